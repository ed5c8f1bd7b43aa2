"""Predict a plan's step time (forward + backward) and peak memory from a profile.

The model's TMP regions form a chain. For one plan (k sub-batches, a recompute policy, per region
replicate or shard at a TMP degree d dividing the TMP degree T, and vocab_parallel) this module
writes down the events one training step issues, in the host order the schedule pass produces,
and runs them through :func:`oases_fx.timeline.simulate`, the one two-stream execution model of
oases_fx. Nothing here schedules or overlaps by itself.

Events of region r for sub-batch j (times from the profile, at the sub-batch shapes):

    F   region forward (column linears .. row linear)    AR_f  all-reduce of the row output (g), d ranks
    AG_f  all-gather of the output over the n = T/d ranks of the cross group (only d < T)
    G   glue forward (bias/dropout/residual/norm up to the next region)
    B   region backward except the column weight-grads   AR_b  all-reduce of the input grad (f), d ranks
    AG_b  all-gather of the input grad over the cross group (only d < T)
    W   column weight-grads (run while AR_b is in flight, as Megatron does)
    Gb  glue backward                                    R     recompute (fine: the recomputed
                                                               ops of F + G, no comm; see below)
    GR  all-reduce of the region's parameter gradients over the cross group, once per step after
        the last sub-batch's W (only d < T), waited at the end of the step

A region at degree d < T (Oases): the T ranks form n = T/d groups of d consecutive ranks; each
group shards the region d-ways and runs 1/n of the sub-batch (F, B, W at batch B/(k n) with
d-way shards); AR_f/AR_b are over the d ranks (absent when d = 1), and AG_f/AG_b assemble the
whole sub-batch over the n ranks. They are issued back to back (the comm stream orders them) and
only the last is waited. d = T is Megatron sharding (no AG, no GR); a replicated region has no
collectives and full-size compute.

Host order (the Oases interleave: sub-batch j's collective overlaps sub-batch j+1's compute,
and the last sub-batch's collective overlaps the first sub-batch's work of the next region):

    forward:   head; [vocab_parallel: AR_emb, wait]
               for r: for j: [wait last comm(r-1, j); G(r-1, j)]; F(r, j); AR_f(r, j); AG_f(r, j)
               for j: wait AR_f(last, j); G(last, j); tail forward
               [vocab_parallel: AR_ce x 3, each waited (max, sum-exp, target logit);
                AG_logits when the logits are a graph output, waited at the end of the step]
               tail backward; [vocab_parallel: AR_lm (LM head input grad), wait]
    backward:  for r (reversed):
                   full: for j: F'(r, j); AR_f'(r, j); AG_f'(r, j)   (all sub-batches' recompute first)
                   for j:
                       fine: R(r, j)                 (before the wait: recompute needs no grad)
                       wait last comm_b(r+1, j)
                       full: wait AR_f'(r, j); G'(r, j)
                       Gb(r, j); B(r, j); AR_b(r, j); AG_b(r, j); W(r, j)
                   GR(r)
               for j: wait AR_b(first, j); head backward; wait every GR; [wait AG_logits]

At most MAX_IN_FLIGHT collectives are in flight (schedule_overlap's ScheduleOptions.max_in_flight):
a collective past the bound is issued right after the next wait, and a wait reached before its
collective was issued waits the oldest in flight first (tests/unit/test_planner_order.py checks
this order against the pass's on a graph of k sub-batch chains).

Per-step terms (issue 14; the constants are Profile.step, profile.StepConstants; all zero: off):

    kernels    price_ops: Inductor's view of a part's ops. Library ops (GEMMs, fused attention)
               are kernels of their own (a linear: 1 forward, dgrad + wgrad + bias-grad backward;
               fused attention: 1 forward, ATTENTION_BACKWARD_KERNELS backward);
               a run of other ops is one fused kernel each way (+1 backward per norm for its weight
               grads, +1 per embedding for its scatter); dropout(p=0) is dropped (free). An input
               made by the previous op of the same fused kernel is not read from memory: that op's
               time shrinks by those bytes' share of its traffic. Roofline times get
               kernel_overhead_us per kernel, and library kernels library_kernel_us more
               (measured times already hold both).
    recompute  R (fine) re-runs only the ops whose outputs backward reads (OpSpec.recomputed:
               attention keeps its output, linears and norms their inputs); a row linear's output
               feeds only the all-reduce and the adds, so fine never re-runs it. Full re-runs the
               forward all-reduce (F', AR_f'), so it re-runs the row linears too, unless that
               all-reduce is free (skipped): then fine and full do the same work.
    split      k > 1: a cat of the whole batch at the split span's end (forward, after the last
               region) and of the input gradient at its start (backward, before the head's
               backward), each a read + write at copy_bw; and for every sub-batch after the first
               the weight-gradient accumulation (addmm beta=1 copies the accumulator: 3 x the
               region's gradient bytes, one copy kernel per weight).
    host       host_us = host_step_us + host_per_kernel_us * kernels + host_per_checkpoint_us *
               (regions x k when recomputing); step_us = max(device makespan, host_us): the host
               issues ahead of the device until the device outruns it (Prediction.host_bound).

Head (before the first region) and tail (after the last) run whole: split_sub_batches only
splits the region chain. With vocab_parallel they run their vocabulary-parallel variants (LM
head and cross-entropy over V/T, embedding lookup in a V/T table). The optimizer step is not part
of the predicted step (the benchmarks' "step" is forward+backward).

Memory (bytes on one rank, an estimate): parameters + gradients (parameter dtype) + Adam's two
fp32 states per parameter element (exp_avg, exp_avg_sq; no fp32 master copy) + activations kept
from forward to backward, by recompute policy:

    none: every compute op's output of every region and glue (whole batch)
    fine: each region's input and its post-all-reduce output (whole batch), plus the transient
          of one sub-batch's region while it is recomputed and differentiated
    full: each region's input (whole batch), plus the transient of the k sub-batches'
          recomputed region (they are recomputed together, see the host order)
    head and tail outputs are kept in every policy.

A region at degree d keeps parameters, gradients and Adam state / d and activations at its
batch B/(k n) and d-way shards. vocab_parallel divides the embedding/LM-head parameters (and
their gradients and Adam state) and the logits-sized tail activations by T, and adds the
all-gathered logits when they are a graph output.
"""
from __future__ import annotations

import bisect
import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Optional, Sequence

import torch
import torch.fx as fx

from oases_fx import meta as oases_meta
from oases_fx.passes.schedule_overlap import ScheduleOptions
from oases_fx.plan import RECOMPUTE_POLICIES, Plan
from oases_fx.timeline import COMM, COMPUTE, TableCostModel, Timeline, is_free_op, op_key, simulate

if TYPE_CHECKING:  # profile imports this module, not the other way round
    from oases_fx.planner.profile import Profile

GIB = 1024 ** 3
ADAM_STATE_BYTES_PER_ELEMENT = 8
"""Adam keeps exp_avg and exp_avg_sq in fp32: 2 x 4 bytes per parameter element."""


# ---------------------------------------------------------------------------------------------
# The workload: what each region computes, per (k, shard) variant
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class OpSpec:
    """One compute op at one variant's shapes (the profile times it by ``key``)."""

    key: str
    """Profile key: :func:`oases_fx.timeline.op_key` of the op at these shapes, plus its
    non-tensor arguments (``is_causal`` changes an attention's time, not its shapes)."""
    part: str
    """"region" (between the column and the row linears), "glue" (after the region's row, up to
    the next region), "head" or "tail" (outside the region chain, whole batch)."""
    out_bytes: int = 0
    """Bytes of the op's output at these shapes (what a no-recompute backward keeps)."""
    column: bool = False
    """A column linear: half of its backward (the weight-grad) may run under the input-grad
    all-reduce."""
    in_bytes: int = 0
    """Bytes of the op's tensor inputs at these shapes (the fusion term: an input produced by the
    previous op of the same fused kernel is not read from memory)."""
    name: str = field(default="", compare=False)
    """The traced node's name (the fusion term matches it against ``sources``)."""
    sources: tuple = field(default=(), compare=False)
    """Names of the compute nodes producing the op's tensor inputs (through views)."""
    recomputed: bool = True
    """Recomputation re-runs this op: backward needs its output, directly (attention keeps its
    output, norms and linears their inputs) or to recompute an op that does. False for ops whose
    outputs backward never reads (a row linear's output only feeds the bias/residual adds and the
    all-reduce), see _recomputed_nodes."""
    node: Optional[fx.Node] = field(default=None, compare=False, repr=False)
    """The op in a scratch graph with ``meta["val"]`` at these shapes; profile.py runs it."""


@dataclass(frozen=True, kw_only=True)
class RegionVariant:
    """A region's work for ONE sub-batch, given k and shard/replicate."""

    ops: tuple
    """OpSpec of the region's ops then its glue ops, graph order."""
    comm_fwd_bytes: int = 0
    """Bytes of the forward all-reduce (row output; 0 when replicated)."""
    comm_bwd_bytes: int = 0
    """Bytes of the backward all-reduce (grad of the column input; 0 when replicated)."""
    in_bytes: int = 0
    """Bytes of the region's input (column linears' activation)."""
    out_bytes: int = 0
    """Bytes of the region's (post-all-reduce) output."""
    param_numel: int = 0
    """Parameter elements of the region on one rank."""
    param_bytes: int = 0
    """Parameter bytes of the region on one rank."""
    gather_fwd_bytes: int = 0
    """Bytes of the forward all-gather of the output over the cross group (whole sub-batch; d < T)."""
    gather_bwd_bytes: int = 0
    """Bytes of the backward all-gather of the input grad over the cross group (d < T)."""
    grad_reduce_bytes: int = 0
    """Bytes of the once-per-step all-reduce of the parameter gradients over the cross group (d < T)."""
    degree: int = 0
    """d: ranks the region is sharded over (0: not recorded; the variant key says)."""
    cross: int = 1
    """n = T/d: ranks of the cross group (each runs 1/n of the sub-batch)."""


