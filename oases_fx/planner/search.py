"""Choose the plan: k sub-batches, the recompute policy, vocab_parallel and, per TMP region,
replicate or shard at a TMP degree.

Why this algorithm
------------------
The decisions are of two sorts. The *global* ones, the number of sub-batches k, the recompute
policy and vocab_parallel (embedding, LM head and cross-entropy sharded over the vocabulary),
take few values (3 x 3 x 2 by default): they are enumerated. With them fixed, what is left is
one decision per TMP region: replicate, or shard at a TMP degree d dividing the TMP degree T
(Oases: T/d groups of d ranks, each sharding the region d-ways on 1/(T/d) of the batch; d = T is
Megatron sharding, d = 1 data parallelism inside the TMP group). The states, in tie order, are
(T, lower divisors descending, replicate): T + 1 of them at T = 2, 5 at T = 8. vocab_parallel
only changes the head and tail (outside the chain) and the memory, so the chain's simulations are
shared by both of its values. The regions form a chain (attention, MLP, attention, ...), and the step time of the
chain is, to a good approximation, additive over the regions plus a boundary term between
neighbours: the cross-layer overlap (the last sub-batch's all-reduce of region r hides behind the
first sub-batch's compute of region r+1) only ever couples adjacent regions. So

    T(d_1..d_L) ~= sum_r  single(r, d_r)  +  sum_r [pair(r, d_r, d_r+1) - single(r, d_r) - single(r+1, d_r+1)]

where single() and pair() are timeline simulations of one region and of two neighbouring regions
alone (the same simulate() the full prediction uses; identical layers share them). Minimising this
over the chain is dynamic programming with state = the previous region's decision: exact for
that model, O(L * states^2), and keeping the best top_n paths per state gives the top_n plans.
(Oases solves the same problem as an ILP; on a chain DP is exact and needs no solver.) A region at
d < T adds an all-gather per sub-batch and a once-per-step gradient all-reduce that may overlap
the next (earlier) region's backward: the pair simulations see that overlap.

Search time (time.process_time, one core, a shared 2-core machine, analytical profile): a 48-layer
GPT (h=2048, seq 2048, batch 16, V=51200; 96 regions, identical layers share their simulations)
over the full space: 1.9 s at T=2, 4.5 s at T=8 (mostly the whole-step simulations of the final
candidates). Worst case, every region with its own costs (no shared simulation; synthetic,
tests/unit/test_planner_search.py): 4.4 s at T=2, 6.3 s at T=4 (batch 8), 8.3 s at T=8 with
batch 64 (every degree at every k).

Memory is additive over regions too (parameters, gradients, Adam state and kept activations of
each region). When the fastest plans exceed the budget, a Lagrangian relaxation (DP on
time + lambda * memory, lambda found by doubling then bisection) finds the fastest plans that fit.

The approximation is then removed: the top candidates of every global choice are simulated whole
(head, every region, tail, all sub-batches) and ranked by that prediction. Ties are broken by
(memory, k, recompute, vocab_parallel off, then per region the full degree, higher degrees,
replicated), so every rank picks the same plan.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from oases_fx.errors import OasesError
from oases_fx.plan import RECOMPUTE_POLICIES, Plan, RegionPlan
from oases_fx.planner.cost_model import (
    GIB, REPLICATED, Choice, CostCache, ModelSpec, Prediction, RegionSpec, describe_model, divisors, memory,
    predict, region_memory_bytes, simulate_choice,
)
from oases_fx.planner.profile import Profile, analytical_profile

SHARD, REPLICATE = 0, 1
"""Kept for callers of the two-state search: index 0 is the full degree, the last is replicate."""


def region_states(tp: int, degrees=None) -> tuple:
    """The DP's per-region decisions in tie order: the TMP degrees (full degree first, then
    higher degrees), then replicate (cost_model.REPLICATED)."""
    degs = divisors(tp) if degrees is None else tuple(sorted(set(degrees), reverse=True))
    return tuple(degs) + ((REPLICATED,) if tp > 1 else ())


# ---------------------------------------------------------------------------------------------
# Chain dynamic programming
# ---------------------------------------------------------------------------------------------


def kbest_chain(node_cost: Sequence[Sequence[float]], edge_cost: Sequence[Sequence[Sequence[float]]],
                top_n: int) -> list:
    """The top_n cheapest decision paths of a chain, [(cost, path)] sorted by (cost, path).

    node_cost[r][d]: cost of decision d at position r; edge_cost[r][d][e]: extra cost of d at r
    followed by e at r+1. Exact: keeps the top_n partial paths ending in each state.
    """
    n = len(node_cost)
    if n == 0:
        return [(0.0, ())]
    best = [[(node_cost[0][d], (d,))] for d in range(len(node_cost[0]))]
    for r in range(1, n):
        new = []
        for e in range(len(node_cost[r])):
            cands = []
            for d, paths in enumerate(best):
                step = edge_cost[r - 1][d][e] + node_cost[r][e]
                cands.extend((c + step, p + (e,)) for c, p in paths)
            cands.sort()
            new.append(cands[:top_n])
        best = new
    out = sorted(x for paths in best for x in paths)
    return out[:top_n]


@dataclass
class _Chain:
    """Per-region and pairwise simulated times for one global choice (k, recompute)."""

    node_time: list
    edge_time: list
    node_mem: list
    const_time: float

    def approx(self, path) -> float:
        t = self.const_time + sum(self.node_time[r][d] for r, d in enumerate(path))
        return t + sum(self.edge_time[r][path[r]][path[r + 1]] for r in range(len(path) - 1))


class _Sims:
    """Cached region-alone and pair simulations (identical layers simulate once)."""

    def __init__(self, model: ModelSpec, profile: Profile):
        self.model, self.profile = model, profile
        self.costs = CostCache(model, profile)
        self.sigs = [r.signature for r in model.regions]
        self._cache: dict = {}
        self.count = 0

    def _run(self, k, rc, lo, states) -> float:
        key = (k, rc) + tuple((self.sigs[lo + i], d) for i, d in enumerate(states))
        hit = self._cache.get(key)
        if hit is None:
            full = [self.model.tp] * len(self.model.regions)
            full[lo:lo + len(states)] = states
            ch = Choice.of_states(num_sub_batches=k, recompute=rc, states=full, tp=self.model.tp)
            tl, _ = simulate_choice(self.model, ch, self.profile, lo=lo, hi=lo + len(states), outside=False,
                                    cache=self.costs)
            hit = self._cache[key] = tl.makespan_us
            self.count += 1
        return hit

    def chain(self, k: int, rc: str, states: tuple) -> _Chain:
        """The chain at one global choice; ``states``: the decisions of every region (those a
        region has no variant for are never chosen: infinite cost)."""
        m = self.model
        L = len(m.regions)
        inf = float("inf")
        ok = [[m.regions[r].has_state(k, d, m.tp) for d in states] for r in range(L)]
        node = [[self._run(k, rc, r, (d,)) if ok[r][i] else inf for i, d in enumerate(states)] for r in range(L)]
        edge = [[[self._run(k, rc, r, (d, e)) - node[r][i] - node[r + 1][j] if ok[r][i] and ok[r + 1][j] else 0.0
                  for j, e in enumerate(states)] for i, d in enumerate(states)] for r in range(L - 1)]
        mem = [[region_memory_bytes(m.regions[r].variant(k, d, m.tp), k, rc) if ok[r][i] else inf
                for i, d in enumerate(states)] for r in range(L)]
        return _Chain(node, edge, mem, 0.0)


def _fitting_paths(chain: _Chain, decisions: tuple, top_n: int, fits: Callable[[tuple], bool]) -> list:
    """Paths (in decision indices) that fit the memory budget, fastest first by the chain model."""
    inf = float("inf")

    def run(lam):
        nodes = [[t + lam * mm if mm != inf else inf for t, mm in zip(ts, ms)]
                 for ts, ms in zip(chain.node_time, chain.node_mem)]
        return [p for c, p in kbest_chain(nodes, chain.edge_time, top_n) if c != inf]

    found = {}

    def collect(paths):
        ok = False
        for p in paths:
            if fits(p):
                found.setdefault(p, chain.approx(p))
                ok = True
        return ok

    if collect(run(0.0)):
        return sorted(found, key=lambda p: (found[p], p))
    least = tuple(min(range(len(decisions)), key=lambda i: (ms[i], i)) for ms in chain.node_mem)
    if any(ms[i] == inf for ms, i in zip(chain.node_mem, least)) or not fits(least):
        return []
    lam_lo, lam = 0.0, 1e-15  # microseconds per byte
    while not collect(run(lam)) and lam < 1e9:
        lam_lo, lam = lam, lam * 4
    for _ in range(40):  # the smallest lambda that fits gives the fastest plan that fits
        mid = 0.5 * (lam_lo + lam)
        if collect(run(mid)):
            lam = mid
        else:
            lam_lo = mid
    collect([least])
    return sorted(found, key=lambda p: (found[p], p))


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def _as_model(regions, *, tp: int, batch: int, k_choices) -> ModelSpec:
    if isinstance(regions, ModelSpec):
        if regions.tp != tp or regions.batch != batch:
            raise ValueError(f"the model spec was described for tp={regions.tp}, batch={regions.batch}, "
                             f"not tp={tp}, batch={batch}")
        return regions
    regions = list(regions)
    if not regions:
        raise OasesError("choose_plan: the model has no TMP regions (nothing to shard or plan)")
    if all(isinstance(r, RegionSpec) for r in regions):
        return ModelSpec(regions=tuple(regions), tp=tp, batch=batch)
    gm = regions[0].row.graph.owning_module  # RegionMatch from find_tmp_regions
    if gm is None:
        raise ValueError("choose_plan: the regions' graph has no owning GraphModule; pass describe_model(...)")
    return describe_model(gm, regions, tp=tp, batch=batch, k_choices=k_choices)


def _ms(us: float) -> float:
    return round(us / 1e3, 4)


def _gib(b: float) -> float:
    return round(b / GIB, 4)


def _predicted(model: ModelSpec, best: Prediction, others: list, rejected: list, profile: Profile,
               batch: int, seq_len: int, budget: int, sims: int) -> dict:
    tl = best.timeline
    mem = best.memory
    per_region = {}
    for i, (spec, rb) in enumerate(zip(model.regions, best.per_region)):
        st = best.choice.state(i, model.tp)
        per_region[spec.name] = {
            "kind": spec.kind, "shard": st != REPLICATED, "degree": None if st == REPLICATED else int(st),
            "compute_ms": _ms(rb.compute_us),
            "exposed_comm_ms": _ms(rb.exposed_comm_us), "hidden_comm_ms": _ms(rb.hidden_comm_us),
            "memory_gib": _gib(rb.memory_bytes),
        }
    names = [r.name for r in model.regions]
    return {
        "step_ms": _ms(best.step_us),
        "device_ms": _ms(best.device_us),
        "host_ms": _ms(best.host_us),
        "host_bound": bool(best.host_bound),
        "kernels": round(best.kernels),
        "memory_gib": _gib(mem.total),
        "tokens_per_s": round(batch * seq_len / (best.step_us * 1e-6), 1) if best.step_us > 0 else None,
        "compute_ms": _ms(tl.compute_busy_us),
        "comm_exposed_ms": _ms(tl.comm_exposed_us),
        "comm_hidden_ms": _ms(tl.comm_hidden_us),
        "memory": {"params_gib": _gib(mem.params), "grads_gib": _gib(mem.grads), "adam_gib": _gib(mem.optimizer),
                   "activations_gib": _gib(mem.activations + mem.transient), "budget_gib": _gib(budget)},
        "per_region": per_region,
        "runners_up": [{"plan": p.choice.summary(names), "step_ms": _ms(p.step_us), "memory_gib": _gib(p.memory.total),
                        "choice": {"num_sub_batches": p.choice.num_sub_batches, "recompute": p.choice.recompute,
                                   "vocab_parallel": bool(p.choice.vocab_parallel),
                                   "states": [int(s) for s in p.choice.states(model.tp)]}}
                       for p in others],
        "rejected": list(rejected),
        "profile": profile.label(),
        "interference": {"compute": round(profile.compute_interference, 4), "comm": round(profile.comm_interference, 4)},
        "all_reduce": {"alpha_us": round(profile.all_reduce.alpha_us, 4),
                       "gb_per_s": round(profile.all_reduce.bandwidth_gb_s, 3)},
        "vocab_parallel": bool(best.choice.vocab_parallel),
        "vocab_note": ("" if model.vocab is not None else model.vocab_reason),
        "degrees": sorted({d for r in model.regions for _, d in r.degree_variants} | {model.tp}, reverse=True),
        "batch": batch, "seq_len": seq_len, "simulations": sims,
        "notes": [n for n in model.notes if not n.startswith("k=")]  # k exclusions are in "rejected"
                 + list(profile.notes) + _cap_note(model, profile),
    }


def _cap_note(model: ModelSpec, profile: Profile) -> list:
    keys = sorted(set(model.op_keys()))
    capped = profile.capped_backwards(keys)
    if not capped:
        return []
    raw = sum(profile.op_us[k][1] for k in keys if k in profile.op_us)
    cut = sum(profile.op_us[k][1] - profile.op_time(k)[1] for k in capped)
    return [f"backward capped at 2x its forward (2.5x attention) for {len(capped)} of {len(keys)} ops, "
            f"removing {100 * cut / raw:.0f} % of the measured backward time: eager autograd host time, not device "
            "time (profile.backward_cap)"]


def choose_plan(regions, *, tp: int, batch: int, seq_len: int, profile: Optional[Profile] = None,
                memory_budget_bytes: Optional[int] = None, k_choices=(1, 2, 4),
                recompute_choices=("none", "fine", "full"), top_n: int = 5, degrees=None,
                vocab_parallel_choices=(False, True)) -> Plan:
    """The fastest plan that fits in memory, with its predicted breakdown in ``plan.predicted``.

    Args:
        regions: find_tmp_regions(gm, tp)[0] (RegionMatch list), a cost_model.ModelSpec, or a list
            of cost_model.RegionSpec (synthetic workloads).
        tp: TMP degree. batch: the step's batch size. seq_len: tokens per sample (for tokens/s).
        profile: measured (measure_profile) or None for analytical_profile (labelled so).
        memory_budget_bytes: default 0.9 x the profile's device memory.
        k_choices, recompute_choices: the global choices to enumerate.
        top_n: DP paths kept per global choice and per state; runners-up shown.
        degrees: per-region TMP degrees to consider (divisors of tp; None: every divisor the model
            was described at). Replicate is always a choice (tp > 1).
        vocab_parallel_choices: the values of Plan.vocab_parallel to consider; True is skipped
            (the reason recorded in ``predicted["rejected"]``) when the model has no vocabulary-
            parallel variant.
    Raises OasesError when no plan fits, with every reason.
    """
    model = _as_model(regions, tp=tp, batch=batch, k_choices=k_choices)
    profile = profile if profile is not None else analytical_profile(model)
    missing = profile.missing(model.op_keys())
    if missing:
        raise OasesError(
            f"the profile ({profile.label()}) lacks {len(missing)} op shapes of this model, e.g. {missing[0]!r}. "
            "Fix: measure a profile for this model, batch, TMP degree and k choices (measure_profile), "
            "or plan with analytical_profile(model).")
    budget = int(memory_budget_bytes if memory_budget_bytes is not None else 0.9 * profile.memory_bytes)
    rejected = []
    ks = []
    for k in sorted(set(k_choices)):
        if batch % k:
            rejected.append(f"k={k}: batch {batch} does not divide into {k} sub-batches")
        elif k not in model.k_choices:
            rejected.append(f"k={k}: the model spec has no variant for {k} sub-batches")
        else:
            ks.append(k)
    rcs = [rc for rc in RECOMPUTE_POLICIES if rc in set(recompute_choices)]
    unknown = sorted(set(recompute_choices) - set(RECOMPUTE_POLICIES))
    if unknown:
        raise ValueError(f"recompute_choices {unknown}: expected some of {RECOMPUTE_POLICIES}")
    described = {tp} | {d for r in model.regions for _, d in r.degree_variants}
    if degrees is None:
        degs = tuple(sorted(described, reverse=True))
    else:
        bad = [d for d in degrees if tp % d]
        if bad:
            raise ValueError(f"degrees {bad} do not divide the TMP degree {tp}")
        degs = tuple(d for d in sorted(set(degrees), reverse=True) if d in described)
        for d in sorted(set(degrees) - described, reverse=True):
            rejected.append(f"degree {d}: the model spec has no variant at that degree (describe_model(degrees=...))")
    states = region_states(tp, degs)
    vps = []
    for vp in sorted(set(bool(v) for v in vocab_parallel_choices)):
        if vp and tp <= 1:
            rejected.append("vocab_parallel: TMP degree 1, nothing to shard the vocabulary over")
        elif vp and model.vocab is None:
            rejected.append(f"vocab_parallel: {model.vocab_reason or 'no embedding/LM-head pattern'}")
        else:
            vps.append(vp)
    if not vps:
        raise OasesError("choose_plan: no vocab_parallel choice is possible: " + "; ".join(rejected))
    sims = _Sims(model, profile)
    names = [r.name for r in model.regions]

    pool = []  # (approx_us, Choice), the candidates to simulate whole
    for k, rc in itertools.product(ks, rcs):
        base = sims.chain(k, rc, states)
        for vp in vps:
            chain = dataclasses.replace(base, const_time=sims.costs.outside_time(vp))

            def to_choice(path, k=k, rc=rc, vp=vp):
                return Choice.of_states(num_sub_batches=k, recompute=rc, states=[states[i] for i in path], tp=tp,
                                        vocab_parallel=vp)

            def fits(path):
                return memory(model, to_choice(path)).total <= budget

            best1 = [p for c, p in kbest_chain(chain.node_time, chain.edge_time, 1) if c != float("inf")]
            if not best1:
                rejected.append(f"k={k} recompute={rc}: some region has no variant at any allowed degree")
                continue
            fastest = best1[0]
            ok = _fitting_paths(chain, states, top_n, fits)
            tag = f"k={k} recompute={rc}" + (" vocab_parallel" if vp else "")
            if not ok or not fits(fastest):
                least = tuple(min(range(len(states)), key=lambda i: (ms[i], i)) for ms in chain.node_mem)
                ch = to_choice(fastest if ok else least)
                m = memory(model, ch)
                what = "its fastest assignment" if ok else "even its least-memory assignment"
                rejected.append(
                    f"{tag}: {what} ({_degree_summary(ch, tp)}) needs {m.total / GIB:.2f} GiB > budget "
                    f"{budget / GIB:.2f} GiB (params {m.params / GIB:.2f}, grads {m.grads / GIB:.2f}, Adam "
                    f"{m.optimizer / GIB:.2f}, activations {(m.activations + m.transient) / GIB:.2f} GiB)"
                    + ("; slower assignments that fit were kept" if ok else ""))
            pool.extend((chain.approx(p), to_choice(p)) for p in ok[:top_n])
    if not pool:
        raise OasesError("no plan fits: " + "; ".join(rejected) +
                         ". Fix: a larger TMP degree, recompute='fine'/'full', a smaller batch, or more memory "
                         "(memory_budget_bytes).")

    # Simulate whole: the overall top_n by the chain model plus the best of every global choice.
    pool.sort(key=lambda x: (x[0], x[1].tie_key()))
    chosen, seen = [], set()
    best_of = {}
    for approx, ch in pool:
        best_of.setdefault((ch.num_sub_batches, ch.recompute, ch.vocab_parallel), ch)
    order = sorted(best_of, key=lambda g: (g[0], RECOMPUTE_POLICIES.index(g[1]), g[2]))
    for ch in [c for _, c in pool[:top_n]] + [best_of[g] for g in order]:
        if ch not in seen:
            seen.add(ch)
            chosen.append(ch)
    preds = [predict(model, ch, profile, memory_budget_bytes=budget, cache=sims.costs) for ch in chosen]
    preds = [p for p in preds if p.feasible]
    # equal steps (host-bound plans share the host's floor): the one leaving the device more slack
    preds.sort(key=lambda p: (p.step_us, p.device_us, p.memory.total, p.choice.tie_key()))
    best = preds[0]
    others = preds[1:1 + max(top_n, len(best_of))]
    predicted = _predicted(model, best, others, rejected, profile, batch, seq_len, budget,
                           sims.count + len(chosen))
    ch = best.choice
    return _plan_of(model.regions, tp=tp, k=ch.num_sub_batches, rc=ch.recompute, states=ch.states(tp),
                    vocab_parallel=ch.vocab_parallel, predicted=predicted)


def _plan_of(model_regions, *, tp: int, k: int, rc: str, states, vocab_parallel: bool, predicted=None) -> Plan:
    return Plan(tp_degree=tp, num_sub_batches=k, recompute=rc,
                regions=tuple(RegionPlan(name=r.name, kind=r.kind, shard=st != REPLICATED, tp_degree=_plan_degree(st, tp))
                              for r, st in zip(model_regions, states)),
                vocab_parallel=bool(vocab_parallel), predicted=predicted)


def runner_up_plans(plan: Plan) -> list:
    """The runners-up of a plan made by choose_plan, as Plans in the planner's order (fastest
    predicted first). Each carries ``predicted = {"step_ms", "memory_gib", "runner_up_of"}`` only;
    measure one with ``oases_fx.compile(..., plan=runner_up_plans(plan)[i])``.

    Raises ValueError for a plan the planner did not make (no runners-up recorded)."""
    ru = (plan.predicted or {}).get("runners_up")
    if ru is None:
        raise ValueError(f"plan {plan.digest()} has no runners-up: it was not made by choose_plan "
                         "(plan='auto'). Fix: pass a plan from choose_plan / compiled.plan.")
    out = []
    for x in ru:
        c = x.get("choice")
        if c is None:
            raise ValueError(f"plan {plan.digest()}'s runners-up were saved by an older oases_fx without their "
                             "decisions. Fix: re-plan (plan='auto') with this version.")
        if len(c["states"]) != len(plan.regions):
            raise ValueError(f"runner-up {x['plan']!r} has {len(c['states'])} region decisions for the plan's "
                             f"{len(plan.regions)} regions")
        out.append(_plan_of(plan.regions, tp=plan.tp_degree, k=c["num_sub_batches"], rc=c["recompute"],
                            states=c["states"], vocab_parallel=c["vocab_parallel"],
                            predicted={"step_ms": x["step_ms"], "memory_gib": x["memory_gib"],
                                       "runner_up_of": plan.digest()}))
    return out


def _plan_degree(state: int, tp: int) -> Optional[int]:
    """RegionPlan.tp_degree: None for the full degree (plans without degrees keep their digest)."""
    return None if state in (REPLICATED, tp) else int(state)


def _degree_summary(ch: Choice, tp: int) -> str:
    sts = ch.states(tp)
    parts = [f"sharded {sum(s != REPLICATED for s in sts)}/{len(sts)}"]
    for d in sorted({s for s in sts if s not in (REPLICATED, tp)}, reverse=True):
        parts.append(f"{sum(s == d for s in sts)} at d={d}")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# Explaining
# ---------------------------------------------------------------------------------------------


def _plain_table(header: list, rows: list) -> list:
    cols = [header] + rows
    widths = [max(len(str(r[i])) for r in cols) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return [fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]


def explain_plan(plan: Plan, *, use_rich: Optional[bool] = None) -> str:
    """The plan, its predicted breakdown per region and the runners-up, as text (rich tables if
    rich is installed)."""
    p = plan.predicted or {}
    lows = {}
    for r in plan.regions:
        d = plan.region_degree(r.name)
        if d is not None and d != plan.tp_degree:
            lows[d] = lows.get(d, 0) + 1
    head = (f"plan {plan.digest()}: TMP degree {plan.tp_degree}, {plan.num_sub_batches} sub-batches, "
            f"recompute {plan.recompute}, {sum(r.shard for r in plan.regions)}/{len(plan.regions)} regions sharded"
            + "".join(f" ({n} at degree {d})" for d, n in sorted(lows.items(), reverse=True))
            + f", vocab_parallel {'on' if plan.vocab_parallel else 'off'}")
    if not p:
        return head + "\n(no prediction: this plan was not made by the planner)"
    mem = p.get("memory", {})
    lines = [
        head,
        f"predicted step {p['step_ms']:.3f} ms (forward + backward)"
        + (f", {p['tokens_per_s']:,.0f} tokens/s" if p.get("tokens_per_s") else "")
        + f"; compute {p['compute_ms']:.3f} ms, comm exposed {p['comm_exposed_ms']:.3f} ms, "
          f"hidden {p['comm_hidden_ms']:.3f} ms"
        + (f"; host-bound: host issue {p['host_ms']:.3f} ms > device {p['device_ms']:.3f} ms "
           f"({p.get('kernels', 0)} kernels)" if p.get("host_bound") else ""),
        f"predicted memory {p['memory_gib']:.3f} GiB of budget {mem.get('budget_gib', float('nan')):.3f} GiB "
        f"(params {mem.get('params_gib', 0):.3f}, grads {mem.get('grads_gib', 0):.3f}, "
        f"Adam 2 x fp32 {mem.get('adam_gib', 0):.3f}, activations {mem.get('activations_gib', 0):.3f})",
        f"cost model: {p.get('profile', '?')}; interference compute x{p.get('interference', {}).get('compute', 1)}, "
        f"comm x{p.get('interference', {}).get('comm', 1)}; all-reduce alpha "
        f"{p.get('all_reduce', {}).get('alpha_us', 0)} us, {p.get('all_reduce', {}).get('gb_per_s', 0)} GB/s",
    ]
    header = ["region", "kind", "decision", "compute ms", "exposed comm ms", "hidden comm ms", "memory GiB"]
    def decision(r):
        if not r["shard"]:
            return "replicate"
        d = r.get("degree") or plan.tp_degree
        return f"shard d={d}" + ("" if d == plan.tp_degree else f" x{plan.tp_degree // d} batch")

    rows = [[name, r["kind"], decision(r), f"{r['compute_ms']:.3f}",
             f"{r['exposed_comm_ms']:.3f}", f"{r['hidden_comm_ms']:.3f}", f"{r['memory_gib']:.3f}"]
            for name, r in p.get("per_region", {}).items()]
    ru_header = ["runner-up", "step ms", "memory GiB"]
    ru_rows = [[x["plan"], f"{x['step_ms']:.3f}", f"{x['memory_gib']:.3f}"] for x in p.get("runners_up", [])]
    tail = [f"rejected: {r}" for r in p.get("rejected", [])] + [f"note: {n}" for n in p.get("notes", [])]

    if use_rich is None:
        try:
            import rich  # noqa: F401
            use_rich = True
        except ImportError:
            use_rich = False
    if use_rich:
        import io

        from rich.console import Console
        from rich.table import Table

        buf = io.StringIO()
        con = Console(file=buf, width=160, force_terminal=False, color_system=None)
        for ln in lines:
            con.print(ln, highlight=False, markup=False)
        t = Table(title="per region")
        for i, h in enumerate(header):
            t.add_column(h, justify="left" if i < 3 else "right")
        for r in rows:
            t.add_row(*r)
        con.print(t)
        if ru_rows:
            t2 = Table(title="runners-up (whole-step simulation)")
            for i, h in enumerate(ru_header):
                t2.add_column(h, justify="left" if i == 0 else "right")
            for r in ru_rows:
                t2.add_row(*r)
            con.print(t2)
        for ln in tail:
            con.print(ln, highlight=False, markup=False)
        return buf.getvalue().rstrip()
    out = lines + [""] + _plain_table(header, rows)
    if ru_rows:
        out += [""] + _plain_table(ru_header, ru_rows)
    return "\n".join(out + tail)


__all__ = ["choose_plan", "explain_plan", "kbest_chain", "region_states", "SHARD", "REPLICATE"]
