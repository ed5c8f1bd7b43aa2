"""The one execution model of oases_fx: a compute stream and a comm stream, simulated in host order.

schedule_overlap predicts its schedules with :func:`simulate`; the planner predicts step time with
the same function, fed by a measured :class:`TableCostModel` instead of the analytical default.

The model (what a CUDA device does with functional collectives on a side NCCL stream):

- The compute stream runs every non-collective ``call_function`` node in host order, one at a time.
- A collective is *issued* at its place in host order. Like NCCL's stream wait on an event recorded
  at issue, it may start only when every compute-stream item issued before it has finished, and
  only after the previous collective (collectives serialise on the one comm stream).
- ``wait_tensor`` blocks the compute stream until its collective has finished; the time the
  compute stream sits there is exposed communication.
- Interference (approximation): while both streams are busy, compute progresses at
  ``1 / compute_interference`` of its speed and communication at ``1 / comm_interference``;
  alone, each runs at full speed. Durations are piecewise-integrated, so a 10 us matmul that
  overlaps a collective for half of its run with factor 1.2 takes 5 + 6 = 11 us.

Legend for the tensor-size helpers: sizes come from ``node.meta["val"]`` (fake tensors, as
AOTAutograd and make_fx leave them) or ``node.meta["tensor_meta"]`` (ShapeProp); symbolic sizes
use their hint.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Optional, Protocol, Sequence, runtime_checkable

import torch
import torch.fx as fx

from oases_fx import meta as oases_meta

# ---------------------------------------------------------------------------------------------
# Private torch API access (candidates for oases_fx/_compat.py)
# ---------------------------------------------------------------------------------------------


def _is_op_overload(target) -> bool:
    # torch._ops.OpOverload has no public alias; it is what aten-level fx graphs call.
    return isinstance(target, torch._ops.OpOverload)


def _is_higher_order_op(target) -> bool:
    # torch._ops.HigherOrderOperator: run_with_rng_state, run_and_save_rng_state, cond, ...
    return isinstance(target, torch._ops.HigherOrderOperator)


def _size_hint(x) -> int:
    """An int for a possibly symbolic size, without installing a guard."""
    if isinstance(x, int):
        return x
    try:  # torch 2.13 name
        from torch.fx.experimental.symbolic_shapes import optimization_hint

        return int(optimization_hint(x, fallback=1))
    except ImportError:
        pass
    try:  # older name (torch <= 2.11)
        from torch.fx.experimental.symbolic_shapes import hint_int

        return int(hint_int(x, fallback=1))
    except ImportError:
        return int(x)


# ---------------------------------------------------------------------------------------------
# Node classification
# ---------------------------------------------------------------------------------------------

_COLLECTIVE_NAMESPACES = ("_c10d_functional", "c10d_functional")


def is_collective(node: fx.Node) -> bool:
    """A functional collective's issue node (``_c10d_functional.all_reduce`` etc., not the wait)."""
    t = node.target
    return (
        node.op == "call_function"
        and _is_op_overload(t)
        and t.namespace in _COLLECTIVE_NAMESPACES
        and t.__name__.split(".")[0] != "wait_tensor"
    )


def is_wait(node: fx.Node) -> bool:
    """A ``_c10d_functional.wait_tensor`` node."""
    t = node.target
    return (
        node.op == "call_function"
        and _is_op_overload(t)
        and t.namespace in _COLLECTIVE_NAMESPACES
        and t.__name__.split(".")[0] == "wait_tensor"
    )


def collective_of(
    wait: fx.Node, comm_is: Callable[[fx.Node], bool] = is_collective
) -> Optional[fx.Node]:
    """The collective a wait waits for (through ``getitem`` of coalesced collectives), or None."""
    x = wait.args[0] if wait.args else None
    while isinstance(x, fx.Node):
        if comm_is(x):
            return x
        if x.op == "call_function" and x.target is operator.getitem:
            x = x.args[0]
            continue
        return None
    return None


# Ops whose output shares its input's storage although their schema does not say so.
_UNANNOTATED_VIEWS = {"aten._unsafe_view"}


