"""The planner's predicted compute-only step time against rank_bench's measurement, per (k, recompute).

For each (tp, hidden): trace the plain GPT, describe it for the planner (oases_fx.planner's public
functions), take a profile (analytical roofline, or measured on this device as rank 0 of a fake
TP world: FINDINGS 7), set every collective's cost to zero (compute only: what rank_bench measures
with skip_collectives=True), and predict plan="megatron" at every k and recompute policy.

    python -m benchmarks.planner_check --profile analytical --measured OUT/results.json
    python -m benchmarks.planner_check --profile measure --tp 2 --hidden 1024,2048 --out OUT/pred.json

With --measured (rank_bench results.json files, comma-separated) it prints each prediction's error
against the measured step time of the same case (oases, collectives skipped, no options), with the
predicted device and host times and the kernels counted (step = max(device, host)). --out writes
the rows, the step constants and the profiles; --profile-from re-predicts from such a file on any
machine (the same measurement under the current cost model). --fit-host FILES fits the host
constants to those files' host_ms at this --tp and --hidden (and says which cells were fitted);
--host-constants predicts with given ones (a fit made at another TP: the held-out check).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional

import torch

from benchmarks.rank_bench import Case, fake_mesh, gpt_config, make_batch
from oases_fx.models.gpt import GPT


def predictions(case: Case, *, profile: str, device: torch.device, ks=(1, 2, 4),
                recomputes=("none", "fine", "full"), measure_host: bool = True, hold: bool = False,
                saved: Optional[dict] = None) -> tuple:
    """([(k, recompute, Prediction)], the profile as measured) for plan="megatron" at case's
    shapes, compute only. saved: a Profile dict (an earlier --out's "profiles" entry) to predict
    from instead of profiling: the same measurement under today's cost model."""
    from oases_fx.api import megatron_plan
    from oases_fx.passes.annotate_sharding import find_tmp_regions
    from oases_fx.planner import AlphaBeta, analytical_profile, describe_model, measure_profile, predict_plan
    from oases_fx.planner.profile import ProfileOptions
    from oases_fx.tracing import capture

    mesh = fake_mesh(case.tp, device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[case.dtype]
    torch.manual_seed(0)
    model = GPT(gpt_config(case)).to(device=device, dtype=dtype)
    idx, targets = make_batch(case, device)
    gm = capture(model, (idx, targets), {}).gm
    regions = find_tmp_regions(gm, case.tp)[0]
    # plan="megatron" only: the full degree, no vocab-parallel variant, so the profile needs no
    # subgroup collectives (the fake group has nothing to measure there anyway).
    spec = describe_model(gm, regions, tp=case.tp, batch=case.batch, k_choices=tuple(ks), degrees=(case.tp,),
                          vocab=False)
    if saved is not None:
        from oases_fx.planner import Profile

        prof = Profile.from_dict(saved)
        missing = prof.missing(spec.op_keys())
        if missing:
            raise SystemExit(f"the saved profile for h={case.hidden} lacks {len(missing)} op keys, e.g. {missing[0]!r}")
    elif profile == "measure":
        from benchmarks.rank_bench import gpu_lock

        _one_rank_profile()
        opts = dataclasses.replace(ProfileOptions.for_device(device.type), measure_host=measure_host,
                                   hold_device=hold)
        with gpu_lock():  # alone on the GPU while it times ops (a rank_bench run may share it)
            prof = measure_profile(spec, group=mesh.get_group("tp"), device=device, options=opts,
                                   cache=False, progress=False)
    else:
        prof = analytical_profile(spec)
    measured = prof
    # Compute only, as rank_bench's skip_collectives=True: every collective free (time 0: with
    # nothing to feed, full recompute does not re-run the row linears either).
    free = AlphaBeta(alpha_us=0.0, beta_us_per_byte=0.0)
    prof = dataclasses.replace(prof, all_reduce=free, collectives={k: free for k in prof.collectives},
                               compute_interference=1.0, comm_interference=1.0)
    out = []
    for rc in recomputes:
        for k in ks:
            plan = megatron_plan(regions, tp=case.tp, num_sub_batches=k, recompute=rc)
            out.append((k, rc, predict_plan(spec, plan, prof)))
    return out, measured


def _one_rank_profile():
    """measure_profile on the fake group: its cross-rank mean would divide this rank's times by the
    world size (the fake all-reduce sums nothing), and its interference probe waits for a fake
    collective that never reports completion. Here, and only here: the mean is this rank's value
    and interference is 1 (the prediction is compute-only anyway)."""
    import oases_fx.planner.profile as prof_mod

    prof_mod._all_reduce_mean = lambda values, group, device: list(values)
    prof_mod._measure_interference = lambda *a, **k: (1.0, 1.0, 1.0, 1.0)


def measured_steps(paths) -> dict:
    """(tp, hidden, layers, batch, seq, k, recompute) -> {step_ms, host_ms, file}, from rank_bench
    results (oases, collectives skipped, no options or cudagraphs off). A case in several files:
    the last file listed wins. A traced row (Case.trace: profiled after its timed steps, which the
    profiler does not touch) counts only where no file has the case untraced."""
    got, traced = {}, {}
    for p in paths:
        for r in json.loads(Path(p).read_text())["rows"]:
            c = r["case"]
            opts = {k: v for k, v in (c.get("options") or {}).items() if not (k == "cudagraphs" and v is False)}
            if ("step_ms" in r and c["system"] == "oases" and c["collectives"] == "skip" and not opts
                    and c.get("boundary", True) and c.get("dp", 1) == 1):
                (traced if c.get("trace") else got)[
                    (c["tp"], c["hidden"], c["layers"], c["batch"], c["seq"], c["k"], c["recompute"])] = dict(
                    step_ms=r["step_ms"], host_ms=r.get("host_ms"), file=str(p))
    return {**traced, **got}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.planner_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=["analytical", "measure"], default="analytical")
    p.add_argument("--tp", type=int, default=2, help="one TP degree per process (one fake world)")
    p.add_argument("--tp-list", default=None, help="--write-grid only: comma-separated TP degrees (e.g. 2,4)")
    p.add_argument("--hidden", default="1024,2048,4096")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--tiny", action="store_true", help="CPU smoke test shapes")
    p.add_argument("--device", default=None)
    p.add_argument("--no-host-probe", action="store_true",
                   help="--profile measure: skip the host probe (two small Inductor compiles); host constants "
                        "then are StepConstants.analytical()'s")
    p.add_argument("--hold", action="store_true",
                   help="--profile measure: time ops behind a device hold (ProfileOptions.hold_device)")
    p.add_argument("--profile-from", default=None,
                   help="an earlier --out JSON: predict from its saved profiles (no device needed)")
    p.add_argument("--write-grid", default=None,
                   help="write the rank_bench cases this check compares with (oases, coll=skip, every k and "
                        "recompute at --tp and --hidden) as a JSON grid file for `rank_bench --grid FILE`, and exit")
    p.add_argument("--measured", default="", help="comma-separated rank_bench results.json files")
    p.add_argument("--fit-host", default="",
                   help="comma-separated rank_bench results.json files: fit the host constants (host_step_us, "
                        "host_per_kernel_us, host_per_checkpoint_us) by least squares to their host_ms column (the "
                        "host issue time, not the step) at this --tp and --hidden, and predict with them; the "
                        "table counts the fitted cells and the held-out ones apart")
    p.add_argument("--host-constants", default=None, metavar="STEP_US,PER_KERNEL_US,PER_CHECKPOINT_US",
                   help="predict with these host constants (e.g. a --fit-host printed at another TP)")
    p.add_argument("--out", default=None, help="write the rows (and the step constants used) as JSON here")
    args = p.parse_args(argv)
    if args.write_grid:
        cases = [dataclasses.asdict(Case(tp=tp, hidden=int(h), layers=args.layers, batch=args.batch, seq=args.seq,
                                         k=k, recompute=rc, collectives="skip"))
                 for tp in [int(t) for t in str(args.tp_list or args.tp).split(",")]
                 for h in args.hidden.split(",") if h for rc in ("none", "fine", "full") for k in (1, 2, 4)]
        Path(args.write_grid).write_text(json.dumps(cases, indent=1))
        print(f"{len(cases)} cases -> {args.write_grid}")
        return 0
    if args.fit_host and args.host_constants:
        raise SystemExit("--fit-host and --host-constants both set the host constants: pass one")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    measured = measured_steps([s for s in args.measured.split(",") if s])
    fit_steps = measured_steps([s for s in args.fit_host.split(",") if s])
    rows, constants, profiles, cells = [], {}, {}, []
    saved = json.loads(Path(args.profile_from).read_text())["profiles"] if args.profile_from else {}
    for h in [int(x) for x in args.hidden.split(",") if x]:
        kw = dict(tp=args.tp, hidden=h, layers=args.layers, batch=args.batch, seq=args.seq)
        if args.tiny:
            kw.update(layers=1, batch=4, seq=16, vocab=64, head_dim=16, dtype="fp32")
        case = Case(**kw)
        preds, prof = predictions(case, profile=args.profile, device=device, measure_host=not args.no_host_probe,
                                  hold=args.hold, saved=saved.get(str(h)) if args.profile_from else None)
        constants[str(h)] = dataclasses.asdict(prof.step)
        profiles[str(h)] = prof.to_dict()
        print(f"# h={h}: step constants {json.dumps(constants[str(h)])}", flush=True)
        for k, rc, pred in preds:
            key = (case.tp, case.hidden, case.layers, case.batch, case.seq, k, rc)
            segments = 0 if rc == "none" else len(pred.per_region) * k  # CostCache.host_us's segments
            cells.append((h, k, rc, pred, segments, measured.get(key) or {}, fit_steps.get(key)))
    host_fit = None
    if args.fit_host:
        pts = [(pred.kernels, seg, f["host_ms"] * 1e3) for _, _, _, pred, seg, _, f in cells
               if f and f.get("host_ms") is not None]
        host_fit = dict(files=args.fit_host, cells=len(pts),
                        constants=fit_host_constants(pts, prof.step.host_per_checkpoint_us))
    elif args.host_constants:
        vals = [float(x) for x in args.host_constants.split(",")]
        if len(vals) != 3:
            raise SystemExit(f"--host-constants {args.host_constants!r}: expected STEP_US,PER_KERNEL_US,PER_CHECKPOINT_US")
        host_fit = dict(files=None, cells=0, constants=vals)
    if host_fit is not None:
        print(f"# host constants (us): step {host_fit['constants'][0]:.1f}, per kernel {host_fit['constants'][1]:.2f}, "
              f"per checkpoint {host_fit['constants'][2]:.1f}" + (f" (fitted to {host_fit['cells']} host_ms values "
              f"of {args.fit_host})" if args.fit_host else " (given)"), flush=True)
    for h, k, rc, pred, segments, m, f in cells:
        host_us = pred.host_us
        if host_fit is not None:
            c0, c1, c2 = host_fit["constants"]
            host_us = c0 + c1 * pred.kernels + c2 * segments
        ms = max(pred.device_us, host_us) / 1e3  # predict()'s step = max(device, host)
        meas = m.get("step_ms")
        rows.append(dict(tp=args.tp, hidden=h, layers=case.layers, k=k, recompute=rc, profile=args.profile,
                         predicted_ms=round(ms, 3), device_ms=round(pred.device_us / 1e3, 3),
                         host_ms=round(host_us / 1e3, 3), kernels=round(pred.kernels),
                         measured_ms=meas, measured_host_ms=m.get("host_ms"), measured_file=m.get("file"),
                         error_pct=None if meas is None else round(100 * (ms / meas - 1), 1),
                         host_fitted=bool(f and f.get("host_ms") is not None) if args.fit_host else None))
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(dict(rows=rows, step_constants=constants, device=str(device),
                                                  torch=torch.__version__, argv=sys.argv[1:], profiles=profiles,
                                                  host_fit=host_fit), indent=1))
    print(table(rows))
    return 0