@dataclass(frozen=True, kw_only=True)
class RegionSpec:
    name: str
    """Region name as find_tmp_regions gives it (e.g. "transformer.h.0.attn")."""
    kind: str
    """"attention" or "mlp"."""
    variants: Mapping
    """(num_sub_batches, shard) -> RegionVariant: shard=True at the full TMP degree T."""
    degree_variants: Mapping = field(default_factory=dict)
    """(num_sub_batches, d) -> RegionVariant for the degrees 1 <= d < T (Oases: n = T/d groups of
    d ranks, each running 1/n of the sub-batch)."""

    def _where(self, k: int, state: int, tp: int) -> tuple:
        """(table, key) holding the variant of decision ``state`` at k sub-batches."""
        if state == REPLICATED or state == tp:
            return self.variants, (k, state == tp)
        return self.degree_variants, (k, state)

    def variant(self, k: int, state: int, tp: int) -> RegionVariant:
        """The variant of decision ``state`` (a degree d, or REPLICATED) at k sub-batches."""
        table, key = self._where(k, state, tp)
        return table[key]

    def has_state(self, k: int, state: int, tp: int) -> bool:
        table, key = self._where(k, state, tp)
        return key in table

    @property
    def signature(self) -> tuple:
        """Equal for regions that cost the same in every variant (identical layers)."""
        items = [(("s",) + key, v) for key, v in self.variants.items()]
        items += [(("d",) + key, v) for key, v in self.degree_variants.items()]
        return tuple(
            (key, v.comm_fwd_bytes, v.comm_bwd_bytes, v.in_bytes, v.out_bytes, v.param_numel, v.param_bytes,
             v.gather_fwd_bytes, v.gather_bwd_bytes, v.grad_reduce_bytes, v.degree, v.cross,
             tuple((o.key, o.part, o.out_bytes, o.column, o.in_bytes, o.recomputed) for o in v.ops),
             _fused_inputs(v.ops))
            for key, v in sorted(items, key=lambda kv: kv[0])
        )


def _fused_inputs(ops) -> tuple:
    """Per op, the positions in ``ops`` of the ops producing its inputs (-1: from outside)."""
    at = {o.name: i for i, o in enumerate(ops) if o.name}
    return tuple(tuple(at.get(src, -1) for src in o.sources) for o in ops)


REPLICATED = 0
"""The per-region decision "replicate" (any other decision is the TMP degree d >= 1)."""


@dataclass(frozen=True, kw_only=True)
class VocabSpec:
    """The model's embedding + LM head + cross-entropy when sharded over the vocabulary."""

    vocab: int
    """V."""
    head_ops: tuple
    """The head's ops with the V-row embedding table sharded (V/T rows), whole batch."""
    tail_ops: tuple
    """The tail's ops with the LM head and the cross-entropy over V/T columns, whole batch."""
    emb_reduce_bytes: int
    """All-reduce of the embedding output (B*S*h) in forward."""
    lm_grad_reduce_bytes: int
    """All-reduce of the LM head's input gradient (B*S*h) in backward."""
    ce_reduce_bytes: int
    """Each of the cross-entropy's three all-reduces (max, sum-exp, target logit: B*S floats)."""
    logits_gather_bytes: int = 0
    """All-gather of the logits (B*S*V) when they are a graph output; 0 when only the loss is."""
    param_numel: int = 0
    """Elements of the embedding/LM-head parameters (unsharded; tied weights once)."""
    param_bytes: int = 0
    """Their bytes (unsharded)."""


def _spec_to_json(x):
    if dataclasses.is_dataclass(x):
        return {f.name: _spec_to_json(getattr(x, f.name)) for f in dataclasses.fields(x) if f.name != "node"}
    if isinstance(x, Mapping):  # variant tables keyed by tuples
        return [[list(k), _spec_to_json(v)] for k, v in sorted(x.items())]
    if isinstance(x, (tuple, list)):
        return [_spec_to_json(v) for v in x]
    return x


def _build(cls, d: dict, **nested):
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in d.items() if k in names}
    for k, conv in nested.items():
        if k in kw:
            kw[k] = conv(kw[k])
    for f in dataclasses.fields(cls):  # JSON lists back to the tuples the dataclasses hold
        if f.name in kw and isinstance(kw[f.name], list) and f.name not in nested:
            kw[f.name] = tuple(kw[f.name])
    return cls(**kw)


def _ops_from(xs) -> tuple:
    return tuple(_build(OpSpec, o) for o in xs)


def _variants_from(rows) -> dict:
    return {tuple(k): _build(RegionVariant, v, ops=_ops_from) for k, v in rows}


def _spec_from_json(cls, d: dict):
    region = lambda r: _build(RegionSpec, r, variants=_variants_from, degree_variants=_variants_from)  # noqa: E731
    vocab = lambda v: None if v is None else _build(VocabSpec, v, head_ops=_ops_from, tail_ops=_ops_from)  # noqa: E731
    return _build(cls, d, regions=lambda rs: tuple(region(r) for r in rs), head_ops=_ops_from, tail_ops=_ops_from,
                  vocab=vocab, merged=lambda xs: tuple(tuple(x) for x in xs))


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Everything the cost model needs to know about one model at one batch size and TMP degree."""

    regions: tuple
    """RegionSpec per TMP region, chain (graph) order."""
    tp: int
    """TMP degree."""
    batch: int
    """Batch size of one step (per data-parallel replica)."""
    head_ops: tuple = ()
    """OpSpec of the ops before the first region (embeddings, masks), whole batch, replicated."""
    tail_ops: tuple = ()
    """OpSpec of the ops after the last region (final norm, LM head, loss), whole batch."""
    other_param_numel: int = 0
    """Parameter elements outside the regions (embeddings, norms, LM head): replicated."""
    other_param_bytes: int = 0
    """Their bytes."""
    notes: tuple = ()
    """What describe_model assumed (shown by explain)."""
    degrees: tuple = ()
    """TMP degrees the regions were described at (divisors of tp; () means just (tp,))."""
    vocab: Optional[VocabSpec] = None
    """The vocabulary-parallel variant of head and tail, or None (see vocab_reason)."""
    vocab_reason: str = ""
    """Why vocab is None (no embedding/LM-head pattern, V not divisible by T, not described)."""
    merged: tuple = ()
    """(i, j, forward, backward) per parallel-residual pair of regions (passes.merge_collectives):
    when both are sharded at the full degree, region i's forward all-reduce is merged into j's and,
    if ``backward``, j's backward all-reduce into i's (they read the same tensor)."""

    @property
    def described_degrees(self) -> tuple:
        return tuple(sorted(set(self.degrees) | {self.tp}, reverse=True))

    @property
    def k_choices(self) -> tuple:
        """The sub-batch counts every region has variants for."""
        ks = None
        for r in self.regions:
            mine = {k for k, _ in r.variants}
            ks = mine if ks is None else ks & mine
        return tuple(sorted(ks or ()))

    def all_ops(self) -> list:
        """Every OpSpec of every variant (the profile must time all their keys)."""
        out = list(self.head_ops) + list(self.tail_ops)
        if self.vocab is not None:
            out += list(self.vocab.head_ops) + list(self.vocab.tail_ops)
        for r in self.regions:
            for _, v in sorted(r.variants.items()):
                out.extend(v.ops)
            for _, v in sorted(r.degree_variants.items()):
                out.extend(v.ops)
        return out

    def op_keys(self) -> list:
        return sorted({o.key for o in self.all_ops()})

    def to_dict(self) -> dict:
        """JSON-able form without the scratch fx nodes (the cost model never reads them; only the
        profiler runs them), e.g. to re-predict measured plans later: ModelSpec.from_dict."""
        return _spec_to_json(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        """Inverse of to_dict. Fields added since the dict was written take their defaults;
        fields since removed are ignored."""
        return _spec_from_json(cls, d)


# ---------------------------------------------------------------------------------------------
# Building a ModelSpec from the traced graph
# ---------------------------------------------------------------------------------------------


def _ints(shape) -> list:
    out = []
    for s in shape:
        try:
            out.append(int(s))
        except Exception:  # a symbolic size without a hint: its hint through the node
            out.append(int(s.node.hint) if getattr(s.node, "hint", None) is not None else 1)
    return out


def _metas(v) -> list:
    """[(shape, dtype)] of every tensor in a node value (tensor or nested list/tuple)."""
    if isinstance(v, torch.Tensor):
        return [(_ints(v.shape), v.dtype)]
    if isinstance(v, (list, tuple)):
        return [m for x in v for m in _metas(x)]
    return []


def _batch_dims(gm: fx.GraphModule, batch: int) -> tuple:
    """(node -> batch dim, note): the analysis' batch dims (oases_fx.analysis, the ones the passes
    split by), computed here only when describe_model is called on a graph without one."""
    from oases_fx import analysis
    from oases_fx.meta import graph_meta

    an = graph_meta(gm).analysis
    dims = an.batch_dims if an is not None and an.batch_size == batch else None
    note = ""
    if dims is None:
        try:
            dims = analysis.propagate_batch_dims(gm, batch)
        except analysis.BatchDimsUnknown as e:
            dims, note = {}, f"batch dims unknown ({e}): only leading dims of size {batch} are divided by k"
    by_name = {n.name: n for n in gm.graph.nodes}
    return {by_name[name]: d for name, d in dims.items() if name in by_name}, note


class _Shapes:
    """Shapes of a node's value at a variant: batch dim divided by k, the sharded dim by tp."""

    def __init__(self, *, batch: int, dims: dict, params: set):
        self.batch, self.dims, self.params = batch, dims, params

    def placement(self, n: fx.Node, st) -> object:
        if st is None:
            return None
        if n in st.weight_dim:
            return st.weight_dim[n]
        if n in st.bias_dim:
            return st.bias_dim[n]
        return st.placement.get(n)

    def scaled(self, n: fx.Node, k: int, tp: int, st) -> list:
        pl = self.placement(n, st)
        out = []
        for i, (shape, dtype) in enumerate(_metas(n.meta.get("val"))):
            shape = list(shape)
            p = pl[i] if isinstance(pl, tuple) and i < len(pl) else (pl if not isinstance(pl, tuple) else None)
            if isinstance(p, int) and shape:
                shape[p] //= tp
            is_param = n.op == "get_attr" or n in self.params
            d = self.dims.get(n, 0 if shape and shape[0] == self.batch else None)  # the batch dim
            if shape and not is_param and k > 1 and d is not None and d < len(shape) and shape[d] % k == 0:
                shape[d] //= k
            out.append((shape, dtype))
        return out


