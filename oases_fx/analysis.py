"""One analysis per trace, read by the passes and by the planner.

:func:`analyze` looks at a traced graph once and records what both consumers need:

- the TMP regions (Megatron column -> row pairs) and the blocks declined, with the reason
  (``passes.annotate_sharding.find_tmp_regions``);
- the batch dimension of every node (:func:`propagate_batch_dims`: propagated from the inputs on
  this one trace; the old method, exporting the model again at batch B+1 and comparing shapes, is
  kept only as a fallback when propagation cannot decide, and that is recorded);
- the vocab-parallel pattern (embedding, LM head, losses: ``passes.vocab_parallel.find_vocab_parallel``)
  or why there is none;
- the parameter table (names, tied aliases, which need gradients);
- every decision, with its reason (:class:`Decision`), shown by ``OasesModule.explain()``.

The record lives in ``graph_meta(gm).analysis``.

Batch-dim propagation (one rule for every op, from shapes only, so it needs no op list):

    seed:  every graph input whose leading dim is the batch size B carries the batch on dim 0
    for each node in graph order, from its inputs that carry the batch (input dim i, size b):
        select/index on i: the batch is gone; views: the output dim where the running product of
        sizes meets the input's before i (B may merge with the dims after it: (B, S) -> (B*S,));
        permute/transpose: i moved; embedding: i of the indices; otherwise i itself if the output
        has size b there, else the right-aligned dim (broadcasting), else the one dim of size b;
        no dim of size b: the op reduced the batch (a loss, a mean).
    an op that combines a batch tensor with a full-size operand that carries no batch (a mask
    expanded to (B, ...) from an arange; pointwise ops right-aligned, others of the same rank)
    marks that operand, and its producers back to where the size-B dim is made (an expand from
    size 1, an arange(B)), and propagates again (at most a few rounds).
    Ambiguous (several candidate dims of size b, disagreeing inputs): raise, and the analysis
    falls back to tracing at B+1.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx

aten = torch.ops.aten

__all__ = ["Analysis", "Decision", "ParamInfo", "analyze", "propagate_batch_dims", "BatchDimsUnknown",
           "vocab_pattern"]


@dataclass(frozen=True)
class Decision:
    """One thing the analysis decided, and why."""

    subject: str
    """What it is about: a region or block name, "batch dims", "vocab-parallel", a parameter."""
    decision: str
    """What was decided: "found", "declined", "propagated", "traced twice", "tied", ..."""
    reason: str
    """Why, in a sentence a user can act on."""

    def __str__(self):
        return f"{self.subject}: {self.decision}" + (f" ({self.reason})" if self.reason else "")


@dataclass(frozen=True)
class ParamInfo:
    """One parameter of the traced model (one entry per tensor, tied names together)."""

    name: str
    """Its first state_dict name."""
    aliases: tuple
    """Other names of the same tensor (tied weights), possibly empty."""
    shape: tuple
    """Its full (traced) shape."""
    requires_grad: bool
    """Whether it is trained (a gradient is computed for it)."""


@dataclass
class Analysis:
    """What :func:`analyze` found in one trace."""

    tp: int
    """TMP degree the regions were checked against."""
    batch_size: Optional[int]
    """Leading dim of the example inputs (None: no tensor input)."""
    regions: list = field(default_factory=list)
    """The TMP regions found (propagation.Region, graph order), before any plan."""
    declined: list = field(default_factory=list)
    """(block name, reason) for every block the finder did not make a region of."""
    batch_dims: Optional[dict] = None
    """Node name -> the dim that carries the batch; None when not computed."""
    batch_dims_method: str = "not computed"
    """"propagated from the inputs" or "traced at batch B+1 (propagation failed: ...)"."""
    vocab: Optional[object] = None
    """passes.vocab_parallel.VocabInfo of the embedding / LM head / losses, None if none."""
    vocab_reason: str = ""
    """Why there is no vocab-parallel pattern (empty when found)."""
    params: dict = field(default_factory=dict)
    """Parameter name (first name of a tied tensor) -> ParamInfo."""
    decisions: list = field(default_factory=list)
    """Every Decision, in the order made."""

    _region_error: Optional[Exception] = field(default=None, repr=False)
    _retrace: Optional[object] = field(default=None, repr=False)

    def require_regions(self) -> list:
        """The regions; raises the finder's error where it failed at the full degree."""
        if self._region_error is not None:
            raise self._region_error
        return self.regions

    _failure: str = field(default="", repr=False)

    def require_batch_dims(self) -> dict:
        """The batch dims; where propagation failed, found now by the fallback (trace again at B+1)."""
        if self.batch_dims is None and self._retrace is not None:
            self.batch_dims = self._retrace()
            b = self.batch_size
            self.batch_dims_method = f"traced again at batch {b + 1} (propagation failed: {self._failure})"
            self.decide("batch dims", f"traced again at batch {b + 1}", f"propagation failed: {self._failure}")
        if self.batch_dims is None:
            raise AssertionError(f"batch dims not found: {self.batch_dims_method}")
        return self.batch_dims

    def decide(self, subject: str, decision: str, reason: str = "") -> None:
        self.decisions.append(Decision(subject, decision, reason))

    def alias_of(self, name: str) -> str:
        """The table name of a parameter name (its tied first name, or itself)."""
        for p in self.params.values():
            if name == p.name or name in p.aliases:
                return p.name
        return name


