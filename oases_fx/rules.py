"""Sharding rules: one small function per op family, each family defined once.

A family says, in one place: its ops, how a placement propagates through them (``rule(node, st)``:
sets ``st.placement[node]`` and any bookkeeping, or raises Incompatible / UnknownOp / ShardingError),
and, where the op bakes sizes into its arguments (view and expand sizes, slice bounds, split
sizes), how those arguments change when some of its output dims shrink (``localise``). The passes
ask the family: shard for this rank's TMP shard, split_sub_batches for one of k sub-batches,
vocab_parallel for the local vocabulary. The order in which rules apply is
propagation.propagate_node's; rules registered from outside (``propagation.register_rule``, e.g.
oases_fx.moe's expert matmuls) come first.

    family("views", VIEW_OPS, localise=_localise_sizes, batch_sized=True)(view_rule)

View dim-mapping and DTensor. DTensor's own view rule (torch/distributed/tensor/_ops/_view_ops.py:
``view_groups`` builds the DimMap of InputDim / Flatten / Split, ``propagate_shape_and_sharding``
maps a Shard through it) groups dims as :func:`view_dim_map` does. Its rule for aten.view
(strict_view: never redistribute; checked on 2.11 and 2.13) keeps a plain Shard exactly where
ours accepts, on the same output dim, and the dim maps of transpose, permute, unsqueeze, squeeze
and expand agree with the rules below (tests/unit/test_rule_registry.py checks both on random
shapes, through ``_compat.dtensor_view_shard`` / ``dtensor_op_shard``). We keep ours as the
rule and DTensor as the oracle: where DTensor declines it cannot say why, and the why is the
user's message (heads not divisible by the degree: the ShardingError naming the fix; a sharded
dim that does not lead its group: a declined region), and using it would put a private torch
module on every view of every region. Where the two differ, ours is the one a TMP region needs:

- Where DTensor's strict rule raises ("requires redistribution", "Cannot unflatten unevenly
  sharded tensor") or its reshape rule answers Replicate (it would all-gather the input first),
  we decline: a region is never all-gathered silently.
- A flatten whose sharded dim is not the first of its group: DTensor 2.13 answers _StridedShard,
  a strided layout our placements (a dim or None) do not carry; we decline.
- DTensor's reshape rule (not strict; 2.11 and 2.13) answers Shard for a flatten-then-split
  group whose leading output size does not divide by the degree, e.g. (3, 6, 2, 6) ->
  (3, 8, 3, 3) sharded on dim 1 at degree 3: Shard(1) of the size-8 dim, which is no rank's
  contiguous block of 24 of the 72 elements (the Flatten's second analysis, for the later split
  ids, resets the divisibility check). Its strict rule and ours decline.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.fx as fx

from oases_fx.errors import ShardingError, describe
from oases_fx.propagation import Incompatible, linear_parts, ndim, tensor_args, val

aten = torch.ops.aten


# --- op sets ----------------------------------------------------------------------------------
IDENTITY_OPS = {
    aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
    aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.type_as.default,
    aten.dropout.default, aten.lift_fresh_copy.default, aten.ones_like.default, aten.zeros_like.default,
    aten.empty_like.default, aten.full_like.default, aten.native_dropout.default,
}
ORIGIN_KEEPING_OPS = {aten.clone.default, aten.contiguous.default, aten.alias.default}  # a plain copy or view
NO_OUTPUT_OPS = {aten._assert_tensor_metadata.default}
VIEW_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
FLATTEN_OPS = {aten.flatten.using_ints}
EXPAND_OPS = {aten.expand.default}
TRANSPOSE_OPS = {aten.transpose.int, aten.t.default, aten.permute.default}
UNSQUEEZE_OPS = {aten.unsqueeze.default}
SQUEEZE_OPS = {aten.squeeze.dim, aten.squeeze.dims}
SPLIT_OPS = {aten.split.Tensor, aten.split_with_sizes.default}  # sizes baked into the arguments
CHUNK_OPS = {aten.chunk.default}  # a count: nothing to localise
SLICE_OPS = {aten.slice.Tensor}
SELECT_OPS = {aten.select.int}
SDPA_OPS = {aten.scaled_dot_product_attention.default}
BATCH_MATMUL_OPS = {aten.bmm.default, aten.matmul.default}
LOG_SOFTMAX_OPS = {aten.log_softmax.int, aten._log_softmax.default}
SOFTMAX_OPS = {aten.softmax.int, aten._softmax.default} | LOG_SOFTMAX_OPS
REDUCE_OPS = {aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default}
PARTIAL_REDUCE_OPS = {aten.sum.dim_IntList, aten.mean.dim}  # linear: a local result all-reduced is exact
STACK_OPS = {aten.stack.default}
CAT_OPS = {aten.cat.default}
LAST_DIMS_NORM_OPS = {aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default}
NORM_OPS = LAST_DIMS_NORM_OPS | {aten.group_norm.default, aten.batch_norm.default}
NEW_FACTORY_OPS = {aten.new_ones.default, aten.new_zeros.default, aten.new_empty.default, aten.new_full.default}

# Outside propagation: the loss vocab_parallel rewrites, and what annotate_sharding looks through.
CE_OPS = {aten.cross_entropy_loss.default}
NLL_OPS = {aten.nll_loss.default, aten.nll_loss_nd.default, aten.nll_loss_forward.default}
# Ops that keep each row's values within its row and its last dim last (the logits' vocab).
ROW_IDENTITY_OPS = (IDENTITY_OPS - {aten.ones_like.default, aten.zeros_like.default, aten.empty_like.default,
                                    aten.full_like.default, aten.dropout.default, aten.native_dropout.default})
# Ops a weight parameter may pass through before a matmul (annotate_sharding's orphan weights).
WEIGHT_VIEW_OPS = TRANSPOSE_OPS | {aten.view.default, aten.reshape.default, aten._to_copy.default,
                                   aten.contiguous.default, aten.alias.default}
MATMUL_OPS = {aten.mm.default, aten.bmm.default, aten.matmul.default, aten.einsum.default, aten.baddbmm.default,
              aten.addmm.default, aten.addbmm.default}


def is_pointwise(target) -> bool:
    """An aten op torch tags pointwise (elementwise with broadcasting)."""
    return isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags


# --- the family table -------------------------------------------------------------------------
@dataclass(frozen=True)
class OpFamily:
    """One op family: its ops, its placement rule, and how its shape arguments are localised."""

    name: str
    ops: frozenset
    rule: Callable  # (node, st) -> None
    localise: Optional[Callable] = None
    """(node, divide: {output dim: factor}, from_trace) -> (new args, note) or None (unchanged).
    from_trace: start from the traced full sizes (val) rather than the node's current arguments."""
    batch_sized: bool = False
    """Its shape arguments carry the batch size, so a sub-batch (or a batch chunk) changes them."""