def _meta_value(metas: list, like) -> object:
    vals = [torch.empty(s, dtype=d, device="meta") for s, d in metas]
    if isinstance(like, torch.Tensor):
        return vals[0] if vals else None
    return vals


def _nbytes(metas: list) -> int:
    return sum(math.prod(s) * d.itemsize for s, d in metas)


def _non_tensor_args(node: fx.Node) -> str:
    parts = []

    def keep(a):
        if isinstance(a, fx.Node):
            return "_"
        if isinstance(a, torch.device):  # meta-traced (CLI) and CUDA-traced (compile) keys must agree
            return "device"
        if isinstance(a, (list, tuple)):
            return "[" + ",".join(keep(x) for x in a) + "]"
        return repr(a)

    for a in node.args:
        parts.append(keep(a))
    for k in sorted(node.kwargs):
        parts.append(f"{k}={keep(node.kwargs[k])}")
    return ",".join(parts)


class _VariantBuilder:
    """Makes scratch-graph copies of ops at variant shapes (for keys, measuring and roofline)."""

    def __init__(self, shapes: _Shapes):
        self.shapes = shapes
        self.graph = fx.Graph()
        self._cache: dict = {}

    def op(self, n: fx.Node, *, k: int, tp: int, st, part: str, column: bool = False,
           recomputed: bool = True) -> OpSpec:
        ck = (n, k, tp, id(st) if st is not None else None, part, column, recomputed)
        if ck in self._cache:
            return self._cache[ck]
        phs = {}
        in_bytes = 0
        for a in n.all_input_nodes:
            ph = self.graph.placeholder(f"in_{a.name}")
            metas = self.shapes.scaled(a, k, tp, st)
            ph.meta["val"] = _meta_value(metas, a.meta.get("val"))
            in_bytes += _nbytes(metas)
            phs[a] = ph
        args = fx.node.map_arg(n.args, lambda a: phs[a])
        kwargs = fx.node.map_arg(n.kwargs, lambda a: phs[a])
        v = self.graph.create_node("call_function", n.target, args, kwargs, name=n.name)
        out = self.shapes.scaled(n, k, tp, st)
        v.meta["val"] = _meta_value(out, n.meta.get("val"))
        spec = OpSpec(key=f"{op_key(v)}|{_non_tensor_args(n)}", part=part, out_bytes=_nbytes(out),
                      column=column, in_bytes=in_bytes, name=n.name,
                      sources=tuple(_source(a).name for a in n.all_input_nodes), recomputed=recomputed, node=v)
        self._cache[ck] = spec
        return spec


def _source(a: fx.Node) -> fx.Node:
    """The node computing a value, through views (free ops with one tensor input)."""
    while is_free_op(a) and a.op == "call_function" and len(a.all_input_nodes) == 1:
        a = a.all_input_nodes[0]
    return a


def _compute_users(n: fx.Node) -> list:
    """(user, the input of the user it reads) for compute nodes reading n's value, through views."""
    out, todo, seen = [], [n], set()
    while todo:
        x = todo.pop()
        for u in x.users:
            if u in seen:
                continue
            seen.add(u)
            if is_free_op(u) and u.op == "call_function":
                todo.append(u)
            elif u.op == "call_function":
                out.append((u, x))
    return out


_BACKWARD_NEEDS_NOTHING = ("add", "sub", "neg", "dropout", "clone", "cat", "split", "chunk", "_to_copy",
                           "to", "contiguous", "embedding")
"""Ops whose backward reads none of their tensor inputs or outputs (embedding reads its integer
indices, which are graph inputs; dropout its saved mask, which recomputation does not produce)."""
_BACKWARD_NEEDS_OUTPUT = ("attention", "softmax", "tanh", "sigmoid", "exp")
"""Ops whose backward reads their own output (fused attention: output and logsumexp)."""


def _base_name(target) -> str:
    s = str(target)
    parts = s.split(".")
    return parts[1] if s.startswith("aten.") and len(parts) > 1 else s.rsplit(".", 1)[-1]


def _recomputed_nodes(nodes: Sequence) -> set:
    """Of a region's compute nodes and glue (one recomputed segment), those whose outputs backward
    reads, directly or to recompute another such node: recomputation re-runs exactly these
    (AOTAutograd's partitioner recomputes what backward needs, nothing else). Whatever backward
    needs from outside the segment is its saved input."""
    seg = set(nodes)
    out = set()
    for n in reversed(list(nodes)):
        name = _base_name(n.target)
        if any(w in name for w in _BACKWARD_NEEDS_OUTPUT):
            out.add(n)
            continue
        for u, _ in _compute_users(n):
            uname = _base_name(u.target)
            reads_inputs = not any(w == uname or uname.startswith(w + "_") for w in _BACKWARD_NEEDS_NOTHING)
            if (u in seg and u in out) or reads_inputs:
                out.add(n)
                break
    return out


def divisors(n: int) -> tuple:
    """Divisors of n, descending."""
    return tuple(d for d in range(n, 0, -1) if n % d == 0)


@dataclass(frozen=True)
class VocabPattern:
    """An embedding table [V, h] whose V is the output dim of a linear (the LM head)."""

    vocab: int
    embedding: fx.Node
    """The aten.embedding node."""
    weights: tuple
    """The [V, h] weight nodes (embedding's and LM head's; one node when tied)."""
    lm_head: fx.Node
    """The linear producing the logits."""
    lm_bias: Optional[fx.Node] = None
    logits_output: bool = False
    """The logits reach the graph outputs (through views only): vocab_parallel must all-gather them."""


def find_vocab_pattern(gm: fx.GraphModule):
    """(VocabPattern, "") or (None, reason): the vocab_parallel pass's own detection
    (passes.vocab_parallel.find_vocab_parallel, through oases_fx.analysis), so the planner offers
    vocab_parallel exactly where the pass applies it; the analysis' result when the graph has one."""
    from oases_fx import analysis
    from oases_fx.meta import graph_meta

    an = graph_meta(gm).analysis
    info, reason = (an.vocab, an.vocab_reason) if an is not None else analysis.find_vocab(gm)
    if info is None and an is not None and "not divisible" in reason:
        info, reason = analysis.find_vocab(gm)  # divisibility is _describe_vocab's to say, per degree
    return (analysis.vocab_pattern(info), "") if info is not None else (None, reason)


class _VocabState:
    """Placements for _Shapes.scaled: the [V, h] weights on dim 0, V-wide activations on the last dim."""

    def __init__(self, weights, bias, placement):
        self.weight_dim = {w: 0 for w in weights}
        self.bias_dim = {bias: 0} if bias is not None else {}
        self.placement = placement


def _describe_vocab(graph, pat, head, tail, build, shapes, tp, order):
    """VocabSpec of head/tail under vocab_parallel, or (None, reason)."""
    if tp <= 1:
        return None, "TMP degree 1: nothing to shard the vocabulary over"
    if pat.vocab % tp:
        return None, f"vocabulary {pat.vocab} is not divisible by the TMP degree {tp}"
    if pat.embedding not in head or pat.lm_head not in tail:
        return None, "the embedding or the LM head is not outside the TMP regions (head/tail)"
    V = pat.vocab
    placement, todo = {}, [pat.lm_head]
    while todo:  # V-wide floating-point values downstream of the LM head: sharded on the last dim
        x = todo.pop()
        ms = _metas(x.meta.get("val"))
        if x in placement or not ms or not ms[0][0] or ms[0][0][-1] != V or not ms[0][1].is_floating_point:
            continue
        placement[x] = len(ms[0][0]) - 1
        todo.extend(u for u in x.users if u.op == "call_function")
    st = _VocabState(pat.weights, pat.lm_bias, placement)
    head_ops = tuple(build.op(n, k=1, tp=tp, st=st, part="head") for n in head)
    tail_ops = tuple(build.op(n, k=1, tp=tp, st=st, part="tail") for n in tail)
    emb_b = _nbytes(shapes.scaled(pat.embedding, 1, tp, None))
    lm_in = pat.lm_head.args[0]
    lm_in_b = _nbytes(shapes.scaled(lm_in, 1, tp, None)) if isinstance(lm_in, fx.Node) else 0
    logits = shapes.scaled(pat.lm_head, 1, tp, None)
    rows = math.prod(logits[0][0][:-1]) if logits else 0
    pnodes = list(pat.weights) + ([pat.lm_bias] if pat.lm_bias is not None else [])
    uniq = {}
    for n in pnodes:
        uniq.setdefault(str(n.target), n)
    p_metas = [m for n in uniq.values() for m in _metas(n.meta.get("val"))]
    return VocabSpec(
        vocab=V, head_ops=head_ops, tail_ops=tail_ops, emb_reduce_bytes=emb_b, lm_grad_reduce_bytes=lm_in_b,
        ce_reduce_bytes=rows * 4, logits_gather_bytes=_nbytes(logits) if pat.logits_output else 0,
        param_numel=sum(math.prod(s) for s, _ in p_metas), param_bytes=_nbytes(p_metas)), ""