# ---------------------------------------------------------------------------------------------
# Batch dims
# ---------------------------------------------------------------------------------------------

class BatchDimsUnknown(Exception):
    """Propagation could not decide a node's batch dim (the caller falls back to tracing twice)."""


_VIEW_TARGETS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
                 aten.unflatten.int}
_SELECT_TARGETS = {aten.select.int}
_EMBEDDING_TARGETS = {aten.embedding.default}
_PERMUTE_TARGETS = {aten.permute.default}
_TRANSPOSE_TARGETS = {aten.transpose.int}
_EXPAND_TARGETS = {aten.expand.default}


def _tensors(v) -> list:
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (list, tuple)):
        return [t for x in v for t in _tensors(x)]
    return []


def _shape(n) -> Optional[tuple]:
    ts = _tensors(n.meta.get("val")) if isinstance(n, fx.Node) else []
    return tuple(int(s) for s in ts[0].shape) if ts else None


def _view_out_dim(in_shape, out_shape, i, batch) -> Optional[int]:
    """Output dim holding input dim i of a view: where the running product before it meets (the
    batch whole, merged with later dims, or a merged dim split back keeping the batch whole)."""
    before = math.prod(in_shape[:i])
    p = 1
    for j, s in enumerate(out_shape):
        if p == before and s != 1:
            return j if s % in_shape[i] == 0 or (in_shape[i] % s == 0 and s % batch == 0) else None
        p *= s
    return None


def _norm_dim(d, nd):
    return d + nd if isinstance(d, int) and d < 0 else d


def _out_dim(n: fx.Node, a: fx.Node, i: int, size: int, batch: int) -> Optional[int]:
    """The output dim of n that carries input a's batch dim i (size `size`); None: reduced."""
    out = _shape(n)
    in_shape = _shape(a)
    if out is None:
        return None
    nd = len(out)
    t = n.target
    if t in _SELECT_TARGETS and n.args[0] is a:
        d = _norm_dim(n.args[1], len(in_shape))
        return None if d == i else (i - 1 if d < i else i)
    if t in _VIEW_TARGETS and n.args[0] is a:
        j = _view_out_dim(in_shape, out, i, batch)
        if j is None:
            raise BatchDimsUnknown(f"{n.name}: view {in_shape} -> {out} splits the batch dim {i}")
        return j
    if t in _PERMUTE_TARGETS and n.args[0] is a:
        return [_norm_dim(d, nd) for d in n.args[1]].index(i)
    if t in _TRANSPOSE_TARGETS and n.args[0] is a:
        d0, d1 = (_norm_dim(d, nd) for d in n.args[1:3])
        return d1 if i == d0 else d0 if i == d1 else i
    if t in _EMBEDDING_TARGETS and len(n.args) > 1 and n.args[1] is a:
        return i
    if t is aten.index.Tensor and n.args[0] is a and i < len(n.args[1]) and n.args[1][i] is not None:
        return None  # a gather on the batch dim (MoE: hidden[perm // top_k]): the batch comes from the indices
    if t in _EXPAND_TARGETS and n.args[0] is a:
        return i + nd - len(in_shape)
    if i < nd and out[i] == size:
        return i
    j = i + nd - len(in_shape)
    if 0 <= j < nd and out[j] == size:
        return j
    cands = [d for d, s in enumerate(out) if s == size]
    if not cands:
        return None  # reduced over the batch (a loss, a mean over rows)
    if len(cands) == 1:
        return cands[0]
    raise BatchDimsUnknown(f"{n.name} ({t}): output {out} has several dims of the batch size {size}")


def _is_pointwise(n: fx.Node) -> bool:
    t = n.target
    return (hasattr(t, "tags") and torch.Tag.pointwise in t.tags) or t in (aten.where.self, aten.masked_fill.Scalar,
                                                                          aten.masked_fill.Tensor)


