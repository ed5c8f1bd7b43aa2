"""oases_fx/moe.py on traced graphs (single process): 3-D expert parameters behind a grouped matmul
(transformers' grouped_mm_fallback, aten._grouped_mm) are one MLP region per MoE layer, gate_up
column-parallel per piece (gate, up) and down_proj row-parallel, the routing replicated; the rule's
sharding reproduces the unsharded op; other experts implementations are declined naming the fix."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from oases_fx import moe
from oases_fx.passes.annotate_sharding import annotate_sharding_pass, coverage, find_tmp_regions
from oases_fx.passes.shard import shard_tensor
from oases_fx.plan import Plan
from oases_fx.propagation import linear_parts
from oases_fx.tracing import capture

pytest.importorskip("transformers")
from tests import zoo  # noqa: E402

aten = torch.ops.aten
E, H, I, S = 4, 16, 16, 12  # experts, hidden, intermediate, routed pairs (aten._grouped_mm wants 16-byte strides)


def _trace_zoo(name, dtype=torch.float32):
    m = zoo.build(name).to(dtype)
    idx = torch.randint(0, zoo.VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    return capture(m, (), dict(input_ids=idx, labels=idx)).gm


def _check_moe_regions(gm, op):
    regions, declined = find_tmp_regions(gm, 2)
    assert declined == []
    mlps = [r for r in regions if r.kind == "mlp"]
    assert [r.name for r in mlps] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    for r in mlps:
        (col,) = r.columns
        assert col.target is op and r.row.target is op
        assert r.blocks == 4  # one block per expert
        _, w_col, _, layout = linear_parts(col)
        _, w_row, _, _ = linear_parts(r.row)
        assert layout == "eoi" and w_col.target.endswith("experts.gate_up_proj")
        st = r.state
        assert st.weight_dim[w_col] == 1 and st.weight_dim[w_row] == 2  # gate_up out dim, down in dim
        assert st.pieces[col] == [zoo.INTER, zoo.INTER]  # gate and up, each sharded
        assert st.placement[col] == 1 and st.rows == [r.row]
        routing = {n.target for n in r.nodes}  # the router, sort and offsets stay outside: replicated
        assert not routing & {aten.topk.default, aten.sort.default, aten.histc.default, aten.cumsum.default}
    return regions


def test_mixtral_grouped_mm_fallback_is_one_mlp_region_per_layer():
    gm = _trace_zoo("mixtral")
    _check_moe_regions(gm, torch.ops.transformers.grouped_mm_fallback.default)


def test_mixtral_in_bf16_traces_aten_grouped_mm_with_int32_offsets_and_the_same_rule_applies():
    gm = _trace_zoo("mixtral", torch.bfloat16)  # HF picks torch.nn.functional.grouped_mm for bf16
    regions = _check_moe_regions(gm, aten._grouped_mm.default)
    col = [r for r in regions if r.kind == "mlp"][0].columns[0]
    assert moe._offs(col).meta["val"].dtype == torch.int32


def test_coverage_counts_one_block_per_expert():
    gm = _trace_zoo("olmoe")
    annotate_sharding_pass(gm, plan=Plan(tp_degree=2), tp=2)
    assert coverage(gm.meta["oases"])[:2] == (10, 10)  # 2 attention + 2 layers x 4 experts


def test_batched_mm_experts_are_declined_naming_the_fix_and_counted_per_expert():
    gm = _trace_zoo("mixtral_batched_mm")
    annotate_sharding_pass(gm, plan=Plan(tp_degree=2), tp=2)
    sharded, found, declined = coverage(gm.meta["oases"])
    assert (sharded, found) == (2, 10)
    assert [n for n, _ in declined] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    for _, why in declined:
        assert "gate_up_proj feeds aten.bmm.default" in why and "set_experts_implementation('grouped_mm')" in why


class _Experts(nn.Module):
    """HF's grouped_mm experts reduced to the two matmuls (x already sorted by expert)."""

    def __init__(self, op, transposed=False, dtype=torch.float32):
        super().__init__()
        self.op, self.transposed = op, transposed
        shape_up, shape_down = ((E, H, 2 * I), (E, I, H)) if transposed else ((E, 2 * I, H), (E, H, I))
        self.gate_up_proj = nn.Parameter(torch.randn(shape_up, dtype=dtype) / H ** 0.5)
        self.down_proj = nn.Parameter(torch.randn(shape_down, dtype=dtype) / I ** 0.5)

    def mm(self, x, w, offs):
        w = w if self.transposed else w.transpose(-2, -1)
        if self.op == "aten":
            return torch._grouped_mm(x, w, offs=offs)
        return torch.ops.transformers.grouped_mm_fallback(x, w, offs)

    def forward(self, x, offs):
        gate, up = self.mm(x, self.gate_up_proj, offs).chunk(2, dim=-1)  # (S, I) each
        return self.mm(F.silu(gate) * up, self.down_proj, offs)  # (S, H)


# fp32: sharding only reorders the I-term sums of the row (1e-6 on O(1) values). aten._grouped_mm
# traces only in bf16 (its meta function): two bf16 partial sums added vs one rounding, a few bf16
# ulps (2^-8 relative) of O(1) values; a wrong slice is O(1) off, far outside both.
@pytest.mark.parametrize("op,transposed,dtype,tol", [("fallback", False, torch.float32, 1e-5),
                                                     ("fallback", True, torch.float32, 1e-5),
                                                     ("aten", False, torch.bfloat16, 5e-2)])
