"""Planner accuracy from the sweep (benchmarks/run_sweep.sh): predicted vs measured step time of
every measured plan, and the planner's choice vs the best measured plan. Runs on CPU, from the
files the sweep wrote (no GPU needed):

    python -m benchmarks.accuracy benchmarks/results/accuracy            # markdown tables
    python -m benchmarks.accuracy benchmarks/results/accuracy --repredict  # with this cost model

--repredict re-predicts every measured plan from the saved profile and model spec with the cost
model of this checkout, and re-runs the planner (plan="auto"'s default space: every block at the
full TMP degree, no vocab-parallel) on them: its choice is looked up among the measured plans, so
"choice vs best" needs no GPU as long as the choice was measured. A choice that was not measured
is reported as such, never guessed.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics


def plan_key(d: dict) -> tuple:
    """The identity of a plan dict (Plan.to_dict) without its prediction."""
    tp = d["tp_degree"]
    return (d.get("num_sub_batches", 1), d.get("recompute", "none"), bool(d.get("vocab_parallel", False)),
            tuple((r["name"], r.get("shard", True), r.get("tp_degree") or (tp if r.get("shard", True) else None))
                  for r in d.get("regions", [])))


def load(root: str) -> list:
    """[(interconnect, hidden, row, directory)] from root/*/sweep_*_h*.json."""
    out = []
    for path in sorted(glob.glob(os.path.join(root, "*", "sweep_*_h*.json"))):
        with open(path) as f:
            doc = json.load(f)
        for row in doc["rows"]:
            out.append((row["interconnect"], row["hidden"], row, os.path.dirname(path), doc["meta"]))
    return sorted(out, key=lambda x: (x[0] != "NVLink", x[1]))


def _err(pred, ms):
    return None if pred is None or ms is None else 100.0 * (pred - ms) / ms


def repredict(row: dict, directory: str, interconnect: str) -> dict:
    """{"predicted": {name: ms}, "choice": plan_key of plan="auto"'s choice}, with this cost model."""
    from oases_fx.plan import Plan
    from oases_fx.planner import ModelSpec, Profile, choose_plan, predict_plan

    tag = "nvlink" if interconnect == "NVLink" else "p2p_disabled"
    h = row["hidden"]
    profile = Profile.load(os.path.join(directory, f"profile_{tag}_h{h}.json"))
    with open(os.path.join(directory, f"spec_h{h}.json")) as f:
        spec = ModelSpec.from_dict(json.load(f))
    pred = {}
    for name, r in row["results"].items():
        if name.startswith("floor") or "plan" not in r:
            continue
        pred[name] = predict_plan(spec, Plan.from_dict(r["plan"]), profile).step_us / 1e3
    auto = choose_plan(spec, tp=2, batch=row["batch"], seq_len=row["seq"], profile=profile,
                       degrees=(2,), vocab_parallel_choices=(False,))
    return dict(predicted=pred, choice=plan_key(auto.to_dict()))


def report(root: str, *, again: bool) -> str:
    rows = load(root)
    if not rows:
        raise SystemExit(f"no sweep_*_h*.json under {root}/*/ (run benchmarks/run_sweep.sh first)")
    lines = []
    meta = rows[0][4]
    lines.append(f"Card {meta['card']}, torch {meta['torch']}, NCCL {meta['nccl']}, first run {meta['date']}.")
    lines.append("Predicted by " + ("the cost model of this checkout (--repredict) from the profile measured in the "
                                    "run" if again else "the cost model at the time of the run") + ".")
    lines.append("")
    lines.append("| config | plan | measured ms | predicted ms | error |")
    lines.append("|---|---|---|---|---|")
    errs = {}
    summary = []
    for ic, h, row, d, _ in rows:
        res = row["results"]
        rp = repredict(row, d, ic) if again else None
        measured = {n: r["ms"] for n, r in res.items() if "ms" in r and not n.startswith("floor")}
        keys = {plan_key(r["plan"]): n for n, r in res.items()
                if "ms" in r and "plan" in r and not n.startswith("floor")}
        for n, r in res.items():
            if n.startswith("floor") or r.get("same_as"):
                continue
            if "ms" not in r:
                lines.append(f"| {ic} h={h} | {n} | failed: {r.get('error', '?')[:80]} | | |")
                continue
            p = rp["predicted"][n] if rp else r.get("predicted_ms")
            e = _err(p, r["ms"])
            errs.setdefault((ic, "search-all" in n), []).append(abs(e))
            label = r.get("summary") or n
            if n.startswith(("plan=", "runner")):
                label = f"{n}: {label}"
            lines.append(f"| {ic} h={h} | {label} | {r['ms']:.2f} | {p:.2f} | {e:+.1f} % |")
        if "floor (no comm)" in res and "ms" in res["floor (no comm)"]:
            lines.append(f"| {ic} h={h} | floor (k=1, collectives skipped) | {res['floor (no comm)']['ms']:.2f} | | |")
        best = min(measured, key=measured.get)
        if rp:
            ck = rp["choice"]
            cname = keys.get(ck)
            k, rc = ck[0], ck[1]
            chose = cname if cname else (f"not measured: k={k} recompute={rc}, "
                                         f"{sum(r[1] for r in ck[3])}/{len(ck[3])} sharded")
        else:
            cname = "plan=auto" if "plan=auto" in measured else None
            chose = cname or "default plan=auto not in this run (use --repredict)"
        gap = (measured[cname] / measured[best] - 1) * 100 if cname in measured else None
        summary.append((ic, h, chose, measured.get(cname), best, measured[best], gap))
    lines.append("")
    lines.append("Planner's choice vs the best measured plan:")
    lines.append("")
    lines.append("| config | choice | its ms | best measured | best ms | gap |")
    lines.append("|---|---|---|---|---|---|")
    for ic, h, chose, cms, best, bms, gap in summary:
        lines.append(f"| {ic} h={h} | {chose} | {'' if cms is None else f'{cms:.2f}'} | {best} | {bms:.2f} | "
                     f"{'n/a' if gap is None else f'{gap:+.1f} %'} |")
    lines.append("")
    for (ic, wide), e in sorted(errs.items(), key=lambda kv: (kv[0][0] != "NVLink", kv[0][1])):
        what = "plans of the --search-all planner (per-block degrees)" if wide else "plans"
        lines.append(f"{ic}, {what}: |error| median {statistics.median(e):.1f} %, max {max(e):.1f} %, "
                     f"{sum(x <= 10 for x in e)}/{len(e)} within 10 %.")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", help="the OUT_DIR of benchmarks/run_sweep.sh")
    p.add_argument("--repredict", action="store_true", help="predict with this checkout's cost model")
    a = p.parse_args(argv)
    print(report(a.root, again=a.repredict), end="")


if __name__ == "__main__":
    main()
