"""Sharding propagation: which dim of each tensor is split over the TMP group, op by op.

A placement is ``None`` (replicated) or a non-negative dim (block-sharded over the TMP group), a
tuple of them for tuple-valued ops. Rules take the input placements and return the output
placement, or raise :class:`Incompatible` (a known op that would mix the sharded dim: the region
is declined) or :class:`UnknownOp` (no rule: the caller turns it into a clear error naming op and
source line). This module holds that vocabulary (ShardState), the linear recogniser
(linear_parts), the registry for rules added from outside (register_rule) and the order in which
rules apply (propagate_node); the rules of the op families, and how each localises its shape
arguments (view sizes, split sizes, slice bounds) for a shard, are in :mod:`oases_fx.rules`.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx


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

def val(node) -> Optional[torch.Tensor]:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def ndim(node) -> int:
    v = val(node)
    return v.dim() if v is not None else 0


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


def tensor_args(node):
    """The tensor (fx.Node) arguments of node, lists flattened, then its tensor kwargs."""
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
    """Compute node's placement from its inputs' placements (in st), or raise.

    The first rule that applies decides (the rules themselves: oases_fx.rules):
    1. a rule registered for the op (register_rule: oases_fx.moe's expert matmuls);
    2. getitem of a tuple-valued op;
    3. a linear-like op whose weight is a parameter (linear_parts): column, row or neither;
    4. attention over replicated q/k/v (st.replicate_qkv: a fused q/k/v with kv heads < tp);
    5. nothing sharded flows in: replicated (a tuple of them for tuple-valued ops);
    6. ops without an output (metadata asserts): nothing;
    7. identity ops (copies, casts, dropout, *_like), before the pointwise tag some of them carry;
    8. pointwise ops (torch's pointwise tag);
    9. the op's family (rules.OP_RULES); else UnknownOp."""
    if node.op != "call_function":
        return
    tgt = node.target
    rule = RULES.get(tgt)
    if rule is not None:
        rule(node, st)
        return
    if tgt is operator.getitem:
        _rules.getitem_rule(node, st)
        return
    if linear_parts(node) is not None:
        _rules.linear_rule(node, st)
        return
    nothing_sharded = all(st.of(a) is None for a in tensor_args(node))
    if tgt in _rules.SDPA_OPS and st.replicate_qkv and nothing_sharded:
        _rules.attention_rule(node, st)
        return
    if nothing_sharded:
        _rules.replicated_rule(node, st)
        return
    if tgt in _rules.NO_OUTPUT_OPS:
        return
    if tgt in _rules.IDENTITY_OPS:
        _rules.identity_rule(node, st)
        return
    if _rules.is_pointwise(tgt):
        _rules.pointwise_rule(node, st)
        return
    fam = _rules.OP_RULES.get(tgt)
    if fam is None:
        raise UnknownOp(f"{tgt} has no sharding rule")
    fam.rule(node, st)


def local_shape(node: fx.Node, placement: Placement, tp: int) -> list:
    """The node's output shape on one rank: the traced full shape with the sharded dim divided."""
    shape = [int(s) for s in val(node).shape]
    if placement is not None:
        shape[placement] //= tp
    return shape


# The op families live in oases_fx.rules (which imports the vocabulary above); their names are
# also importable from here, as they were before the move.
from oases_fx import rules as _rules  # noqa: E402

_FROM_RULES = frozenset({
    "IDENTITY_OPS", "VIEW_OPS", "SDPA_OPS", "SOFTMAX_OPS", "REDUCE_OPS", "NORM_OPS", "NO_OUTPUT_OPS",
    "view_dim_map", "_Indivisible", "slice_bounds", "check_kv_heads", "kv_slice_bounds", "is_pointwise",
})


def __getattr__(name):
    if name in _FROM_RULES:
        return getattr(_rules, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