def fit_host_constants(points, per_checkpoint_us: float) -> list:
    """[host_step_us, host_per_kernel_us, host_per_checkpoint_us] minimising the squared error of
    step + per_kernel * kernels + per_checkpoint * segments against the measured host times
    (points: (kernels, segments, host_us)). Without a recomputing point the per-checkpoint
    constant cannot be fitted: it stays per_checkpoint_us (the profile's) and the others absorb
    nothing of it."""
    import numpy as np

    if len({round(kn) for kn, _, _ in points}) < 2:
        raise SystemExit(f"--fit-host: {len(points)} host_ms values with fewer than 2 kernel counts fix no "
                         "per-kernel constant; give files that measure several k (or recompute policies) at this "
                         "--tp and --hidden (oases rows, collectives skipped, no options)")
    y = np.array([hu for _, _, hu in points], dtype=float)
    if any(seg for _, seg, _ in points):
        x = np.array([[1.0, kn, seg] for kn, seg, _ in points], dtype=float)
        return [float(v) for v in np.linalg.lstsq(x, y, rcond=None)[0]]
    x = np.array([[1.0, kn] for kn, _, _ in points], dtype=float)
    c0, c1 = np.linalg.lstsq(x, y, rcond=None)[0]
    return [float(c0), float(c1), float(per_checkpoint_us)]