def _walk(gm: fx.GraphModule, batch: int, seeds: dict) -> tuple:
    """One forward propagation; returns (dims, marks): marks are full-size operands without a batch
    dim found beside a batch operand of a pointwise op (to be seeded in the next round)."""
    dims, marks = {}, {}
    for n in gm.graph.nodes:
        if n in seeds:
            dims[n] = seeds[n]
            continue
        if n.op == "placeholder":
            s = _shape(n)
            if s and s[0] == batch:
                dims[n] = 0
            continue
        if n.op != "call_function":
            continue
        if n.target is operator.getitem:
            src = n.args[0]
            if src in dims:
                sv = _tensors(src.meta.get("val"))
                v = _tensors(n.meta.get("val"))
                if v and sv:
                    d = dims[src]
                    size = int(sv[0].shape[d])
                    got = [k for k in range(v[0].dim()) if int(v[0].shape[k]) == size]
                    dims[n] = d if d < v[0].dim() and int(v[0].shape[d]) == size else (got[0] if got else None)
                    if dims[n] is None:
                        del dims[n]
            continue
        found = set()
        for a in n.all_input_nodes:
            if a in dims:
                i = dims[a]
                size = _shape(a)[i]
                j = _out_dim(n, a, i, size, batch)
                if j is not None:
                    found.add(j)
        if len(found) > 1:
            raise BatchDimsUnknown(f"{n.name} ({n.target}): inputs carry the batch to dims {sorted(found)}")
        if not found:
            continue
        (j,) = found
        dims[n] = j
        out = _shape(n)
        for a in n.all_input_nodes:  # a full-size operand that carries no batch yet: made from B
            s = _shape(a)
            if a in dims or s is None or a.op != "call_function":
                continue
            k = j - (len(out) - len(s)) if _is_pointwise(n) else (j if len(s) == len(out) else -1)
            if 0 <= k < len(s) and s[k] == out[j] and s[k] != 1:
                marks[a] = k
    return dims, marks


def _producers_to_mark(a: fx.Node, k: int, marks: dict) -> None:
    """Mark a's producers that hold the same size-B dim, back to the op that makes it (an expand
    from size 1, an arange(B)): the same index, else right-aligned (broadcasting)."""
    shape = _shape(a)
    size = shape[k]
    if a.target in _EXPAND_TARGETS:
        src = _shape(a.args[0]) if isinstance(a.args[0], fx.Node) else None
        kk = k - (len(shape) - len(src)) if src is not None else -1
        if kk < 0 or src[kk] != size:
            return  # the expand makes the batch dim
    for p in a.all_input_nodes:
        s = _shape(p)
        if s is None or p.op != "call_function" or p in marks:
            continue
        kk = k if k < len(s) and s[k] == size else k - (len(shape) - len(s))
        if 0 <= kk < len(s) and s[kk] == size and s[kk] != 1:
            marks[p] = kk
            _producers_to_mark(p, kk, marks)


def propagate_batch_dims(gm: fx.GraphModule, batch: int, *, max_rounds: int = 4) -> dict:
    """Node name -> batch dim, from one trace (see the module docstring); raises BatchDimsUnknown."""
    seeds: dict = {}
    for _ in range(max_rounds):
        dims, marks = _walk(gm, batch, seeds)
        new = {a: k for a, k in marks.items() if a not in seeds}
        if not new:
            return {n.name: d for n, d in dims.items()}
        for a, k in list(new.items()):
            _producers_to_mark(a, k, new)
        seeds.update(new)
    raise BatchDimsUnknown(f"batch dims not settled after {max_rounds} rounds")


# ---------------------------------------------------------------------------------------------
# Vocab pattern, parameters
# ---------------------------------------------------------------------------------------------

def find_vocab(gm: fx.GraphModule, tp: Optional[int] = None):
    """(VocabInfo, "") or (None, reason): the one vocab-parallel detection (passes.vocab_parallel)."""
    from oases_fx.errors import OasesError
    from oases_fx.passes.vocab_parallel import find_vocab_parallel

    try:
        return find_vocab_parallel(gm, tp), ""
    except OasesError as e:
        return None, str(e).split(" Fix:")[0]


def vocab_pattern(info):
    """The planner's VocabPattern view of a VocabInfo (the same nodes)."""
    from oases_fx.planner.cost_model import VocabPattern
    from oases_fx.propagation import linear_parts

    _, lw, bias, _ = linear_parts(info.lm_head)
    emb = info.embeddings[0]
    return VocabPattern(vocab=info.vocab_size, embedding=emb, weights=tuple(dict.fromkeys([emb.args[0], lw])),
                        lm_head=info.lm_head, lm_bias=bias if isinstance(bias, fx.Node) else None,
                        logits_output=info.logits_output)


