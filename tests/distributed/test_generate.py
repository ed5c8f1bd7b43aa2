"""Inference on the compiled model: batches that k does not divide, .to() after compile, HF generate().

Tolerances as in test_equivalence.py (fp32, atol=2e-5, rtol=1e-4: sharding only reorders sums).
Generated tokens are compared exactly: greedy argmax over logits that agree to ~1e-6 picks the same
token unless two logits tie that closely, which the fixed seeds here do not produce (a failure
would show the first differing position).
"""
import pytest
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


@pytest.mark.extended  # the rule is covered in CI by the plain-GPT and degree tests
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


def test_hf_gpt2_double_after_compile_recompiles_and_matches():
    # fp64 on both sides: the bounds above hold with orders of magnitude to spare
    r = get_pool(2).run(tasks_loading.convert_after_compile, kind="hf_gpt2", cfg=GPT, how="double")[0]
    assert r["dtypes"] == ["torch.float64"] and r["same_params"] and r["programs"] == 2
    _assert_close(r)
    name, msg = r["error"]
    assert name == "OasesError" and "before compile" in msg, msg


def test_hf_gpt2_bfloat16_after_compile_matches():
    r = get_pool(2).run(tasks_loading.convert_after_compile, kind="hf_gpt2", cfg=GPT, how="bfloat16")[0]
    assert r["dtypes"] == ["torch.bfloat16"]
    # bf16 has an 8-bit mantissa (relative step 2^-8 = 3.9e-3); sharding reorders bf16 sums over
    # contractions of 32-128 terms, so logits (O(1)) may differ by a few bf16 steps: atol 5e-2 is ~13 steps
    # at |x|~1 and still fails a wrong shard or a dtype not applied (which move logits by O(1))
    torch.testing.assert_close(r["loss"].float(), r["ref_loss"].float(), atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(r["logits"].float(), r["ref_logits"].float(), atol=5e-2, rtol=2e-2)


def _assert_generate(r, prompt_len, new_tokens):
    for mode in ("greedy", "sample"):
        got, want = r[mode]
        assert got.shape == want.shape == (want.shape[0], prompt_len + new_tokens), (got.shape, want.shape)
        assert torch.equal(got, want), f"{mode}: first difference at {(got != want).nonzero()[:1].tolist()}"
    assert r["config_delegated"]


def test_hf_gpt2_generate_greedy_and_sampling_equal_unsharded_bounded_traces():
    # prompt 5 + 20 new tokens: lengths 5..24 fall in buckets 16 and 32, so at most 2 new programs
    # (one per bucket), where a retrace per token would compile 20
    r = get_pool(2).run(tasks_loading.generate_matches, kind="hf_gpt2", cfg=dict(GPT, block_size=32),
                        prompt_len=5, new_tokens=20)[0]
    _assert_generate(r, 5, 20)
    # HF generate calls the model at lengths 5..24; each pads to its bucket: one program per bucket
    from oases_fx.generation import bucket_length

    buckets = {bucket_length(n, 32) for n in range(5, 5 + 20)}
    assert r["new_programs"] == len(buckets) == 2, (r["new_programs"], buckets)


def test_hf_llama_generate_batch_of_3_equal_unsharded():
    cfg = dict(vocab_size=64, block_size=32, n_layer=1, n_head=4, n_embd=32)
    r = get_pool(2).run(tasks_loading.generate_matches, kind="hf_llama", cfg=cfg, prompt_len=4, new_tokens=8,
                        batch=3)[0]
    _assert_generate(r, 4, 8)
    assert r["new_programs"] == 1, r["new_programs"]  # lengths 4..11: one bucket (16)