FAMILIES: dict = {}  # name -> OpFamily
OP_RULES: dict = {}  # op -> OpFamily: the per-op step of propagate_node


def family(name: str, ops, *, localise=None, batch_sized: bool = False):
    """Register `fn(node, st)` as the rule of op family `name` (each op in one family only)."""
    def deco(fn):
        fam = OpFamily(name, frozenset(ops), fn, localise, batch_sized)
        clash = [op for op in fam.ops if op in OP_RULES]
        assert not clash and name not in FAMILIES, (name, clash)
        FAMILIES[name] = fam
        for op in fam.ops:
            OP_RULES[op] = fam
        return fn
    return deco


def family_of(target) -> Optional[OpFamily]:
    return OP_RULES.get(target)


def localise(node: fx.Node, divide: dict, *, from_trace: bool = False):
    """(args, note) for `node` computing its output with each dim in `divide` divided by its factor
    (this rank's shard, one sub-batch), or None when its arguments do not change: an op without
    shape arguments, or none for those dims. `note` reads "view [2, 16, 32] -> [2, 16, 16]"."""
    fam = OP_RULES.get(node.target) if node.op == "call_function" else None
    if fam is None or fam.localise is None or not divide:
        return None
    return fam.localise(node, divide, from_trace)


def _first(node, st):
    """The first tensor argument and its placement (the operand a unary rule follows)."""
    x = tensor_args(node)[0]
    return x, st.of(x)


