"""Per-region TMP degree on one process: the graph rewrites (roles, shapes, batch-split rule).

The collectives are the skip_* stand-ins (no process group of size T exists here), which keep
every shape right by design; values are checked by tests/distributed/test_region_degree.py.
"""
import pytest

from oases_fx import meta
from oases_fx.api import batch_dims
from oases_fx.errors import InputError
from oases_fx.mesh import DegreeGroups
from oases_fx.passes.annotate_sharding import annotate_sharding_pass
from oases_fx.passes.graph_utils import is_segment_end
from oases_fx.passes.insert_collectives import insert_collectives_pass
from oases_fx.passes.shard import shard_pass
from oases_fx.passes.split_sub_batches import check_batch_splits, split_sub_batches_pass
from oases_fx.plan import Plan, RegionPlan
from tests.unit.graphs import single_rank_group, traced_gpt


def _lower_degree_gm(k, batch=4):
    """TINY GPT at T=2, rank 0: every attention at d=1 (2 batch chunks), every MLP at d=2."""
    model, traced, idx = traced_gpt(batch=batch)
    gm = traced.gm
    plan = Plan(tp_degree=2, num_sub_batches=k, regions=tuple(
        r for i in range(2) for r in (RegionPlan(name=f"transformer.h.{i}.attn", kind="attention", tp_degree=1),
                                      RegionPlan(name=f"transformer.h.{i}.mlp", kind="mlp"))))
    gm.meta.setdefault("oases", {})["batch_dims"] = batch_dims(model, (idx, idx.clone()), {}, gm)
    annotate_sharding_pass(gm, plan=plan, tp=2)
    shard_pass(gm, rank=0, tp=2)
    groups = {1: DegreeGroups(d=1, n=2, chunk=0, shard=0, inner_group_name=None, cross_group_name="unused")}
    insert_collectives_pass(gm, group_name=single_rank_group().group_name, skip=True, subgroups=groups)
    split_sub_batches_pass(gm, num_sub_batches=k, batch_size=batch)
    return gm, idx


def _roles(gm, region):
    out = {}
    for n in gm.graph.nodes:
        if meta.get(n).region == region and meta.get(n).role:
            out[meta.get(n).role] = out.get(meta.get(n).role, 0) + 1
    return out


@pytest.mark.parametrize("k", [1, 2])
def test_degree_one_region_is_scattered_gathered_and_its_parameters_cross_summed(k):
    gm, idx = _lower_degree_gm(k)
    attn = _roles(gm, "transformer.h.0.attn")
    assert attn.get("batch_scatter") == k and attn.get("batch_gather") == k
    assert attn.get("copy_to_cross") == 4  # c_attn/c_proj weight and bias: shared by the k copies
    assert "reduce_from_tp" not in attn and "copy_to_tp" not in attn  # d=1: no inner group
    mlp = _roles(gm, "transformer.h.0.mlp")
    assert "batch_scatter" not in mlp and mlp.get("reduce_from_tp") == k
    ends = [n for n in gm.graph.nodes if is_segment_end(n) and meta.get(n).region == "transformer.h.0.attn"]
    assert ends and all(meta.get(n).role == "batch_gather" for n in ends)
    assert gm.meta["oases"]["param_degree"]["transformer.h.0.attn.c_proj.weight"] == 1
    assert "transformer.h.0.attn.c_proj.weight" not in gm.meta["oases"]["sharded_params"]  # full weight
    assert tuple(gm.get_parameter("transformer.h.0.mlp.c_fc.weight").shape) == (64, 32)  # d=2 shard of 128
    logits, loss = gm(idx, idx.clone())  # skip stand-ins keep the shapes
    assert tuple(logits.shape) == (4, 8, 64) and loss.dim() == 0


def test_batch_split_rule_names_region_degree_and_fix():
    check_batch_splits(8, 2, [("a.attn", 1, 4)])
    with pytest.raises(InputError, match=r"region 'a\.attn' runs at TMP degree 1.*k\*n=8.*Fix"):
        check_batch_splits(4, 2, [("a.attn", 1, 4)])


def test_plan_with_degrees_round_trips_and_hashes_differently():
    plan = Plan(tp_degree=4, regions=(RegionPlan(name="a", kind="mlp", tp_degree=2), RegionPlan(name="b", kind="mlp")))
    back = Plan.from_json(plan.to_json())
    assert back == plan and back.region_degree("a") == 2 and back.region_degree("b") == 4
    assert Plan(tp_degree=4, regions=(RegionPlan(name="a", kind="mlp"), RegionPlan(name="b", kind="mlp"))).digest() \
        != plan.digest()
