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
    assert kind == "RuntimeError" and "Timed out" in msg, (kind, msg)
    print(f"rank 0 raised after {waited_s:.1f} s: {msg}")