def _returns_alias(node: fx.Node) -> bool:
    """Output shares storage with an input: views, in-place ops, ``getitem``, ``wait_tensor``."""
    t = node.target
    if node.op != "call_function":
        return False
    if t is operator.getitem or is_wait(node):
        return True
    if _is_op_overload(t):
        return (any(r.alias_info is not None for r in t._schema.returns)
                or str(t.overloadpacket) in _UNANNOTATED_VIEWS)
    return False


def is_free_op(node: fx.Node) -> bool:
    """Ops that launch no kernel: views, ``getitem``, waits, size/symbolic-int arithmetic."""
    if node.op != "call_function":
        return True
    t = node.target
    if _returns_alias(node):  # views, getitem, wait (in-place ops launch kernels)
        return not (_is_op_overload(t) and t._schema.is_mutable)
    if getattr(t, "__module__", None) in ("_operator", "operator", "math"):
        return True
    if _is_op_overload(t):
        # aten.sym_size.int, aten.sym_numel, asserts: return no tensor, launch no kernel.
        return all("Tensor" not in str(r.type) for r in t._schema.returns)
    return False


# ---------------------------------------------------------------------------------------------
# Tensor sizes
# ---------------------------------------------------------------------------------------------


def _flat_tensor_metas(v) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of every tensor in a node's value (tensor, TensorMetadata, or nested)."""
    if v is None:
        return []
    if hasattr(v, "shape") and hasattr(v, "dtype") and isinstance(getattr(v, "dtype"), torch.dtype):
        return [(tuple(_size_hint(s) for s in v.shape), v.dtype)]
    if isinstance(v, (list, tuple)):
        out = []
        for x in v:
            out += _flat_tensor_metas(x)
        return out
    return []


def _value_of(x):
    if isinstance(x, fx.Node):
        v = x.meta.get("val")
        return v if v is not None else x.meta.get("tensor_meta")
    if isinstance(x, (list, tuple)):
        return [_value_of(y) for y in x]
    return None


def value_bytes(x) -> int:
    """Bytes of all tensors in a node's value (or in a list of nodes)."""
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in _flat_tensor_metas(_value_of(x)))


def _shape(x) -> Optional[tuple[int, ...]]:
    metas = _flat_tensor_metas(_value_of(x))
    return metas[0][0] if metas else None


def _numel(x) -> int:
    s = _shape(x)
    return math.prod(s) if s is not None else 0


def _arg(node: fx.Node, name: str, default=None):
    """An OpOverload argument by schema name: positional, keyword, or the schema's default."""
    if name in node.kwargs:
        return node.kwargs[name]
    for i, a in enumerate(node.target._schema.arguments):
        if a.name == name:
            if i < len(node.args) and not a.kwarg_only:
                return node.args[i]
            return a.default_value if a.has_default_value() else default
    return default


def op_key(node: fx.Node) -> str:
    """Shape-specific op name, the key a measured profile uses: ``aten.mm.default(bfloat16[8,4],...)``."""
    parts = []
    for a in node.all_input_nodes:
        for shape, dtype in _flat_tensor_metas(_value_of(a)):
            parts.append(f"{str(dtype).removeprefix('torch.')}[{','.join(map(str, shape))}]")
    return f"{node.target}({','.join(parts)})"


# ---------------------------------------------------------------------------------------------
# Cost models
# ---------------------------------------------------------------------------------------------


@runtime_checkable
class CostModel(Protocol):
    """What the timeline needs to know about time. All times in microseconds."""

    compute_interference: float
    """Compute runs this many times slower while a collective runs (>= 1; 1 = no interference)."""
    comm_interference: float
    """A collective runs this many times slower while compute runs (>= 1)."""

    def compute_us(self, node: fx.Node) -> float:
        """Time of a non-collective node on the compute stream, running alone."""
        ...

    def comm_us(self, node: fx.Node) -> float:
        """Time of a collective on the comm stream, running alone."""
        ...


