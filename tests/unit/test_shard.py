import torch
from hypothesis import given
from hypothesis import strategies as st

from oases_fx import _compat
from oases_fx.passes.annotate_sharding import annotate_sharding_pass, find_tmp_regions
from oases_fx.passes.shard import shard_pass, shard_tensor, unshard_tensors
from oases_fx.plan import Plan, RegionPlan
from tests.unit.graphs import traced_gpt


@given(tp=st.sampled_from([1, 2, 4]), dim=st.sampled_from([0, 1]),  # pieces: None or any split of 24 into multiples of 4
       pieces=st.one_of(st.none(), st.integers(0, 31).map(lambda cuts: tuple(4 * (b - a) for a, b in zip(
           [0] + [i + 1 for i in range(5) if cuts >> i & 1], [i + 1 for i in range(5) if cuts >> i & 1] + [6])))))
def test_shard_then_unshard_is_identity(tp, pieces, dim):
    full = torch.randn(24, 24)
    shards = [shard_tensor(full, dim, r, tp, pieces) for r in range(tp)]
    assert all(s.shape[dim] == 24 // tp for s in shards)
    assert torch.equal(unshard_tensors(shards, dim, pieces), full)


def test_interleaved_shard_takes_each_piece():
    full = torch.arange(12.0)
    assert shard_tensor(full, 0, 1, 2, (4, 4, 4)).tolist() == [2, 3, 6, 7, 10, 11]


def test_shard_pass_makes_local_params_and_shapes():
    _, traced, idx = traced_gpt()
    gm = traced.gm
    regions, _ = find_tmp_regions(gm, 2)
    plan = Plan(tp_degree=2, regions=tuple(RegionPlan(name=r.name, kind=r.kind) for r in regions))
    annotate_sharding_pass(gm, plan=plan, tp=2)
    shard_pass(gm, rank=1, tp=2)
    gm.graph.lint()
    assert gm.get_parameter("transformer.h.0.attn.c_attn.weight").shape == (48, 32)
    assert gm.get_parameter("transformer.h.0.attn.c_proj.weight").shape == (32, 16)
    assert gm.get_parameter("transformer.h.0.mlp.c_fc.bias").shape == (64,)
    assert gm.get_parameter("transformer.h.0.attn.c_proj.bias").shape == (32,)  # row bias stays whole
    views = [n.args[1] for n in gm.graph.nodes if n.target is torch.ops.aten.view.default]
    assert [2, 8, 2, 8] in views and [2, 8, 4, 8] not in views
    # The rewritten graph runs with local shapes (without collectives: values are partial sums).
    _compat.fake_tensor_prop(gm, idx, idx)
