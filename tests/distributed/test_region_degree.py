"""Per-region TMP degree (Oases): a region at degree d < T shards d-ways and runs 1/(T/d) of the
batch; the compiled model must still equal the unsharded eager model.

Compared as in test_equivalence (same tolerances, same reasons: sharding and the batch split
only reorder fp32 additions; a missing or doubled cross-group gradient sum is a factor of T/d, a
wrong chunk or gather order moves whole rows). Every plan goes through JSON first (round-trip).
"""
import pytest
import torch

from tests import tasks_degree
from tests.conftest import get_pool
from tests.distributed.test_equivalence import assert_matches

GPT = dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32)


@pytest.mark.parametrize("degrees,k,recompute,bias", [
    ([(1, 2)], 1, "none", True),
    ([(1, 2)], 2, "fine", False),
    ([(1, 1)], 2, "none", True),
    ([(1, 1)], 1, "fine", True),
])
def test_gpt_tp2_lower_degrees_match_unsharded(degrees, k, recompute, bias):
    r = get_pool(2).run(tasks_degree.compare_with_degrees, kind="gpt", cfg=dict(GPT, bias=bias), batch=4, seq=8,
                        degrees=degrees, k=k, recompute=recompute, steps=2)[0]
    assert_matches(r, steps=2)
    assert "transformer.h.0.attn [attention, TMP degree 1 x 2 batch chunks]" in r["explain"]
    if degrees == [(1, 2)] and k == 1:
        # forward: one g per MLP; backward: f per MLP and one cross-group gradient sum per attention
        # parameter (4 with biases), all inside the AOTAutograd graphs where the schedule sees them
        assert "2 all-reduces in forward, 10 in backward" in r["explain"]


def test_gpt_tp4_mixed_degrees_match_unsharded():
    r = get_pool(4).run(tasks_degree.compare_with_degrees, kind="gpt", cfg=GPT, batch=8, seq=8,
                        degrees=[(1, 2), (4, 2)], k=2, recompute="fine")[0]
    assert_matches(r)
    assert "transformer.h.0.mlp [mlp, TMP degree 2 x 2 batch chunks]" in r["explain"]
    assert "transformer.h.1.attn [attention, TMP degree 4]" in r["explain"]


def test_dp2_tp2_mesh_with_lower_degree_matches_unsharded():
    # Subgroups are made for every TMP group of the 2-D mesh; dp averaging runs on top.
    cfg = dict(GPT, n_layer=1)
    r = get_pool(4).run(tasks_degree.compare_with_degrees, kind="gpt", cfg=cfg, batch=2, seq=8,
                        degrees=[(1, 2)], mesh_shape=(2, 2))[0]
    assert_matches(r)


def test_hf_llama_gqa_tp2_lower_degree_matches_unsharded():
    cfg = dict(vocab_size=64, block_size=16, n_layer=1, n_head=4, n_kv_head=2, n_embd=32)
    r = get_pool(2).run(tasks_degree.compare_with_degrees, kind="hf_llama", cfg=cfg, batch=4, seq=8,
                        degrees=[(1, 2)], k=2, recompute="fine")[0]
    assert_matches(r)


def test_skip_collectives_keeps_shapes_and_checkpoints_roundtrip():
    r = get_pool(2).run(tasks_degree.skip_collectives_shapes, cfg=dict(GPT, n_layer=1), batch=4, seq=8,
                        degrees=[(1, 2)], k=2)[0]
    assert r["logits"] == (4, 8, 64) and r["loss"] == ()
    assert r["grads_fit"]
    assert r["checkpoint_roundtrip"] and r["full_shapes"] == r["model_shapes"]
    assert "collectives SKIPPED" in r["explain"]


def _both(results):
    assert all(x is not None for x in results), "compile did not raise"
    assert len({x[0] for x in results}) == 1
    return results[0]


def test_batch_not_divisible_by_k_times_chunks_names_the_region():
    kind, msg = _both(get_pool(2).run(tasks_degree.degree_error, case="batch"))
    assert kind == "InputError"
    assert "transformer.h.0.attn" in msg and "TMP degree 1" in msg and "k*n=4" in msg and "Fix" in msg


def test_heads_not_divisible_by_region_degree():
    kind, msg = _both(get_pool(4).run(tasks_degree.degree_error, case="heads"))
    assert kind == "ShardingError"
    assert "region 'proj' planned at TMP degree 2" in msg and "heads" in msg and "Fix" in msg


def test_region_without_batch_input_at_lower_degree():
    kind, msg = _both(get_pool(2).run(tasks_degree.degree_error, case="no_batch"))
    assert kind == "ShardingError" and "region 'fc2'" in msg and "batch dim" in msg and "Fix" in msg


def test_degree_not_dividing_tp():
    kind, msg = get_pool(4).run(tasks_degree.degree_error, case="degree")[0]
    assert kind == "ValueError" and "does not divide" in msg