def parameter_table(gm: fx.GraphModule, model: Optional[torch.nn.Module] = None) -> dict:
    """Name -> ParamInfo, tied names folded into the first; requires_grad from the model if given
    (the traced module's parameters mirror it)."""
    src = model if model is not None else gm
    by_id: dict = {}
    for name, p in src.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), (p, []))[1].append(name)
    out = {}
    for p, names in by_id.values():
        out[names[0]] = ParamInfo(name=names[0], aliases=tuple(names[1:]), shape=tuple(p.shape),
                                  requires_grad=bool(p.requires_grad))
    return out


# ---------------------------------------------------------------------------------------------
# The analysis
# ---------------------------------------------------------------------------------------------

def batch_size_of(flat_inputs) -> Optional[int]:
    return next((int(t.shape[0]) for t in flat_inputs if isinstance(t, torch.Tensor) and t.dim() > 0), None)


def analyze(gm: fx.GraphModule, *, tp: int, batch_size: Optional[int], model: Optional[torch.nn.Module] = None,
            retrace=None, need_batch_dims: bool = True) -> Analysis:
    """The analysis of one trace (see the module docstring).

    Args:
        gm: the traced graph (tracing.capture), before any pass.
        tp: the TMP degree regions are checked against.
        batch_size: the example batch (leading dim of the inputs).
        model: the user's module (parameter names and requires_grad); None: gm's.
        retrace: () -> {node name: dim}: the old method (trace again at B+1), used only when
            propagation fails; None: no fallback (the failure is recorded, batch dims stay None).
        need_batch_dims: False skips them (nothing splits the batch).
    """
    from oases_fx.passes.annotate_sharding import find_tmp_regions

    from oases_fx.errors import OasesError

    a = Analysis(tp=tp, batch_size=batch_size)
    try:
        a.regions, declined = find_tmp_regions(gm, tp)
    except OasesError as e:  # e.g. heads not divisible by tp: an explicit plan may still shard at d < tp
        a._region_error, declined = e, []
        a.decide("TMP regions", f"not found at TMP degree {tp}", str(e).split(" Fix:")[0])
    a.declined = list(declined)
    for r in a.regions:
        a.decide(r.name, f"{r.kind} region found", "Megatron column -> row pair")
    for name, why in a.declined:
        a.decide(name, "declined", why)
    if need_batch_dims and batch_size:
        try:
            a.batch_dims = propagate_batch_dims(gm, batch_size)
            a.batch_dims_method = "propagated from the inputs (one trace)"
            a.decide("batch dims", "propagated from the inputs", f"{len(a.batch_dims)} nodes carry the batch")
        except BatchDimsUnknown as e:
            a.batch_dims_method = f"not found by propagation: {e}"
            a._retrace, a._failure = retrace, str(e)
    a.vocab, a.vocab_reason = find_vocab(gm, tp)
    if a.vocab is not None:
        a.decide("vocab-parallel", "pattern found",
                 f"embedding {', '.join(str(e.args[0].target) for e in a.vocab.embeddings)}, LM head "
                 f"{a.vocab.lm_head.name}{' (tied)' if a.vocab.tied else ''}, {len(a.vocab.losses)} loss(es), V={a.vocab.vocab_size}")
    else:
        a.decide("vocab-parallel", "no pattern", a.vocab_reason)
    a.params = parameter_table(gm, model)
    for p in a.params.values():
        if p.aliases:
            a.decide(p.name, "tied", f"same tensor as {', '.join(p.aliases)}")
    frozen = [p.name for p in a.params.values() if not p.requires_grad]
    if frozen:
        a.decide(f"{len(frozen)} parameter(s)", "frozen", "requires_grad=False: " + ", ".join(frozen[:5])
                 + (" ..." if len(frozen) > 5 else ""))
    return a


def analysis_of(traced, *, tp: int, model: Optional[torch.nn.Module] = None, retrace=None) -> Analysis:
    """The analysis of a tracing.Traced, computed once and kept in graph_meta(traced.gm).analysis."""
    from oases_fx.meta import graph_meta

    m = graph_meta(traced.gm)
    if m.analysis is None or m.analysis.tp != tp:
        m.analysis = analyze(traced.gm, tp=tp, batch_size=batch_size_of(traced.flat_inputs), model=model,
                             retrace=retrace)
    return m.analysis
