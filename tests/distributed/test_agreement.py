"""Ranks that must agree are checked before anything talks: every rank raises the same
PlanMismatchError naming what differs and which ranks (oases_fx.agreement)."""
import pytest
import torch

from tests import tasks_safety as T
from tests.conftest import get_pool


def _both_raise(results, what):
    assert results[0] is not None and results[1] is not None, f"compile did not raise on every rank: {results}"
    for kind, msg, *_ in results:
        assert kind == "PlanMismatchError", msg
        assert what in msg and "rank 0:" in msg and "rank 1:" in msg and "Fix" in msg, msg
    return results[0][1]


def test_identical_ranks_compile():
    # the control: the same model, inputs and options on both ranks compile without complaint
    assert get_pool(2).run(T.disagree_at_compile, case="same") == [None, None]


def test_ranks_seeded_differently():
    msg = _both_raise(get_pool(2).run(T.disagree_at_compile, case="seed"), "weights")
    assert "c_attn.weight" in msg and "manual_seed" in msg


def test_ranks_with_different_generator_state_and_dropout():
    # replicated dropout would draw different masks on the TMP ranks: refused, naming the fix
    msg = _both_raise(get_pool(2).run(T.disagree_at_compile, case="rng"), "rng")
    assert "manual_seed" in msg and "weights" not in msg.split("Fix")[0]


@pytest.mark.parametrize("case, what, detail", [
    ("seq_auto", "inputs", "(4, 16) int64"),       # a different sequence length on rank 1
    ("k_auto", "options", "num_sub_batches=2"),    # a different k on rank 1
    ("dtype_auto", "graph", "parameters bfloat16"),  # a bf16 model on rank 1
])
def test_auto_plan_inputs_differ_before_planner(case, what, detail):
    # plan="auto": the planner's collectives would run first (gloo: "Received data size doesn't match")
    msg = _both_raise(get_pool(2).run(T.disagree_at_compile, case=case), what)
    assert detail in msg


def test_ranks_fed_different_batches_first_call():
    got = get_pool(2).run(T.disagree_on_batch)
    msg = _both_raise(got, "batch")
    assert got[0][2] == 0 and "input 0" in msg and "'dp' rank only" in msg


def test_check_every_call_catches_later_batches():
    # the default checks the first call only (second call differs: not seen); "every" sees it
    assert get_pool(2).run(T.disagree_on_batch, second_differs=True) == [None, None]
    got = get_pool(2).run(T.disagree_on_batch, second_differs=True, check_inputs="every")
    _both_raise(got, "batch")
    assert got[0][2] == 1


def test_input_that_starts_requiring_grad_retraces_with_its_all_reduce():
    # compiled with x.requires_grad=False, called with True: a new program (f's backward all-reduce
    # of x's gradient where x enters the column linear); today's key ignored requires_grad
    r = get_pool(2).run(T.input_grad_after_compile)[0]
    assert r["programs"] == 2
    # float32, a 16-wide MLP: sharded matmuls + one all-reduce reorder sums only (~1e-7 relative)
    torch.testing.assert_close(r["grad"], r["ref_grad"], rtol=1e-5, atol=1e-6)
