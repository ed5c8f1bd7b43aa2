"""The sharding rules one family at a time (oases_fx.rules), on one-op fx graphs (single process).

Each accepted placement is checked by computing: every rank runs the op on its block of the input,
with the shape arguments its family localises, and must get its block of the full result along
the placement's dim. Declined cases check the error text (explain() and the region reasons show
it). The view rule is compared with DTensor's own (through oases_fx._compat) on random shapes.
"""
import math
import operator

import pytest
import torch
import torch.fx as fx
from hypothesis import assume, given
from hypothesis import strategies as st

from oases_fx import _compat, rules
from oases_fx.errors import ShardingError
from oases_fx.propagation import RULES, Incompatible, ShardState, UnknownOp, propagate_node, register_rule
from oases_fx.rules import _Indivisible, localise, view_dim_map

aten = torch.ops.aten


# --- one-op graphs ----------------------------------------------------------------------------------
def _build(target, args, kwargs=None):
    """(node, inputs): a graph calling `target` once; every tensor argument (also inside a list) is a
    placeholder whose val is a meta tensor of its shape, and the node's val is the op run on them."""
    g, inputs = fx.Graph(), []

    def lift(a):
        if isinstance(a, torch.Tensor):
            n = g.placeholder(f"x{len(inputs)}")
            n.meta["val"] = a.to("meta")
            inputs.append(n)
            return n
        if isinstance(a, (list, tuple)):
            return type(a)(lift(v) for v in a)
        return a

    kwargs = kwargs or {}
    node = g.call_function(target, tuple(lift(a) for a in args), {k: lift(v) for k, v in kwargs.items()})
    metas = [a.to("meta") if isinstance(a, torch.Tensor) else
             [v.to("meta") if isinstance(v, torch.Tensor) else v for v in a] if isinstance(a, (list, tuple)) else a
             for a in args]
    node.meta["val"] = target(*metas, **{k: v.to("meta") if isinstance(v, torch.Tensor) else v
                                         for k, v in kwargs.items()})
    return node, inputs


def _propagate(target, args, placements, tp=2, kwargs=None, **state):
    node, inputs = _build(target, args, kwargs)
    s = ShardState(tp=tp, **state)
    for n, p in zip(inputs, placements):
        s.placement[n] = p
    propagate_node(node, s)
    return node, s


def _blocks_agree(target, x, dim, tp, args=(), kwargs=None):
    """Propagate Shard(dim) of x through target(x, *args); then each rank computing the op on its
    block (shape arguments localised by the op's family) must get its block of the full result
    along the propagated dim. Returns that dim."""
    node, s = _propagate(target, (x,) + tuple(args), [dim], tp, kwargs)
    o = s.placement[node]
    assert isinstance(o, int), (target, o)
    got = localise(node, {o: tp}, from_trace=True)
    local_args = got[0][1:] if got else args
    full = target(x, *args, **(kwargs or {}))
    for r in range(tp):
        mine = target(x.chunk(tp, dim)[r], *local_args, **(kwargs or {}))
        torch.testing.assert_close(mine, full.chunk(tp, o)[r], rtol=0, atol=0)
    return o


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


# --- per family: accepted placements, checked by computing ---------------------------------------------
ACCEPTED = [  # (family, op, input shape, sharded dim, further args)
    ("views", aten.view.default, (2, 8, 12), 2, ([2, 8, 4, 3],)),  # hidden -> (heads, head_dim)
    ("views", aten.reshape.default, (2, 8, 4, 3), 2, ([2, 8, 12],)),  # heads -> hidden
    ("views", aten._unsafe_view.default, (16, 12), 0, ([2, 8, 12],)),  # 2-D back to (B, S, H)
    ("views", aten.view.default, (2, 1, 8, 6), 2, ([2, 8, 6],)),  # size-1 dims skipped
    ("views", aten.view.default, (2, 8, 12), 2, ([2, -1, 4, 3],)),  # -1 made explicit by localise
    ("flatten", aten.flatten.using_ints, (2, 8, 4, 3), 2, (2, 3)),
    ("expand", aten.expand.default, (4, 1, 6), 0, ([3, 4, 5, 6],)),
    ("expand", aten.expand.default, (4, 1, 6), 2, ([4, -1, 5, -1],)),
    ("transpose", aten.transpose.int, (2, 4, 8, 3), 1, (1, 2)),
    ("transpose", aten.transpose.int, (2, 4, 8, 3), 0, (-1, -2)),
    ("transpose", aten.t.default, (4, 6), 1, ()),
    ("transpose", aten.permute.default, (2, 4, 8, 3), 3, ([0, 3, 1, 2],)),
    ("unsqueeze", aten.unsqueeze.default, (2, 4, 6), 1, (1,)),
    ("unsqueeze", aten.unsqueeze.default, (2, 4, 6), 1, (-1,)),
    ("squeeze", aten.squeeze.dim, (2, 1, 6), 2, (1,)),
    ("squeeze", aten.squeeze.dims, (1, 4, 1, 6), 3, ([0, 2],)),
    ("select", aten.select.int, (3, 4, 6), 2, (0, 1)),
    ("select", aten.select.int, (3, 4, 6), 0, (2, -1)),
    ("slice", aten.slice.Tensor, (4, 8, 6), 0, (1, 2, 7)),  # another dim: bounds unchanged
    ("softmax", aten._softmax.default, (2, 4, 6), 1, (-1, False)),
    ("softmax", aten.log_softmax.int, (2, 4, 6), 0, (2,)),
    ("reduce", aten.amax.default, (2, 4, 6), 1, ([2], False)),
    ("reduce", aten.sum.dim_IntList, (2, 4, 6), 2, ([0], True)),
    ("reduce", aten.mean.dim, (4, 3, 6), 0, ([1, 2],)),
    ("norm", aten.layer_norm.default, (4, 3, 6), 0, ([6],)),
    ("norm", aten.rms_norm.default, (2, 4, 6), 1, ([6],)),
    ("view_as_real", aten.view_as_real.default, None, 0, ()),
    ("view_as_complex", aten.view_as_complex.default, (4, 6, 2), 1, ()),
]


