"""schedule_overlap: reorder an AOTAutograd forward or backward graph so TMP all-reduces of one
sub-batch run while another sub-batch computes (the Oases schedule, arXiv:2305.16121).

Kind: SCHEDULE ONLY.

Contract
  Preconditions: an aten-level fx.GraphModule (AOTAutograd forward or backward graph) with one
  output node; collectives are functional (``_c10d_functional.*``) and every collective's result
  is used only by ``wait_tensor`` (directly or through ``getitem`` for coalesced collectives).
  Sub-batch copies may come one after another or interleaved: the result does not depend on it.
  Invariant: only reorders nodes, never adds, removes or changes one, so values are bitwise
  identical. Data dependencies are kept; placeholders stay first and the output last; nodes that
  are not pure keep their relative order (see ``_ordering_class``: RNG ops, asserts and unknown
  callables are chained in their original order; mutating ops - in-place, ``copy_`` into inputs,
  in-place collectives - are barriers nothing moves across).
  Errors rather than silently producing a different schedule: a graph it cannot handle raises a
  ValueError naming the node; a schedule that would break the memory bound or is predicted
  slower than the original order is not applied (the original order is kept, with a logged
  warning). Deterministic: the same graph and cost model give the same order on every rank (no
  hashing of ids, no wall-clock input; ties end at the original position).
  Output: every call_function node gets ``meta["oases"]`` stream/start_us/end_us from the
  simulated timeline, and ``gm.meta["oases_timeline"]`` holds the :class:`Timeline`.

Pseudocode
  deps   = data edges + order edges (impure nodes chained; mutating nodes are barriers)
  order  = placeholders; issue every ready collective while in_flight < max_in_flight
           (ready collectives are issued in the order they became ready)
  while nodes remain:
      candidates = nodes whose missing inputs are only waits of issued collectives
      if none: emit the oldest ready wait; continue
      ready   = candidates whose waits' collectives are predicted done (emitting them won't stall)
      best    = the ready candidate feeding the collective in progress (its nearest collective)
                else the ready candidate minimising
                    (nearest collective it feeds, by original order - work feeding none, like
                     weight gradients, takes its inputs' collective so it runs beside that work
                     instead of last; -critical path (cost model); original position)
                else the stalled candidate whose waits finish first (same ties)
      if best would break the memory bound: best = the candidate earliest in the original order
      emit best's waits (oldest collective first), then best   # each wait just before first use
      issue every ready collective                              # as soon as its input exists
      advance the predicted compute clock / comm clock          # what "stall" is judged by
  order += output
  keep the original order (logged) if the result breaks the memory bound or is predicted slower

Limits
  RNG ops that draw from the global generator (dropout with p > 0 in training, rand, bernoulli,
  philox_rand) keep their original relative order, so bitwise identity holds. If sub-batch
  copies were traced one after another (all of A, then all of B), that chain pins A's every
  dropout before B's first one and blocks most forward overlap: emit the copies interleaved at
  collective boundaries, or functionalize RNG. Attention with dropout_p == 0 and dropout with
  train=False are pure. The memory bound is checked on the result; the greedy only steers.

Before / after (k=2 forward; A = sub-batch 0, B = sub-batch 1)
  before                                    after
    mm     = mm(xa, w1)                       mm     = mm(xa, w1)
    ar     = all_reduce(mm)                   ar     = all_reduce(mm)       # A0 issued
    wt     = wait_tensor(ar)                  mm_2   = mm(xb, w1)           # B0 computes under A0
    mm_1   = mm(wt, w2)                       ar_2   = all_reduce(mm_2)     # B0 issued
    ar_1   = all_reduce(mm_1)                 wt     = wait_tensor(ar)      # A0 waited at first use
    wt_1   = wait_tensor(ar_1)                mm_1   = mm(wt, w2)           # A1 computes under B0
    mm_2   = mm(xb, w1)                       ar_1   = all_reduce(mm_1)
    ar_2   = all_reduce(mm_2)                 wt_2   = wait_tensor(ar_2)
    wt_2   = wait_tensor(ar_2)                mm_3   = mm(wt_2, w2)         # B1 computes under A1
    mm_3   = mm(wt_2, w2)                     ar_3   = all_reduce(mm_3)
    ar_3   = all_reduce(mm_3)                 wt_1   = wait_tensor(ar_1)
    wt_3   = wait_tensor(ar_3)                wt_3   = wait_tensor(ar_3)    # only A0's first block
    cat    = cat([wt_1, wt_3])                cat    = cat([wt_1, wt_3])    # and the last one exposed
"""
from __future__ import annotations