def describe_model(gm: fx.GraphModule, regions: Sequence, *, tp: int, batch: int,
                   k_choices: Sequence[int] = (1, 2, 4), degrees: Optional[Sequence[int]] = None,
                   vocab: bool = True, find_vocab=None, merge_collectives: bool = True) -> ModelSpec:
    """The planner's view of a traced model: per region and variant, the ops and byte counts.

    Args:
        gm: the traced graph (oases_fx.tracing.capture), nodes with ``meta["val"]`` at FULL shapes.
        regions: find_tmp_regions(gm, tp)[0], graph order.
        tp: TMP degree; batch: the step's batch size; k_choices: sub-batch counts to describe
            (those that do not divide the batch are left out, with a note).
        degrees: per-region TMP degrees to describe (divisors of tp; None: all of them). A degree
            d < tp at k sub-batches needs batch % (k * tp/d) == 0 (else left out, with a note).
        vocab: describe the vocabulary-parallel head/tail (when the pattern is found).
        find_vocab: the detection, gm -> (pattern or None, reason); default find_vocab_pattern (the pass's).
        merge_collectives: the merge_collectives pass runs (not disabled): describe its pairs.
    """
    from oases_fx.propagation import linear_parts

    graph = gm.graph
    if not regions:
        raise ValueError("describe_model: no TMP regions (nothing to plan)")
    params = set()
    if isinstance(gm, torch.nn.Module):
        names = {name for name, _ in gm.named_parameters(remove_duplicate=False)}
        params = {n for n in graph.nodes if n.op == "get_attr" and str(n.target) in names}
    else:
        params = {n for n in graph.nodes if n.op == "get_attr"}
    dims, dims_note = _batch_dims(gm, batch)
    shapes = _Shapes(batch=batch, dims=dims, params=params)
    build = _VariantBuilder(shapes)
    notes = [dims_note] if dims_note else []
    ks = []
    for k in sorted(set(k_choices)):
        if batch % k:
            notes.append(f"k={k} left out: batch {batch} does not divide into {k} sub-batches")
        else:
            ks.append(k)
    all_d = divisors(tp)
    wanted = all_d if degrees is None else tuple(sorted(set(degrees), reverse=True))
    bad = [d for d in wanted if d not in all_d]
    if bad:
        raise ValueError(f"degrees {bad} do not divide the TMP degree {tp} (divisors: {all_d})")
    low_degrees = tuple(d for d in wanted if d < tp)
    for k in ks:
        for d in low_degrees:
            if batch % (k * (tp // d)):
                notes.append(f"degree {d} at k={k} left out: batch {batch} does not divide into "
                             f"{k} x {tp // d} parts")

    order = {n: i for i, n in enumerate(graph.nodes)}
    in_region = {n for r in regions for n in r.nodes}
    ends = [order[r.row] for r in regions]
    first = min(order[r.nodes[0]] for r in regions)
    head, tail, glue = [], [], [[] for _ in regions]
    for n in graph.nodes:
        if n.op != "call_function" or n in in_region or is_free_op(n):
            continue
        i = order[n]
        if i < first:
            head.append(n)
        elif i > ends[-1]:
            tail.append(n)
        else:
            r = bisect.bisect_left(ends, i) - 1  # last region whose row comes before n
            (glue[r] if r >= 0 else head).append(n)

    def param_nodes(r):
        out = []
        for lin in list(r.columns) + [r.row]:
            _, w, bias, _ = linear_parts(lin)
            out.append(w)
            if isinstance(bias, fx.Node):
                out.append(bias)
        return out

    def compute_of(r):
        return [n for n in r.nodes if n.op == "call_function" and not is_free_op(n)]

    region_params = set()
    specs = []
    for ri, r in enumerate(regions):
        pnodes = param_nodes(r)
        region_params.update(pnodes)
        col_inputs = list(dict.fromkeys(linear_parts(c)[0] for c in r.columns))
        compute = [n for n in r.nodes if n.op == "call_function" and not is_free_op(n)]
        # recompute_policy's segment r: the previous region's glue, then region r up to its row
        again = _recomputed_nodes((glue[ri - 1] if ri > 0 else []) + compute) | _recomputed_nodes(
            glue[ri] + (compute_of(regions[ri + 1]) if ri + 1 < len(regions) else []))
        variants, dvariants = {}, {}
        for k in ks:
            for d in low_degrees:
                n = tp // d
                if batch % (k * n):
                    continue
                ops = [build.op(x, k=k * n, tp=d, st=r.state, part="region", column=x in r.columns,
                                recomputed=x in again) for x in compute]
                ops += [build.op(x, k=k, tp=tp, st=None, part="glue", recomputed=x in again) for x in glue[ri]]
                in_b = sum(_nbytes(shapes.scaled(x, k * n, d, None)) for x in col_inputs)
                out_b = _nbytes(shapes.scaled(r.row, k * n, d, None))
                p_metas = [m for p in pnodes for m in shapes.scaled(p, 1, d, r.state)]
                p_bytes = _nbytes(p_metas)
                dvariants[(k, d)] = RegionVariant(
                    ops=tuple(ops), comm_fwd_bytes=out_b if d > 1 else 0, comm_bwd_bytes=in_b if d > 1 else 0,
                    in_bytes=in_b, out_bytes=out_b,
                    param_numel=sum(math.prod(s) for s, _ in p_metas), param_bytes=p_bytes,
                    gather_fwd_bytes=_nbytes(shapes.scaled(r.row, k, tp, None)),
                    gather_bwd_bytes=sum(_nbytes(shapes.scaled(x, k, tp, None)) for x in col_inputs),
                    grad_reduce_bytes=p_bytes, degree=d, cross=n)
            for shard in ((True, False) if tp > 1 else (True,)):
                st = r.state if shard else None
                ops = [build.op(n, k=k, tp=tp, st=st, part="region", column=n in r.columns,
                                recomputed=n in again) for n in compute]
                ops += [build.op(n, k=k, tp=tp, st=None, part="glue", recomputed=n in again) for n in glue[ri]]
                in_b = sum(_nbytes(shapes.scaled(x, k, tp, None)) for x in col_inputs)
                out_b = _nbytes(shapes.scaled(r.row, k, tp, None))
                p_metas = [m for p in pnodes for m in shapes.scaled(p, 1, tp, st)]
                comm = shard and tp > 1
                variants[(k, shard)] = RegionVariant(
                    ops=tuple(ops), comm_fwd_bytes=out_b if comm else 0, comm_bwd_bytes=in_b if comm else 0,
                    in_bytes=in_b, out_bytes=out_b,
                    param_numel=sum(math.prod(s) for s, _ in p_metas), param_bytes=_nbytes(p_metas))
        specs.append(RegionSpec(name=r.name, kind=r.kind, variants=variants, degree_variants=dvariants))

    others = {}
    for n in params - region_params:
        others.setdefault(str(n.target), n)  # tied weights: one parameter, several get_attrs
    o_metas = [m for n in others.values() for m in _metas(n.meta.get("val"))]
    vspec, vreason = None, "not described (vocab_parallel not among the choices)"
    if vocab:
        pat, vreason = (find_vocab or find_vocab_pattern)(gm)
        if pat is not None:
            vspec, vreason = _describe_vocab(graph, pat, head, tail, build, shapes, tp, order)
    merged = ()
    if merge_collectives and tp > 1:
        from oases_fx.passes.merge_collectives import parallel_pairs

        merged = parallel_pairs(regions)
        for i, j, _, bwd in merged:
            notes.append(f"{regions[i].name} + {regions[j].name}: parallel residual, one forward all-reduce"
                         + (" and one backward" if bwd else "") + " when both are sharded (merge_collectives)")
    return ModelSpec(
        regions=tuple(specs), tp=tp, batch=batch, merged=merged,
        head_ops=tuple(build.op(n, k=1, tp=tp, st=None, part="head") for n in head),
        tail_ops=tuple(build.op(n, k=1, tp=tp, st=None, part="tail") for n in tail),
        other_param_numel=sum(math.prod(s) for s, _ in o_metas), other_param_bytes=_nbytes(o_metas),
        notes=tuple(notes), degrees=wanted, vocab=vspec, vocab_reason=vreason,
    )


# ---------------------------------------------------------------------------------------------
# A plan as the cost model sees it
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Choice:
    """The decisions of one plan."""

    num_sub_batches: int
    recompute: str
    shard: tuple
    """Per region (chain order): True = Megatron-sharded over the TMP group, False = replicated."""
    degrees: tuple = ()
    """Per region: the TMP degree d of a sharded region, None for the full degree T (and for
    replicated regions). () when every sharded region runs at T (normalised so)."""
    vocab_parallel: bool = False

    def __post_init__(self):
        if self.recompute not in RECOMPUTE_POLICIES:
            raise ValueError(f"recompute={self.recompute!r}: expected one of {RECOMPUTE_POLICIES}")
        if self.degrees:
            if len(self.degrees) != len(self.shard):
                raise ValueError(f"{len(self.degrees)} degrees for {len(self.shard)} regions")
            degs = tuple(d if s else None for d, s in zip(self.degrees, self.shard))
            object.__setattr__(self, "degrees", () if all(d is None for d in degs) else degs)

    def state(self, r: int, tp: int) -> int:
        """Region r's decision: REPLICATED (0) or its TMP degree."""
        if not self.shard[r]:
            return REPLICATED
        d = self.degrees[r] if self.degrees else None
        return tp if d is None else int(d)

    def states(self, tp: int) -> tuple:
        return tuple(self.state(r, tp) for r in range(len(self.shard)))

    @staticmethod
    def of_states(*, num_sub_batches: int, recompute: str, states: Sequence[int], tp: int,
                  vocab_parallel: bool = False) -> "Choice":
        return Choice(num_sub_batches=num_sub_batches, recompute=recompute,
                      shard=tuple(s != REPLICATED for s in states),
                      degrees=tuple(None if s in (REPLICATED, tp) else s for s in states),
                      vocab_parallel=vocab_parallel)

    def _region_key(self, r: int) -> float:
        # full degree first, then higher degrees, then replicated
        if not self.shard[r]:
            return 2.0
        d = self.degrees[r] if self.degrees else None
        return 0.0 if d is None else 1.0 / d

    def tie_key(self) -> tuple:
        """Deterministic order among equally fast plans: fewer sub-batches, lighter recompute,
        vocab_parallel off, then per region (earlier regions first) the full degree, then higher
        degrees, then replicated."""
        return (self.num_sub_batches, RECOMPUTE_POLICIES.index(self.recompute), self.vocab_parallel,
                tuple(self._region_key(r) for r in range(len(self.shard))))

    def summary(self, names: Optional[Sequence[str]] = None) -> str:
        n_shard = sum(self.shard)
        s = f"k={self.num_sub_batches} recompute={self.recompute} sharded {n_shard}/{len(self.shard)}"
        if self.degrees:
            by_d: dict = {}
            for i, d in enumerate(self.degrees):
                if d is not None:
                    by_d.setdefault(d, []).append(i)
            s += "".join(f", {len(v)} at d={d}" for d, v in sorted(by_d.items(), reverse=True))
            if names is not None:
                lows = [names[i] + f"@{d}" for d, v in sorted(by_d.items(), reverse=True) for i in v]
                s += " (" + ", ".join(lows[:2]) + (f" +{len(lows) - 2} more" if len(lows) > 2 else "") + ")"
        if names is not None and n_shard < len(self.shard):
            rep = [nm for nm, sh in zip(names, self.shard) if not sh]
            s += " (replicated: " + ", ".join(rep[:2]) + (f" +{len(rep) - 2} more" if len(rep) > 2 else "") + ")"
        if self.vocab_parallel:
            s += " vocab-parallel"
        return s


def choice_of(plan: Plan, model: ModelSpec) -> Choice:
    """The Choice a Plan makes for this model (a region missing from the plan is replicated)."""
    by_name = {r.name: r for r in plan.regions}
    shard = tuple(bool(by_name[r.name].shard) if r.name in by_name else False for r in model.regions)
    degs = []
    for r in model.regions:
        d = plan.region_degree(r.name)
        degs.append(None if d is None or d == plan.tp_degree else d)
    return Choice(num_sub_batches=plan.num_sub_batches, recompute=plan.recompute, shard=shard,
                  degrees=tuple(degs), vocab_parallel=plan.vocab_parallel)


# ---------------------------------------------------------------------------------------------
# Events -> timeline
# ---------------------------------------------------------------------------------------------


def _compute_event(*_):
    """Target of a compute event node (never called: the nodes only feed the simulator)."""


def _comm_event(*_):
    """Target of a collective event node."""


def _wait_event(*_):
    """Target of a wait event node."""


def _is_comm_event(n: fx.Node) -> bool:
    return n.target is _comm_event


def _is_wait_event(n: fx.Node) -> bool:
    return n.target is _wait_event


# ---------------------------------------------------------------------------------------------
# Kernels: what Inductor launches for the ops of a part, and what fusing them saves
# ---------------------------------------------------------------------------------------------

_EXTERN = ("linear", "mm", "addmm", "bmm", "baddbmm", "matmul", "convolution", "attention")
"""Ops that run as their own library kernels (cuBLAS GEMMs, cuDNN/flash attention): never fused."""


def _op_name(key: str) -> str:
    return _base_name(key.split("(", 1)[0])


def is_identity_op(key: str) -> bool:
    """An op the compiled program drops: dropout with p=0 (Inductor's decomposition is the input)."""
    name = _op_name(key)
    if "dropout" not in name:
        return False
    args = key.split("|", 1)[1].split(",") if "|" in key else []
    try:
        return float(args[1]) == 0.0
    except (IndexError, ValueError):
        return False


def _is_extern(key: str) -> bool:
    name = _op_name(key)
    return name in _EXTERN or any(name.startswith(w) for w in ("_scaled_mm", "_addmm")) or "attention" in name


ATTENTION_BACKWARD_KERNELS = 3
"""Kernels of a fused attention backward: cuDNN's SDPA backward (the H200's path under torch 2.11)
launches a dot(dO, O) row-sum kernel, the flash backward kernel and a dQ fp32 -> 16-bit
conversion (benchmarks/results/split_trace: per attention backward, h=2048, k=1 and k=2)."""


def extern_kernels(key: str) -> tuple:
    """(forward, backward) kernels of a library op: a linear is one GEMM (bias in the epilogue)
    forward, and a dgrad GEMM, a wgrad GEMM and (with a bias) the bias-grad reduction backward;
    fused attention one kernel forward and ATTENTION_BACKWARD_KERNELS backward."""
    name = _op_name(key)
    if "attention" in name:
        return 1, ATTENTION_BACKWARD_KERNELS
    n_in = key.split("(", 1)[1].split(")", 1)[0].count("[") if "(" in key else 2
    bias = name in ("addmm", "baddbmm") or (name == "linear" and n_in >= 3)
    return 1, 2 + int(bias)


@dataclass(frozen=True)
class OpCost:
    """One op's priced time inside its part: fused with its neighbours, kernels counted."""

    op: OpSpec
    fwd_us: float
    bwd_us: float
    fwd_kernels: float
    bwd_kernels: float


def price_ops(ops: Sequence, profile: "Profile") -> list:
    """OpCost per op, Inductor-style: identity ops are free; consecutive non-library ops form one
    fused kernel forward and one backward (plus one reduction per norm for its weight grads, and
    the scatter of an embedding's backward); an input produced by the previous op of the same fused
    kernel is not read from memory, so that op's time shrinks by those bytes' share of its traffic
    (memory-bound ops scale with bytes moved). Roofline op times get the kernel overhead per
    kernel, library kernels StepConstants.library_kernel_us more; measured ones (timed one op at a
    time) already carry both."""
    step = profile.step
    per_kernel = 0.0 if step.op_times_include_overhead else step.kernel_overhead_us
    per_library = 0.0 if step.op_times_include_overhead else step.library_kernel_us
    out = []
    group: set = set()  # names of the ops in the current fused kernel
    for o in ops:
        if is_identity_op(o.key):
            out.append(OpCost(o, 0.0, 0.0, 0, 0))
            if o.name and any(src in group for src in o.sources):
                group.add(o.name)  # passes on a value made inside the kernel
            continue
        f, b = profile.op_time(o.key)
        if _is_extern(o.key):
            group = set()
            kf, kb = extern_kernels(o.key)
            f, b = f + kf * per_library, b + kb * per_library
        else:
            inside = [src for src in o.sources if src in group]
            kf, kb = (0, 0) if group else (1, 1)
            name = _op_name(o.key)
            kb += int("norm" in name) + int("embedding" in name)
            if inside and o.in_bytes + o.out_bytes > 0:
                # bytes of fused inputs: the producers' outputs (at these shapes, the op's own inputs)
                share = min(sum(p.op.out_bytes for p in out if p.op.name in inside) / (o.in_bytes + o.out_bytes), 1.0)
                f, b = f * (1.0 - share), b * (1.0 - share)
            if o.name:
                group.add(o.name)
        out.append(OpCost(o, f + kf * per_kernel, b + kb * per_kernel, kf, kb))
    return out


@dataclass(frozen=True)
class _PartCosts:
    """One region variant's event costs for one sub-batch, microseconds."""

    fwd: float
    glue_fwd: float
    bwd: float
    wgrad: float
    glue_bwd: float
    ar_fwd: float
    ar_bwd: float
    ag_fwd: float = 0.0
    ag_bwd: float = 0.0
    grad_ar: float = 0.0
    comm: tuple = (False, False, False)
    """Which collectives the region issues: (all-reduce over d, all-gather over n, gradient
    all-reduce over n): the template's shape."""
    re_fine: float = 0.0
    """Fine recompute of the region: its ops whose outputs backward reads (OpSpec.recomputed)."""
    re_full: float = 0.0
    """Full recompute of the region: re_fine, plus the ops feeding the forward all-reduce when it
    runs again (a priced collective; a free or skipped one needs no input)."""
    re_glue: float = 0.0
    """Recompute of the glue (its recomputed ops; the same for fine and full)."""
    wgrad_acc: float = 0.0
    """k > 1, every sub-batch after the first: the weight-gradient GEMMs accumulate into the
    gradient (aten addmm with beta=1 first copies the accumulator: read + write, then the GEMM
    reads it again): 3 x the gradient bytes at the copy bandwidth, one copy kernel per weight."""
    kernels: tuple = (0.0, 0.0, 0.0, 0.0, 0.0)
    """Kernels of (fwd + glue_fwd, bwd + wgrad + glue_bwd, re_fine + re_glue, re_full + re_glue,
    wgrad_acc) for one sub-batch: the host term counts them."""


def _region_costs(v: "RegionVariant", profile: "Profile", ar_fwd: float) -> dict:
    """The compute fields of _PartCosts for one variant."""
    fwd = glue_fwd = bwd = wgrad = glue_bwd = re_fine = re_row = re_glue = 0.0
    kf = kb = kre = krow = 0.0
    n_weights = 0
    for p in price_ops(v.ops, profile):
        o = p.op
        if o.part == "glue":
            glue_fwd += p.fwd_us
            glue_bwd += p.bwd_us
            if o.recomputed:
                re_glue += p.fwd_us
                kre += p.fwd_kernels
        else:
            fwd += p.fwd_us
            w = 0.5 * p.bwd_us if o.column else 0.0  # linear backward: dgrad and wgrad have equal flops
            wgrad += w
            bwd += p.bwd_us - w
            if o.recomputed:
                re_fine += p.fwd_us
                kre += p.fwd_kernels
            else:
                re_row += p.fwd_us
                krow += p.fwd_kernels
        kf += p.fwd_kernels
        kb += p.bwd_kernels
        n_weights += int(_is_extern(o.key) and "attention" not in _op_name(o.key))
    step = profile.step
    acc = acc_k = 0.0
    if step.copy_bw_bytes_per_s > 0 and v.param_bytes:
        acc = 3.0 * v.param_bytes / step.copy_bw_bytes_per_s * 1e6 + n_weights * step.kernel_overhead_us
        acc_k = n_weights
    rerun = ar_fwd > 0
    return dict(fwd=fwd, glue_fwd=glue_fwd, bwd=bwd, wgrad=wgrad, glue_bwd=glue_bwd,
                re_fine=re_fine, re_full=re_fine + (re_row if rerun else 0.0), re_glue=re_glue, wgrad_acc=acc,
                kernels=(kf, kb, kre, kre + (krow if rerun else 0.0), acc_k))


class CostCache:
    """Region/part costs from a profile, cached per (region signature, k, decision)."""

    def __init__(self, model: ModelSpec, profile: "Profile"):
        self.model, self.profile = model, profile
        self._cache: dict = {}
        self._sigs = [r.signature for r in model.regions]
        self._head_tail: dict = {}  # vocab_parallel -> head_tail()
        self._vocab_comm: Optional[dict] = None

    def region(self, ri: int, k: int, state) -> _PartCosts:
        """Costs of region ri at k sub-batches; state: a degree d, REPLICATED, or a bool (shard at
        the full degree / replicate)."""
        tp = self.model.tp
        if state is True:
            state = tp
        elif state is False:
            state = REPLICATED
        ck = (self._sigs[ri], k, state)
        hit = self._cache.get(ck)
        if hit is not None:
            return hit
        v = self.model.regions[ri].variant(k, state, tp)
        prof = self.profile
        if state == REPLICATED:
            comm = dict(ar_fwd=0.0, ar_bwd=0.0)
        elif state == tp:
            ar = prof.all_reduce
            comm = dict(ar_fwd=ar.predict_us(v.comm_fwd_bytes) if v.comm_fwd_bytes else 0.0,
                        ar_bwd=ar.predict_us(v.comm_bwd_bytes) if v.comm_bwd_bytes else 0.0,
                        comm=(tp > 1, False, False))
        else:
            d, n = state, tp // state
            comm = dict(
                ar_fwd=prof.all_reduce_us(v.comm_fwd_bytes, d) if d > 1 else 0.0,
                ar_bwd=prof.all_reduce_us(v.comm_bwd_bytes, d) if d > 1 else 0.0,
                ag_fwd=prof.all_gather_us(v.gather_fwd_bytes, n), ag_bwd=prof.all_gather_us(v.gather_bwd_bytes, n),
                grad_ar=prof.all_reduce_us(v.grad_reduce_bytes, n, cross=True) if v.grad_reduce_bytes else 0.0,
                comm=(d > 1, True, v.grad_reduce_bytes > 0))
        pc = _PartCosts(**_region_costs(v, prof, comm["ar_fwd"] + comm.get("ag_fwd", 0.0)), **comm)
        self._cache[ck] = pc
        return pc

    def outside_ops(self, ops) -> tuple:
        """(forward us, backward us, forward kernels, backward kernels) of head or tail ops."""
        f = b = kf = kb = 0.0
        for p in price_ops(ops, self.profile):
            f, b, kf, kb = f + p.fwd_us, b + p.bwd_us, kf + p.fwd_kernels, kb + p.bwd_kernels
        return f, b, kf, kb

    def head_tail(self, vocab_parallel: bool) -> tuple:
        """(outside_ops of the head, outside_ops of the tail), plain or vocabulary-parallel. Priced
        once per cache: head and tail run whole, whatever k, the recompute policy and the regions'
        decisions, so the candidates of one search (one cache: the chains' constant terms, the
        whole-step simulations and the host terms) share them."""
        vp = bool(vocab_parallel)
        hit = self._head_tail.get(vp)
        if hit is None:
            m = self.model
            if vp and m.vocab is None:
                raise ValueError(f"vocab_parallel: the model has no vocabulary-parallel variant ({m.vocab_reason})")
            head, tail = (m.vocab.head_ops, m.vocab.tail_ops) if vp else (m.head_ops, m.tail_ops)
            hit = self._head_tail[vp] = (self.outside_ops(head), self.outside_ops(tail))
        return hit

    def _span_bytes(self, k: int, first: bool) -> int:
        r = self.model.regions[0 if first else -1]
        v = r.variants.get((k, True)) or r.variants.get((k, False))
        return 0 if v is None else k * (v.in_bytes if first else v.out_bytes)

    def split_copy_us(self, k: int, *, first: bool) -> float:
        """One cat of the k sub-batches at the split span's end (forward: the last region's
        output; backward, first=True: the first region's input gradient). The chunks themselves
        are views. A copy reads and writes the whole batch's bytes."""
        step = self.profile.step
        if k <= 1 or step.copy_bw_bytes_per_s <= 0:
            return 0.0
        return 2.0 * self._span_bytes(k, first) / step.copy_bw_bytes_per_s * 1e6 + step.kernel_overhead_us

    def step_kernels(self, choice: "Choice") -> float:
        """Kernels one step launches (the host term): head and tail, every sub-batch's region
        work and recompute, the accumulation copies and the split's cats."""
        m, k, rc = self.model, choice.num_sub_batches, choice.recompute
        head, tail = self.head_tail(bool(choice.vocab_parallel) and m.vocab is not None)
        n = sum(head[2:]) + sum(tail[2:])
        if k > 1 and self.profile.step.copy_bw_bytes_per_s > 0:
            n += 2
        for r in range(len(m.regions)):
            kern = self.region(r, k, choice.state(r, m.tp)).kernels
            re = kern[2] if rc == "fine" else kern[3] if rc == "full" else 0.0
            n += k * (kern[0] + kern[1] + re) + (k - 1) * kern[4]
        return n

    def host_us(self, choice: "Choice", kernels: Optional[float] = None) -> float:
        """Host issue time of one step: StepConstants.host_step_us, host_per_kernel_us per kernel
        (`kernels`: step_kernels(choice), counted here when not given) and host_per_checkpoint_us
        per recomputed (region, sub-batch) segment."""
        step = self.profile.step
        if step.host_step_us <= 0 and step.host_per_kernel_us <= 0 and step.host_per_checkpoint_us <= 0:
            return 0.0
        segments = 0 if choice.recompute == "none" else len(self.model.regions) * choice.num_sub_batches
        if kernels is None:
            kernels = self.step_kernels(choice)
        return step.host_step_us + step.host_per_kernel_us * kernels + step.host_per_checkpoint_us * segments

    def vocab_comm(self) -> dict:
        """Costs of vocab_parallel's collectives (microseconds), priced once per cache like
        head_tail (a copy: the priced dict stays the cache's)."""
        if self._vocab_comm is None:
            v, prof, tp = self.model.vocab, self.profile, self.model.tp
            self._vocab_comm = {
                "ar_emb": prof.all_reduce_us(v.emb_reduce_bytes, tp),
                "ar_lm": prof.all_reduce_us(v.lm_grad_reduce_bytes, tp),
                "ar_ce": prof.all_reduce_us(v.ce_reduce_bytes, tp),
                "ag_logits": prof.all_gather_us(v.logits_gather_bytes, tp) if v.logits_gather_bytes else 0.0}
        return dict(self._vocab_comm)

    def outside_time(self, vocab_parallel: bool) -> float:
        """Head + tail, forward + backward, their collectives counted as exposed (the search's
        constant term; the whole-step simulation replaces it)."""
        (hf, hb, _, _), (tf, tb, _, _) = self.head_tail(vocab_parallel)
        if not vocab_parallel:
            return hf + hb + tf + tb
        c = self.vocab_comm()
        return hf + hb + tf + tb + c["ar_emb"] + c["ar_lm"] + 3 * c["ar_ce"]


_SUB_BATCH_META: dict = {}

MAX_IN_FLIGHT = ScheduleOptions().max_in_flight
"""The schedule pass's default bound on collectives in flight: the host order predicted is the pass's."""


@dataclass
class _Template:
    """The event nodes of a step (or of a few regions) in host order, without their costs.

    Region indices are relative to the first simulated region, and costs are references (which
    _PartCosts fields an event sums), so the search's many small simulations of the same shape
    reuse one set of nodes.
    """

    nodes: list = field(default_factory=list)
    compute: list = field(default_factory=list)
    """(name, region or None, fields): the event costs the sum of these _PartCosts fields
    (for region None: fields[0] is "head_fwd", "head_bwd", "tail_fwd" or "tail_bwd")."""
    comm: list = field(default_factory=list)
    """(name, region, field)."""
    owner: dict = field(default_factory=dict)
    """Event name -> region (relative) or None."""
    max_in_flight: Optional[int] = None
    """Most collectives issued and not yet waited (ScheduleOptions.max_in_flight, the schedule pass's
    bound): a collective past it is issued right after the next wait, and a wait still ahead of an
    unissued collective waits the oldest one in flight first, as schedule_overlap orders them.
    None: unbounded."""
    _graph: fx.Graph = field(default_factory=fx.Graph)
    _in_flight: list = field(default_factory=list)
    _deferred: list = field(default_factory=list)
    _waited: set = field(default_factory=set)
    _where: dict = field(default_factory=dict)

    def _node(self, target, name, args, owner, sub_batch, append=True):
        n = fx.Node(self._graph, name, "call_function", target, args, {})
        if sub_batch is not None:
            meta = _SUB_BATCH_META.get(sub_batch)
            if meta is None:
                meta = _SUB_BATCH_META[sub_batch] = oases_meta.OasesMeta(sub_batch=sub_batch)
            n.meta[oases_meta.KEY] = meta
        if append:
            self.nodes.append(n)
        self.owner[name] = owner
        return n

    def compute_ev(self, name, owner, sub_batch, *fields):
        self._node(_compute_event, name, (), owner, sub_batch)
        self.compute.append((name, owner, fields))

    def comm_ev(self, name, owner, sub_batch, what):
        n = self._node(_comm_event, name, (), owner, sub_batch, append=False)
        self.comm.append((name, owner, what))
        self._where[n] = (owner, sub_batch)
        self._deferred.append(n)
        self._issue()
        return n

    def _issue(self):
        while self._deferred and (self.max_in_flight is None or len(self._in_flight) < self.max_in_flight):
            c = self._deferred.pop(0)
            self.nodes.append(c)
            self._in_flight.append(c)

    def _wait(self, c):
        owner, sub_batch = self._where[c]
        self._node(_wait_event, "wait_" + c.name, (c,), owner, sub_batch)
        self._in_flight.remove(c)
        self._waited.add(c)
        self._issue()

    def wait_ev(self, comm_node, owner, sub_batch):
        if comm_node is None or comm_node in self._waited:
            return
        while comm_node in self._deferred:  # not issued yet: the oldest in flight is waited first
            self._wait(self._in_flight[0])
        if comm_node not in self._waited:
            self._wait(comm_node)


def _build_template(k: int, rc: str, comm: tuple, outside: bool, vocab: tuple = (False, False),
                    max_in_flight: Optional[int] = None) -> _Template:
    """See the module docstring for the order. comm[r]: region r's (all-reduce, all-gather,
    gradient all-reduce) flags; vocab: (vocab_parallel, logits all-gather); max_in_flight: the
    schedule pass's bound on collectives in flight (_Template.max_in_flight)."""
    n = len(comm)
    vp, logits_ag = vocab if outside else (False, False)
    ev = _Template(max_in_flight=max_in_flight)
    if outside:
        ev.compute_ev("head_fwd", None, None, "head_fwd")
        if vp:
            ev.wait_ev(ev.comm_ev("vp_ar_emb", None, None, "ar_emb"), None, None)

    def issue(prefix, r, j, ar_field, ag_field):
        last = None
        if comm[r][0]:
            last = ev.comm_ev(f"{prefix}ar_{ar_field[3:]}.r{r}.s{j}", r, j, ar_field)
        if comm[r][1]:
            last = ev.comm_ev(f"{prefix}ag_{ag_field[3:]}.r{r}.s{j}", r, j, ag_field)
        return last

    ar_f: dict = {}
    for r in range(n):
        for j in range(k):
            if r > 0:
                ev.wait_ev(ar_f.get((r - 1, j)), r - 1, j)
                ev.compute_ev(f"glue.r{r - 1}.s{j}", r - 1, j, "glue_fwd")
            ev.compute_ev(f"fwd.r{r}.s{j}", r, j, "fwd")
            last = issue("", r, j, "ar_fwd", "ag_fwd")
            if last is not None:
                ar_f[(r, j)] = last
    for j in range(k):
        ev.wait_ev(ar_f.get((n - 1, j)), n - 1, j)
        ev.compute_ev(f"glue.r{n - 1}.s{j}", n - 1, j, "glue_fwd")
    logits = None
    if outside:
        ev.compute_ev("tail_fwd", None, None, "tail_fwd")
        if vp:
            for i in range(3):  # the parallel cross-entropy's max, sum-exp and target-logit all-reduces
                ev.wait_ev(ev.comm_ev(f"vp_ar_ce{i}", None, None, "ar_ce"), None, None)
            if logits_ag:
                logits = ev.comm_ev("vp_ag_logits", None, None, "ag_logits")
        ev.compute_ev("tail_bwd", None, None, "tail_bwd")
        if vp:
            ev.wait_ev(ev.comm_ev("vp_ar_lm", None, None, "ar_lm"), None, None)

    ar_b: dict = {}
    grads = []
    for r in reversed(range(n)):
        ar_re: dict = {}
        if rc == "full":  # every sub-batch's recompute first: AR_f'(j) hides behind F'(j+1)
            for j in range(k):
                ev.compute_ev(f"recompute.r{r}.s{j}", r, j, "re_full")
                last = issue("re", r, j, "ar_fwd", "ag_fwd")
                if last is not None:
                    ar_re[j] = last
        for j in range(k):
            if rc == "fine":
                ev.compute_ev(f"recompute.r{r}.s{j}", r, j, "re_fine", "re_glue")
            ev.wait_ev(ar_b.get((r + 1, j)), r + 1, j)
            if rc == "full":
                ev.wait_ev(ar_re.get(j), r, j)
                ev.compute_ev(f"recompute_glue.r{r}.s{j}", r, j, "re_glue")
            ev.compute_ev(f"glue_bwd.r{r}.s{j}", r, j, "glue_bwd")
            ev.compute_ev(f"bwd.r{r}.s{j}", r, j, "bwd")
            last = issue("", r, j, "ar_bwd", "ag_bwd")
            if last is not None:
                ar_b[(r, j)] = last
            ev.compute_ev(f"wgrad.r{r}.s{j}", r, j, *(("wgrad", "wgrad_acc") if j > 0 else ("wgrad",)))
        if comm[r][2]:
            grads.append((ev.comm_ev(f"grad_ar.r{r}", r, k - 1, "grad_ar"), r))
    for j in range(k):
        ev.wait_ev(ar_b.get((0, j)), 0, j)
    if outside:
        ev.compute_ev("head_bwd", None, None, "head_bwd")
    for g, r in grads:
        ev.wait_ev(g, r, k - 1)
    if logits is not None:
        ev.wait_ev(logits, None, None)
    return ev


_TEMPLATES: dict = {}
_TEMPLATE_CACHE_MAX_REGIONS = 2
"""Templates of up to this many regions (the search's single and pair simulations) are kept."""


def _template(k: int, rc: str, comm: tuple, outside: bool, vocab: tuple = (False, False),
              max_in_flight: Optional[int] = None) -> _Template:
    if len(comm) > _TEMPLATE_CACHE_MAX_REGIONS:
        return _build_template(k, rc, comm, outside, vocab, max_in_flight)
    key = (k, rc, comm, outside, vocab, max_in_flight)
    t = _TEMPLATES.get(key)
    if t is None:
        t = _TEMPLATES[key] = _build_template(k, rc, comm, outside, vocab, max_in_flight)
    return t


def simulate_choice(model: ModelSpec, choice: Choice, profile: "Profile", *, lo: int = 0,
                    hi: Optional[int] = None, outside: bool = True, cache: Optional[CostCache] = None):
    """Timeline of one step (or of regions lo..hi-1 alone, for the search), and the events'
    owners (event name -> region index, None for head/tail). Event names count regions from lo."""
    hi = len(model.regions) if hi is None else hi
    costs = cache or CostCache(model, profile)
    k = choice.num_sub_batches
    tp = model.tp
    pcs = [costs.region(r, k, choice.state(r, tp)) for r in range(lo, hi)]
    for i, j, fwd, bwd in model.merged:  # parallel residual: one all-reduce serves both blocks
        if lo <= i < hi and lo <= j < hi and choice.state(i, tp) == tp and choice.state(j, tp) == tp:
            if fwd:
                pcs[i - lo] = dataclasses.replace(pcs[i - lo], ar_fwd=0.0)
            if bwd:
                pcs[j - lo] = dataclasses.replace(pcs[j - lo], ar_bwd=0.0)
    comm_flags = tuple(p.comm for p in pcs)
    vp = bool(choice.vocab_parallel) and outside
    if vp and model.vocab is None:
        raise ValueError(f"vocab_parallel: the model has no vocabulary-parallel variant ({model.vocab_reason})")
    vocab = (vp, vp and model.vocab.logits_gather_bytes > 0)
    tpl = _template(k, choice.recompute, comm_flags, outside, vocab, MAX_IN_FLIGHT)
    fixed = {}
    if outside:
        head, tail = costs.head_tail(vp)
        fixed["head_fwd"], fixed["head_bwd"] = head[:2]
        fixed["tail_fwd"], fixed["tail_bwd"] = tail[:2]
    if outside and k > 1:  # split_sub_batches' cats: the span's output forward, its input's grad backward
        fixed["tail_fwd"] += costs.split_copy_us(k, first=False)
        fixed["head_bwd"] += costs.split_copy_us(k, first=True)
    vcomm = costs.vocab_comm() if vp else {}
    compute = {}
    for name, r, fields in tpl.compute:
        if r is None:
            compute[name] = fixed[fields[0]]
        else:
            p = pcs[r]
            compute[name] = sum(getattr(p, f) for f in fields)
    comm = {name: (vcomm[f] if r is None else getattr(pcs[r], f)) for name, r, f in tpl.comm}
    cm = TableCostModel(compute=compute, comm=comm, compute_interference=profile.compute_interference,
                        comm_interference=profile.comm_interference)
    tl = simulate(tpl.nodes, cm, comm_is=_is_comm_event, wait_is=_is_wait_event)
    owner = {name: (None if r is None else r + lo) for name, r in tpl.owner.items()}
    return tl, owner


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class MemoryBreakdown:
    params: int
    grads: int
    optimizer: int
    activations: int
    transient: int
    per_region: tuple
    """Bytes per region (its params + grads + Adam state + kept activations)."""

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.transient


def region_kept_bytes(v: RegionVariant, k: int, recompute: str) -> int:
    """Activation bytes a region keeps from forward to backward (whole batch = k sub-batches)."""
    if recompute == "none":
        return k * sum(o.out_bytes for o in v.ops)
    if recompute == "fine":
        return k * (v.in_bytes + v.out_bytes)
    return k * v.in_bytes


def region_memory_bytes(v: RegionVariant, k: int, recompute: str) -> int:
    """A region's share of the memory: params, grads, Adam state and kept activations."""
    return 2 * v.param_bytes + ADAM_STATE_BYTES_PER_ELEMENT * v.param_numel + region_kept_bytes(v, k, recompute)


def memory(model: ModelSpec, choice: Choice) -> MemoryBreakdown:
    k, rc = choice.num_sub_batches, choice.recompute
    vs = [r.variant(k, choice.state(i, model.tp), model.tp) for i, r in enumerate(model.regions)]
    params = model.other_param_bytes + sum(v.param_bytes for v in vs)
    numel = model.other_param_numel + sum(v.param_numel for v in vs)
    head, tail = model.head_ops, model.tail_ops
    if choice.vocab_parallel and model.vocab is not None:
        voc, tp = model.vocab, model.tp
        params -= voc.param_bytes - voc.param_bytes // tp
        numel -= voc.param_numel - voc.param_numel // tp
        head, tail = voc.head_ops, voc.tail_ops
    kept = [region_kept_bytes(v, k, rc) for v in vs]
    outside = sum(o.out_bytes for o in head + tail)
    if choice.vocab_parallel and model.vocab is not None:
        outside += model.vocab.logits_gather_bytes  # the gathered logits (a graph output), whole
    live = 0 if rc == "none" else 1 if rc == "fine" else k  # sub-batches recomputed at once
    transient = live * max((sum(o.out_bytes for o in v.ops) for v in vs), default=0)
    return MemoryBreakdown(
        params=params, grads=params, optimizer=ADAM_STATE_BYTES_PER_ELEMENT * numel,
        activations=sum(kept) + outside, transient=transient,
        per_region=tuple(region_memory_bytes(v, k, rc) for v in vs),
    )


# ---------------------------------------------------------------------------------------------
# Prediction
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RegionBreakdown:
    compute_us: float
    """Time the region's compute events occupy the compute stream (interference included)."""
    exposed_comm_us: float
    """Time its collectives run while the compute stream does no work."""
    hidden_comm_us: float
    """Time its collectives run under compute."""
    memory_bytes: int


@dataclass(frozen=True, kw_only=True)
class Prediction:
    choice: Choice
    step_us: float
    memory: MemoryBreakdown
    memory_budget_bytes: Optional[int]
    per_region: tuple
    """RegionBreakdown per region, chain order."""
    timeline: Timeline = field(repr=False)
    device_us: float = 0.0
    """The device's makespan (the simulated two-stream timeline)."""
    host_us: float = 0.0
    """The host's issue time (StepConstants; 0 when the profile has no host constants).
    step_us = max(device_us, host_us): the host runs ahead of the device through the launch
    queue, so the slower of the two sets the step."""
    kernels: float = 0.0
    """Kernels one step launches (cost_model.price_ops' count)."""

    @property
    def host_bound(self) -> bool:
        return self.host_us > self.device_us

    @property
    def feasible(self) -> bool:
        return self.memory_budget_bytes is None or self.memory.total <= self.memory_budget_bytes

    @property
    def reason(self) -> str:
        """Why the plan is rejected ("" when it fits)."""
        if self.feasible:
            return ""
        m = self.memory
        return (f"{self.choice.summary()}: needs {m.total / GIB:.2f} GiB > budget "
                f"{self.memory_budget_bytes / GIB:.2f} GiB (params {m.params / GIB:.2f}, grads "
                f"{m.grads / GIB:.2f}, Adam {m.optimizer / GIB:.2f}, activations "
                f"{(m.activations + m.transient) / GIB:.2f} GiB)")


def _overlaps(busy: list, starts: list, a: float, b: float) -> float:
    """Overlap of [a, b) with the sorted, disjoint busy intervals."""
    total = 0.0
    i = max(bisect.bisect_right(starts, a) - 1, 0)
    while i < len(busy) and busy[i].start_us < b:
        lo, hi = max(a, busy[i].start_us), min(b, busy[i].end_us)
        if hi > lo:
            total += hi - lo
        i += 1
    return total


def breakdown(tl: Timeline, owner: Mapping, num_regions: int) -> list:
    """(compute, exposed comm, hidden comm) per region from a simulated timeline."""
    comp = [0.0] * num_regions
    exp = [0.0] * num_regions
    hid = [0.0] * num_regions
    busy = [iv for iv in tl.streams[COMPUTE] if iv.kind == "compute" and iv.duration_us > 0]
    starts = [iv.start_us for iv in busy]
    for iv in busy:
        r = owner.get(iv.name)
        if r is not None:
            comp[r] += iv.duration_us
    for iv in tl.streams[COMM]:
        r = owner.get(iv.name)
        if r is None:
            continue
        h = _overlaps(busy, starts, iv.start_us, iv.end_us)
        hid[r] += h
        exp[r] += iv.duration_us - h
    return list(zip(comp, exp, hid))


def predict(model: ModelSpec, choice: Choice, profile: "Profile", *,
            memory_budget_bytes: Optional[int] = None, cache: Optional[CostCache] = None) -> Prediction:
    """Step time (forward + backward) and memory of one plan, explained per region."""
    if len(choice.shard) != len(model.regions):
        raise ValueError(f"choice has {len(choice.shard)} shard decisions for {len(model.regions)} regions")
    cache = cache or CostCache(model, profile)
    tl, owner = simulate_choice(model, choice, profile, cache=cache)
    kernels = cache.step_kernels(choice)
    host = cache.host_us(choice, kernels)
    mem = memory(model, choice)
    parts = breakdown(tl, owner, len(model.regions))
    per_region = tuple(
        RegionBreakdown(compute_us=c, exposed_comm_us=e, hidden_comm_us=h, memory_bytes=mb)
        for (c, e, h), mb in zip(parts, mem.per_region))
    return Prediction(choice=choice, step_us=max(tl.makespan_us, host), memory=mem,
                      memory_budget_bytes=memory_budget_bytes, per_region=per_region, timeline=tl,
                      device_us=tl.makespan_us, host_us=host, kernels=kernels)


def predict_plan(model: ModelSpec, plan: Plan, profile: "Profile", *,
                 memory_budget_bytes: Optional[int] = None) -> Prediction:
    """predict() for a Plan (e.g. a hand-written one, to compare with the planner's choice)."""
    return predict(model, choice_of(plan, model), profile, memory_budget_bytes=memory_budget_bytes)


__all__ = [
    "OpSpec", "OpCost", "price_ops", "is_identity_op", "extern_kernels", "ATTENTION_BACKWARD_KERNELS", "RegionVariant", "RegionSpec", "ModelSpec",
    "VocabSpec", "VocabPattern", "REPLICATED", "divisors",
    "find_vocab_pattern", "describe_model", "Choice", "choice_of",
    "simulate_choice", "MemoryBreakdown", "memory", "region_memory_bytes", "region_kept_bytes",
    "RegionBreakdown", "Prediction", "predict", "predict_plan", "breakdown", "GIB",
    "ADAM_STATE_BYTES_PER_ELEMENT",
]