@pytest.mark.parametrize("fam,op,shape,dim,args", ACCEPTED, ids=[f"{c[0]}-{i}" for i, c in enumerate(ACCEPTED)])
def test_accepted_placement_gives_each_rank_its_block(fam, op, shape, dim, args):
    assert op in rules.FAMILIES[fam].ops
    x = torch.randn(4, 6, dtype=torch.complex64) if shape is None else _x(*shape)
    _blocks_agree(op, x, dim, 2, args)


def test_view_keeps_the_column_it_comes_from():
    x = _x(2, 8, 12)
    node, s = _build(aten.view.default, (x, [2, 8, 12]))
    st_ = ShardState(tp=2)
    st_.placement[s[0]] = 2
    st_.origin[s[0]] = s[0]
    propagate_node(node, st_)
    assert st_.origin.get(node) is s[0]  # last dim to last dim: still a plain view of the column
    node2, s2 = _build(aten.view.default, (x, [2, 8, 4, 3]))
    st2 = ShardState(tp=2)
    st2.placement[s2[0]] = 2
    st2.origin[s2[0]] = s2[0]
    propagate_node(node2, st2)
    assert node2 not in st2.origin and st2.placement[node2] == 2


def test_stack_and_cat_follow_their_inputs():
    a, b = _x(4, 6), _x(4, 6)
    for op, dim_arg in ((aten.stack.default, -1), (aten.stack.default, 0), (aten.cat.default, 1)):
        node, s = _propagate(op, ([a, b], dim_arg), [0, 0])
        o = s.placement[node]
        full = op([a, b], dim_arg)
        for r in range(2):
            torch.testing.assert_close(op([a.chunk(2, 0)[r], b.chunk(2, 0)[r]], dim_arg), full.chunk(2, o)[r])


def test_split_of_a_column_output_records_its_pieces():
    x = _x(2, 8, 24)
    node, (xn,) = _build(aten.split_with_sizes.default, (x, [8, 8, 8], -1))
    s = ShardState(tp=2)
    s.placement[xn] = 2
    s.origin[xn] = xn
    propagate_node(node, s)
    assert s.placement[node] == (2, 2, 2) and s.pieces[xn] == [8, 8, 8]
    args, note = localise(node, {2: 2})
    assert args[1] == [4, 4, 4] and note == "split [8, 8, 8] -> [4, 4, 4]"
    # another dim: the pieces keep the placement, nothing to record or localise
    node, s = _propagate(aten.split.Tensor, (x, 1, 1), [2])
    assert s.placement[node] == (2,) * 8 and not s.pieces and localise(node, {2: 2}) is None
    node, s = _propagate(aten.chunk.default, (x, 2, 0), [2])
    assert s.placement[node] == (2, 2) and localise(node, {2: 2}) is None  # a count: nothing baked


def test_getitem_takes_its_element_and_origin():
    x = _x(2, 8, 24)
    g = fx.Graph()
    xn = g.placeholder("x")
    xn.meta["val"] = x
    sp = g.call_function(aten.split.Tensor, (xn, 8, -1))
    sp.meta["val"] = list(x.split(8, -1))
    gi = g.call_function(operator.getitem, (sp, 1))
    gi.meta["val"] = sp.meta["val"][1]
    s = ShardState(tp=2)
    s.placement[xn] = 2
    s.origin[xn] = xn
    propagate_node(sp, s)
    propagate_node(gi, s)
    assert s.placement[gi] == 2 and gi not in s.origin  # a split's pieces view no column themselves
    s.origin[sp] = xn  # a tuple-valued op that does view one (an external rule may say so)
    propagate_node(gi, s)
    assert s.origin[gi] is xn
    s.placement[sp] = (2, None, 2)
    del s.origin[gi]
    propagate_node(gi, s)
    assert s.placement[gi] is None and gi not in s.origin