import heapq
import logging
import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from oases_fx import meta as oases_meta
from oases_fx.timeline import (
    AnalyticalCostModel,
    CostModel,
    LiveBytes,
    Timeline,
    _is_higher_order_op,
    _arg,
    _is_op_overload,
    collective_of,
    is_collective,
    is_wait,
    peak_live_bytes,
    simulate,
)

log = logging.getLogger(__name__)

__all__ = ["ScheduleOptions", "schedule_overlap_pass"]


@dataclass(frozen=True, kw_only=True)
class ScheduleOptions:
    """Options of :func:`schedule_overlap_pass`."""

    max_in_flight: int = 2
    """Most collectives issued and not yet waited at any point of the order (>= 1). Two lets one
    sub-batch's collective run while the other's is issued; more costs memory and NCCL queueing."""
    max_extra_live_bytes: Optional[int] = None
    """Bound on extra memory the new order keeps alive (waits moved later, work computed ahead):
    its predicted peak of live intermediates may exceed the original order's by at most this many
    bytes, else the original order is kept. None: unbounded."""
    enabled: bool = True
    """False: the pass returns the graph untouched (no reordering, no metadata)."""

    def __post_init__(self):
        if self.max_in_flight < 1:
            raise ValueError(f"ScheduleOptions.max_in_flight must be >= 1, got {self.max_in_flight}")
        if self.max_extra_live_bytes is not None and self.max_extra_live_bytes < 0:
            raise ValueError("ScheduleOptions.max_extra_live_bytes must be >= 0 or None, "
                             f"got {self.max_extra_live_bytes}")


# ---------------------------------------------------------------------------------------------
# Graph utilities
# ---------------------------------------------------------------------------------------------

PURE, ORDERED, BARRIER = "pure", "ordered", "barrier"

# run_with_rng_state(state, op, *args) sets the generator to the saved state, runs op and restores
# the previous state: its value depends only on its inputs and it leaves the global RNG as it
# found it, so it commutes with every other op (AOTAutograd uses it to replay dropout in
# recomputation). run_and_save_rng_state and graphsafe variants advance generator state: ORDERED.
_PURE_HIGHER_ORDER_OPS = {"run_with_rng_state"}


def _where(node: fx.Node) -> str:
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
    src = f", source: {lines[-2]} {lines[-1]}" if len(lines) >= 2 else ""
    return f"node {node.name} (op {node.op} {node.target}{src})"


def _draws_random_numbers(node: fx.Node) -> bool:
    """False only where an RNG-tagged op provably leaves the generator alone: attention with
    dropout_p == 0 (flash / efficient / cudnn / CPU kernels touch the generator only for
    dropout_p > 0) and dropout with train=False. native_dropout with p == 0 in training still
    draws (its CPU kernel runs bernoulli_(1 - p)), so it stays ordered."""
    name = str(node.target.overloadpacket)
    try:
        if "attention" in name and _arg(node, "dropout_p", None) == 0.0:
            return False
        if "dropout" in name and _arg(node, "train", None) is False:
            return False
    except (IndexError, AttributeError):
        pass
    return True


def _ordering_class(node: fx.Node) -> str:
    """PURE: free to move. ORDERED: keeps its order among ORDERED nodes (RNG, asserts, profiler
    marks, anything unknown). BARRIER: mutates memory, so nothing moves across it."""
    t = node.target
    if node.op != "call_function":
        return ORDERED
    if t is operator.getitem:
        return PURE
    if _is_op_overload(t):
        if t._schema.is_mutable:
            return BARRIER
        if is_collective(node) or is_wait(node):
            return PURE
        if torch.Tag.nondeterministic_seeded in t.tags:
            return ORDERED if _draws_random_numbers(node) else PURE
        if node.is_impure():
            return ORDERED
        return PURE
    if _is_higher_order_op(t):
        return PURE if t.name() in _PURE_HIGHER_ORDER_OPS else ORDERED
    module = getattr(t, "__module__", None)
    if module in ("_operator", "operator", "math") and t is not operator.setitem:
        return PURE
    if module == "torch" and getattr(t, "__name__", "").startswith("sym_"):
        return PURE  # torch.sym_max, sym_int, ...: size arithmetic
    return ORDERED