def table(rows) -> str:
    """Markdown: predicted (device / host) vs measured (step / host) and the error, per cell."""
    out = ["| tp | h | L | k | recompute | profile | predicted ms | device / host ms | kernels | measured ms | "
           "measured host ms | error |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        err = "-" if r["error_pct"] is None else f"{r['error_pct']:+.1f} %"
        meas = "-" if r["measured_ms"] is None else f"{r['measured_ms']:.2f}"
        mh = "-" if r.get("measured_host_ms") is None else f"{r['measured_host_ms']:.2f}"
        out.append(f"| {r['tp']} | {r['hidden']} | {r['layers']} | {r['k']} | {r['recompute']} | {r['profile']} | "
                   f"{r['predicted_ms']:.2f} | {r['device_ms']:.2f} / {r['host_ms']:.2f} | {r['kernels']} | {meas} | "
                   f"{mh} | {err} |")
    groups = [("", [r for r in rows])]
    if any(r.get("host_fitted") is not None for r in rows):  # --fit-host: the fitted cells and the rest apart
        groups += [(" (host constants fitted here)", [r for r in rows if r.get("host_fitted")]),
                   (" (held out of the host fit)", [r for r in rows if r.get("host_fitted") is False])]
    for what, rs in groups:
        errs = [abs(r["error_pct"]) for r in rs if r["error_pct"] is not None]
        if errs:
            out.append(f"\nwithin 5 %{what}: {sum(e <= 5 for e in errs)} of {len(errs)} measured cells; "
                       f"median |error| {sorted(errs)[len(errs) // 2]:.1f} %, max {max(errs):.1f} %")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