def _slices_graph(bounds, width=24):
    """x (2, 8, width), a column output sharded on dim 2, cut by one slice per (start, end[, step])."""
    g = fx.Graph()
    xn = g.placeholder("x")
    xn.meta["val"] = torch.empty(2, 8, width, device="meta")
    out = []
    for b in bounds:
        n = g.call_function(aten.slice.Tensor, (xn, 2) + tuple(b))
        n.meta["val"] = xn.meta["val"][..., slice(*b)]
        out.append(n)
    s = ShardState(tp=2)
    s.placement[xn] = 2
    s.origin[xn] = xn
    return xn, out, s


def test_slices_of_a_column_output_are_its_pieces():
    xn, sl, s = _slices_graph([(0, 8), (8, 16), (16, 24)])
    for n in sl:
        propagate_node(n, s)
    assert [s.placement[n] for n in sl] == [2, 2, 2] and s.pieces[xn] == [8, 8, 8]
    args, note = localise(sl[1], {2: 2})
    assert args == (xn, 2, 4, 8, 1) and note == "slice [8:16] -> [4:8]"


@pytest.mark.parametrize("bounds,message", [
    ([(0, 8), (4, 24)], "slices of the sharded dim of x overlap or leave a gap at 4"),
    ([(0, 8), (8, 20)], "slices of the sharded dim of x do not cover it"),
    ([(0, 24, 2), (1, 24, 2)], "strided slice (step 2) of the sharded dim"),
    ([(0, 9), (9, 24)], "a slice of 9 of the sharded dim is not divisible by the TMP degree 2"),
])
def test_slices_that_are_no_pieces_decline(bounds, message):
    xn, sl, s = _slices_graph(bounds)
    with pytest.raises(Incompatible) as e:
        for n in sl:
            propagate_node(n, s)
    assert str(e.value) == message


def test_slice_of_a_tensor_that_is_no_column_output():
    xn, sl, s = _slices_graph([(0, 8)])
    del s.origin[xn]
    with pytest.raises(Incompatible, match="^slice of the sharded dim of x, which is not a column linear's output$"):
        propagate_node(sl[0], s)


def _w(g, name, shape):
    w = g.get_attr(name)
    w.meta["val"] = torch.empty(*shape, device="meta")
    return w


def _linear_state(weight_dim, x_dim, shape=(2, 8, 6)):
    g = fx.Graph()
    xn = g.placeholder("x")
    xn.meta["val"] = torch.empty(*shape, device="meta")
    w = _w(g, "w", (4, shape[-1]))
    node = g.call_function(aten.linear.default, (xn, w))
    node.meta["val"] = torch.empty(*shape[:-1], 4, device="meta")
    s = ShardState(tp=2)
    s.placement[xn] = x_dim
    if weight_dim is not None:
        s.weight_dim[w] = weight_dim
    return node, s


def test_linear_column_row_and_replicated_weight():
    node, s = _linear_state(0, None)
    propagate_node(node, s)
    assert s.placement[node] == 2 and s.origin[node] is node  # column: output sharded on its last dim
    node, s = _linear_state(1, 2)
    propagate_node(node, s)
    assert s.placement[node] is None and s.rows == [node]  # row: a partial sum
    node, s = _linear_state(None, 0)
    propagate_node(node, s)
    assert s.placement[node] == 0  # a replicated weight on a batch-sharded input


@pytest.mark.parametrize("weight_dim,x_dim,message", [
    (None, 2, "linear {} contracts over the sharded dim with a replicated weight"),
    (0, 1, "column-parallel {} gets a sharded input"),
    (1, 1, "row-parallel {} gets an input not sharded on its last dim"),
])
def test_linear_declines(weight_dim, x_dim, message):
    node, s = _linear_state(weight_dim, x_dim)
    with pytest.raises(Incompatible) as e:
        propagate_node(node, s)
    assert str(e.value) == message.format(node.name)


def test_matmul_with_a_parameter_weight_is_a_linear_not_a_batch_matmul():
    g = fx.Graph()
    xn = g.placeholder("x")
    xn.meta["val"] = torch.empty(2, 8, 6, device="meta")
    w = _w(g, "w", (6, 4))
    node = g.call_function(aten.matmul.default, (xn, w))
    node.meta["val"] = torch.empty(2, 8, 4, device="meta")
    s = ShardState(tp=2)
    s.placement[xn] = None
    s.weight_dim[w] = 1  # "io" layout: the output dim
    propagate_node(node, s)
    assert s.placement[node] == 2 and s.origin[node] is node