@dataclass(frozen=True, kw_only=True)
class DeviceConstants:
    """Hardware constants of the analytical cost model (defaults: one H100 SXM, NVLink, TP=2)."""

    peak_flops: float = 800e12
    """Dense bf16 matmul throughput reachable in practice, flop/s (H100 SXM measured ~800e12;
    datasheet 989e12)."""
    mem_bw_bytes_per_s: float = 3.0e12
    """HBM bandwidth reachable by elementwise kernels, B/s (H100 SXM: 3.35e12 datasheet)."""
    comm_alpha_us: float = 10.0
    """Fixed latency of one collective, microseconds (launch + NCCL protocol setup)."""
    comm_bus_bw_bytes_per_s: float = 250e9
    """All-reduce bus bandwidth, B/s (nccl-tests busbw; 256e9 measured for 2 x H100 NVLink,
    27.5e9 with NCCL_P2P_DISABLE=1)."""
    group_size: int = 2
    """Ranks in a collective's group where the op does not say (all_reduce carries no size)."""
    compute_interference: float = 1.0
    """Compute slowdown while a collective runs (NCCL kernels take SMs), >= 1."""
    comm_interference: float = 1.0
    """Collective slowdown while compute runs, >= 1."""


_MATMUL_OPS = {"aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm", "aten.matmul",
               "aten.linear", "aten._addmm_activation", "aten._scaled_mm"}
_CONV_OPS = {"aten.convolution", "aten._convolution", "aten.conv2d", "aten.conv1d", "aten.conv3d"}
_ALL_REDUCE_LIKE = {"all_reduce", "all_reduce_", "all_reduce_coalesced", "all_reduce_coalesced_"}
_ONE_SHARE_LIKE = {"all_gather_into_tensor", "all_gather_into_tensor_coalesced",
                   "all_gather_into_tensor_out", "reduce_scatter_tensor",
                   "reduce_scatter_tensor_coalesced", "all_to_all_single"}


def _attention_flops(node: fx.Node, name: str) -> float:
    """2 matmuls of (Sq x D) @ (D x Skv) and (Sq x Skv) @ (Skv x Dv) per batch and head."""
    backward = name.endswith("_backward")
    q, k, v = node.args[1:4] if backward else node.args[0:3]
    qs, ks, vs = _shape(q), _shape(k), _shape(v)
    if not (qs and ks and vs) or len(qs) < 3:
        return 0.0
    if "scaled_dot_product" in name:  # (B, H, S, D)
        s_kv = ks[-2]
    else:  # _flash_attention_* / _efficient_attention_*: (B, S, H, D)
        s_kv = ks[-3]
    rows = math.prod(qs[:-1])  # B * H * Sq
    flops = 2.0 * rows * s_kv * (qs[-1] + vs[-1])
    try:
        if _arg(node, "is_causal", False) is True:
            flops /= 2
    except (IndexError, AttributeError):
        pass
    return flops * (2.5 if backward else 1.0)  # backward: dQ, dK, dV + recomputed scores


def _conv_flops(node: fx.Node, name: str) -> float:
    backward = name.endswith("_backward")
    if backward:  # convolution_backward(grad_output, input, weight, ...): grad input + grad weight
        out, inp, w = node.args[0], node.args[1], node.args[2]
    else:
        inp, w, out = node.args[0], node.args[1], node
    transposed = bool(_arg(node, "transposed", False))
    ws = _shape(w)
    if not ws:
        return 0.0
    per_elem = math.prod(ws) / ws[0]
    flops = 2.0 * (_numel(inp) if transposed else _numel(out)) * per_elem
    return flops * (2.0 if backward else 1.0)


def node_flops(node: fx.Node) -> float:
    """Floating-point operations of matmul, attention and convolution nodes (0 for others)."""
    if node.op != "call_function" or not _is_op_overload(node.target):
        return 0.0
    name = str(node.target.overloadpacket)
    if name in _MATMUL_OPS:
        a = node.args[1] if name in ("aten.addmm", "aten.baddbmm", "aten._addmm_activation") else node.args[0]
        a_shape = _shape(a)
        return 2.0 * _numel(node) * a_shape[-1] if a_shape else 0.0
    if name == "oases_fx.mm_accumulate":  # sum_i a[i] @ b[i] (passes/accumulate_grads.py)
        return sum(2.0 * _numel(node) * (_shape(a) or (0,))[-1] for a in node.args[0])
    if "scaled_dot_product" in name or name.startswith(("aten._flash_attention", "aten._efficient_attention")):
        return _attention_flops(node, name)
    if name in _CONV_OPS or name == "aten.convolution_backward":
        return _conv_flops(node, name)
    return 0.0