def _check_graph(nodes: list[fx.Node]) -> None:
    outputs = [n for n in nodes if n.op == "output"]
    if len(outputs) != 1 or nodes[-1] is not outputs[0]:
        raise ValueError("schedule_overlap needs exactly one output node, placed last; "
                         f"got {len(outputs)} output nodes")
    for c in nodes:
        if not is_collective(c):
            continue
        for u in c.users:
            ok = is_wait(u) or (
                u.op == "call_function" and u.target is operator.getitem
                and all(is_wait(w) for w in u.users))
            if not ok:
                raise ValueError(
                    f"schedule_overlap: the result of collective {_where(c)} is used by {_where(u)} "
                    "without a wait_tensor; a functional collective's result must go through "
                    "_c10d_functional.wait_tensor before use (fix the graph that produced it)")


def _dependencies(body: list[fx.Node]) -> dict[fx.Node, list[fx.Node]]:
    """Data edges plus order edges among body nodes (ORDERED chain, BARRIER fences)."""
    in_body = set(body)
    deps = {n: [a for a in n.all_input_nodes if a in in_body] for n in body}
    last_ordered: Optional[fx.Node] = None
    since_barrier: list[fx.Node] = []
    barrier: Optional[fx.Node] = None
    for n in body:
        cls = _ordering_class(n)
        if barrier is not None:
            deps[n].append(barrier)
        if cls == BARRIER:
            deps[n].extend(since_barrier)
            barrier, since_barrier, last_ordered = n, [], n
            continue
        since_barrier.append(n)
        if cls == ORDERED:
            if last_ordered is not None:
                deps[n].append(last_ordered)
            last_ordered = n
    return {n: list(dict.fromkeys(ds)) for n, ds in deps.items()}  # dedupe, keep order


def _lowest_bit(mask: int) -> int:
    return (mask & -mask).bit_length() - 1


# ---------------------------------------------------------------------------------------------
# The list scheduler
# ---------------------------------------------------------------------------------------------


class _MemoCostModel:
    """Asks the cost model once per node (the pass simulates twice and schedules once)."""

    def __init__(self, cm: CostModel):
        self._cm = cm
        self.compute_interference = getattr(cm, "compute_interference", 1.0)
        self.comm_interference = getattr(cm, "comm_interference", 1.0)
        self._compute: dict[fx.Node, float] = {}
        self._comm: dict[fx.Node, float] = {}

    def compute_us(self, node: fx.Node) -> float:
        if node not in self._compute:
            self._compute[node] = float(self._cm.compute_us(node))
        return self._compute[node]

    def comm_us(self, node: fx.Node) -> float:
        if node not in self._comm:
            self._comm[node] = float(self._cm.comm_us(node))
        return self._comm[node]