def test_batch_matmul_on_a_shared_batch_dim():
    a, b = _x(2, 4, 8, 3), _x(2, 4, 3, 8)
    node, s = _propagate(aten.matmul.default, (a, b), [1, 1])
    assert s.placement[node] == 1
    full = a @ b
    for r in range(2):
        torch.testing.assert_close(a.chunk(2, 1)[r] @ b.chunk(2, 1)[r], full.chunk(2, 1)[r])
    with pytest.raises(Incompatible, match="^matmul with the sharded dim not a shared batch dim$"):
        _propagate(aten.bmm.default, (_x(4, 8, 3), _x(4, 3, 8)), [0, None])


def test_attention_heads_and_replicated_kv():
    q, k, v = _x(2, 4, 8, 3), _x(2, 4, 8, 3), _x(2, 4, 8, 3)
    node, s = _propagate(aten.scaled_dot_product_attention.default, (q, k, v), [1, 1, 1])
    assert s.placement[node] == 1
    full = torch.ops.aten.scaled_dot_product_attention.default(q, k, v)
    for r in range(2):
        mine = aten.scaled_dot_product_attention.default(*(t.chunk(2, 1)[r] for t in (q, k, v)))
        torch.testing.assert_close(mine, full.chunk(2, 1)[r])
    # kv projections kept replicated (1 kv head for 4 q heads at tp 2): the shard pass slices k and v
    k1, v1 = _x(2, 1, 8, 3), _x(2, 1, 8, 3)
    node, s = _propagate(aten.scaled_dot_product_attention.default, (q, k1, v1), [1, None, None],
                         replicated_columns=frozenset({"kv"}))
    assert s.placement[node] == 1 and [(i, d, qh, h) for _, i, d, qh, h in s.local_slices] == [(1, 1, 4, 1), (2, 1, 4, 1)]
    # every q, k, v replicated under replicate_qkv: attention still runs on this rank's heads
    node, s = _propagate(aten.scaled_dot_product_attention.default, (q, k, v), [None, None, None],
                         replicate_qkv=True)
    assert s.placement[node] == 1 and [a[1] for a in s.local_slices] == [0, 1, 2]


@pytest.mark.parametrize("placements,message", [
    ([1, 2, 1], "attention whose q, k, v are not split alike on a batch or heads dim"),
    ([2, 2, 2], "attention whose q, k, v are not split alike on a batch or heads dim"),  # the sequence dim
    ([1, None, None], "attention whose q, k, v are not split alike on a batch or heads dim"),  # nothing replicated
])
def test_attention_declines(placements, message):
    with pytest.raises(Incompatible) as e:
        _propagate(aten.scaled_dot_product_attention.default, tuple(_x(2, 4, 8, 3) for _ in range(3)), placements)
    assert str(e.value) == message


@pytest.mark.parametrize("q_heads,kv_heads,tp,gqa,message", [
    (4, 2, 2, False, "attention with 2 key/value heads for 4 query heads without enable_gqa"),
    (6, 3, 4, True, "6 attention heads are not divisible by the TMP degree 4"),
    (8, 4, 8, True, None),  # 4 kv heads are shared by pairs of ranks: fine
    (12, 3, 2, True, "3 key/value heads for 12 query heads at TMP degree 2: the key/value heads must divide or be "
                     "divisible by the TMP degree"),
])
def test_attention_over_replicated_kv_heads(q_heads, kv_heads, tp, gqa, message):
    q, kv = _x(2, q_heads, 8, 3), _x(2, kv_heads, 8, 3)
    node, inputs = _build(aten.scaled_dot_product_attention.default, (q, kv, kv), {"enable_gqa": True})
    node.kwargs = {"enable_gqa": gqa}
    s = ShardState(tp=tp, replicated_columns=frozenset({"kv"}))
    s.placement.update({inputs[0]: 1, inputs[1]: None, inputs[2]: None})
    if message is None:
        propagate_node(node, s)
        assert s.placement[node] == 1 and [a[1:] for a in s.local_slices] == [
            (1, 1, q_heads, kv_heads), (2, 1, q_heads, kv_heads)]
        return
    with pytest.raises(Incompatible) as e:
        propagate_node(node, s)
    assert str(e.value) == message


def test_attention_mask_over_the_split_dim_declines():
    q = _x(2, 4, 8, 3)
    with pytest.raises(Incompatible, match=r"^attention mask with the full split dim \(it would need slicing per rank\)$"):
        _propagate(aten.scaled_dot_product_attention.default, (q, q, q, _x(2, 4, 8, 8)), [1, 1, 1, None])
    node, s = _propagate(aten.scaled_dot_product_attention.default, (q, q, q, _x(2, 1, 8, 8)), [1, 1, 1, None])
    assert s.placement[node] == 1  # a mask broadcast over the heads


