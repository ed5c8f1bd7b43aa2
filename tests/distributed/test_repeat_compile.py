"""compile_layers="reuse" (oases_fx/layers.py) on gloo ranks: the program cut per block, identical
blocks compiled once, still equals the unsharded eager model (loss, logits, every gradient, and
the parameters after SGD steps). Tolerances: test_equivalence's (sharding reorders sums only)."""
import pytest

from tests import tasks, tasks_loading
from tests.conftest import get_pool
from tests.distributed.test_equivalence import assert_matches


@pytest.mark.parametrize("recompute", ["none", "fine", "full"])
def test_reused_blocks_match_unsharded(recompute):
    # 3 layers: blocks 0 and 1 share one artifact, so block 1 runs code compiled for block 0 with its own weights
    cfg = dict(vocab_size=64, block_size=16, n_layer=3, n_head=4, n_embd=32, bias=True, seed=7)
    r = get_pool(2).run(tasks.compare_with_reference, kind="gpt", cfg=cfg, batch=4, seq=8, steps=2,
                        compile_kwargs=dict(num_sub_batches=2, recompute=recompute, compile_layers="reuse"))[0]
    assert_matches(r, steps=2)
    # every block one structure (the split on block 0's input, the cat after the last residual add)
    assert "compiled per block (compile_layers='reuse'): 5 pieces (3 blocks, prologue, epilogue) of 3 " \
           "distinct structures" in r["explain"], r["explain"]


def test_reused_blocks_match_unsharded_hf_llama():
    # Llama's rotary tables and masks are computed once (prologue) and read by every block
    cfg = dict(vocab_size=64, block_size=16, n_layer=3, n_head=4, n_kv_head=2, n_embd=32, seed=3)
    r = get_pool(2).run(tasks.compare_with_reference, kind="hf_llama", cfg=cfg, batch=4, seq=8, steps=1,
                        compile_kwargs=dict(num_sub_batches=2, compile_layers="reuse"))[0]
    assert_matches(r)
    assert "5 pieces (3 blocks, prologue, epilogue) of 3 distinct structures" in r["explain"], r["explain"]


def test_meta_device_model_reads_the_loaded_shards():
    import torch

    from tests.distributed.test_equivalence import ATOL, RTOL

    cfg = dict(vocab_size=64, block_size=16, n_layer=3, n_head=4, n_embd=32, bias=True)
    # its shards are allocated after compile (oases_fx.loading): the pieces must read those, not the
    # fake tensors seen at compile time
    r = get_pool(2).run(tasks_loading.meta_plain_gpt_full_state_dict, cfg=cfg, batch=4, seq=8,
                        compile_kwargs=dict(compile_layers="reuse"))[0]
    assert "of 3 distinct structures" in r["explain"]
    torch.testing.assert_close(r["loss"], r["ref_loss"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(r["logits"], r["ref_logits"], atol=ATOL, rtol=RTOL)
    for name, ref in r["ref_grads"].items():
        torch.testing.assert_close(r["grads"][name], ref, atol=ATOL, rtol=RTOL, msg=lambda m: f"grad {name}: {m}")