# --- the rules consulted before the per-op table (propagate_node's precedence) ----------------------
def getitem_rule(node, st) -> None:
    """An element of a tuple-valued op (split, native_layer_norm): its placement in the tuple."""
    src, idx = node.args
    p = st.placement.get(src)
    st.placement[node] = p[idx] if isinstance(p, tuple) else None
    if isinstance(p, tuple) and p[idx] is not None and src in st.origin:
        st.origin[node] = st.origin[src]


def linear_rule(node, st) -> None:
    """A linear-like op with a parameter weight (propagation.linear_parts): a weight sharded on its
    output dim makes it column-parallel, on its input dim row-parallel (a partial sum)."""
    x, w, bias, layout = linear_parts(node)
    col_dim, row_dim = (0, 1) if layout == "oi" else (1, 0)
    if parallel_weight_rule(node, st, x, w, col_dim, row_dim, node.name):
        return
    px = st.of(x)
    if px is not None and px == ndim(x) - 1:
        raise Incompatible(f"linear {node.name} contracts over the sharded dim with a replicated weight")
    st.placement[node] = px


def parallel_weight_rule(node, st, x, w, col_dim: int, row_dim: int, what: str) -> bool:
    """The column and row cases of every linear-like op (linear_rule; oases_fx.moe's grouped expert
    matmuls): weight `w` sharded on its output dim `col_dim` makes `node` column-parallel (a
    replicated input `x`, the output sharded on its last dim), on its input dim `row_dim`
    row-parallel (`x` sharded on its last dim, the output a partial sum: st.rows). False, with
    nothing set, for a replicated weight, which the callers treat differently (a linear keeps a
    batch shard; an expert matmul, whose rows are routed pairs, keeps none). `what`: the node as the
    messages name it."""
    wd = st.weight_dim.get(w)
    if wd is None:
        return False
    px = st.of(x)
    if wd == col_dim:
        if px is not None:
            raise Incompatible(f"column-parallel {what} gets a sharded input")
        st.placement[node] = ndim(node) - 1
        st.origin[node] = node
        return True
    if wd == row_dim:
        if px != ndim(x) - 1:
            raise Incompatible(f"row-parallel {what} gets an input not sharded on its last dim")
        st.placement[node] = None  # partial sum, made whole by the reduce insert_collectives adds
        if node not in st.rows:
            st.rows.append(node)
        return True
    raise AssertionError(node)


def replicated_rule(node, st) -> None:
    """Nothing sharded flows in: replicated (a tuple of them for ops that make tuples)."""
    v = node.meta.get("val")
    st.placement[node] = tuple(None for _ in v) if isinstance(v, (list, tuple)) else None


def identity_rule(node, st) -> None:
    """Copies, casts, dropout, *_like: the input's placement (a copy still views its column)."""
    x, d = _first(node, st)
    st.placement[node] = d
    if x in st.origin and node.target in ORIGIN_KEEPING_OPS:
        st.origin[node] = st.origin[x]


def pointwise_rule(node, st) -> None:
    """Elementwise ops (torch's pointwise tag), broadcasting: every sharded input on one output dim."""
    args = tensor_args(node)
    st.placement[node] = _pointwise(node, args, [st.of(a) for a in args], ndim(node), st)


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


# --- views: reshape, flatten, expand ----------------------------------------------------------
class _Indivisible(Exception):
    def __init__(self, dim, size):
        super().__init__(dim, size)
        self.dim, self.size = dim, size


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


def _divided(sizes: list, divide: dict) -> list:
    for dim, f in divide.items():
        if sizes[dim] != -1:
            sizes[dim] //= f
    return sizes