@dataclass(frozen=True)
class AnalyticalCostModel:
    """Roofline compute (flops over peak, bytes over bandwidth) and alpha-beta collectives.

    compute_us = max(flops / peak_flops, bytes_moved / mem_bw), bytes_moved = inputs + outputs;
    comm_us    = alpha + bytes * f(n) / bus_bw, f = 2(n-1)/n for all-reduce (ring), (n-1)/n for
                 all-gather / reduce-scatter / all-to-all (bytes = the full tensor), 1 otherwise.
    """

    constants: DeviceConstants = field(default_factory=DeviceConstants)

    @property
    def compute_interference(self) -> float:
        return self.constants.compute_interference

    @property
    def comm_interference(self) -> float:
        return self.constants.comm_interference

    def compute_us(self, node: fx.Node) -> float:
        if is_free_op(node):
            return 0.0
        c = self.constants
        moved = value_bytes(node) + sum(value_bytes(a) for a in node.all_input_nodes)
        seconds = max(node_flops(node) / c.peak_flops, moved / c.mem_bw_bytes_per_s)
        return seconds * 1e6

    def comm_us(self, node: fx.Node) -> float:
        c = self.constants
        name = node.target.__name__.split(".")[0] if _is_op_overload(node.target) else ""
        n = c.group_size
        if _is_op_overload(node.target):
            n = int(_arg(node, "group_size", n) or n)
        if name.startswith("all_gather"):
            nbytes = value_bytes(node)  # output: the gathered tensor
        else:
            nbytes = value_bytes(node.args[0]) if node.args else 0
        if name in _ALL_REDUCE_LIKE:
            share = 2.0 * (n - 1) / n
        elif name in _ONE_SHARE_LIKE:
            share = (n - 1) / n
        else:
            share = 1.0
        return c.comm_alpha_us + nbytes * share / c.comm_bus_bw_bytes_per_s * 1e6


@dataclass(frozen=True, kw_only=True)
class TableCostModel:
    """Measured times: look a node up by name, then by :func:`op_key`; else ask ``fallback``.

    Free ops (views, getitem, waits, size arithmetic) cost 0 without a lookup. A miss with no
    fallback is a KeyError: a profile that lacks an op must not silently count it as free.
    The table must be the same on every rank (broadcast it) or schedules will differ.
    """

    compute: Mapping[str, float] = field(default_factory=dict)
    """Node name or op_key -> microseconds on the compute stream."""
    comm: Mapping[str, float] = field(default_factory=dict)
    """Node name or op_key -> microseconds of the collective on the comm stream."""
    fallback: Optional[CostModel] = None
    """Asked for nodes missing from the tables; None: missing entries raise KeyError."""
    compute_interference: float = 1.0
    """Compute slowdown while a collective runs, >= 1."""
    comm_interference: float = 1.0
    """Collective slowdown while compute runs, >= 1."""

    def _lookup(self, table: Mapping[str, float], node: fx.Node, what: str) -> float:
        if node.name in table:
            return float(table[node.name])
        key = op_key(node)
        if key in table:
            return float(table[key])
        if self.fallback is not None:
            return float(getattr(self.fallback, what)(node))
        raise KeyError(f"TableCostModel has no {what} entry for node {node.name!r} (key {key!r})")

    def compute_us(self, node: fx.Node) -> float:
        if is_free_op(node) and node.name not in self.compute:
            return 0.0
        return self._lookup(self.compute, node, "compute_us")

    def comm_us(self, node: fx.Node) -> float:
        return self._lookup(self.comm, node, "comm_us")


