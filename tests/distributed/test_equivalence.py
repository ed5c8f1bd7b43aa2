"""The compiled sharded model equals the unsharded eager model: loss, logits, every gradient.

Tolerances (fp32 throughout): sharding changes only the order of floating-point additions, in
the row-parallel matmul (each rank sums half the contraction) and in the all-reduce that adds
the halves. Each reordered sum of n fp32 terms of size ~|x| moves the result by ~n * 2^-24 * |x|,
which for these sizes (contractions <= 256, values O(1), gradients O(1e-2)) stays below 1e-6
absolute. We allow atol=2e-5, rtol=1e-4: an order of magnitude of headroom for the chained
layers, and still five orders below the size of the values, so a wrong shard, a missing or
double all-reduce (a factor of 2 or 1/tp) or a bias counted twice fails loudly.

The four properties search (tests/conftest.py): 50 examples each per run, a fresh seed per run;
each example draws a shape from the session's pool and its own weight and data seeds, and the
ranks reuse the program compiled for that shape (tasks.compare_with_reference(cache=True)).
"""
import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests import tasks
from tests.conftest import get_pool, shape_pool

ATOL, RTOL = 2e-5, 1e-4


def assert_matches(r, steps=1):
    torch.testing.assert_close(r["losses"], r["ref_losses"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(r["logits"], r["ref_logits"], atol=ATOL, rtol=RTOL)
    assert set(r["grads"]) == set(r["ref_grads"]), "parameter names differ from the original model's"
    for name, ref in r["ref_grads"].items():
        assert r["grads"][name] is not None, f"{name}: no gradient"
        torch.testing.assert_close(r["grads"][name], ref, atol=ATOL, rtol=RTOL, msg=lambda m: f"grad {name}: {m}")
    assert list(r["params"]) == list(r["ref_params"]), "full_state_dict keys differ from the original model's"
    for name, ref in r["ref_params"].items():
        torch.testing.assert_close(r["params"][name], ref, atol=ATOL * steps, rtol=RTOL,
                                   msg=lambda m: f"param {name}: {m}")


def _product(**axes):
    """Every combination of the axes' values, as dicts."""
    return [dict(zip(axes, vals)) for vals in itertools.product(*axes.values())]


# The shape space (576 GPT shapes). Each session compiles a few of them, chosen by its seed
# (conftest.shape_pool); every example draws one of those and fresh weights, inputs and targets.
GPT_SHAPES = _product(n_layer=[1, 2], n_head=[4, 8], head_dim=[4, 8], seq=[8, 16], batch=[4, 8], bias=[False, True],
                      k=[1, 2, 4], recompute=["none", "fine", "full"])
HF_GPT2_SHAPES = _product(n_head=[4, 8], n_layer=[1, 2], k=[1, 2])
HF_LLAMA_SHAPES = _product(heads=[(4, 2), (4, 4), (8, 2)], n_layer=[1, 2], k=[1, 2])
seeds = st.integers(0, 2 ** 31 - 1)


def _schedule(s):
    return dict(num_sub_batches=s["k"], recompute=s["recompute"])


def _gpt_cfg(s, seed):
    return dict(vocab_size=64, block_size=16, n_layer=s["n_layer"], n_head=s["n_head"],
                n_embd=s["n_head"] * s["head_dim"], bias=s["bias"], seed=seed)


@given(s=st.sampled_from(shape_pool("gpt_tp2", GPT_SHAPES, 6)), seed=seeds, data_seed=seeds)
def test_plain_gpt_tp2_matches_unsharded(s, seed, data_seed):
    r = get_pool(2).run(tasks.compare_with_reference, kind="gpt", cfg=_gpt_cfg(s, seed), batch=s["batch"],
                        seq=s["seq"], steps=2, compile_kwargs=_schedule(s), data_seed=data_seed, cache=True)[0]
    assert_matches(r, steps=2)


@given(s=st.sampled_from(shape_pool("gpt_tp4", GPT_SHAPES, 2)), seed=seeds, data_seed=seeds)
def test_plain_gpt_tp4_matches_unsharded(s, seed, data_seed):
    r = get_pool(4).run(tasks.compare_with_reference, kind="gpt", cfg=_gpt_cfg(s, seed), batch=s["batch"],
                        seq=s["seq"], compile_kwargs=_schedule(s), data_seed=data_seed, cache=True)[0]
    assert_matches(r)


@given(s=st.sampled_from(shape_pool("hf_gpt2", HF_GPT2_SHAPES, 3)), seed=seeds, data_seed=seeds)
def test_hf_gpt2_tp2_matches_unsharded(s, seed, data_seed):
    n_head, n_layer, k = s["n_head"], s["n_layer"], s["k"]
    cfg = dict(vocab_size=64, block_size=16, n_layer=n_layer, n_head=n_head, n_embd=8 * n_head, seed=seed)
    r = get_pool(2).run(tasks.compare_with_reference, kind="hf_gpt2", cfg=cfg, batch=4, seq=8, data_seed=data_seed,
                        compile_kwargs=dict(num_sub_batches=k, recompute="fine" if k > 1 else "none"), cache=True)[0]
    assert_matches(r)
    assert "c_attn.weight S(1) interleaved" in r["explain"]  # Conv1D: (in, out) weight, fused qkv


@given(s=st.sampled_from(shape_pool("hf_llama", HF_LLAMA_SHAPES, 3)), seed=seeds, data_seed=seeds)
def test_hf_llama_gqa_tp2_matches_unsharded(s, seed, data_seed):
    (n_head, n_kv), n_layer, k = s["heads"], s["n_layer"], s["k"]
    cfg = dict(vocab_size=64, block_size=16, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv, n_embd=8 * n_head,
               seed=seed)
    r = get_pool(2).run(tasks.compare_with_reference, kind="hf_llama", cfg=cfg, batch=4, seq=8, data_seed=data_seed,
                        compile_kwargs=dict(num_sub_batches=k, recompute="fine" if k > 1 else "none"), cache=True)[0]
    assert_matches(r)


def test_hf_llama_tp4_matches_unsharded():
    cfg = dict(vocab_size=64, block_size=16, n_layer=1, n_head=8, n_kv_head=4, n_embd=64)
    r = get_pool(4).run(tasks.compare_with_reference, kind="hf_llama", cfg=cfg, batch=2, seq=8)[0]
    assert_matches(r)


def test_dp2_tp2_mesh_averages_gradients():
    cfg = dict(vocab_size=64, block_size=16, n_layer=1, n_head=4, n_embd=32)
    # Each dp rank sees its half of a batch of 4; the reference sees the whole batch, so matching
    # gradients prove the dp average (a sum would be 2x off).
    r = get_pool(4).run(tasks.compare_with_reference, kind="gpt", cfg=cfg, batch=2, seq=8, mesh_shape=(2, 2),
                        steps=2)[0]
    assert_matches(r, steps=2)


@pytest.mark.slow
def test_plain_gpt_tp2_inductor_matches_unsharded():
    cfg = dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32)
    r = get_pool(2).run(tasks.compare_with_reference, kind="gpt", cfg=cfg, batch=4, seq=8, backend="inductor",
                        compile_kwargs=dict(num_sub_batches=2, recompute="fine"))[0]
    assert_matches(r)
    # 2 layers x 2 regions x 2 sub-batches; fine recompute adds no collective to the backward
    assert "8 all-reduces in forward, 8 in backward" in r["explain"]


def test_auto_plan_measures_cpu_and_stays_correct():
    # plan="auto": the planner profiles ops and the gloo all-reduce on these ranks, searches k,
    # recompute and shard/replicate per region, and whatever it picks must still be exact.
    cfg = dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32)
    r = get_pool(2).run(tasks.compare_with_reference, kind="gpt", cfg=cfg, batch=4, seq=8,
                        compile_kwargs=dict(plan="auto"))[0]
    assert_matches(r)
    assert "predicted" in r["explain"].lower() or "step" in r["explain"].lower()


