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
  while nodes remain:
      candidates = nodes whose missing inputs are only waits of issued collectives
      if none: emit the oldest ready wait; continue
      pick the candidate minimising
          (fits memory bound? , would stall on a wait?, predicted stall,
           does not feed the collective in progress, first collective it feeds (original order),
           -critical path to the graph's end (cost model), original position)
      emit its waits (oldest collective first), then it   # so each wait sits just before its first use
      issue every ready collective                        # issue as soon as the input exists
      advance the predicted compute clock / comm clock    # what "would stall" is judged by
  order += output

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
        if torch.Tag.nondeterministic_seeded in t.tags or node.is_impure():
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


def _list_schedule(graph: fx.Graph, cm: CostModel, options: ScheduleOptions,
                   live_budget: Optional[int]) -> list[fx.Node]:
    nodes = list(graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    head = [n for n in nodes if n.op in ("placeholder", "get_attr")]
    output = nodes[-1]
    body = [n for n in nodes if n.op not in ("placeholder", "get_attr", "output")]
    body_set = set(body)
    deps = _dependencies(body)
    succs: dict[fx.Node, list[fx.Node]] = {n: [] for n in body}
    for n, ds in deps.items():
        for d in ds:
            succs[d].append(n)

    comms = [n for n in body if is_collective(n)]
    comm_bit = {c: i for i, c in enumerate(comms)}
    waits = [n for n in body if is_wait(n)]
    wait_coll = {w: collective_of(w) for w in waits}
    waits_left = {c: 0 for c in comms}
    for w, c in wait_coll.items():
        if c is not None:
            waits_left[c] += 1
    wait_set = set(waits)

    cost: dict[fx.Node, float] = {}
    for n in body:
        cost[n] = cm.comm_us(n) if n in comm_bit else 0.0 if n in wait_set else cm.compute_us(n)

    # desc: bitmask of collectives each node feeds; bottom: critical path (us) to the graph's end.
    desc: dict[fx.Node, int] = {}
    bottom: dict[fx.Node, float] = {}
    for n in reversed(body):
        users = [u for u in n.users if u in body_set]
        mask = 1 << comm_bit[n] if n in comm_bit else 0
        for u in users:
            mask |= desc[u]
        desc[n] = mask
        bottom[n] = cost[n] + max((bottom[u] for u in users), default=0.0)

    missing = {n: len(deps[n]) for n in body}
    missing_nonwait = {n: sum(1 for d in deps[n] if d not in wait_set) for n in body}
    near = {n for n in body if n not in wait_set and missing_nonwait[n] == 0}
    emitted: set[fx.Node] = set()
    order: list[fx.Node] = list(head)
    live = LiveBytes(graph) if live_budget is not None else None
    if live is not None:
        for n in head:
            live.emit(n)

    clock = {"compute": 0.0, "comm": 0.0}   # predicted free time of each stream
    done_at: dict[fx.Node, float] = {}      # predicted end of each issued collective
    in_flight: list[fx.Node] = []           # issued collectives with waits still to come
    state = {"target": None}                # bit of the collective being worked towards

    def emit(n: fx.Node) -> None:
        order.append(n)
        emitted.add(n)
        near.discard(n)
        if live is not None:
            live.emit(n)
        for u in succs[n]:
            missing[u] -= 1
            if n not in wait_set:
                missing_nonwait[u] -= 1
                if missing_nonwait[u] == 0 and u not in wait_set:
                    near.add(u)
        if n in comm_bit:
            done_at[n] = max(clock["compute"], clock["comm"]) + cost[n]
            clock["comm"] = done_at[n]
            if waits_left[n] > 0:
                in_flight.append(n)
            if state["target"] == comm_bit[n]:
                state["target"] = None
        elif n in wait_set:
            c = wait_coll[n]
            if c is not None:
                clock["compute"] = max(clock["compute"], done_at[c])
                waits_left[c] -= 1
                if waits_left[c] == 0:
                    in_flight.remove(c)
        else:
            clock["compute"] += cost[n]

    def issue_ready_collectives() -> None:
        while len(in_flight) < options.max_in_flight:
            ready = [c for c in near if c in comm_bit and missing[c] == 0]
            if not ready:
                return
            emit(min(ready, key=pos.__getitem__))

    def wait_ready_at(w: fx.Node) -> float:
        c = wait_coll[w]
        return done_at[c] if c is not None else clock["compute"]

    def priority(n: fx.Node, pending: list[fx.Node]) -> tuple:
        ready_at = max((wait_ready_at(w) for w in pending), default=clock["compute"])
        stall = max(0.0, ready_at - clock["compute"])
        target = state["target"]
        feeds_target = target is not None and (desc[n] >> target) & 1 == 1
        first = _lowest_bit(desc[n]) if desc[n] else len(comms)
        key = (stall > 0.0, stall, not feeds_target, first, -bottom[n], pos[n])
        if live is not None:
            fits = live.live + live.alloc_bytes(n) <= live_budget
            key = (0,) + key if fits else (1, pos[n])  # over budget: fall back to original order
        return key

    issue_ready_collectives()
    while len(emitted) < len(body):
        candidates = []
        for n in near:
            if n in comm_bit and missing[n] == 0:
                continue  # ready collective held back by max_in_flight
            pending = [d for d in deps[n] if d not in emitted]  # only waits, as n is in `near`
            if all(missing[w] == 0 for w in pending):
                candidates.append((priority(n, pending), n, pending))
        if not candidates:
            # Left: waits whose only users are the output (or collectives held back by the bound).
            ready_waits = [w for w in waits if w not in emitted and missing[w] == 0]
            assert ready_waits, (
                "schedule_overlap: no schedulable node; unscheduled: "
                f"{[n.name for n in body if n not in emitted][:10]}")
            emit(min(ready_waits, key=lambda w: (wait_ready_at(w), pos[w])))
            issue_ready_collectives()
            continue
        _, best, pending = min(candidates, key=lambda c: c[0])
        if not (state["target"] is not None and (desc[best] >> state["target"]) & 1):
            state["target"] = _lowest_bit(desc[best]) if desc[best] else None
        for w in sorted(pending, key=lambda w: (wait_ready_at(w), pos[w])):
            emit(w)
            issue_ready_collectives()
        if best in emitted or (best in comm_bit and len(in_flight) >= options.max_in_flight):
            continue  # a collective pulled in by its waits: issued, or issued when a slot frees
        emit(best)
        issue_ready_collectives()

    order.append(output)
    _assert_valid_order(nodes, order, deps)
    return order


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
    cm = cost_model if cost_model is not None else AnalyticalCostModel()
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
    order = _list_schedule(graph, cm, options, budget)
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