def test_the_rule_shards_every_expert_like_the_unsharded_op(op, transposed, dtype, tol):
    """The region found, its weights sliced as the shard pass slices them (per piece on the out dim,
    on the in dim for the row), run per rank: the sum of the ranks' partial outputs is the unsharded
    output."""
    import transformers.integrations.moe  # noqa: F401  (registers transformers::grouped_mm_fallback)

    torch.manual_seed(0)
    model = _Experts(op, transposed, dtype)
    x = torch.randn(S, H, dtype=dtype)
    offs = torch.tensor([3, 3, 8, S], dtype=torch.int32)  # expert 1 gets no rows
    gm = capture(model, (x, offs), {}).gm
    (r,), declined = find_tmp_regions(gm, 2)
    assert not declined and r.kind == "mlp" and r.blocks == E
    st = r.state
    w_col, w_row = r.weights()
    col_dim, row_dim = moe.EXPERT_LAYOUTS["eio" if transposed else "eoi"]
    assert (st.weight_dim[w_col], st.weight_dim[w_row]) == (col_dim, row_dim)
    assert st.pieces[r.columns[0]] == [I, I]
    want = model(x, offs)
    tp = 2
    parts = []
    for rank in range(tp):
        local = _Experts(op, transposed, dtype)
        local.gate_up_proj = nn.Parameter(shard_tensor(model.gate_up_proj.detach(), col_dim, rank, tp, (I, I)))
        local.down_proj = nn.Parameter(shard_tensor(model.down_proj.detach(), row_dim, rank, tp))
        parts.append(local(x, offs))
    torch.testing.assert_close(sum(parts), want, atol=tol, rtol=tol)
    # gate_up cut in two halves instead of per piece (rank 0 all gate, rank 1 all up) is O(1) off
    for rank, local in enumerate([_Experts(op, transposed, dtype) for _ in range(tp)]):
        local.gate_up_proj = nn.Parameter(shard_tensor(model.gate_up_proj.detach(), col_dim, rank, tp))
        local.down_proj = nn.Parameter(shard_tensor(model.down_proj.detach(), row_dim, rank, tp))
        parts[rank] = local(x, offs)
    assert (sum(parts) - want).abs().max() > 0.3


def test_a_sharded_input_to_a_column_expert_matmul_is_incompatible():
    import transformers.integrations.moe  # noqa: F401

    from oases_fx.propagation import Incompatible, ShardState, propagate_node

    model = _Experts("fallback")
    gm = capture(model, (torch.randn(S, H), torch.tensor([3, 3, 8, S], dtype=torch.int32)), {}).gm
    (r,), _ = find_tmp_regions(gm, 2)
    col = r.columns[0]
    st = ShardState(tp=2)
    st.weight_dim[linear_parts(col)[1]] = 1
    st.placement[linear_parts(col)[0]] = 1  # the activation arrives sharded on its hidden dim
    with pytest.raises(Incompatible, match="gets a sharded input"):
        propagate_node(col, st)


@pytest.mark.parametrize("weight_dim,x_dim,want", [
    (1, None, 1),  # column ("eoi": the out dim is 1): the output sharded on its last dim
    (2, 1, None),  # row: a partial sum
    (None, None, None),  # replicated weight and input
    (1, 1, "column-parallel expert matmul {} gets a sharded input"),
    (2, 0, "row-parallel expert matmul {} gets an input not sharded on its last dim"),
    (None, 0, "grouped matmul {} with a replicated expert weight gets a sharded input"),  # routed rows: no batch dim
])
def test_expert_matmul_rule_column_row_replicated_and_declines(weight_dim, x_dim, want):
    """The expert matmul shares linear_rule's column and row cases (rules.parallel_weight_rule) but
    not its replicated-weight case, and its messages name it as an expert matmul."""
    import transformers.integrations.moe  # noqa: F401

    from oases_fx.propagation import Incompatible, ShardState, propagate_node

    model = _Experts("fallback")
    gm = capture(model, (torch.randn(S, H), torch.tensor([3, 3, 8, S], dtype=torch.int32)), {}).gm
    (r,), _ = find_tmp_regions(gm, 2)
    col = r.columns[0]
    x, w = linear_parts(col)[:2]
    st = ShardState(tp=2)
    if weight_dim is not None:
        st.weight_dim[w] = weight_dim
    st.placement[x] = x_dim
    if isinstance(want, str):
        with pytest.raises(Incompatible) as e:
            propagate_node(col, st)
        assert str(e.value) == want.format(col.name)
        return
    propagate_node(col, st)
    assert st.placement[col] == want
    assert (st.origin.get(col) is col) == (weight_dim == 1) and (st.rows == [col]) == (weight_dim == 2)


def test_declined_block_count_takes_expert_matrices_not_every_3d_parameter():
    """coverage's "N of M blocks" counts a declined MoE region once per expert, from its 3-D
    parameters. Only parameters used as expert matrices count: LFM2's short-conv weight (C, 1, K),
    squeezed and used per channel, once counted as C blocks ("3 of 67 blocks sharded")."""
    from oases_fx.passes.annotate_sharding import _declined_blocks
    from oases_fx.tracing import capture

    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 8, 8))

        def forward(self, x):
            return sum(x @ self.w[e] for e in range(self.w.shape[0]))  # HF's eager expert loop

    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 1, 3))

        def forward(self, x):  # a depthwise causal conv written by hand, as HF's reference kernel
            w = self.weight.squeeze(1)
            return x * w[:, 0] + x.roll(1, -1) * w[:, 1]

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts, self.conv = Experts(), Conv()

        def forward(self, x):
            return self.conv(self.experts(x)).sum()

    gm = capture(M(), (torch.randn(2, 8),), {}).gm
    assert _declined_blocks(gm, [("experts", "why"), ("conv", "why")]) == {"experts": 4}
