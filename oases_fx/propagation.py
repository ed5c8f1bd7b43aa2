"""Sharding propagation: which dim of each tensor is split over the TMP group, op by op.

A placement is ``None`` (replicated) or a non-negative dim (block-sharded over the TMP group).
Rules take the input placements and return the output placement, or raise
:class:`Incompatible` (a known op that would mix the sharded dim: the region is declined) or
:class:`UnknownOp` (no rule: the caller turns it into a clear error naming op and source line).
Shape constants (view sizes, split sizes, expand sizes) are re-derived from the traced full
shapes and the placement by :func:`local_shape`, so head counts and hidden sizes baked into the
graph follow the shard without pattern matching the model's code.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.fx as fx

from oases_fx.errors import ShardingError, describe

aten = torch.ops.aten

Placement = Optional[int]


class Incompatible(Exception):
    """A known op whose semantics do not allow the sharded dim to pass (e.g. a norm over it)."""


class UnknownOp(Exception):
    """An op without a sharding rule touches a sharded tensor."""


# Linear-like ops whose weight is a parameter: (op, index of activation, index of weight,
# weight layout). "oi" is nn.Linear's (out, in); "io" is HF Conv1D's / a plain matmul's (in, out).
LINEAR_OPS = {
    aten.linear.default: (0, 1, "oi"),
    aten.addmm.default: (1, 2, "io"),
    aten.mm.default: (0, 1, "io"),
    aten.matmul.default: (0, 1, "io"),
}

IDENTITY_OPS = {
    aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
    aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.type_as.default,
    aten.dropout.default, aten.lift_fresh_copy.default, aten.ones_like.default, aten.zeros_like.default,
    aten.empty_like.default, aten.full_like.default, aten.native_dropout.default,
}
VIEW_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
SDPA_OPS = {aten.scaled_dot_product_attention.default}
SOFTMAX_OPS = {aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default}
REDUCE_OPS = {aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default}
NORM_OPS = {aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default,
            aten.group_norm.default, aten.batch_norm.default}
NO_OUTPUT_OPS = {aten._assert_tensor_metadata.default}


def val(node) -> Optional[torch.Tensor]:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def ndim(node) -> int:
    v = val(node)
    return v.dim() if v is not None else 0


def view_dim_map(in_shape: Sequence[int], out_shape: Sequence[int], dim: int, tp: int) -> int:
    """The output dim that carries input `dim`'s block shard through a view, or raise.

    Dims are grouped where the running products of sizes meet. A block shard survives a view
    when the sharded dim leads its group (ignoring size-1 dims) and the leading output dim of
    the group divides by the TMP degree: e.g. (B, T, nh*hs) -> (B, T, nh, hs) shards nh.
    """
    i = j = 0
    n_in, n_out = len(in_shape), len(out_shape)
    while i < n_in:
        gi, gj = [i], []
        pi = in_shape[i]
        pj = 1
        while True:
            if pj == pi and gj and (i + 1 >= n_in or in_shape[i + 1] != 1 or j >= n_out or out_shape[j] != 1):
                break
            if pj < pi or (pj == pi and not gj):
                if j >= n_out:
                    break
                gj.append(j)
                pj *= out_shape[j]
                j += 1
            else:
                i += 1
                if i >= n_in:
                    break
                gi.append(i)
                pi *= in_shape[i]
        if dim in gi:
            lead_in = [d for d in gi if in_shape[d] != 1]
            lead_out = [d for d in gj if out_shape[d] != 1]
            if not lead_in or lead_in[0] != dim or not lead_out:
                raise Incompatible(
                    f"a view regroups the sharded dim {dim} of {tuple(in_shape)} into {tuple(out_shape)} "
                    "so that each rank's block is no longer contiguous"
                )
            o = lead_out[0]
            if out_shape[o] % tp:
                raise _Indivisible(o, out_shape[o])
            return o
        i += 1
    raise Incompatible(f"cannot map dim {dim} of {tuple(in_shape)} through a view to {tuple(out_shape)}")


class _Indivisible(Exception):
    def __init__(self, dim, size):
        super().__init__(dim, size)
        self.dim, self.size = dim, size


@dataclass
class ShardState:
    """Placements found so far, plus what the shard pass must do to the parameters."""

    tp: int
    placement: dict = field(default_factory=dict)  # Node -> Placement | tuple[Placement, ...]
    origin: dict = field(default_factory=dict)  # sharded Node -> column linear Node it is a plain view of
    pieces: dict = field(default_factory=dict)  # column linear Node -> piece sizes (fused qkv interleave)
    weight_dim: dict = field(default_factory=dict)  # weight get_attr Node -> sharded dim
    bias_dim: dict = field(default_factory=dict)  # bias get_attr Node -> sharded dim (column bias)
    rows: list = field(default_factory=list)  # row linear Nodes (partial outputs)
    partial_reductions: list = field(default_factory=list)  # mean/sum over the sharded dim: all-reduced
    param_inputs: dict = field(default_factory=dict)  # input Node (a parameter, maybe cast) -> its get_attr,
    # sharded because it meets a sharded tensor pointwise (a q/k norm weight over the full width)
    replicated_columns: frozenset = frozenset()  # column linears kept whole on every rank (kv heads < tp)
    replicate_qkv: bool = False  # every column replicated (a fused q/k/v with kv heads < tp): the
    # attention op slices q, k and v to this rank's heads
    local_slices: list = field(default_factory=list)  # (attention node, arg index, heads dim, q heads,
    # heads of that arg): a replicated operand the shard pass slices to the heads this rank's q needs
    replicated_path: set = field(default_factory=set)  # region nodes computing a replicated operand of
    # local_slices: each rank back-propagates only its heads through them, so every gradient-carrying
    # input (x, the kv weight and bias, a k-norm weight) enters through f (gradient summed over TMP)

    def of(self, arg) -> Placement:
        if isinstance(arg, fx.Node):
            p = self.placement.get(arg)
            return p if not isinstance(p, tuple) else None
        return None


def _tensor_args(node):
    out = []
    for a in node.args:
        if isinstance(a, fx.Node):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(x for x in a if isinstance(x, fx.Node))
    out.extend(v for v in node.kwargs.values() if isinstance(v, fx.Node))
    return out


_TRANSPOSE_OPS = {aten.t.default, aten.numpy_T.default, aten.permute.default, aten.transpose.int}


def _is_2d_transpose(node) -> bool:
    if ndim(node) != 2:
        return False
    if node.target is aten.permute.default:
        return [int(v) % 2 for v in node.args[1]] == [1, 0]
    return True


# target -> parts(node) for linear-like ops defined outside this file (oases_fx.moe: grouped expert
# matmuls over 3-D weights): (activation, weight get_attr, bias, layout, the weight as passed) or None.
# linear_parts and weight_arg consult it, so every pass sees those ops as linears.
LINEAR_LIKE: dict = {}


def weight_arg(node):
    """The weight argument of a linear-like node as it appears in the graph (a get_attr, or its
    transpose for `x @ w.T`), or None."""
    hook = LINEAR_LIKE.get(node.target) if node.op == "call_function" else None
    if hook is not None:
        parts = hook(node)
        return parts[4] if parts else None
    spec = LINEAR_OPS.get(node.target) if node.op == "call_function" else None
    return node.args[spec[1]] if spec is not None and len(node.args) > spec[1] else None


def linear_parts(node):
    """(activation, weight, bias, layout) of a linear-like node with a parameter weight (or one
    passed through f over the cross group by insert_collectives), else None."""
    spec = LINEAR_OPS.get(node.target) if node.op == "call_function" else None
    if spec is None:
        hook = LINEAR_LIKE.get(node.target) if node.op == "call_function" else None
        parts = hook(node) if hook is not None else None
        return parts[:4] if parts else None
    xi, wi, layout = spec
    if len(node.args) <= wi:
        return None
    w = node.args[wi]
    base = w
    if isinstance(w, fx.Node) and w.op == "call_function" and (w.meta.get("oases") is not None
                                                               and w.meta["oases"].role == "copy_to_cross"):
        base = w.args[0]  # a weight through f over the cross group (region of degree d < tp) is still one
    if (isinstance(base, fx.Node) and base.op == "call_function" and base.target in _TRANSPOSE_OPS
            and _is_2d_transpose(base) and isinstance(base.args[0], fx.Node) and base.args[0].op == "get_attr"):
        # `x @ self.weight.T` (Falcon's FalconLinear): the (out, in) weight seen transposed
        base = w = base.args[0]
        layout = "oi" if layout == "io" else "io"
    if not (isinstance(base, fx.Node) and base.op == "get_attr" and ndim(base) == 2):
        return None
    bias = None
    if node.target is aten.linear.default and len(node.args) > 2:
        bias = node.args[2]
    elif node.target is aten.addmm.default:
        bias = node.args[0]
    return node.args[xi], w, bias, layout


# Op -> rule(node, st): sets st.placement[node] (and any bookkeeping) or raises Incompatible /
# UnknownOp. Consulted before the built-in rules, so a module can add ops (oases_fx.moe's expert
# matmuls) without touching this file: ``@register_rule(op, ...)``.
RULES: dict = {}


def register_rule(*targets):
    def deco(fn):
        for t in targets:
            if t in RULES and RULES[t] is not fn:
                raise ValueError(f"a sharding rule for {t} is already registered ({RULES[t].__qualname__})")
            RULES[t] = fn
        return fn
    return deco


def propagate_node(node: fx.Node, st: ShardState) -> None:
    """Compute node's placement from its inputs' placements (in st), or raise."""
    if node.op != "call_function":
        return
    rule = RULES.get(node.target)
    if rule is not None:
        rule(node, st)
        return
    tp = st.tp
    args = _tensor_args(node)
    pls = [st.of(a) for a in args]
    tgt = node.target

    if tgt is operator.getitem:
        src, idx = node.args
        p = st.placement.get(src)
        st.placement[node] = p[idx] if isinstance(p, tuple) else None
        if isinstance(p, tuple) and p[idx] is not None and src in st.origin:
            st.origin[node] = st.origin[src]
        return

    parts = linear_parts(node)
    if parts is not None:
        x, w, bias, layout = parts
        wd = st.weight_dim.get(w)
        px = st.of(x)
        col_dim, row_dim = (0, 1) if layout == "oi" else (1, 0)
        if wd is None:
            if px is not None and px == ndim(x) - 1:
                raise Incompatible(f"linear {node.name} contracts over the sharded dim with a replicated weight")
            st.placement[node] = px
            return
        if wd == col_dim:
            if px is not None:
                raise Incompatible(f"column-parallel {node.name} gets a sharded input")
            st.placement[node] = ndim(node) - 1
            st.origin[node] = node
            return
        if wd == row_dim:
            if px != ndim(x) - 1:
                raise Incompatible(f"row-parallel {node.name} gets an input not sharded on its last dim")
            st.placement[node] = None  # partial sum, made whole by the reduce insert_collectives adds
            if node not in st.rows:
                st.rows.append(node)
            return
        raise AssertionError(node)

    if tgt in SDPA_OPS and st.replicate_qkv and all(p is None for p in pls):
        _attention(node, st)
        return

    if all(p is None for p in pls):
        # Nothing sharded flows in. Ops that make tuples still need a tuple placement.
        v = node.meta.get("val")
        st.placement[node] = tuple(None for _ in v) if isinstance(v, (list, tuple)) else None
        return

    if tgt in NO_OUTPUT_OPS:
        return
    out_nd = ndim(node)

    if tgt in IDENTITY_OPS:
        st.placement[node] = pls[0]
        if args[0] in st.origin and tgt in (aten.clone.default, aten.contiguous.default, aten.alias.default):
            st.origin[node] = st.origin[args[0]]
        return

    if isinstance(tgt, torch._ops.OpOverload) and torch.Tag.pointwise in tgt.tags:
        st.placement[node] = _pointwise(node, args, pls, out_nd, st)
        return

    d = pls[0]
    x = args[0]
    if tgt in VIEW_OPS:
        try:
            o = view_dim_map(list(val(x).shape), list(val(node).shape), d, tp)
        except _Indivisible as e:
            owner = st.origin.get(x)
            raise ShardingError(
                f"{describe(node)} reshapes a tensor sharded over the TMP group: its dim {e.dim} "
                f"(size {e.size}, the attention heads or key/value heads here) is not divisible by the TMP "
                f"degree {tp}" + (f" (the tensor comes from {owner.name})" if owner is not None else "")
                + ". Fix: use a TMP degree that divides the number of heads and key/value heads, or a plan "
                "that replicates this region."
            ) from None
        st.placement[node] = o
        if x in st.origin and o == out_nd - 1 and d == ndim(x) - 1:
            st.origin[node] = st.origin[x]
        return
    if tgt is aten.flatten.using_ints:  # a view without baked sizes (nothing for shard to rewrite)
        try:
            st.placement[node] = view_dim_map(list(val(x).shape), list(val(node).shape), d, tp)
        except _Indivisible as e:
            raise Incompatible(f"flatten merges the sharded dim into dim {e.dim} of size {e.size}, not "
                               f"divisible by {tp}") from None
        return
    if tgt is aten.expand.default:
        st.placement[node] = d + (out_nd - ndim(x))
        return
    if tgt is aten.transpose.int:
        a, b = (int(v) % ndim(x) for v in node.args[1:3])
        st.placement[node] = b if d == a else a if d == b else d
        return
    if tgt is aten.t.default:
        st.placement[node] = 1 - d
        return
    if tgt is aten.permute.default:
        perm = [int(v) % ndim(x) for v in node.args[1]]
        st.placement[node] = perm.index(d)
        return
    if tgt is aten.unsqueeze.default:
        u = int(node.args[1]) % out_nd
        st.placement[node] = d + 1 if u <= d else d
        return
    if tgt in (aten.squeeze.dim, aten.squeeze.dims):
        dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
        dims = [int(v) % ndim(x) for v in dims if val(x).shape[int(v) % ndim(x)] == 1]
        if d in dims:
            raise Incompatible("squeeze of the sharded dim")
        st.placement[node] = d - sum(1 for v in dims if v < d)
        return
    if tgt in (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default):
        sdim = int(node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % ndim(x)
        n_out = len(node.meta["val"])
        if sdim == d:
            sizes = [int(t.shape[d]) for t in node.meta["val"]]
            bad = [s for s in sizes if s % tp]
            if bad:
                raise ShardingError(
                    f"{describe(node)} splits a sharded dim into pieces {sizes}; {bad[0]} is not divisible by "
                    f"the TMP degree {tp}. Fix: use a TMP degree that divides the hidden size."
                )
            col = st.origin.get(x)
            if col is None:
                raise Incompatible(f"split of the sharded dim of {x.name}, which is not a column linear's output")
            if st.pieces.get(col, sizes) != sizes:
                raise Incompatible(f"the output of {col.name} is split two different ways")
            st.pieces[col] = sizes
        st.placement[node] = tuple(d for _ in range(n_out))
        return
    if tgt is aten.slice.Tensor:
        sdim = int(node.args[1]) % ndim(x) if len(node.args) > 1 else 0
        if sdim == d and tuple(val(node).shape) != tuple(val(x).shape):
            _slice_pieces(node, x, d, st)  # a fused projection cut by slicing (Phi-3's qkv[..., :q_end])
        st.placement[node] = d
        return
    if tgt is aten.select.int:
        sdim = int(node.args[1]) % ndim(x)
        if sdim == d:
            raise Incompatible("select on the sharded dim")
        st.placement[node] = d - 1 if sdim < d else d
        return
    if tgt in SDPA_OPS:
        _attention(node, st)
        return
    if tgt in (aten.bmm.default, aten.matmul.default):
        a, b = node.args[:2]
        if st.of(a) is None or st.of(a) != st.of(b) or st.of(a) >= ndim(a) - 2:
            raise Incompatible("matmul with the sharded dim not a shared batch dim")
        st.placement[node] = st.of(a)
        return
    if tgt in SOFTMAX_OPS:
        if int(node.args[1]) % ndim(x) == d:
            raise Incompatible("softmax over the sharded dim")
        st.placement[node] = d
        return
    if tgt in REDUCE_OPS:
        dims = node.args[1] if len(node.args) > 1 else None
        dims = list(range(ndim(x))) if not dims else [int(v) % ndim(x) for v in dims]
        if d in dims and tgt in (aten.mean.dim, aten.sum.dim_IntList) and dims == [d] and val(node).dtype.is_floating_point:
            # a norm's statistics over the full width (OLMo-2's q/k RMSNorm): the local mean or sum,
            # all-reduced over the TMP group by insert_collectives (Megatron g: backward identity)
            st.partial_reductions.append(node)
            st.placement[node] = None
            return
        if d in dims:
            raise Incompatible("reduction over the sharded dim")
        keep = out_nd == ndim(x)
        st.placement[node] = d if keep else d - sum(1 for v in dims if v < d)
        return
    if tgt is aten.stack.default:  # rotary written as stack((x1*cos - x2*sin, ...), -1).flatten(-2)
        sdim = int(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % out_nd
        ps = [st.of(t) for t in node.args[0]]
        if len(set(ps)) != 1:
            raise Incompatible("stack of tensors sharded differently")
        st.placement[node] = ps[0] + 1 if sdim <= ps[0] else ps[0]
        return
    if tgt is aten.view_as_complex.default:  # (..., n, 2) real -> (..., n) complex: the last dim goes
        if d >= ndim(x) - 1:
            raise Incompatible("view_as_complex of the sharded (real, imaginary) dim")
        st.placement[node] = d
        return
    if tgt is aten.view_as_real.default:  # (..., n) complex -> (..., n, 2) real: a new last dim
        st.placement[node] = d
        return
    if tgt is aten.cat.default:
        cdim = int(node.args[1] if len(node.args) > 1 else 0) % out_nd
        ps = [st.of(t) for t in node.args[0]]
        if len(set(ps)) != 1 or cdim == ps[0]:
            raise Incompatible("cat of tensors sharded differently or along the sharded dim")
        st.placement[node] = ps[0]
        return
    if tgt in (aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default):
        if d >= ndim(x) - len(node.args[1]):
            raise Incompatible(f"{tgt} normalises over the sharded dim")
        st.placement[node] = (d,) + (None, None) if tgt is aten.native_layer_norm.default else d
        return
    if tgt in NORM_OPS:
        raise Incompatible(f"{tgt} normalises over the split dim")
    if tgt in (aten.new_ones.default, aten.new_zeros.default, aten.new_empty.default, aten.new_full.default):
        st.placement[node] = None
        return
    raise UnknownOp(f"{tgt} has no sharding rule")


def check_kv_heads(q_heads: int, kv_heads: int, tp: int, where: str = "") -> None:
    """Raise Incompatible unless q_heads shard over tp and every rank's q heads share whole kv heads:
    kv_heads divisible by tp (each rank its block of kv heads) or dividing it (ranks share a kv head)."""
    if q_heads % tp:
        raise Incompatible(f"{q_heads} attention heads are not divisible by the TMP degree {tp}{where}")
    if kv_heads == q_heads:
        return
    if q_heads % kv_heads or (kv_heads % tp and tp % kv_heads):
        raise Incompatible(
            f"{kv_heads} key/value heads for {q_heads} query heads at TMP degree {tp}: the key/value heads must "
            f"divide or be divisible by the TMP degree{where}")


def kv_slice_bounds(rank: int, tp: int, q_heads: int, heads: int) -> tuple:
    """(start, end) of the heads of a replicated attention operand with `heads` heads (q_heads: the
    query's) that rank `rank` of `tp` needs: its block of q heads, or the kv heads they are grouped on
    (grouped-query attention: rank r's q heads all read kv head (r * heads) // tp when heads < tp)."""
    if heads == q_heads:
        hl = q_heads // tp
        return rank * hl, (rank + 1) * hl
    if heads % tp == 0:
        hl = heads // tp
        return rank * hl, (rank + 1) * hl
    assert tp % heads == 0, (rank, tp, q_heads, heads)
    h = (rank * heads) // tp
    return h, h + 1


def _attention(node, st) -> None:
    """SDPA: q, k, v split alike on a batch or heads dim; or, with key/value projections kept
    replicated (kv heads < tp), q sharded on its heads dim (or replicated too: a fused q/k/v) and the
    replicated operands sliced by the shard pass to the heads this rank's q heads read (local_slices)."""
    q, k, v = node.args[:3]
    dq = st.of(q)
    replicated = st.replicated_columns or st.replicate_qkv
    heads_dim = ndim(q) - 3
    if dq is None and st.replicate_qkv and st.placement.get(q) is None and heads_dim >= 0:
        dq = heads_dim
        check_kv_heads(int(val(q).shape[dq]), int(val(q).shape[dq]), st.tp)
        st.local_slices.append((node, 0, dq, int(val(q).shape[dq]), int(val(q).shape[dq])))
    if dq is None or dq >= ndim(q) - 2:
        raise Incompatible("attention whose q, k, v are not split alike on a batch or heads dim")
    q_heads = int(val(q).shape[dq])
    for i, t in ((1, k), (2, v)):
        p = st.of(t)
        if p == dq:
            continue
        if p is None and replicated and st.placement.get(t) is None and dq == heads_dim:
            heads = int(val(t).shape[dq])
            if heads not in (1, q_heads) and not node.kwargs.get("enable_gqa", False):  # 1: broadcast
                raise Incompatible(f"attention with {heads} key/value heads for {q_heads} query heads "
                                   "without enable_gqa")
            check_kv_heads(q_heads, heads, st.tp)
            st.local_slices.append((node, i, dq, q_heads, heads))
            continue
        raise Incompatible("attention whose q, k, v are not split alike on a batch or heads dim")
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    if isinstance(mask, fx.Node) and st.of(mask) != dq:
        md = dq - (ndim(q) - ndim(mask))
        if st.of(mask) is not None or (md >= 0 and val(mask).shape[md] != 1):
            raise Incompatible("attention mask with the full split dim (it would need slicing per rank)")
    st.placement[node] = dq


def slice_bounds(node) -> tuple:
    """(dim, start, end, step) of an aten.slice.Tensor node, normalised to ints within the input."""
    x = node.args[0]
    size_in = val(x).shape
    dim = int(node.args[1]) % ndim(x) if len(node.args) > 1 else 0
    n = int(size_in[dim])
    start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
    end = node.args[3] if len(node.args) > 3 and node.args[3] is not None else n
    step = node.args[4] if len(node.args) > 4 else 1
    start, end = int(start), int(end)
    start = max(0, min(n, start + n if start < 0 else start))
    end = max(0, min(n, end + n if end < 0 else end))
    return dim, start, end, int(step)


def _slice_pieces(node, x, d, st) -> None:
    """Slices of the sharded dim of a column linear's output that cut it into consecutive pieces
    (every user of `x` on that dim a step-1 slice, together covering it once) are the pieces of
    an interleaved shard, exactly like split: each rank's output holds its block of every piece."""
    col = st.origin.get(x)
    if col is None:
        raise Incompatible(f"slice of the sharded dim of {x.name}, which is not a column linear's output")
    cuts = []
    for u in x.users:
        if u.op == "call_function" and u.target is aten.slice.Tensor and slice_bounds(u)[0] == d:
            _, a, b, step = slice_bounds(u)
            if step != 1:
                raise Incompatible(f"strided slice (step {step}) of the sharded dim")
            cuts.append((a, b))
        elif u.op == "call_function":
            raise Incompatible(f"the sharded dim of {x.name} is sliced and also used whole by {u.name}")
    cuts = sorted(set(cuts))
    pos, sizes = 0, []
    for a, b in cuts:
        if a != pos:
            raise Incompatible(f"slices of the sharded dim of {x.name} overlap or leave a gap at {a}")
        sizes.append(b - a)
        pos = b
    if pos != int(val(x).shape[d]):
        raise Incompatible(f"slices of the sharded dim of {x.name} do not cover it")
    bad = [v for v in sizes if v % st.tp]
    if bad:
        raise Incompatible(f"a slice of {bad[0]} of the sharded dim is not divisible by the TMP degree {st.tp}")
    if st.pieces.get(col, sizes) != sizes:
        raise Incompatible(f"the output of {col.name} is cut two different ways")
    st.pieces[col] = sizes


def _param_base(a):
    """The get_attr of a parameter used only here, directly or through one dtype cast; else None."""
    base = a
    if base.op == "call_function" and base.target in (aten._to_copy.default, aten.to.dtype) and len(base.users) == 1:
        base = base.args[0]
    if isinstance(base, fx.Node) and base.op == "get_attr" and ndim(base) >= 1 and len(base.users) == 1:
        return base
    return None


def _pointwise(node, args, pls, out_nd, st=None):
    dims = set()
    for a, p in zip(args, pls):
        if p is not None:
            dims.add(p + out_nd - ndim(a))
    if len(dims) != 1:
        raise Incompatible(f"pointwise {node.target} mixes tensors sharded on different dims")
    (d,) = dims
    out_shape = val(node).shape
    for a, p in zip(args, pls):
        if p is None and val(a) is not None and val(a).dim() > 0:
            ad = d - (out_nd - ndim(a))
            if ad >= 0 and val(a).shape[ad] != 1 and val(a).shape[ad] == out_shape[d] and st is not None:
                base = _param_base(a)
                if base is not None and val(a).shape[ad] % st.tp == 0:
                    st.param_inputs[a] = base  # a norm weight over the sharded width: sharded with it
                    st.bias_dim[base] = ad
                    continue
            if ad >= 0 and val(a).shape[ad] != 1 and val(a).shape[ad] == out_shape[d]:
                raise Incompatible(
                    f"pointwise {node.target} combines a sharded tensor with a replicated one ({a.name}) "
                    "that has the full sharded dim"
                )
    return d


def local_shape(node: fx.Node, placement: Placement, tp: int) -> list:
    """The node's output shape on one rank: the traced full shape with the sharded dim divided."""
    shape = [int(s) for s in val(node).shape]
    if placement is not None:
        shape[placement] //= tp
    return shape