# ---------------------------------------------------------------------------------------------
# Live memory
# ---------------------------------------------------------------------------------------------


class LiveBytes:
    """Bytes of intermediate tensors alive while a graph's nodes run in some order.

    Graph inputs (placeholders, get_attr) are excluded: they are alive throughout anyway. A view,
    getitem or wait shares its input's storage; a storage is freed after the last user of any of
    its aliases ran; values returned by the graph are never freed. Multi-output ops are freed as a
    whole (approximation). Feed :meth:`emit` any topological order of ``graph``'s nodes.
    """

    def __init__(self, graph: fx.Graph):
        self._owner: dict[fx.Node, fx.Node] = {}
        self._bytes: dict[fx.Node, int] = {}
        self._uses_left: dict[fx.Node, int] = {}
        for n in graph.nodes:
            if n.op in ("placeholder", "get_attr"):
                self._owner[n] = n
                self._bytes[n] = 0
            elif n.op != "output":
                if _returns_alias(n) and n.all_input_nodes:
                    self._owner[n] = self._owner[n.all_input_nodes[0]]
                else:
                    self._owner[n] = n
                    self._bytes[n] = value_bytes(n)
            self._uses_left.setdefault(self._owner.get(n, n), 0)
            for o in self._input_owners(n):
                self._uses_left[o] = self._uses_left.get(o, 0) + 1
        self.live = 0
        self.peak = 0

    def _input_owners(self, n: fx.Node) -> set[fx.Node]:
        return {self._owner[a] for a in n.all_input_nodes if a in self._owner}

    def alloc_bytes(self, n: fx.Node) -> int:
        """Bytes newly allocated when ``n`` runs (0 for views and inputs)."""
        return self._bytes.get(n, 0) if self._owner.get(n) is n else 0

    def emit(self, n: fx.Node) -> None:
        if n.op == "output":
            return
        self.live += self.alloc_bytes(n)
        self.peak = max(self.peak, self.live)
        for o in sorted(self._input_owners(n) - {n}, key=lambda x: x.name):
            self._uses_left[o] -= 1
            if self._uses_left[o] == 0:
                self.live -= self._bytes.get(o, 0)
        if self._owner.get(n) is n and self._uses_left.get(n, 0) == 0:
            self.live -= self._bytes.get(n, 0)  # dead value


def peak_live_bytes(nodes_in_order: Sequence[fx.Node]) -> int:
    """Peak bytes of intermediates for this order (see :class:`LiveBytes`)."""
    nodes = list(nodes_in_order)
    if not nodes:
        return 0
    lb = LiveBytes(nodes[0].graph)
    for n in nodes:
        lb.emit(n)
    return lb.peak


# ---------------------------------------------------------------------------------------------
# Timeline
# ---------------------------------------------------------------------------------------------

COMPUTE = "compute"
COMM = "comm"


@dataclass(frozen=True)
class Interval:
    """One node's stay on a stream. ``kind``: "compute", "comm", or "wait" (compute stream blocked)."""

    name: str
    start_us: float
    end_us: float
    kind: str
    sub_batch: Optional[int] = None

    @property
    def duration_us(self) -> float:
        return self.end_us - self.start_us