def test_partial_reduction_over_the_sharded_dim():
    node, s = _propagate(aten.mean.dim, (_x(2, 8, 6), [-1], True), [2])
    assert s.placement[node] is None and s.partial_reductions == [node]  # all-reduced by insert_collectives
    with pytest.raises(Incompatible, match="^reduction over the sharded dim$"):
        _propagate(aten.amax.default, (_x(2, 8, 6), [-1], True), [2])
    with pytest.raises(Incompatible, match="^reduction over the sharded dim$"):
        _propagate(aten.sum.dim_IntList, (_x(2, 8, 6), [1, 2]), [2])  # not the sharded dim alone


def test_native_layer_norm_is_tuple_valued_and_norms_decline():
    node, s = _propagate(aten.native_layer_norm.default, (_x(4, 3, 6), [6], None, None, 1e-5), [0])
    assert s.placement[node] == (0, None, None)
    with pytest.raises(Incompatible) as e:
        _propagate(aten.layer_norm.default, (_x(4, 3, 6), [3, 6]), [1])
    assert str(e.value) == "aten.layer_norm.default normalises over the sharded dim"
    with pytest.raises(Incompatible) as e:
        _propagate(aten.group_norm.default, (_x(2, 4, 6), 2), [0])
    assert str(e.value) == "aten.group_norm.default normalises over the split dim"


def test_new_factories_are_replicated():
    for op, args in ((aten.new_zeros.default, ([3],)), (aten.new_full.default, ([3, 2], 1.0))):
        node, s = _propagate(op, (_x(4, 6),) + args, [0])
        assert s.placement[node] is None


@pytest.mark.parametrize("op,shape,dim,args,message", [
    (aten.squeeze.dim, (2, 1, 6), 1, (1,), "squeeze of the sharded dim"),
    (aten.select.int, (2, 4, 6), 1, (1, 0), "select on the sharded dim"),
    (aten.softmax.int, (2, 4, 6), 2, (-1,), "softmax over the sharded dim"),
    (aten.view_as_complex.default, (4, 6, 2), 2, (), "view_as_complex of the sharded (real, imaginary) dim"),
    (aten.cat.default, None, 0, (0,), "cat of tensors sharded differently or along the sharded dim"),
    (aten.stack.default, None, None, (0,), "stack of tensors sharded differently"),
    (aten.flatten.using_ints, (2, 4, 6), 2, (1, 2),
     "a view regroups the sharded dim 2 of (2, 4, 6) into (2, 24) so that each rank's block is no longer contiguous"),
])
def test_declined_with_its_reason(op, shape, dim, args, message):
    if shape is None:  # a list of two (4, 6) tensors; stack: sharded differently
        ins, pls = ([_x(4, 6), _x(4, 6)],), ([0, 0] if dim == 0 else [0, 1])
    else:
        ins, pls = (_x(*shape),), [dim]
    with pytest.raises(Incompatible) as e:
        _propagate(op, ins + args, pls)
    assert str(e.value) == message


def test_flatten_into_an_indivisible_dim():
    # defensive: only an uneven input shard (3 rows over 2 ranks) can flatten into an indivisible dim
    with pytest.raises(Incompatible) as e:
        _propagate(aten.flatten.using_ints, (_x(2, 3, 1), 1, 2), [1])
    assert str(e.value) == "flatten merges the sharded dim into dim 1 of size 3, not divisible by 2"


def test_view_into_indivisible_heads_is_the_users_error():
    x = _x(2, 8, 24)
    node, (xn,) = _build(aten.view.default, (x, [2, 8, 3, 8]))
    s = ShardState(tp=2)
    s.placement[xn] = 2
    s.origin[xn] = xn
    with pytest.raises(ShardingError) as e:
        propagate_node(node, s)
    assert ("reshapes a tensor sharded over the TMP group: its dim 2 (size 3, the attention heads or key/value "
            "heads here) is not divisible by the TMP degree 2 (the tensor comes from x0). Fix: use a TMP degree "
            "that divides the number of heads and key/value heads, or a plan that replicates this region.") in str(e.value)


def test_view_that_interleaves_ranks_declines():
    with pytest.raises(Incompatible) as e:
        _propagate(aten.view.default, (_x(2, 16, 8), [2, 128]), [2])
    assert str(e.value) == ("a view regroups the sharded dim 2 of (2, 16, 8) into (2, 128) so that each rank's "
                            "block is no longer contiguous")