def _localise_sizes(node, divide, from_trace):
    """view/reshape sizes: the traced sizes (every -1 made explicit) or the current ones, divided."""
    sizes = _divided([int(s) for s in val(node).shape] if from_trace else list(node.args[1]), divide)
    return (node.args[0], sizes) + tuple(node.args[2:]), f"{node.target.__name__} {list(node.args[1])} -> {sizes}"


def _localise_expand(node, divide, from_trace):
    """expand sizes: as a view's, except that a -1 (keep this dim) stays -1."""
    old = list(node.args[1])
    sizes = _divided([int(s) for s in val(node).shape] if from_trace else list(old), divide)
    sizes = [-1 if s == -1 else v for s, v in zip(old, sizes)]
    return (node.args[0], sizes) + tuple(node.args[2:]), f"{node.target.__name__} {old} -> {sizes}"


@family("views", VIEW_OPS, localise=_localise_sizes, batch_sized=True)
def view_rule(node, st) -> None:
    """view/reshape: the dim that carries the block (view_dim_map); heads that do not divide by the
    degree are the user's error (ShardingError with the fix), a non-contiguous block declines."""
    x, d = _first(node, st)
    tp = st.tp
    try:
        o = view_dim_map(list(val(x).shape), list(val(node).shape), d, tp)
    except _Indivisible as e:
        owner = st.origin.get(x)
        group, size = [], 1
        for s in val(node).shape[e.dim:]:  # the output dims the sharded dim is viewed as
            if size >= int(val(x).shape[d]):
                break
            group.append(int(s))
            size *= int(s)
        # (3, heads, head_dim): the q/k/v pieces outermost, the heads divide (ModernBERT's Wqkv)
        fused = len(group) == 3 and group[0] == 3 and group[1] % tp == 0
        what = (f"the q/k/v pieces of a fused projection viewed as {tuple(group)}" if fused
                else "the attention heads or key/value heads here")
        fix = ("A fused q/k/v laid out (3, heads, head_dim) is not sharded yet ((heads, 3, head_dim) is): the "
               "region runs replicated." if fused else "Fix: use a TMP degree that divides the number of heads "
               "and key/value heads, or a plan that replicates this region.")
        raise ShardingError(
            f"{describe(node)} reshapes a tensor sharded over the TMP group: its dim {e.dim} "
            f"(size {e.size}, {what}) is not divisible by the TMP "
            f"degree {tp}" + (f" (the tensor comes from {owner.name})" if owner is not None else "") + f". {fix}"
        ) from None
    st.placement[node] = o
    if x in st.origin and o == ndim(node) - 1 and d == ndim(x) - 1:
        st.origin[node] = st.origin[x]


@family("flatten", FLATTEN_OPS)
def flatten_rule(node, st) -> None:
    """flatten: a view without baked sizes (nothing for the passes to rewrite)."""
    x, d = _first(node, st)
    try:
        st.placement[node] = view_dim_map(list(val(x).shape), list(val(node).shape), d, st.tp)
    except _Indivisible as e:
        raise Incompatible(f"flatten merges the sharded dim into dim {e.dim} of size {e.size}, not "
                           f"divisible by {st.tp}") from None


@family("expand", EXPAND_OPS, localise=_localise_expand, batch_sized=True)
def expand_rule(node, st) -> None:
    """expand: new leading dims shift the sharded dim; a sharded dim is never size 1."""
    x, d = _first(node, st)
    st.placement[node] = d + (ndim(node) - ndim(x))


# --- dim permutations: transpose, t, permute, unsqueeze, squeeze, select -----------------------
@family("transpose", TRANSPOSE_OPS)
def transpose_rule(node, st) -> None:
    x, d = _first(node, st)
    if node.target is aten.transpose.int:
        a, b = (int(v) % ndim(x) for v in node.args[1:3])
        st.placement[node] = b if d == a else a if d == b else d
    elif node.target is aten.t.default:
        st.placement[node] = 1 - d
    else:
        perm = [int(v) % ndim(x) for v in node.args[1]]
        st.placement[node] = perm.index(d)


