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


def test_weight_gradients_do_not_wait_for_the_end_of_the_backward():
    # Work that feeds no collective (weight gradients) is scheduled next to the collective its
    # inputs lead to, not after everything: deferring it kept every output gradient alive to the
    # end (predicted backward peak of live intermediates 2.1x the unscheduled order's here, and
    # +63 % at h=2048), at no cost in overlap (same hidden share in the same simulation).
    for link, min_hidden in ((250.0, 0.9), (27.5, 0.3)):  # NVLink-like; PCIe-class (comm-bound here)
        res = get_pool(2).run(tasks.schedule_memory, link_gb_s=link)[0]
        bw = res["backward"]
        assert bw["after"] <= 1.15 * bw["before"], f"{link} GB/s: backward peak {bw['after']} vs {bw['before']}"
        assert bw["hidden"] >= min_hidden, f"{link} GB/s: backward hides {bw['hidden']:.2f} of its communication"
        assert res["forward"]["after"] <= 1.15 * res["forward"]["before"]
