"""Inference on the compiled model: batches that k does not divide, .to() after compile, HF generate().

Tolerances as in test_equivalence.py (fp32, atol=2e-5, rtol=1e-4: sharding only reorders sums).
Generated tokens are compared exactly: greedy argmax over logits that agree to ~1e-6 picks the same
token unless two logits tie that closely, which the fixed seeds here do not produce (a failure
would show the first differing position).
"""
import torch

from tests import tasks_loading
from tests.conftest import get_pool

ATOL, RTOL = 2e-5, 1e-4
GPT = dict(vocab_size=64, block_size=16, n_layer=1, n_head=4, n_embd=32)


def _assert_close(r):
    torch.testing.assert_close(r["loss"], r["ref_loss"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(r["logits"], r["ref_logits"], atol=ATOL, rtol=RTOL)
    if r["grads"] is not None:
        for name, ref in r["ref_grads"].items():
            torch.testing.assert_close(r["grads"][name], ref, atol=ATOL, rtol=RTOL, msg=lambda m: f"grad {name}: {m}")


def test_last_batch_of_3_with_k2_and_single_prompt_eval():
    r = get_pool(2).run(tasks_loading.odd_batches, kind="gpt", k=2, batches=[4, 3], eval_batches=[1], cfg=GPT)[0]
    for res in r["results"]:
        _assert_close(res)
    full, odd = r["results"][0], r["results"][1]
    assert any("into 2 sub-batches" in n for n in full["notes"]), full["notes"]
    assert not any("sub-batches" in n and "split" in n for n in odd["notes"]), odd["notes"]  # ran with k=1


def test_hf_gpt2_batch_of_6_with_k4_runs_with_k3():
    cfg = dict(vocab_size=64, block_size=16, n_layer=1, n_head=4, n_embd=32)
    r = get_pool(2).run(tasks_loading.odd_batches, kind="hf_gpt2", k=4, batches=[6], cfg=cfg)[0]
    _assert_close(r["results"][0])
    assert any("into 3 sub-batches" in n for n in r["results"][0]["notes"]), r["results"][0]["notes"]


def test_region_below_full_degree_odd_batch_rule_and_error():
    r = get_pool(2).run(tasks_loading.odd_batch_degree, cfg=GPT)[0]
    _assert_close(r)  # batch 2: k=1, the degree-1 attention still cut into its 2 chunks
    name, msg = r["error"]
    assert name == "InputError" and "transformer.h.0.attn" in msg and "k*n" in msg, msg