class _ListScheduler:
    """One pass of list scheduling over ``graph``; ``run()`` returns the new node order.

    Candidates are non-wait nodes whose unemitted inputs are only waits of issued collectives.
    They live in heaps keyed by a static part ``(first, -bottom, pos)`` (first: the nearest
    collective the node feeds, by original order; bottom: critical path to the graph's end;
    pos: original position), split by the dynamic part:
      ready   - emitting it now would not stall (its waits' collectives are predicted done);
                also indexed by ``first`` so work towards the collective in progress comes first;
      stalled - keyed by the predicted time its waits finish, then the static part.
    Entries are invalidated lazily by a per-node version number.
    """

    def __init__(self, graph: fx.Graph, cm: CostModel, options: ScheduleOptions,
                 live_budget: Optional[int]):
        self.options = options
        nodes = list(graph.nodes)
        self.nodes = nodes
        self.pos = {n: i for i, n in enumerate(nodes)}
        self.head = [n for n in nodes if n.op in ("placeholder", "get_attr")]
        self.output = nodes[-1]
        self.body = [n for n in nodes if n.op not in ("placeholder", "get_attr", "output")]
        body_set = set(self.body)
        self.deps = _dependencies(self.body)
        self.succs: dict[fx.Node, list[fx.Node]] = {n: [] for n in self.body}
        for n, ds in self.deps.items():
            for d in ds:
                self.succs[d].append(n)

        comms = [n for n in self.body if is_collective(n)]
        self.comm_bit = {c: i for i, c in enumerate(comms)}
        self.num_comms = len(comms)
        self.is_wait = {n: is_wait(n) for n in self.body}
        self.wait_coll = {w: collective_of(w) for w in self.body if self.is_wait[w]}
        self.waits_left = {c: 0 for c in comms}
        for c in self.wait_coll.values():
            if c is not None:
                self.waits_left[c] += 1

        self.cost = {}
        for n in self.body:
            self.cost[n] = (cm.comm_us(n) if n in self.comm_bit
                            else 0.0 if self.is_wait[n] else cm.compute_us(n))

        # first: nearest collective fed (bit index, num_comms if none); bottom: critical path.
        desc: dict[fx.Node, int] = {}
        bottom: dict[fx.Node, float] = {}
        for n in reversed(self.body):
            users = [u for u in n.users if u in body_set]
            mask = 1 << self.comm_bit[n] if n in self.comm_bit else 0
            for u in users:
                mask |= desc[u]
            desc[n] = mask
            bottom[n] = self.cost[n] + max((bottom[u] for u in users), default=0.0)
        self.first = {n: (_lowest_bit(desc[n]) if desc[n] else self.num_comms) for n in self.body}
        # Work that feeds no collective (weight gradients, the loss) takes the priority of the
        # collective its inputs lead to, so it runs next to that work (while that collective is
        # in flight, as Megatron runs weight gradients) instead of after everything else, which
        # would keep its inputs (activations, output gradients) alive to the end of the graph.
        for n in self.body:
            if not desc[n]:
                self.first[n] = min((self.first[a] for a in self.deps[n] if a in self.first),
                                    default=self.num_comms)
        self.static = {n: (self.first[n], -bottom[n], self.pos[n]) for n in self.body}

        self.wait_deps = {n: [d for d in self.deps[n] if self.is_wait[d]] for n in self.body}
        self.missing = {n: len(self.deps[n]) for n in self.body}          # all unemitted deps
        self.nonwait_left = {n: len(self.deps[n]) - len(self.wait_deps[n]) for n in self.body}
        self.blocked_waits = {n: len(self.wait_deps[n]) for n in self.body}  # waits not ready
        for w in self.body:
            if self.is_wait[w] and self.missing[w] == 0:
                for v in self.succs[w]:
                    self.blocked_waits[v] -= 1

        self.emitted: set[fx.Node] = set()
        self.order: list[fx.Node] = list(self.head)
        self.live = LiveBytes(graph) if live_budget is not None else None
        self.live_budget = live_budget
        if self.live is not None:
            for n in self.head:
                self.live.emit(n)

        self.compute_clock = 0.0
        self.comm_clock = 0.0
        self.done_at: dict[fx.Node, float] = {}
        self.in_flight: list[fx.Node] = []
        self.target: Optional[int] = None

        self.version = {n: 0 for n in self.body}
        self.ready_all: list = []                     # (static, version, node)
        self.ready_by_first: dict[int, list] = {}     # first -> [(static, version, node)]
        self.stalled: list = []                       # (ready_at, static, version, node)
        self.by_pos: list = []                        # (pos, version, node): every candidate
        self.ready_comms: list = []                   # (ready seq, pos, node): collectives ready to issue
        self.ready_seq = 0                            # first ready, first issued (the planner's order too)
        self.ready_waits: list = []                   # (pos, node): waits whose collective issued
        for n in self.body:
            if self.is_wait[n] and self.missing[n] == 0:
                heapq.heappush(self.ready_waits, (self.pos[n], n))
            self._maybe_candidate(n)

    # -- bookkeeping ------------------------------------------------------------------------

    def _pending_waits(self, n: fx.Node) -> list[fx.Node]:
        return [w for w in self.wait_deps[n] if w not in self.emitted]

    def _ready_at(self, waits: list[fx.Node]) -> float:
        t = self.compute_clock
        for w in waits:
            c = self.wait_coll[w]
            if c is not None:
                t = max(t, self.done_at[c])
        return t

    def _maybe_candidate(self, n: fx.Node) -> None:
        """(Re)file ``n`` if it is a candidate now: all non-wait inputs emitted, waits ready."""
        if (n in self.emitted or self.is_wait[n] or self.nonwait_left[n] != 0
                or self.blocked_waits[n] != 0):
            return
        self.version[n] += 1
        ver = self.version[n]
        pending = self._pending_waits(n)
        if n in self.comm_bit and not pending:
            self.ready_seq += 1
            heapq.heappush(self.ready_comms, (self.ready_seq, self.pos[n], n))
            return
        heapq.heappush(self.by_pos, (self.pos[n], ver, n))
        ready_at = self._ready_at(pending)
        if ready_at <= self.compute_clock:
            self._file_ready(n, ver)
        else:
            heapq.heappush(self.stalled, (ready_at, self.static[n], ver, n))

    def _file_ready(self, n: fx.Node, ver: int) -> None:
        entry = (self.static[n], ver, n)
        heapq.heappush(self.ready_all, entry)
        heapq.heappush(self.ready_by_first.setdefault(self.first[n], []), entry)

    def _valid(self, ver: int, n: fx.Node) -> bool:
        return n not in self.emitted and self.version[n] == ver

    def _top(self, heap: list) -> Optional[fx.Node]:
        while heap and not self._valid(heap[0][-2], heap[0][-1]):
            heapq.heappop(heap)
        return heap[0][-1] if heap else None

    def _promote_stalled(self) -> None:
        while self.stalled and self.stalled[0][0] <= self.compute_clock:
            _, _, ver, n = heapq.heappop(self.stalled)
            if self._valid(ver, n):
                self._file_ready(n, ver)

    # -- emission ---------------------------------------------------------------------------

    def _emit(self, n: fx.Node) -> None:
        self.order.append(n)
        self.emitted.add(n)
        if self.live is not None:
            self.live.emit(n)
        if n in self.comm_bit:
            self.done_at[n] = max(self.compute_clock, self.comm_clock) + self.cost[n]
            self.comm_clock = self.done_at[n]
            if self.waits_left[n] > 0:
                self.in_flight.append(n)
            if self.target == self.comm_bit[n]:
                self.target = None
        elif self.is_wait[n]:
            c = self.wait_coll[n]
            if c is not None:
                self.compute_clock = max(self.compute_clock, self.done_at[c])
                self.waits_left[c] -= 1
                if self.waits_left[c] == 0:
                    self.in_flight.remove(c)
        else:
            self.compute_clock += self.cost[n]
        for u in self.succs[n]:
            self.missing[u] -= 1
            if self.is_wait[u]:
                if self.missing[u] == 0:  # its collective is issued: the wait is ready
                    heapq.heappush(self.ready_waits, (self.pos[u], u))
                    for v in self.succs[u]:
                        self.blocked_waits[v] -= 1
                        self._maybe_candidate(v)
            elif self.is_wait[n]:
                self._maybe_candidate(u)  # one pending wait fewer: re-file
            else:
                self.nonwait_left[u] -= 1
                self._maybe_candidate(u)
        self._promote_stalled()

    def _issue_ready_collectives(self) -> None:
        while len(self.in_flight) < self.options.max_in_flight:
            while self.ready_comms and self.ready_comms[0][-1] in self.emitted:
                heapq.heappop(self.ready_comms)
            if not self.ready_comms:
                return
            self._emit(heapq.heappop(self.ready_comms)[-1])

    def _pick(self) -> Optional[fx.Node]:
        best = None
        if self.target is not None and self.target in self.ready_by_first:
            best = self._top(self.ready_by_first[self.target])
        if best is None:
            best = self._top(self.ready_all)
        if best is None:
            best = self._top(self.stalled)
        if best is not None and self.live is not None:
            grow = self.live.alloc_bytes(best)
            if self.live.live + grow > self.live_budget:
                best = self._top(self.by_pos)  # over the bound: take what the original order would
        return best

    # -- main loop --------------------------------------------------------------------------

    def run(self) -> list[fx.Node]:
        self._issue_ready_collectives()
        while len(self.emitted) < len(self.body):
            best = self._pick()
            if best is None:
                # Left: waits used only by the output (or collectives held back by the bound).
                while self.ready_waits and self.ready_waits[0][1] in self.emitted:
                    heapq.heappop(self.ready_waits)
                assert self.ready_waits, (
                    "schedule_overlap: no schedulable node; unscheduled: "
                    f"{[n.name for n in self.body if n not in self.emitted][:10]}")
                waits = [w for _, w in self.ready_waits if w not in self.emitted]
                self._emit(min(waits, key=lambda w: (self._ready_at([w]), self.pos[w])))
                self._issue_ready_collectives()
                continue
            if self.first[best] != self.target:
                self.target = self.first[best] if self.first[best] < self.num_comms else None
            for w in sorted(self._pending_waits(best), key=lambda w: (self._ready_at([w]), self.pos[w])):
                self._emit(w)
                self._issue_ready_collectives()
            if best in self.emitted or (best in self.comm_bit and
                                        len(self.in_flight) >= self.options.max_in_flight):
                continue  # a collective pulled in by its waits: issued, or issued when a slot frees
            self._emit(best)
            self._issue_ready_collectives()
        self.order.append(self.output)
        _assert_valid_order(self.nodes, self.order, self.deps)
        return self.order