def test_split_of_the_sharded_dim_declines_or_errs():
    x = _x(2, 8, 18)
    node, (xn,) = _build(aten.split.Tensor, (x, 6, -1))
    s = ShardState(tp=2)
    s.placement[xn] = 2
    with pytest.raises(Incompatible, match="^split of the sharded dim of x0, which is not a column linear's output$"):
        propagate_node(node, s)
    node, (xn,) = _build(aten.split.Tensor, (_x(2, 8, 9), 3, -1))
    s = ShardState(tp=2)
    s.placement[xn] = 2
    with pytest.raises(ShardingError) as e:
        propagate_node(node, s)
    assert "splits a sharded dim into pieces [3, 3, 3]; 3 is not divisible by the TMP degree 2. Fix: use a TMP " \
           "degree that divides the hidden size." in str(e.value)


# --- the generic steps and their precedence --------------------------------------------------------
def test_identity_ops_come_before_the_pointwise_tag():
    assert torch.Tag.pointwise in aten.clone.default.tags  # else this test checks nothing
    x = _x(2, 8, 6)
    node, (xn,) = _build(aten.clone.default, (x,))
    s = ShardState(tp=2)
    s.placement[xn] = 2
    s.origin[xn] = xn
    propagate_node(node, s)
    assert s.placement[node] == 2 and s.origin[node] is xn  # the identity rule keeps the column; pointwise would not


def test_pointwise_broadcasts_and_declines():
    node, s = _propagate(aten.mul.Tensor, (_x(2, 8, 6), _x(6)), [1, None])
    assert s.placement[node] == 1
    with pytest.raises(Incompatible) as e:
        _propagate(aten.add.Tensor, (_x(2, 8, 6), _x(2, 8, 6)), [1, 2])
    assert str(e.value) == "pointwise aten.add.Tensor mixes tensors sharded on different dims"
    with pytest.raises(Incompatible) as e:
        _propagate(aten.add.Tensor, (_x(2, 8, 6), _x(8, 6)), [1, None])
    assert str(e.value) == ("pointwise aten.add.Tensor combines a sharded tensor with a replicated one (x1) that "
                            "has the full sharded dim")


def test_pointwise_with_a_norm_weight_over_the_sharded_width_shards_it():
    g = fx.Graph()
    xn = g.placeholder("x")
    xn.meta["val"] = torch.empty(2, 8, 6, device="meta")
    w = _w(g, "w", (6,))
    node = g.call_function(aten.mul.Tensor, (xn, w))
    node.meta["val"] = torch.empty(2, 8, 6, device="meta")
    s = ShardState(tp=2)
    s.placement[xn] = 2
    propagate_node(node, s)
    assert s.placement[node] == 2 and s.param_inputs[w] is w and s.bias_dim[w] == 0


def test_nothing_sharded_in_is_replicated_and_tuples_stay_tuples():
    node, s = _propagate(aten.split.Tensor, (_x(2, 8, 6), 2, -1), [None])
    assert s.placement[node] == (None, None, None)
    node, s = _propagate(aten.kthvalue.default, (_x(2, 8), 3), [None])  # no rule, but nothing sharded
    assert s.placement[node] == (None, None)


def test_ops_without_output_and_unknown_ops():
    node, s = _propagate(aten._assert_tensor_metadata.default, (_x(2, 8),), [1])
    assert node not in s.placement
    with pytest.raises(UnknownOp) as e:
        _propagate(aten.kthvalue.default, (_x(2, 8), 3), [0])
    assert str(e.value) == "aten.kthvalue.default has no sharding rule"


def test_no_family_rule_is_shadowed_by_an_earlier_step():
    for op, fam in rules.OP_RULES.items():
        assert op not in rules.IDENTITY_OPS and op not in rules.NO_OUTPUT_OPS, (op, fam.name)
        assert not rules.is_pointwise(op), (op, fam.name)


# --- the registry ---------------------------------------------------------------------------------------
@pytest.fixture
def clean_rules():
    before = dict(RULES)
    yield
    RULES.clear()
    RULES.update(before)


def test_an_external_rule_comes_before_the_built_in_one(clean_rules):
    def rule(node, s):
        s.placement[node] = "external"

    register_rule(aten.transpose.int, aten.kthvalue.default)(rule)
    register_rule(aten.kthvalue.default)(rule)  # the same rule again: idempotent (oases_fx.moe registers on each use)
    node, s = _propagate(aten.transpose.int, (_x(2, 4, 6), 0, 1), [2])
    assert s.placement[node] == "external"
    node, s = _propagate(aten.kthvalue.default, (_x(2, 8), 3), [0])
    assert s.placement[node] == "external"


def test_a_second_rule_for_an_op_is_refused(clean_rules):
    def first(node, s):
        pass

    def second(node, s):
        pass

    register_rule(aten.kthvalue.default)(first)
    with pytest.raises(ValueError) as e:
        register_rule(aten.kthvalue.default)(second)
    assert str(e.value) == (f"a sharding rule for aten.kthvalue.default is already registered "
                            f"({first.__qualname__})")
    assert RULES[aten.kthvalue.default] is first