@dataclass(frozen=True)
class Timeline:
    """A simulated run: per-stream intervals and the numbers the planner explains step time with.

    comm_exposed_us: time a collective runs while the compute stream does no work (blocked in a
    wait, or finished); comm_hidden_us: time a collective runs under compute. Their sum is
    comm_total_us, the comm stream's busy time.
    """

    streams: Mapping[str, tuple[Interval, ...]]
    makespan_us: float
    compute_busy_us: float
    comm_total_us: float
    comm_exposed_us: float
    comm_hidden_us: float

    @property
    def compute(self) -> tuple[Interval, ...]:
        return self.streams[COMPUTE]

    @property
    def comm(self) -> tuple[Interval, ...]:
        return self.streams[COMM]

    def interval(self, name: str) -> Interval:
        """The interval of the node called ``name``."""
        for ivs in self.streams.values():
            for iv in ivs:
                if iv.name == name:
                    return iv
        raise KeyError(name)

    def summary(self) -> str:
        pct = 100.0 * self.comm_hidden_us / self.comm_total_us if self.comm_total_us else 100.0
        return (
            f"makespan {self.makespan_us:.1f} us | compute {self.compute_busy_us:.1f} us | "
            f"comm {self.comm_total_us:.1f} us ({len(self.comm)} collectives): "
            f"exposed {self.comm_exposed_us:.1f} us, hidden {self.comm_hidden_us:.1f} us ({pct:.0f}%)"
        )

    def to_png(self, path: str, *, title: Optional[str] = None) -> None:
        """Draw both streams (color: sub-batch if known, else kind) to a PNG file."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch

        kind_colors = {"compute": "tab:blue", "comm": "tab:orange", "wait": "lightgray"}
        sb_colors = ["tab:blue", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive"]

        def color(iv: Interval) -> str:
            if iv.kind == "wait":
                return kind_colors["wait"]
            if iv.sub_batch is not None:
                return sb_colors[iv.sub_batch % len(sb_colors)]
            return kind_colors[iv.kind]

        fig, ax = plt.subplots(figsize=(12, 2.4))
        for row, stream in enumerate((COMPUTE, COMM)):
            ivs = [iv for iv in self.streams[stream] if iv.duration_us > 0]
            ax.broken_barh([(iv.start_us, iv.duration_us) for iv in ivs], (row - 0.4, 0.8),
                           facecolors=[color(iv) for iv in ivs], edgecolor="black", linewidth=0.3)
        ax.set_yticks([0, 1], ["compute", "comm"])
        ax.set_ylim(1.6, -0.6)
        ax.set_xlabel("time (us)")
        ax.set_title(title or self.summary(), fontsize=9)
        sbs = sorted({iv.sub_batch for s in self.streams.values() for iv in s if iv.sub_batch is not None})
        handles = ([Patch(color=sb_colors[s % len(sb_colors)], label=f"sub-batch {s}") for s in sbs]
                   or [Patch(color=kind_colors[k], label=k) for k in ("compute", "comm")])
        handles.append(Patch(color=kind_colors["wait"], label="waiting (exposed)"))
        ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7,
                  frameon=False)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def _overlap_us(a: Sequence[Interval], b: Sequence[Interval]) -> float:
    """Total overlap of two sorted lists of disjoint intervals."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        lo = max(a[i].start_us, b[j].start_us)
        hi = min(a[i].end_us, b[j].end_us)
        if hi > lo:
            total += hi - lo
        if a[i].end_us < b[j].end_us:
            i += 1
        else:
            j += 1
    return total


def _cost(value: float, node: fx.Node, what: str) -> float:
    v = float(value)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"cost model gave {what}={v!r} for node {node.name} ({node.target}); "
                         "costs must be finite and >= 0")
    return v