def _assert_valid_order(nodes: list[fx.Node], order: list[fx.Node],
                        deps: dict[fx.Node, list[fx.Node]]) -> None:
    assert len(order) == len(nodes) and set(order) == set(nodes), "schedule lost or duplicated nodes"
    at = {n: i for i, n in enumerate(order)}
    for n, ds in deps.items():
        for d in ds:
            assert at[d] < at[n], f"schedule put {n.format_node()} before its dependency {d.name}"
    for n in nodes:
        for a in n.all_input_nodes:
            assert at[a] < at[n], f"schedule put {n.format_node()} before its input {a.name}"


# ---------------------------------------------------------------------------------------------
# Rewrite and record
# ---------------------------------------------------------------------------------------------


def _apply_order(graph: fx.Graph, order: list[fx.Node]) -> None:
    if list(graph.nodes) == order:
        return
    output = order[-1]
    for n in order[:-1]:
        output.prepend(n)  # moves n to just before the output: the final order is `order`


def _record(gm: fx.GraphModule, timeline: Timeline) -> None:
    where = {}
    for stream, ivs in timeline.streams.items():
        for iv in ivs:
            where[iv.name] = (stream, iv)
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.name in where:
            stream, iv = where[n.name]
            oases_meta.update(n, stream=stream, start_us=iv.start_us, end_us=iv.end_us)
    gm.meta["oases_timeline"] = timeline