# families tested by a test of their own (not in ACCEPTED): family -> that test
OWN_TESTS = {"stack": "test_stack_and_cat_follow_their_inputs", "cat": "test_stack_and_cat_follow_their_inputs",
             "split": "test_split_of_a_column_output_records_its_pieces",
             "chunk": "test_split_of_a_column_output_records_its_pieces",
             "batch_matmul": "test_batch_matmul_on_a_shared_batch_dim",
             "attention": "test_attention_heads_and_replicated_kv", "new_factory": "test_new_factories_are_replicated"}


def test_every_family_has_a_test_here():
    assert all(callable(globals().get(t)) for t in OWN_TESTS.values())
    missing = set(rules.FAMILIES) - {f for f, *_ in ACCEPTED} - set(OWN_TESTS)
    assert not missing, f"families without a test in this file: {sorted(missing)}"


def test_old_import_paths_still_work():
    from oases_fx import propagation

    for name in ("VIEW_OPS", "IDENTITY_OPS", "SDPA_OPS", "SOFTMAX_OPS", "view_dim_map", "slice_bounds",
                 "kv_slice_bounds", "check_kv_heads", "_Indivisible"):
        assert getattr(propagation, name) is getattr(rules, name)
    with pytest.raises(AttributeError):
        propagation.no_such_name  # noqa: B018


# --- shape arguments: localise --------------------------------------------------------------------------
def test_localise_views_from_the_trace_or_the_arguments():
    node, _ = _build(aten.view.default, (_x(4, 8, 12), [-1, 8, 4, 3]))
    args, note = localise(node, {2: 2, 0: 2}, from_trace=True)  # the shard pass: the trace's sizes
    assert args[1] == [2, 8, 2, 3] and note == "view.default [-1, 8, 4, 3] -> [2, 8, 2, 3]"
    args, _ = localise(node, {0: 2})  # a sub-batch: the arguments as they are, -1 kept
    assert args[1] == [-1, 8, 4, 3]
    args, _ = localise(node, {2: 4})
    assert args[1] == [-1, 8, 1, 3]
    assert localise(node, {}) is None
    node, _ = _build(aten.expand.default, (_x(4, 1, 6), [4, 5, -1]))
    args, note = localise(node, {0: 2, 2: 2}, from_trace=True)
    assert args[1] == [2, 5, -1] and note == "expand.default [4, 5, -1] -> [2, 5, -1]"
    assert rules.FAMILIES["views"].batch_sized and rules.FAMILIES["expand"].batch_sized
    assert not rules.FAMILIES["slice"].batch_sized and not rules.FAMILIES["split"].batch_sized


def test_localise_leaves_ops_without_shape_arguments():
    for op, args in ((aten.transpose.int, (0, 1)), (aten.flatten.using_ints, (0, 1))):
        node, _ = _build(op, (_x(4, 6),) + args)
        assert localise(node, {0: 2}, from_trace=True) is None
    node, _ = _build(aten.slice.Tensor, (_x(4, 6), 1, 0, 6))  # the whole dim
    assert localise(node, {1: 2}) is None


# --- the view rule against DTensor's (torch/distributed/tensor/_ops/_view_ops.py) -----------------
def _dtensor_or_skip(fn, *args):
    try:
        return fn(*args)
    except NotImplementedError as e:  # this torch has no such private API: nothing to compare with
        pytest.skip(str(e))


def _ours(in_shape, out_shape, dim, tp):
    try:
        return view_dim_map(in_shape, out_shape, dim, tp)
    except (Incompatible, _Indivisible):
        return None


