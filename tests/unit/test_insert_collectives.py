import torch

from oases_fx import runtime
from oases_fx.passes.annotate_sharding import annotate_sharding_pass, find_tmp_regions
from oases_fx.passes.insert_collectives import insert_collectives_pass
from oases_fx.passes.shard import shard_pass
from oases_fx.plan import Plan, RegionPlan
from tests.unit.graphs import single_rank_group, traced_gpt


def _rewritten(tp=1):
    model, traced, idx = traced_gpt()
    gm = traced.gm
    regions, _ = find_tmp_regions(gm, tp)
    plan = Plan(tp_degree=tp, regions=tuple(RegionPlan(name=r.name, kind=r.kind) for r in regions))
    annotate_sharding_pass(gm, plan=plan, tp=tp)
    shard_pass(gm, rank=0, tp=tp)
    group = single_rank_group()
    insert_collectives_pass(gm, group_name=group.group_name)
    return model, gm, idx


def test_one_f_and_one_g_per_region_with_bias_after_g():
    _, gm, _ = _rewritten()
    gm.graph.lint()
    fs = [n for n in gm.graph.nodes if n.target is runtime.copy_to_tp]
    gs = [n for n in gm.graph.nodes if n.target is runtime.reduce_from_tp]
    assert len(fs) == 4 and len(gs) == 4
    for g in gs:
        (user,) = g.users
        assert user.target is torch.ops.aten.add.Tensor and user.args[1].op == "get_attr"  # bias after g
        assert len(g.args[0].args) == 2  # the row linear lost its bias


def test_tp1_rewrite_equals_original_model_exactly():
    # With one rank the collectives are identities, so values must match bit for bit: the rewrite
    # (bias moved after g, f inserted) changes nothing but the order of one addition.
    model, gm, idx = _rewritten(tp=1)
    logits, loss = gm(idx, idx.clone())
    ref_logits, ref_loss = model(idx, idx.clone())
    torch.testing.assert_close(logits, ref_logits, atol=1e-6, rtol=1e-6)
    loss.backward()
    ref_loss.backward()
    for (name, p), (_, q) in zip(gm.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-6, msg=name)