def test_auto_plan_with_the_whole_search_space_stays_correct():
    # planner_degrees="all" and vocab-parallel searched too: the planner measures the subgroup
    # collectives (all-gather / all-reduce over the cross groups) and whatever it picks is exact.
    cfg = dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32)
    r = get_pool(2).run(tasks.compare_with_reference, kind="gpt", cfg=cfg, batch=4, seq=8,
                        compile_kwargs=dict(plan="auto", planner_degrees="all",
                                            planner_vocab_parallel=(False, True)))[0]
    assert_matches(r)
    assert "predicted" in r["explain"].lower()


def test_tp8_and_dp2_tp4_match_unsharded():
    # The 4- and 8-GPU machines are withheld; the sharding itself is checked at those degrees here.
    pool = get_pool(8)
    cfg = dict(vocab_size=64, block_size=16, n_layer=2, n_head=8, n_embd=64)
    r = pool.run(tasks.compare_with_reference, kind="gpt", cfg=cfg, batch=4, seq=8,
                 compile_kwargs=dict(num_sub_batches=2, recompute="fine"))[0]
    assert_matches(r)
    cfg = dict(vocab_size=64, block_size=16, n_layer=1, n_head=8, n_kv_head=8, n_embd=64)
    assert_matches(pool.run(tasks.compare_with_reference, kind="hf_llama", cfg=cfg, batch=2, seq=8)[0])
    cfg = dict(vocab_size=64, block_size=16, n_layer=1, n_head=4, n_embd=32)
    assert_matches(pool.run(tasks.compare_with_reference, kind="gpt", cfg=cfg, batch=2, seq=8, mesh_shape=(2, 4))[0])


def test_compile_frees_the_full_weights_it_sharded():
    r = get_pool(2).run(tasks.full_weights_released)[0]
    assert r["sharded"] and r["released"] == r["sharded"], "every sharded weight, and only those, released"
    assert r["shapes_kept"] and r["tied"]
    assert r["max_err"] == 0.0  # gathered shards are the original values, bit for bit


def test_other_input_shapes_and_eval_mode_retrace_onto_the_same_shards():
    r = get_pool(2).run(tasks.new_shapes_and_eval)[0]
    assert r["programs"] == 2  # the training shape, then (eval, batch 2, seq 4)
    assert r["same_params"], "the retraced program must use the shards the optimizer holds"
    assert r["err"] < ATOL