@st.composite
def _views(draw):
    """(in_shape, out_shape, sharded dim, tp): out_shape either regroups in_shape's dims (split some,
    merge neighbours: the views models make) or is any factorisation of its size, with size-1 dims."""
    tp = draw(st.sampled_from([2, 3, 4]))
    in_shape = draw(st.lists(st.sampled_from([1, 2, 3, 4, 6, 8, 12]), min_size=1, max_size=4))
    shardable = [d for d, s in enumerate(in_shape) if s % tp == 0]
    assume(shardable)
    dim = draw(st.sampled_from(shardable))
    if draw(st.booleans()):
        parts = []
        for s in in_shape:
            divs = [k for k in range(2, s) if s % k == 0]
            if divs and draw(st.booleans()):
                k = draw(st.sampled_from(divs))
                parts += [k, s // k]
            else:
                parts.append(s)
        out = []
        for s in parts:
            if out and draw(st.integers(0, 3)) == 0:
                out[-1] *= s
            else:
                out.append(s)
    else:
        n, out = math.prod(in_shape), []
        while n > 1:
            k = draw(st.sampled_from([k for k in range(2, n + 1) if n % k == 0]))
            out.append(k)
            n //= k
        out = draw(st.permutations(out))
    for _ in range(draw(st.integers(0, 2))):
        out.insert(draw(st.integers(0, len(out))), 1)
    return in_shape, out or [1], dim, tp


def _dtensor_view(in_shape, out_shape, dim, tp):
    """(DTensor's answer, strict): its aten.view rule where this torch has strict_view, else its
    aten.reshape rule (which may redistribute)."""
    try:
        return _compat.dtensor_view_shard(in_shape, out_shape, dim, tp), True
    except NotImplementedError:
        return _dtensor_or_skip(_compat.dtensor_view_shard, in_shape, out_shape, dim, tp, False), False


@given(_views())
def test_view_rule_agrees_with_dtensor(case):
    in_shape, out_shape, dim, tp = case
    ours = _ours(in_shape, out_shape, dim, tp)
    theirs, strict = _dtensor_view(in_shape, out_shape, dim, tp)
    if ours is not None:
        assert theirs == ours, (case, ours, theirs)
        # and it is right: every rank viewing its block (sizes localised) gets its block of the view
        x = torch.arange(math.prod(in_shape)).view(in_shape)
        local = list(out_shape)
        local[ours] //= tp
        for r in range(tp):
            assert torch.equal(x.chunk(tp, dim)[r].reshape(local), x.reshape(out_shape).chunk(tp, ours)[r]), case
    elif strict:
        assert theirs is None, (case, theirs)  # the view rule declines exactly where ours does
    elif theirs is not None:
        # the reshape rule keeps Shard only unevenly here (the flatten-then-split case in oases_fx.rules)
        assert out_shape[theirs] % tp != 0, (case, theirs)


def test_uneven_shard_of_a_flatten_then_split_is_declined():
    # (3, 6, 2, 6) -> (3, 8, 3, 3) on dim 1 at tp 3: a rank holds 24 of each row's 72 elements, not a
    # whole number of the output's 9-element rows, so no block of dim 1 is its block.
    in_shape, out_shape = [3, 6, 2, 6], [3, 8, 3, 3]
    with pytest.raises(_Indivisible):
        view_dim_map(in_shape, out_shape, 1, 3)
    assert (math.prod(in_shape[1:]) // 3) % math.prod(out_shape[2:]) != 0
    assert _dtensor_view(in_shape, out_shape, 1, 3) in ((None, True), (None, False), (1, False))


_DIM_MAP_OPS = st.sampled_from(["permute", "transpose", "unsqueeze", "squeeze", "expand", "view"])


@given(_DIM_MAP_OPS, st.data())
def test_dim_rules_agree_with_dtensors_dim_maps(kind, data):
    tp = 2
    shape = data.draw(st.lists(st.sampled_from([1, 2, 4, 6]), min_size=1, max_size=4))
    shardable = [d for d, s in enumerate(shape) if s % tp == 0]
    assume(shardable)
    dim = data.draw(st.sampled_from(shardable))
    nd = len(shape)
    if kind == "permute":
        op, args = aten.permute.default, (data.draw(st.permutations(list(range(nd)))),)
    elif kind == "transpose":
        op, args = aten.transpose.int, (data.draw(st.integers(-nd, nd - 1)), data.draw(st.integers(-nd, nd - 1)))
    elif kind == "unsqueeze":
        op, args = aten.unsqueeze.default, (data.draw(st.integers(-nd - 1, nd)),)
    elif kind == "squeeze":
        ones = [d for d, s in enumerate(shape) if s == 1]
        assume(ones)
        if data.draw(st.booleans()):
            op, args = aten.squeeze.dim, (data.draw(st.sampled_from(ones)),)
        else:
            op, args = aten.squeeze.dims, (data.draw(st.lists(st.sampled_from(ones), min_size=1, unique=True)),)
    elif kind == "expand":
        lead = data.draw(st.lists(st.sampled_from([1, 3]), max_size=2))
        sizes = lead + [data.draw(st.sampled_from([3, -1])) if s == 1 else data.draw(st.sampled_from([s, -1]))
                        for s in shape]
        op, args = aten.expand.default, (sizes,)
    else:
        in_shape, out_shape, dim, tp = data.draw(_views())
        shape, op, args = in_shape, aten.view.default, (out_shape,)
    x = torch.randn(*shape)
    try:
        o = _blocks_agree(op, x, dim, tp, args)
    except (Incompatible, ShardingError):
        o = None
    try:
        theirs = _compat.dtensor_op_shard(op, x.to("meta"), args, dim, tp)
    except NotImplementedError:  # no DTensor map for this op in this torch: the computed check above stands
        return
    assert theirs == o, (kind, shape, args, dim, o, theirs)  # DTensor's strict rule: same dim, or both decline
