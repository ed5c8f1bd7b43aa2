"""benchmarks/accuracy.py: the planner-accuracy report is computed from what the sweep saved.

A sweep directory is built by hand from a tiny GPT (CPU trace, analytical profile): the spec as
the sweep saves it (ModelSpec.to_dict, JSON), the profile, and "measured" times that we choose.
The report must give each plan's error from those numbers, re-predict with the saved profile
exactly as predict_plan does with the original spec, and find the planner's choice among the
measured plans (or say it was not measured).
"""
import dataclasses
import json

import pytest
import torch

from benchmarks.accuracy import plan_key, report
from oases_fx.models import GPT, GPTConfig
from oases_fx.passes.annotate_sharding import find_tmp_regions
from oases_fx.plan import Plan, RegionPlan
from oases_fx.planner import ModelSpec, analytical_profile, choose_plan, describe_model, predict_plan
from oases_fx.tracing import capture

BATCH, SEQ = 4, 32


@pytest.fixture(scope="module")
def tiny():
    cfg = GPTConfig(vocab_size=128, block_size=SEQ, n_layer=2, n_head=4, n_embd=64)
    torch.manual_seed(0)
    model = GPT(cfg)
    idx = torch.randint(0, 128, (BATCH, SEQ))
    traced = capture(model, (idx, idx), {})
    regions, _ = find_tmp_regions(traced.gm, 2)
    spec = describe_model(traced.gm, regions, tp=2, batch=BATCH, k_choices=(1, 2))
    return spec, analytical_profile(spec), regions


def _sweep_dir(tmp_path, spec, profile, regions, measured: dict, with_choice: bool):
    """A sweep directory with the k=1 and k=2 all-sharded plans measured as ``measured`` says,
    plus the planner's choice when with_choice (else any grid plan equal to it is left out)."""
    d = tmp_path / "nvlink"
    d.mkdir()
    (d / "spec_h64.json").write_text(json.dumps(spec.to_dict()))
    profile.save(d / "profile_nvlink_h64.json")
    plans = {f"k={k} recompute=none": Plan(tp_degree=2, num_sub_batches=k, regions=tuple(
        RegionPlan(name=r.name, kind=r.kind) for r in regions)) for k in (1, 2)}
    auto = choose_plan(spec, tp=2, batch=BATCH, seq_len=SEQ, profile=profile, degrees=(2,),
                       vocab_parallel_choices=(False,), k_choices=(1, 2))
    if with_choice:
        plans["plan=auto"] = auto
    else:
        plans = {n: p for n, p in plans.items() if plan_key(p.to_dict()) != plan_key(auto.to_dict())}
    results = {n: dict(ms=measured[n], plan=p.to_dict(),
                       predicted_ms=predict_plan(spec, p, profile).step_us / 1e3 + 1.0)  # stale on purpose
               for n, p in plans.items()}
    results["floor (no comm)"] = dict(ms=0.5 * min(measured.values()), plan=next(iter(plans.values())).to_dict())
    row = dict(hidden=64, layers=2, batch=BATCH, seq=SEQ, interconnect="NVLink", results=results)
    meta = dict(card="cpu", torch=torch.__version__, nccl=None, date="2026-11-26T00:00:00+00:00", command="test")
    (d / "sweep_nvlink_h64.json").write_text(json.dumps(dict(meta=meta, rows=[row])))
    return plans, auto


def test_model_spec_round_trips_through_json_and_predicts_the_same(tiny):
    spec, profile, regions = tiny
    again = ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec  # OpSpec.node is not part of equality; nothing else is lost
    # a field written by a newer version is ignored; one it lacks takes its default
    d = spec.to_dict()
    d["from_the_future"] = 1
    del d["vocab_reason"]
    assert ModelSpec.from_dict(d) == dataclasses.replace(spec, vocab_reason="")
    for k in (1, 2):
        plan = Plan(tp_degree=2, num_sub_batches=k, regions=tuple(RegionPlan(name=r.name, kind=r.kind) for r in regions))
        assert predict_plan(again, plan, profile).step_us == predict_plan(spec, plan, profile).step_us


def test_report_errors_and_choice_vs_best(tmp_path, tiny):
    spec, profile, regions = tiny
    measured = {"k=1 recompute=none": 2.0, "k=2 recompute=none": 1.0, "plan=auto": 1.6}
    plans, auto = _sweep_dir(tmp_path, spec, profile, regions, measured, with_choice=True)
    text = report(str(tmp_path), again=True)
    for name, plan in plans.items():
        pred = predict_plan(spec, plan, profile).step_us / 1e3
        err = 100.0 * (pred - measured[name]) / measured[name]
        assert f"| {measured[name]:.2f} | {pred:.2f} | {err:+.1f} % |" in text, name
    # The choice is re-derived and found among the measured plans by its decisions.
    same = [n for n, p in plans.items() if n != "plan=auto" and plan_key(p.to_dict()) == plan_key(auto.to_dict())]
    chosen = same[0] if same else "plan=auto"
    gap = 100.0 * (measured[chosen] / 1.0 - 1)
    assert f"| NVLink h=64 | {chosen} | {measured[chosen]:.2f} | k=2 recompute=none | 1.00 | {gap:+.1f} % |" in text
    # Without --repredict the stored (stale) predictions are used.
    stale = report(str(tmp_path), again=False)
    p1 = predict_plan(spec, plans["k=1 recompute=none"], profile).step_us / 1e3 + 1.0
    assert f"| 2.00 | {p1:.2f} |" in stale


def test_report_says_when_the_choice_was_not_measured(tmp_path, tiny):
    spec, profile, regions = tiny
    measured = {"k=1 recompute=none": 2.0, "k=2 recompute=none": 1.0}
    plans, auto = _sweep_dir(tmp_path, spec, profile, regions, measured, with_choice=False)
    assert plans  # one grid plan at least is not the choice
    text = report(str(tmp_path), again=True)
    assert "not measured" in text and "| n/a |" in text
