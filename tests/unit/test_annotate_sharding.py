import torch

from oases_fx import meta
from oases_fx.passes.annotate_sharding import annotate_sharding_pass, find_tmp_regions
from oases_fx.plan import Plan, RegionPlan
from tests.unit.graphs import traced_gpt


def test_finds_attention_and_mlp_pairs_per_block():
    _, traced, _ = traced_gpt()
    regions, declined = find_tmp_regions(traced.gm, 2)
    assert [(r.name, r.kind) for r in regions] == [
        ("transformer.h.0.attn", "attention"), ("transformer.h.0.mlp", "mlp"),
        ("transformer.h.1.attn", "attention"), ("transformer.h.1.mlp", "mlp"),
    ]
    attn = regions[0]
    assert attn.state.pieces[attn.columns[0]] == [32, 32, 32]  # fused qkv: interleaved shard
    assert declined == []


def test_tags_weights_and_region_nodes():
    _, traced, _ = traced_gpt()
    gm = traced.gm
    regions, _ = find_tmp_regions(gm, 2)
    plan = Plan(tp_degree=2, regions=tuple(RegionPlan(name=r.name, kind=r.kind) for r in regions))
    annotate_sharding_pass(gm, plan=plan, tp=2)
    gm.graph.lint()
    by_target = {n.target: meta.get(n) for n in gm.graph.nodes if n.op == "get_attr"}
    assert by_target["transformer.h.0.attn.c_attn.weight"].placement == "S(0)"
    assert by_target["transformer.h.0.attn.c_attn.weight"].pieces == (32, 32, 32)
    assert by_target["transformer.h.0.attn.c_proj.weight"].role == "row"
    assert by_target["transformer.h.0.attn.c_proj.bias"].role == "row_bias"
    assert by_target["lm_head.weight"].placement is None  # replicated
    sdpa = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default)
    assert meta.get(sdpa).placement == "S(1)" and meta.get(sdpa).region == "transformer.h.0.attn"


def test_plan_replicating_a_region_is_respected_and_explained():
    _, traced, _ = traced_gpt()
    gm = traced.gm
    regions, _ = find_tmp_regions(gm, 2)
    plan = Plan(tp_degree=2, regions=tuple(RegionPlan(name=r.name, kind=r.kind, shard=r.kind == "attention")
                                           for r in regions))
    annotate_sharding_pass(gm, plan=plan, tp=2)
    assert [r.name for r in gm.meta["oases"]["regions"]] == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert ("transformer.h.0.mlp", "replicated by the plan") in gm.meta["oases"]["declined"]