def schedule_overlap_pass(
    gm: fx.GraphModule, *, options: ScheduleOptions, cost_model: Optional[CostModel] = None
) -> fx.GraphModule:
    """Reorder ``gm`` in place so collectives overlap independent compute; returns ``gm``.

    ``cost_model`` (default :class:`AnalyticalCostModel`) predicts node times; it must give the
    same numbers on every rank. See the module docstring for the contract and the algorithm.
    """
    if not options.enabled:
        return gm
    cm = _MemoCostModel(cost_model if cost_model is not None else AnalyticalCostModel())
    graph = gm.graph
    nodes = list(graph.nodes)
    _check_graph(nodes)
    before = simulate(nodes, cm)
    if not any(is_collective(n) for n in nodes):
        _record(gm, before)  # nothing to overlap: order untouched
        return gm

    budget = None
    if options.max_extra_live_bytes is not None:
        budget = peak_live_bytes(nodes) + options.max_extra_live_bytes
    order = _ListScheduler(graph, cm, options, budget).run()
    after = simulate(order, cm)

    reason = None
    if budget is not None and peak_live_bytes(order) > budget:
        reason = (f"its predicted peak of live intermediates {peak_live_bytes(order)} B exceeds "
                  f"the bound {budget} B (original peak + max_extra_live_bytes)")
    elif after.makespan_us > before.makespan_us * (1 + 1e-9):
        reason = (f"it is predicted slower than the original order "
                  f"({after.makespan_us:.1f} us vs {before.makespan_us:.1f} us)")
    if reason is not None:
        log.warning("schedule_overlap: keeping the original order: the new schedule was not "
                    "applied because %s", reason)
        _record(gm, before)
        return gm

    _apply_order(graph, order)
    graph.lint()
    gm.recompile()
    _record(gm, after)
    log.info("schedule_overlap: %d nodes, %d collectives; before: %s; after: %s",
             len(nodes), sum(1 for n in nodes if is_collective(n)), before.summary(), after.summary())
    return gm