@family("unsqueeze", UNSQUEEZE_OPS)
def unsqueeze_rule(node, st) -> None:
    x, d = _first(node, st)
    u = int(node.args[1]) % ndim(node)
    st.placement[node] = d + 1 if u <= d else d


@family("squeeze", SQUEEZE_OPS)
def squeeze_rule(node, st) -> None:
    x, d = _first(node, st)
    dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
    dims = [int(v) % ndim(x) for v in dims if val(x).shape[int(v) % ndim(x)] == 1]
    if d in dims:
        raise Incompatible("squeeze of the sharded dim")
    st.placement[node] = d - sum(1 for v in dims if v < d)


@family("select", SELECT_OPS)
def select_rule(node, st) -> None:
    x, d = _first(node, st)
    sdim = int(node.args[1]) % ndim(x)
    if sdim == d:
        raise Incompatible("select on the sharded dim")
    st.placement[node] = d - 1 if sdim < d else d


# --- cutting and joining: split, chunk, slice, stack, cat ---------------------------------------
def split_dim(node) -> int:
    """The dim a split/split_with_sizes/chunk node cuts, normalised."""
    x = node.args[0]
    return int(node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % ndim(x)


def _localise_split(node, divide, from_trace):
    """split sizes on a divided dim: each piece's block (the pieces of an interleaved shard)."""
    f = divide.get(split_dim(node))
    if f is None:
        return None
    sizes = node.args[1]
    new = [s // f for s in sizes] if isinstance(sizes, (list, tuple)) else sizes // f
    if new == sizes or (isinstance(sizes, (list, tuple)) and list(new) == list(sizes)):
        return None
    return (node.args[0], new) + tuple(node.args[2:]), f"split {sizes} -> {new}"


def split_rule(node, st) -> None:
    """split/chunk: every piece keeps the placement; cutting the sharded dim is only allowed for a
    column linear's output (a fused projection: the pieces become an interleaved shard)."""
    x, d = _first(node, st)
    tp = st.tp
    sdim = split_dim(node)
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


family("split", SPLIT_OPS, localise=_localise_split)(split_rule)
family("chunk", CHUNK_OPS)(split_rule)


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


def _localise_slice(node, divide, from_trace):
    """slice bounds on a divided dim: the piece's block (an interleaved shard's piece); a slice of
    the whole dim is left as it is."""
    sdim, start, end, step = slice_bounds(node)
    f = divide.get(sdim)
    if f is None or (start, end) == (0, int(val(node.args[0]).shape[sdim])):
        return None
    return (node.args[0], sdim, start // f, end // f, step), f"slice [{start}:{end}] -> [{start // f}:{end // f}]"


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


@family("slice", SLICE_OPS, localise=_localise_slice)
def slice_rule(node, st) -> None:
    """slice: keeps the placement; a cut of the sharded dim must be a piece of a fused column."""
    x, d = _first(node, st)
    sdim = int(node.args[1]) % ndim(x) if len(node.args) > 1 else 0
    if sdim == d and tuple(val(node).shape) != tuple(val(x).shape):
        _slice_pieces(node, x, d, st)  # a fused projection cut by slicing (Phi-3's qkv[..., :q_end])
    st.placement[node] = d


@family("stack", STACK_OPS)
def stack_rule(node, st) -> None:
    """stack of tensors sharded alike (rotary as stack((x1*cos - x2*sin, ...), -1).flatten(-2))."""
    sdim = int(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % ndim(node)
    ps = [st.of(t) for t in node.args[0]]
    if len(set(ps)) != 1:
        raise Incompatible("stack of tensors sharded differently")
    st.placement[node] = ps[0] + 1 if sdim <= ps[0] else ps[0]


@family("cat", CAT_OPS)
def cat_rule(node, st) -> None:
    cdim = int(node.args[1] if len(node.args) > 1 else 0) % ndim(node)
    ps = [st.of(t) for t in node.args[0]]
    if len(set(ps)) != 1 or cdim == ps[0]:
        raise Incompatible("cat of tensors sharded differently or along the sharded dim")
    st.placement[node] = ps[0]


# --- complex views ------------------------------------------------------------------------------
@family("view_as_complex", {aten.view_as_complex.default})
def view_as_complex_rule(node, st) -> None:
    """(..., n, 2) real -> (..., n) complex: the last dim goes."""
    x, d = _first(node, st)
    if d >= ndim(x) - 1:
        raise Incompatible("view_as_complex of the sharded (real, imaginary) dim")
    st.placement[node] = d


@family("view_as_real", {aten.view_as_real.default})
def view_as_real_rule(node, st) -> None:
    """(..., n) complex -> (..., n, 2) real: a new last dim."""
    st.placement[node] = _first(node, st)[1]


# --- attention and batched matmuls --------------------------------------------------------------
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
    (grouped-query attention: rank r's q heads all read kv head (r * heads) // tp when heads < tp).
    The attention family's localisation: the shard pass slices those operands with it."""
    if heads == q_heads:
        hl = q_heads // tp
        return rank * hl, (rank + 1) * hl
    if heads % tp == 0:
        hl = heads // tp
        return rank * hl, (rank + 1) * hl
    assert tp % heads == 0, (rank, tp, q_heads, heads)
    h = (rank * heads) // tp
    return h, h + 1


@family("attention", SDPA_OPS)
def attention_rule(node, st) -> None:
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


@family("batch_matmul", BATCH_MATMUL_OPS)
def batch_matmul_rule(node, st) -> None:
    """bmm/matmul of two activations (q @ k^T): both sharded on one shared batch dim."""
    a, b = node.args[:2]
    if st.of(a) is None or st.of(a) != st.of(b) or st.of(a) >= ndim(a) - 2:
        raise Incompatible("matmul with the sharded dim not a shared batch dim")
    st.placement[node] = st.of(a)


# --- softmax, reductions, norms -----------------------------------------------------------------
@family("softmax", SOFTMAX_OPS)
def softmax_rule(node, st) -> None:
    x, d = _first(node, st)
    if int(node.args[1]) % ndim(x) == d:
        raise Incompatible("softmax over the sharded dim")
    st.placement[node] = d


@family("reduce", REDUCE_OPS)
def reduce_rule(node, st) -> None:
    """Reductions over other dims keep the shard; a float mean/sum over exactly the sharded dim is a
    partial reduction (all-reduced by insert_collectives); any other reduction over it declines."""
    x, d = _first(node, st)
    dims = node.args[1] if len(node.args) > 1 else None
    dims = list(range(ndim(x))) if not dims else [int(v) % ndim(x) for v in dims]
    if d in dims and node.target in PARTIAL_REDUCE_OPS and dims == [d] and val(node).dtype.is_floating_point:
        # a norm's statistics over the full width (OLMo-2's q/k RMSNorm): the local mean or sum,
        # all-reduced over the TMP group by insert_collectives (Megatron g: backward identity)
        st.partial_reductions.append(node)
        st.placement[node] = None
        return
    if d in dims:
        raise Incompatible("reduction over the sharded dim")
    keep = ndim(node) == ndim(x)
    st.placement[node] = d if keep else d - sum(1 for v in dims if v < d)


@family("norm", NORM_OPS)
def norm_rule(node, st) -> None:
    """layer_norm/rms_norm over trailing dims other than the sharded one; group and batch norm
    always normalise over it (the channels they mix)."""
    x, d = _first(node, st)
    tgt = node.target
    if tgt not in LAST_DIMS_NORM_OPS:
        raise Incompatible(f"{tgt} normalises over the split dim")
    if d >= ndim(x) - len(node.args[1]):
        raise Incompatible(f"{tgt} normalises over the sharded dim")
    st.placement[node] = (d,) + (None, None) if tgt is aten.native_layer_norm.default else d


@family("new_factory", NEW_FACTORY_OPS)
def new_factory_rule(node, st) -> None:
    """new_ones/new_zeros/...: a fresh tensor of the sizes given, the same on every rank."""
    st.placement[node] = None

