"""compile_layers="reuse" (oases_fx/layers.py) on gloo ranks: the program cut per block, identical
blocks compiled once, still equals the unsharded eager model (loss, logits, every gradient, and
the parameters after SGD steps). Tolerances: test_equivalence's (sharding reorders sums only)."""
import pytest

from tests import tasks
from tests.conftest import get_pool
from tests.distributed.test_equivalence import assert_matches


@pytest.mark.parametrize("recompute", ["none", "fine", "full"])
def test_reused_blocks_match_unsharded(recompute):
    # 3 layers: blocks 0 and 1 share one artifact, so block 1 runs code compiled for block 0 with its own weights
    cfg = dict(vocab_size=64, block_size=16, n_layer=3, n_head=4, n_embd=32, bias=True, seed=7)
    r = get_pool(2).run(tasks.compare_with_reference, kind="gpt", cfg=cfg, batch=4, seq=8, steps=2,
                        compile_kwargs=dict(num_sub_batches=2, recompute=recompute, compile_layers="reuse"))[0]
    assert_matches(r, steps=2)
    expect = 4 if recompute == "none" else 5  # fine/full: block 0's first checkpoint starts after its ln_1
    assert f"compiled per block (compile_layers='reuse'): 5 pieces (3 blocks, prologue, epilogue) of {expect} " \
           "distinct structures" in r["explain"], r["explain"]


def test_reused_blocks_match_unsharded_hf_llama():
    # Llama's rotary tables and masks are computed once (prologue) and read by every block
    cfg = dict(vocab_size=64, block_size=16, n_layer=3, n_head=4, n_kv_head=2, n_embd=32, seed=3)
    r = get_pool(2).run(tasks.compare_with_reference, kind="hf_llama", cfg=cfg, batch=4, seq=8, steps=1,
                        compile_kwargs=dict(num_sub_batches=2, compile_layers="reuse"))[0]
    assert_matches(r)
    assert "5 pieces (3 blocks, prologue, epilogue) of 4 distinct structures" in r["explain"], r["explain"]


def meta_gpt_reuse(rank, world_size, *, cfg, batch, seq):
    """A GPT built under torch.device("meta") and compiled with compile_layers="reuse": its shards are
    allocated after compile (oases_fx.loading) and loaded with load_full_state_dict; the pieces must
    read those, not the fake tensors seen at compile time. Loss, logits, grads vs the full model."""
    import oases_fx
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    ref = tasks.build_model("gpt", cfg)
    with torch.device("meta"):
        meta = tasks.build_model("gpt", cfg)
    g = torch.Generator().manual_seed(9)
    idx = torch.randint(0, cfg["vocab_size"], (batch, seq), generator=g)
    tgt = torch.randint(0, cfg["vocab_size"], (batch, seq), generator=g)
    m = oases_fx.compile(meta, mesh, example_inputs=(idx, tgt), num_sub_batches=2, plan="megatron",
                         backend="aot_eager", verbose=False, compile_layers="reuse")
    m.load_full_state_dict(ref.state_dict())
    logits, loss = m(idx, tgt)
    loss.backward()
    r_logits, r_loss = ref(idx, tgt)
    r_loss.backward()
    grads = m.full_grads()
    if rank != 0:
        return None
    return dict(loss=loss.detach(), ref_loss=r_loss.detach(), logits=logits.detach(), ref_logits=r_logits.detach(),
                grads=grads, ref_grads={k: p.grad for k, p in ref.named_parameters()}, explain=m.explain())


def test_meta_device_model_reads_the_loaded_shards():
    import torch

    from tests.distributed.test_equivalence import ATOL, RTOL

    cfg = dict(vocab_size=64, block_size=16, n_layer=3, n_head=4, n_embd=32, bias=True)
    r = get_pool(2).run(meta_gpt_reuse, cfg=cfg, batch=4, seq=8)[0]
    assert "of 4 distinct structures" in r["explain"]
    torch.testing.assert_close(r["loss"], r["ref_loss"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(r["logits"], r["ref_logits"], atol=ATOL, rtol=RTOL)
    for name, ref in r["ref_grads"].items():
        torch.testing.assert_close(r["grads"][name], ref, atol=ATOL, rtol=RTOL, msg=lambda m: f"grad {name}: {m}")
