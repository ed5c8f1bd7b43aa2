"""The planner's host order (cost_model's event template) against the order schedule_overlap gives a
real graph: the planner predicts the schedule the pass produces, so the two must agree."""
import re

import pytest

from oases_fx.passes.schedule_overlap import ScheduleOptions, schedule_overlap_pass
from oases_fx.planner import cost_model
from tests.unit.test_schedule_overlap import _chains_interleaved, _chains_sequential, _inputs, _labels, _trace
from tests.unit.test_schedule_overlap import group_name  # noqa: F401  (the 1-rank gloo group fixture)


def _collapse(events):
    out = []
    for e in events:
        if not out or out[-1] != e or e[0] != "F":
            out.append(e)
    return out


def _planner_forward(k, num_regions, max_in_flight):
    """(kind, region, sub-batch) of the planner's forward events: F compute, AR issue, W wait
    (glue, the ops after a region's all-reduce, has no counterpart in the chain graph)."""
    tpl = cost_model._build_template(k, "none", ((True, False, False),) * num_regions, outside=False,
                                     max_in_flight=max_in_flight)
    out = []
    for n in tpl.nodes:
        name = n.name
        if name.startswith(("glue_bwd", "bwd", "wgrad", "recompute")):
            break  # the backward starts
        m = re.search(r"\.r(\d+)\.s(\d+)$", name)
        r, j = int(m.group(1)), int(m.group(2))
        if name.startswith("fwd."):
            out.append(("F", r, j))
        elif name.startswith("wait_"):
            out.append(("W", r, j))
        elif name.startswith("ar_"):
            out.append(("AR", r, j))
    return _collapse(out)


def _schedule_forward(gm, k):
    out = []
    for label in _labels(gm, k):
        m = re.match(r"([A-H])(\d+) (\w+)", label)
        j, r, kind = "ABCDEFGH".index(m.group(1)), int(m.group(2)), m.group(3)
        out.append(({"ar": "AR", "wait": "W"}.get(kind, "F"), r, j))
    return _collapse(out)


@pytest.mark.parametrize("builder", [_chains_sequential, _chains_interleaved])
@pytest.mark.parametrize("k,max_in_flight", [(2, 2), (3, 2), (4, 2), (3, 3), (4, 1)])
def test_planner_host_order_is_schedule_overlaps(group_name, builder, k, max_in_flight):  # noqa: F811
    depth = 3  # regions: relu -> mm -> all-reduce, k sub-batch chains
    gm = _trace(builder(group_name, k, depth), _inputs(k, depth))
    schedule_overlap_pass(gm, options=ScheduleOptions(max_in_flight=max_in_flight))
    assert _schedule_forward(gm, k) == _planner_forward(k, depth, max_in_flight)


def test_planner_bound_is_the_pass_default():
    assert cost_model.MAX_IN_FLIGHT == ScheduleOptions().max_in_flight
