"""Fault injection: a rank that fails does not leave the others waiting; the step's own errors
reach the caller unwrapped. Each test runs in a fresh 2-rank pool (closed after), so a hang or a
broken communicator cannot reach the shared pools; the pool's per-task timeout bounds each test."""
import pytest

from tests import tasks_safety as T


@pytest.fixture(scope="module")
def fresh_pool():
    from tests.pool import RankPool

    pool = RankPool(2)
    yield pool
    pool.close()


def test_rank_failing_in_compile_stops_the_other(fresh_pool):
    r0, r1 = fresh_pool.run(T.fault_in_compile, failing_rank=1)
    assert r1 == ("RuntimeError", "injected fault on rank 1")
    assert r0 is not None, "rank 0 compiled and would block in its first collective"
    kind, msg = r0
    assert kind == "OasesError" and "rank 1" in msg and "injected fault on rank 1" in msg


def test_pass_error_inside_torch_compile_is_raised_as_itself(fresh_pool):
    for kind, msg in fresh_pool.run(T.fault_in_backend_pass):
        assert kind == "OasesError" and msg == "injected pass failure", (kind, msg)


def test_rank_skipping_a_backward_stops_the_other_within_the_group_timeout():
    # Rank 1 runs step 2's forward and skips backward(): rank 0's backward all-reduce has no partner.
    # The documented bound is the TMP process group's timeout (here 10 s; 30 min by default, set it in
    # init_process_group): rank 0 must get an error, not hang. The pool's task timeout bounds the test.
    from tests.pool import RankPool

    pool = RankPool(2, timeout_s=10)
    try:
        r0, r1 = pool.run(T.skip_backward, skipping_rank=1)
    finally:
        pool.close()
    assert r1 is None
    assert r0 is not None, "rank 0's backward returned although rank 1 never reached its all-reduce"
    kind, msg, waited_s = r0
    # raised from inside autograd's engine, translated by the compiled backward's guard (backend.py)
    assert kind == "OasesError" and "backward of call 2" in msg and "skipped a backward()" in msg, (kind, msg)
    assert "Timed out" in msg, msg  # the collective's own error, kept in the message
    print(f"rank 0 raised after {waited_s:.1f} s: {msg}")


# --- the bound of CompileConfig.collective_timeout_s (oases_fx.watchdog) --------------------------
BOUND_S = 10.0  # short, for the test; long enough that step 1's compile on a loaded 2-core machine fits


def _run_fresh(task, **kw):
    """Run `task` in a fresh 2-rank pool whose default group's timeout (120 s) is far above the bound,
    so an error within the bound can only come from oases_fx's own groups."""
    from tests.pool import RankPool

    pool = RankPool(2, timeout_s=120)
    try:
        return pool.run(task, timeout_s=BOUND_S, **kw)
    finally:
        pool.close()


def test_rank_failing_in_a_forward_stops_the_other_with_its_error():
    r0, r1 = _run_fresh(T.fault_in_forward, failing_rank=1)
    assert r1 is not None and r1[:2] == ("ValueError", "injected user error on rank 1"), r1  # innermost cause
    assert r0 is not None, "rank 0's forward returned although rank 1 never reached its all-reduce"
    kind, msg, waited = r0
    assert kind == "OasesError", (kind, msg)
    assert "rank 1 failed in the forward of call 2" in msg and "injected user error on rank 1" in msg, msg
    assert "forward of call 2" in msg and "collective_timeout_s" in msg and f"{BOUND_S:g} s" in msg, msg
    print(f"rank 0 raised after {waited:.1f} s (bound {BOUND_S} s): {msg}")


def test_rank_skipping_a_backward_gets_the_bound_not_a_30_minute_wait():
    # Rank 1 runs step 2's forward and skips backward(): rank 0's backward all-reduce has no partner.
    # The default group's timeout is 120 s: an error from within the 10 s bound is oases_fx's group.
    r0, r1 = _run_fresh(T.skip_backward_bounded, skipping_rank=1)
    assert r1 is None
    assert r0 is not None, "rank 0's backward returned although rank 1 never reached its all-reduce"
    kind, msg, waited, lines = r0
    # The timeout leaves the compiled backward inside torch's autograd engine; the compiled backward's
    # guard (oases_fx/backend.py) raises it as the OasesError naming the phase and the bound.
    assert kind == "OasesError" and f"Timed out waiting {int(BOUND_S * 1000)}ms" in msg, (kind, msg)
    assert "backward of call 2" in msg and "skipped a backward()" in msg and "collective_timeout_s" in msg, msg
    said = [ln for ln in lines if "backward of call 2" in ln and "no TMP peer reported an error" in ln]
    assert said and "skipped a backward()" in said[0] and "collective_timeout_s" in said[0], lines
    print(f"rank 0 raised after {waited:.1f} s (bound {BOUND_S} s): {msg}\n  logged: {said[0]}")


def test_rank_failing_in_a_backward_is_named_and_stopped_at_its_next_call():
    r0, r1 = _run_fresh(T.fault_in_backward, failing_rank=1)
    (kind1, msg1, _), nxt1, _ = r1
    assert (kind1, msg1) == ("ValueError", "injected backward error on rank 1")  # its own error, unwrapped
    # its loop went on: the next call refuses to run collectives that would pair with rank 0's backward
    assert nxt1 is not None and nxt1[0] == "OasesError" and "backward of call 2 raised on this rank" in nxt1[1], nxt1
    # The hook fires on a gradient the compiled backward hands out after its all-reduces: rank 0's
    # backward completed; what matters is that rank 1's next call stops instead of pairing its
    # collectives with rank 0's next ones.
    got0, _, _ = r0
    assert got0 is None, got0
    print(f"rank 1's next call raised: {nxt1[1]}")


def test_rank_failing_in_the_planner_stops_the_other_with_its_error():
    r0, r1 = _run_fresh(T.fault_in_planner, failing_rank=1)
    assert r1 is not None and r1[:2] == ("RuntimeError", "injected planner fault on rank 1"), r1
    assert r0 is not None, "rank 0's compile returned although rank 1 failed in the planner"
    kind, msg, waited = r0
    assert kind == "OasesError", (kind, msg)
    assert "rank 1 failed in the planner's collectives" in msg and "injected planner fault on rank 1" in msg, msg
    assert "collective_timeout_s" in msg, msg
    print(f"rank 0 raised after {waited:.1f} s (bound {BOUND_S} s): {msg}")
