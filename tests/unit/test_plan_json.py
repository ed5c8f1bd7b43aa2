"""Planner-made plans as JSON: save/load round trip, diff, digest; and the `plan` CLI end to end."""
import dataclasses
import json

import pytest

from oases_fx.plan import Plan, RegionPlan
from oases_fx.planner import choose_plan

from tests.unit.test_planner_search import ATTN, MLP, TINY, synthetic


@pytest.fixture(scope="module")
def plan():
    model, profile = synthetic([ATTN, TINY, MLP, TINY], gb_per_s=20.0)
    return choose_plan(model, tp=2, batch=8, seq_len=128, profile=profile)


def test_round_trip_keeps_plan_and_predictions(plan, tmp_path):
    path = tmp_path / "plan.json"
    plan.save(path)
    back = Plan.load(path)
    assert back == plan
    assert back.digest() == plan.digest()
    assert back.predicted == plan.predicted  # the breakdown survives as plain JSON
    assert back.to_json() == plan.to_json()
    assert back.diff(plan) == []
    d = json.loads(path.read_text())
    assert set(d["predicted"]) >= {"step_ms", "memory_gib", "per_region", "runners_up", "rejected"}
    assert set(d["predicted"]["per_region"]) == {r.name for r in plan.regions}


def test_digest_ignores_predictions_and_diff_names_changes(plan):
    again = dataclasses.replace(plan, predicted={"step_ms": 0.0})
    assert again.digest() == plan.digest()
    first = plan.regions[0]
    changed = dataclasses.replace(
        plan, num_sub_batches=plan.num_sub_batches * 2,
        regions=(RegionPlan(name=first.name, kind=first.kind, shard=not first.shard),) + plan.regions[1:])
    assert changed.digest() != plan.digest()
    lines = plan.diff(changed)
    assert any(ln.startswith("num_sub_batches:") for ln in lines)
    assert any(first.name in ln for ln in lines)
    assert len(lines) == 2


def test_cli_plan_save_and_diff(tmp_path, capsys, monkeypatch):
    from oases_fx.cli import plan_main

    monkeypatch.setenv("OASES_FX_CACHE", str(tmp_path / "cache"))  # no cached profile: analytical
    path = tmp_path / "plan.json"
    argv = ["--model", "gpt", "--hidden", "64", "--layers", "2", "--heads", "4", "--seq", "32", "--batch", "4",
            "--tp", "2", "--plain", "--save", str(path)]
    assert plan_main(argv) == 0
    out = capsys.readouterr().out
    assert "analytical, not measured" in out
    saved = Plan.load(path)
    assert saved.tp_degree == 2 and len(saved.regions) == 4
    assert all(r.name in out for r in saved.regions)
    assert plan_main(argv[:-2] + ["--profile", "analytical", "--diff", str(path)]) == 0
    assert "no differences" in capsys.readouterr().out


def test_cli_searches_compiles_default_space_unless_widened(tmp_path, monkeypatch):
    # `python -m oases_fx plan` must print the plan compile(plan="auto") would choose: by default
    # every block at the full TMP degree (or replicated) and no vocab-parallel, as CompileConfig.
    from oases_fx.cli import plan_main

    monkeypatch.setenv("OASES_FX_CACHE", str(tmp_path / "cache"))
    base = ["--model", "gpt", "--hidden", "64", "--layers", "2", "--heads", "4", "--seq", "32", "--batch", "4",
            "--tp", "2", "--plain", "--profile", "analytical", "--comm-gbps", "0.5"]
    runs = {"default": [], "explicit": ["--degrees", "2", "--vocab-parallel", "off"],
            "wide": ["--degrees", "all", "--vocab-parallel", "auto"]}
    plans = {}
    for name, extra in runs.items():
        path = tmp_path / f"{name}.json"
        assert plan_main(base + extra + ["--save", str(path)]) == 0
        plans[name] = Plan.load(path)
    assert plans["default"] == plans["explicit"]
    assert all(r.tp_degree is None for r in plans["default"].regions) and not plans["default"].vocab_parallel
    assert plans["default"].predicted["degrees"] == [2]
    assert plans["wide"].predicted["degrees"] == [2, 1]  # the wider search described degree 1 too


def test_compile_config_planner_space_is_validated():
    import pytest

    from oases_fx.config import CompileConfig

    assert CompileConfig().planner_degrees == "full" and CompileConfig().planner_vocab_parallel == (False,)
    CompileConfig(planner_degrees="all", planner_vocab_parallel=(False, True))
    CompileConfig(planner_degrees=(1, 2))
    for bad in ("some", (), (0,), [2]):
        with pytest.raises(ValueError, match="planner_degrees"):
            CompileConfig(planner_degrees=bad)
    with pytest.raises(ValueError, match="planner_vocab_parallel"):
        CompileConfig(planner_vocab_parallel=("yes",))
