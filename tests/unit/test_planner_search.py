"""The planner's search (oases_fx/planner/search.py) on synthetic workloads with known answers.

Synthetic regions have one region op and one glue op per variant, timed by a hand-made profile:
sharded compute is 1/tp of replicated, a sub-batch's compute is 1/k of the batch's plus a fixed
per-op overhead, and all-reduces cost alpha + beta * bytes. The brute-force optimum is the
whole-step prediction (cost_model.predict) minimised over every plan.
"""
import itertools
import random
import time

import pytest

from oases_fx.errors import OasesError
from oases_fx.plan import RECOMPUTE_POLICIES
from oases_fx.planner import (
    AlphaBeta, Choice, ModelSpec, OpSpec, Profile, RegionSpec, RegionVariant, choose_plan, explain_plan,
    kbest_chain, memory, predict,
)

GIB = 1024 ** 3


def synthetic(layers, *, tp=2, batch=8, ks=(1, 2, 4), alpha_us=10.0, gb_per_s=100.0, overhead_us=5.0,
              shared_keys=True, memory_gib=80.0, interference=(1.0, 1.0)):
    """(ModelSpec, Profile) from per-region (kind, compute_us, comm_mib, act_mib, param_mib) at k=1, replicated."""
    regions, op_us = [], {}
    for i, (kind, compute_us, comm_mib, act_mib, param_mib) in enumerate(layers):
        tag = f"{kind}:{compute_us}:{comm_mib}:{act_mib}:{param_mib}" if shared_keys else f"r{i}"
        variants = {}
        for k in ks:
            for shard in (True, False):
                part = (1 / tp if shard else 1.0) / k
                rkey, gkey = f"{tag}|k{k}|shard{shard}", f"{tag}|k{k}|glue"
                op_us[rkey] = (overhead_us + compute_us * part, overhead_us + 2 * compute_us * part)
                op_us[gkey] = (overhead_us + 0.05 * compute_us / k, overhead_us + 0.1 * compute_us / k)
                comm = int(comm_mib * 2 ** 20 / k)
                p_bytes = int(param_mib * 2 ** 20 / (tp if shard else 1))
                variants[(k, shard)] = RegionVariant(
                    ops=(OpSpec(key=rkey, part="region", out_bytes=int(act_mib * 2 ** 20 * part), column=True),
                         OpSpec(key=gkey, part="glue", out_bytes=comm)),
                    comm_fwd_bytes=comm if shard else 0, comm_bwd_bytes=comm if shard else 0,
                    in_bytes=comm, out_bytes=comm, param_numel=p_bytes // 2, param_bytes=p_bytes)
        regions.append(RegionSpec(name=f"h.{i // 2}.{kind}", kind=kind, variants=variants))
    model = ModelSpec(regions=tuple(regions), tp=tp, batch=batch)
    profile = Profile(source="synthetic", device_name="synthetic", torch_version="-", tp_degree=tp, op_us=op_us,
                      all_reduce=AlphaBeta(alpha_us=alpha_us, beta_us_per_byte=1e-3 / gb_per_s),
                      compute_interference=interference[0], comm_interference=interference[1],
                      memory_bytes=int(memory_gib * GIB))
    return model, profile


def brute_force(model, profile, *, ks=(1, 2, 4), rcs=RECOMPUTE_POLICIES, budget=None):
    best = None
    for k, rc in itertools.product(ks, rcs):
        if model.batch % k:
            continue
        for shard in itertools.product((True, False), repeat=len(model.regions)):
            p = predict(model, Choice(num_sub_batches=k, recompute=rc, shard=shard), profile,
                        memory_budget_bytes=budget)
            if p.feasible:
                key = (p.step_us, p.memory.total, p.choice.tie_key())
                if best is None or key < best[0]:
                    best = (key, p)
    return best[1]


def _choice(plan):
    return Choice(num_sub_batches=plan.num_sub_batches, recompute=plan.recompute,
                  shard=tuple(r.shard for r in plan.regions))


# --- the chain DP on its own ------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_kbest_chain_is_exact(seed):
    rng = random.Random(seed)
    n, s = rng.randint(1, 6), rng.randint(1, 3)
    node = [[rng.uniform(0, 10) for _ in range(s)] for _ in range(n)]
    edge = [[[rng.uniform(-3, 3) for _ in range(s)] for _ in range(s)] for _ in range(n - 1)]
    every = sorted(
        (sum(node[r][p[r]] for r in range(n)) + sum(edge[r][p[r]][p[r + 1]] for r in range(n - 1)), p)
        for p in itertools.product(range(s), repeat=n))
    got = kbest_chain(node, edge, top_n=4)
    assert [p for _, p in got] == [p for _, p in every[:4]]
    assert [c for c, _ in got] == pytest.approx([c for c, _ in every[:4]])


# --- whole search vs brute force ---------------------------------------------------------------

ATTN, MLP = ("attention", 400.0, 8, 64, 16), ("mlp", 800.0, 8, 96, 32)
TINY = ("mlp", 20.0, 8, 8, 4)  # little compute, the same all-reduce: replicating it pays


@pytest.mark.parametrize("layers,gb_per_s", [
    ([ATTN, MLP, ATTN], 100.0),        # fast link: shard everything, overlap hides comm
    ([ATTN, TINY, MLP, TINY], 20.0),   # slow link: the tiny blocks should be replicated
    ([TINY, TINY, ATTN], 5.0),          # very slow link
    ([MLP, ATTN, MLP, ATTN], 40.0),
])
def test_search_finds_brute_force_optimum(layers, gb_per_s):
    model, profile = synthetic(layers, gb_per_s=gb_per_s, interference=(1.1, 1.05))
    plan = choose_plan(model, tp=2, batch=8, seq_len=128, profile=profile)
    best = brute_force(model, profile)
    assert _choice(plan) == best.choice
    assert plan.predicted["step_ms"] == pytest.approx(best.step_us / 1e3, abs=1e-4)


def test_known_optima():
    # Free communication: sharding halves compute and nothing is exposed; sub-batching only adds
    # per-op overhead, so k=1, no recompute, all sharded.
    model, profile = synthetic([ATTN, MLP, ATTN, MLP], alpha_us=0.0, gb_per_s=1e9)
    plan = choose_plan(model, tp=2, batch=8, seq_len=128, profile=profile)
    assert (plan.num_sub_batches, plan.recompute) == (1, "none")
    assert all(r.shard for r in plan.regions)
    # Prohibitive communication: replicate everything.
    model, profile = synthetic([ATTN, MLP, ATTN, MLP], alpha_us=1e6, gb_per_s=1e-3)
    plan = choose_plan(model, tp=2, batch=8, seq_len=128, profile=profile)
    assert not any(r.shard for r in plan.regions)
    assert (plan.num_sub_batches, plan.recompute) == (1, "none")


def test_sub_batches_hide_communication():
    # Comm about as long as compute: k=2 overlaps what k=1 exposes.
    model, profile = synthetic([ATTN, MLP] * 3, gb_per_s=40.0, overhead_us=0.0)
    plan = choose_plan(model, tp=2, batch=8, seq_len=128, profile=profile)
    one = predict(model, Choice(num_sub_batches=1, recompute="none", shard=(True,) * 6), profile)
    assert plan.num_sub_batches > 1
    assert plan.predicted["step_ms"] < one.step_us / 1e3
    assert plan.predicted["comm_exposed_ms"] < one.timeline.comm_exposed_us / 1e3


# --- determinism, rejections -------------------------------------------------------------------


def test_same_inputs_same_plan():
    model, profile = synthetic([ATTN, TINY, MLP, TINY], gb_per_s=20.0)
    a = choose_plan(model, tp=2, batch=8, seq_len=128, profile=profile)
    b = choose_plan(model, tp=2, batch=8, seq_len=128, profile=profile)
    assert a == b and a.digest() == b.digest()
    assert a.to_json() == b.to_json()  # predictions included


def test_memory_infeasible_plans_are_rejected_with_reason():
    model, profile = synthetic([ATTN, MLP, ATTN, MLP], gb_per_s=100.0)
    unconstrained = choose_plan(model, tp=2, batch=8, seq_len=128, profile=profile)
    assert unconstrained.recompute == "none"
    none_mem = memory(model, _choice(unconstrained)).total
    fine_mem = memory(model, Choice(num_sub_batches=unconstrained.num_sub_batches, recompute="fine",
                                    shard=(True,) * 4)).total
    assert fine_mem < none_mem
    budget = (none_mem + fine_mem) // 2
    plan = choose_plan(model, tp=2, batch=8, seq_len=128, profile=profile, memory_budget_bytes=budget)
    assert plan.recompute in ("fine", "full")
    assert plan.predicted["memory_gib"] * GIB <= budget * (1 + 1e-6)
    assert any("recompute=none" in r and "GiB > budget" in r for r in plan.predicted["rejected"])
    assert _choice(plan) == brute_force(model, profile, budget=budget).choice
    # The prediction itself says why.
    p = predict(model, _choice(unconstrained), profile, memory_budget_bytes=budget)
    assert not p.feasible and "> budget" in p.reason
    with pytest.raises(OasesError, match="no plan fits"):
        choose_plan(model, tp=2, batch=8, seq_len=128, profile=profile, memory_budget_bytes=1024)


def test_memory_budget_forces_sharding():
    # Large replicated parameters: only sharding some regions fits (the Lagrangian path).
    big = ("mlp", 20.0, 8, 8, 2048)
    model, profile = synthetic([big, big, big], gb_per_s=5.0)
    free = choose_plan(model, tp=2, batch=8, seq_len=128, profile=profile, recompute_choices=("none",))
    assert not any(r.shard for r in free.regions)
    budget = int(memory(model, _choice(free)).total * 0.8)
    plan = choose_plan(model, tp=2, batch=8, seq_len=128, profile=profile, recompute_choices=("none",),
                       memory_budget_bytes=budget)
    assert 0 < sum(r.shard for r in plan.regions) < 3
    assert _choice(plan) == brute_force(model, profile, rcs=("none",), budget=budget).choice


def test_batch_not_divisible_by_k_is_excluded():
    model, profile = synthetic([ATTN, MLP], batch=6, ks=(1, 2, 3))
    plan = choose_plan(model, tp=2, batch=6, seq_len=128, profile=profile, k_choices=(1, 2, 4))
    assert plan.num_sub_batches in (1, 2)
    assert any("batch 6 does not divide into 4 sub-batches" in r for r in plan.predicted["rejected"])


def test_explain_plan_names_every_region():
    model, profile = synthetic([ATTN, TINY, MLP], gb_per_s=20.0)
    plan = choose_plan(model, tp=2, batch=8, seq_len=128, profile=profile)
    for use_rich in (False, True):
        text = explain_plan(plan, use_rich=use_rich)
        assert all(r.name in text for r in plan.regions)
        assert "predicted step" in text and "runner-up" in text


def test_48_layers_plan_in_under_10s():
    # Worst case for the caches: every region its own costs (no two layers share a simulation).
    rng = random.Random(0)
    layers = []
    for _ in range(48):
        layers.append(("attention", rng.uniform(200, 600), rng.choice([4, 8, 16]), 64, 16))
        layers.append(("mlp", rng.uniform(100, 1200), rng.choice([4, 8, 16]), 96, 32))
    model, profile = synthetic(layers, gb_per_s=30.0, shared_keys=False, interference=(1.1, 1.05))
    t0 = time.process_time()
    plan = choose_plan(model, tp=2, batch=8, seq_len=2048, profile=profile)
    elapsed = time.process_time() - t0
    assert len(plan.regions) == 96
    assert elapsed < 10.0, f"planning 48 layers took {elapsed:.1f} s of CPU time"
