"""plan.vocab_parallel: Megatron's vocab-parallel embedding, LM head and cross-entropy, checked
against the unsharded eager model (fp32, aot_eager) on gloo ranks.

Tolerances are test_equivalence's (atol=2e-5, rtol=1e-4) and for the same reason: fp32 with
contractions <= 128 and O(1) values stays below 1e-6 absolute. The vocab-parallel cross-entropy
adds only a different summation order (the sum of exp is T partial sums over V/T columns, all
shifted by the same global max; the target logit is picked exactly on one rank and summed with
zeros), a relative change of ~V * 2^-24 in the log-sum-exp. A wrong vocabulary range, a missing
all-reduce (the embedding of every id owned elsewhere is zero; the loss misses T-1 partial
sums), a double-counted tied gradient or an ignore_index counted in the mean is off by O(1e-2)
or more and fails.
"""
import torch

from tests import tasks_vocab
from tests.conftest import get_pool
from tests.distributed.test_equivalence import ATOL, assert_matches

GPT = dict(vocab_size=64, block_size=16, n_layer=1, n_head=4, n_embd=32)


def _check(r, tp, *, steps=2, weights=("lm_head.weight",)):
    assert_matches(r, steps=steps)
    assert r["reload_ok"], "load_full_state_dict(full_state_dict()) must give back the same shards"
    for name in weights:  # this rank's rows of the vocabulary
        assert r["local_shapes"][name] == (GPT["vocab_size"] // tp, GPT["n_embd"]), (name, r["local_shapes"][name])
    assert r["vocab_top"] == 3, "embedding, cross-entropy and the all-gather of the returned logits"
    assert r["vocab_in_ckpt"] == 0, "vocab collectives must stay outside the checkpointed sub-batch span"
    assert "Vocab-parallel" in r["explain"] and "all-gathered along the vocabulary" in r["explain"]


def _all_ranks_same_loss(results):
    for other in results[1:]:
        torch.testing.assert_close(other["loss"], results[0]["loss"], atol=0, rtol=0)


def test_plain_gpt_tied_tp2_with_ignore_index():
    # The returned logits also feed the backward here: checks gather_from_tp's backward (own slice).
    res = get_pool(2).run(tasks_vocab.compare_vocab_parallel, kind="gpt", cfg=GPT, batch=4, seq=8, ignored=2,
                          logits_in_loss=True)
    _check(res[0], 2, weights=("lm_head.weight", "transformer.wte.weight"))  # tied: both keys sharded
    _all_ranks_same_loss(res)
    assert "transformer.wte.weight = lm_head.weight" in res[0]["explain"] or \
        "lm_head.weight = transformer.wte.weight" in res[0]["explain"]


def test_plain_gpt_tied_tp2_sub_batches_fine_recompute():
    cfg = dict(GPT, n_layer=2)
    r = get_pool(2).run(tasks_vocab.compare_vocab_parallel, kind="gpt", cfg=cfg, batch=4, seq=8, k=2,
                        recompute="fine")[0]
    _check(r, 2, weights=("lm_head.weight", "transformer.wte.weight"))
    assert "split" in r["explain"] and "fine recompute" in r["explain"]
    # The one analysis (oases_fx.analysis) says what it found: batch dims from this trace alone.
    assert "Analysis (4 TMP regions found at degree 2" in r["explain"]
    assert "batch dims propagated from the inputs (one trace)" in r["explain"]
    assert "vocab-parallel: pattern found" in r["explain"] and "tied" in r["explain"]


def test_plain_gpt_tp4():
    res = get_pool(4).run(tasks_vocab.compare_vocab_parallel, kind="gpt", cfg=GPT, batch=4, seq=8, ignored=1)
    _check(res[0], 4, weights=("lm_head.weight", "transformer.wte.weight"))
    _all_ranks_same_loss(res)


def test_hf_gpt2_tied_tp2():
    r = get_pool(2).run(tasks_vocab.compare_vocab_parallel, kind="hf_gpt2", cfg=GPT, batch=4, seq=8, k=2,
                        recompute="full", ignored=2)[0]
    _check(r, 2, weights=("lm_head.weight", "transformer.wte.weight"))


def test_hf_llama_untied_tp2_labels_with_ignore_index():
    cfg = dict(GPT, n_kv_head=2)
    r = get_pool(2).run(tasks_vocab.compare_vocab_parallel, kind="hf_llama", cfg=cfg, batch=4, seq=8, k=2,
                        recompute="fine", ignored=3)[0]
    _check(r, 2, weights=("lm_head.weight", "model.embed_tokens.weight"))  # untied: two tables
    # HF's masks (an expand of an arange to the batch) are found by propagation, not a second trace
    assert "Analysis (2 TMP regions found at degree 2; batch dims propagated from the inputs (one trace))" \
        in r["explain"]


def test_log_softmax_nll_sum_untied_with_lm_head_bias():
    # log_softmax + nll_loss_nd(reduction="sum") / count; the embedding feeds a TMP region directly
    # (its all-reduced output is split into sub-batches).
    r = get_pool(2).run(tasks_vocab.compare_vocab_parallel, kind="nll_lm", cfg=GPT, batch=4, seq=8, k=2,
                        recompute="fine", ignored=2)[0]
    _check(r, 2, weights=("head.weight", "emb.weight"))
    assert r["local_shapes"]["head.bias"] == (GPT["vocab_size"] // 2,)
    assert "reduction sum" in r["explain"]


def _both(results):
    assert results[0] is not None and results[1] is not None, "compile did not raise"
    assert results[0][0] == results[1][0]
    return results[0]


def test_vocab_not_divisible_by_tp():
    kind, msg = _both(get_pool(2).run(tasks_vocab.vocab_error, kind="gpt", cfg=dict(GPT, vocab_size=65)))
    assert kind == "ShardingError" and "V=65" in msg and "not divisible by the TMP degree 2" in msg
    assert "pad the vocabulary to a multiple of 2" in msg


def test_no_embedding_lm_head_pair():
    kind, msg = _both(get_pool(2).run(tasks_vocab.vocab_error, kind="no_embedding", cfg={}))
    assert kind == "ShardingError" and "no token embedding / LM head pair" in msg and "aten.embedding" in msg


def test_label_smoothing_is_refused_naming_the_node():
    kind, msg = _both(get_pool(2).run(tasks_vocab.vocab_error, kind="smoothing", cfg=dict(vocab_size=8)))
    assert kind == "ShardingError" and "label_smoothing=0.1" in msg and "cross_entropy" in msg
    assert "tests/tasks_vocab.py" in msg and "Fix" in msg


def test_skip_collectives_keeps_shapes_and_changes_values():
    # The floor benchmark: the same graph without communication. Proves the comparison above can fail.
    r = get_pool(2).run(tasks_vocab.compare_vocab_parallel, kind="gpt", cfg=GPT, batch=4, seq=8, steps=1,
                        skip=True)[0]
    assert r["logits"].shape == r["ref_logits"].shape
    assert not torch.allclose(r["losses"], r["ref_losses"], atol=1e-3)


def test_retrace_with_other_shapes_after_a_step():
    # eval mode, batch 2, seq 4: traced and rewritten again (V/T in the new shape constants), bound
    # to the shards the optimizer updated.
    r = get_pool(2).run(tasks_vocab.retrace_after_step)[0]
    assert r["programs"] == 2
    assert r["err"] < ATOL


def test_dp2_tp2_mesh():
    # Each dp rank sees half the batch; gradients averaged over dp, vocab collectives over tp only.
    from oases_fx.plan import Plan
    from tests import tasks

    r = get_pool(4).run(tasks.compare_with_reference, kind="gpt", cfg=GPT, batch=2, seq=8, mesh_shape=(2, 2),
                        steps=2, compile_kwargs=dict(plan=Plan(tp_degree=2, vocab_parallel=True)))[0]
    assert_matches(r, steps=2)
    assert "Vocab-parallel" in r["explain"]
