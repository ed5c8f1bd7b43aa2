"""The schedule on the real pipeline's AOTAutograd graphs (k=2): collectives overlap compute."""
from tests import tasks
from tests.conftest import get_pool


def test_k2_every_collective_but_the_last_has_a_matmul_before_its_wait():
    res = get_pool(2).run(tasks.schedule_order, k=2, recompute="none")[0]
    for stage in ("forward", "backward"):
        covered = res[stage]
        assert len(covered) == 8, f"{stage}: expected 2 layers x 2 regions x 2 sub-batches all-reduces"
        # Oases: only the last collective of each pass may stay exposed.
        assert all(covered[:-1]), f"{stage}: exposed collectives at {[i for i, c in enumerate(covered) if not c]}"
    assert res["png_bytes"] > 1000  # the timeline picture is one call away


def test_k1_has_nothing_to_overlap_in_forward():
    # With one sub-batch the forward all-reduce of a row linear feeds the very next op (the
    # residual add): nothing may move between issue and wait, and the schedule must not pretend.
    res = get_pool(2).run(tasks.schedule_order, k=1, recompute="none")[0]
    assert not any(res["forward"])