def simulate(
    nodes_in_order: Iterable[fx.Node],
    cost_model: Optional[CostModel] = None,
    *,
    comm_is: Callable[[fx.Node], bool] = is_collective,
    wait_is: Callable[[fx.Node], bool] = is_wait,
) -> Timeline:
    """Run ``nodes_in_order`` (host order) on the two-stream model; see the module docstring.

    Only ``call_function`` nodes take time; placeholders, get_attr and output are skipped. A wait
    whose collective cannot be found (``collective_of``) costs nothing; a wait placed before its
    collective is a ValueError.
    """
    cm = cost_model if cost_model is not None else AnalyticalCostModel()
    f_compute = float(getattr(cm, "compute_interference", 1.0))
    f_comm = float(getattr(cm, "comm_interference", 1.0))
    if f_compute < 1.0 or f_comm < 1.0:
        raise ValueError(f"interference factors must be >= 1, got {f_compute}, {f_comm}")

    # compute queue: (node, kind, cost, index of awaited collective); comm queue: (node, cost,
    # release) where release = number of compute-queue items that must finish before it starts.
    compute_q: list[tuple[fx.Node, str, float, Optional[int]]] = []
    comm_q: list[tuple[fx.Node, float, int]] = []
    comm_index: dict[fx.Node, int] = {}
    for n in nodes_in_order:
        if n.op != "call_function":
            continue
        if comm_is(n):
            comm_index[n] = len(comm_q)
            comm_q.append((n, _cost(cm.comm_us(n), n, "comm_us"), len(compute_q)))
        elif wait_is(n):
            c = collective_of(n, comm_is)
            if c is not None and c not in comm_index:
                raise ValueError(f"wait {n.name} comes before its collective {c.name} in this order")
            compute_q.append((n, "wait", 0.0, comm_index.get(c) if c is not None else None))
        else:
            compute_q.append((n, "compute", _cost(cm.compute_us(n), n, "compute_us"), None))

    def sub_batch(n: fx.Node) -> Optional[int]:
        return oases_meta.get(n).sub_batch

    compute_ivs: list[Interval] = []
    comm_ivs: list[Interval] = []
    comm_done: list[Optional[float]] = [None] * len(comm_q)
    t = 0.0
    ci = mi = 0                       # next compute / comm queue item
    c_rem = m_rem = None              # remaining solo-time of the running items
    c_start = m_start = 0.0
    wait_since: Optional[float] = None
    eps = 1e-9

    while True:
        progressed = True
        while progressed:  # start whatever can start now (zero-time items finish at once)
            progressed = False
            if c_rem is None and ci < len(compute_q):
                node, kind, cost, cidx = compute_q[ci]
                if kind == "wait":
                    if cidx is None or comm_done[cidx] is not None:
                        start = wait_since if wait_since is not None else t
                        compute_ivs.append(Interval(node.name, start, t, "wait", sub_batch(node)))
                        wait_since = None
                        ci += 1
                        progressed = True
                    elif wait_since is None:
                        wait_since = t
                elif cost == 0.0:
                    compute_ivs.append(Interval(node.name, t, t, "compute", sub_batch(node)))
                    ci += 1
                    progressed = True
                else:
                    c_rem, c_start = cost, t
            if m_rem is None and mi < len(comm_q):
                node, cost, release = comm_q[mi]
                if ci >= release:  # everything issued before it on the compute stream is done
                    if cost == 0.0:
                        comm_ivs.append(Interval(node.name, t, t, "comm", sub_batch(node)))
                        comm_done[mi] = t
                        mi += 1
                        progressed = True
                    else:
                        m_rem, m_start = cost, t
        if c_rem is None and m_rem is None:
            assert ci == len(compute_q) and mi == len(comm_q), (
                f"simulation stuck at compute item {ci}, comm item {mi}")
            break
        rate_c = 1.0 / f_compute if m_rem is not None else 1.0
        rate_m = 1.0 / f_comm if c_rem is not None else 1.0
        dt_c = c_rem / rate_c if c_rem is not None else math.inf
        dt_m = m_rem / rate_m if m_rem is not None else math.inf
        dt = min(dt_c, dt_m)
        t += dt
        if c_rem is not None:
            if dt_c - dt <= eps * max(1.0, dt):
                node = compute_q[ci][0]
                compute_ivs.append(Interval(node.name, c_start, t, "compute", sub_batch(node)))
                c_rem = None
                ci += 1
            else:
                c_rem -= dt * rate_c
        if m_rem is not None:
            if dt_m - dt <= eps * max(1.0, dt):
                node = comm_q[mi][0]
                comm_ivs.append(Interval(node.name, m_start, t, "comm", sub_batch(node)))
                comm_done[mi] = t
                m_rem = None
                mi += 1
            else:
                m_rem -= dt * rate_m

    busy = [iv for iv in compute_ivs if iv.kind == "compute"]
    comm_total = sum(iv.duration_us for iv in comm_ivs)
    hidden = _overlap_us(busy, comm_ivs)
    return Timeline(
        streams={COMPUTE: tuple(compute_ivs), COMM: tuple(comm_ivs)},
        makespan_us=t,
        compute_busy_us=sum(iv.duration_us for iv in busy),
        comm_total_us=comm_total,
        comm_exposed_us=comm_total - hidden,
        comm_hidden_us=hidden,
    )
