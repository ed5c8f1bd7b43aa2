"""The planner's predicted compute-only step time against rank_bench's measurement, per (k, recompute).

For each (tp, hidden): trace the plain GPT, describe it for the planner (oases_fx.planner's public
functions), take a profile (analytical roofline, or measured on this device as rank 0 of a fake
TP world: FINDINGS 7), set every collective's cost to zero (compute only: what rank_bench measures
with skip_collectives=True), and predict plan="megatron" at every k and recompute policy.

    python -m benchmarks.planner_check --profile analytical --measured OUT/results.json
    python -m benchmarks.planner_check --profile measure --tp 2 --hidden 1024,2048 --out OUT/pred.json

With --measured (rank_bench results.json files, comma-separated) it prints each prediction's error
against the measured step time of the same case (oases, collectives skipped, no options).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from benchmarks.rank_bench import Case, fake_mesh, gpt_config, make_batch
from oases_fx.models.gpt import GPT


def predictions(case: Case, *, profile: str, device: torch.device, ks=(1, 2, 4),
                recomputes=("none", "fine", "full")) -> list:
    """[(k, recompute, predicted compute-only step ms)] for plan="megatron" at case's shapes."""
    from oases_fx.api import megatron_plan
    from oases_fx.passes.annotate_sharding import find_tmp_regions
    from oases_fx.planner import AlphaBeta, analytical_profile, describe_model, measure_profile, predict_plan
    from oases_fx.planner.profile import MIN_BETA_US_PER_BYTE, ProfileOptions
    from oases_fx.tracing import capture

    mesh = fake_mesh(case.tp, device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[case.dtype]
    torch.manual_seed(0)
    model = GPT(gpt_config(case)).to(device=device, dtype=dtype)
    idx, targets = make_batch(case, device)
    gm = capture(model, (idx, targets), {}).gm
    regions = find_tmp_regions(gm, case.tp)[0]
    spec = describe_model(gm, regions, tp=case.tp, batch=case.batch, k_choices=tuple(ks))
    if profile == "measure":
        from benchmarks.rank_bench import gpu_lock

        _one_rank_profile()
        with gpu_lock():  # alone on the GPU while it times ops (a rank_bench run may share it)
            prof = measure_profile(spec, group=mesh.get_group("tp"), device=device,
                                   options=ProfileOptions.for_device(device.type), cache=False, progress=False)
    else:
        prof = analytical_profile(spec)
    free = AlphaBeta(alpha_us=0.0, beta_us_per_byte=MIN_BETA_US_PER_BYTE)
    prof = dataclasses.replace(prof, all_reduce=free, collectives={k: free for k in prof.collectives},
                               compute_interference=1.0, comm_interference=1.0)
    out = []
    for rc in recomputes:
        for k in ks:
            plan = megatron_plan(regions, tp=case.tp, num_sub_batches=k, recompute=rc)
            out.append((k, rc, predict_plan(spec, plan, prof).step_us / 1e3))
    return out


def _one_rank_profile():
    """measure_profile on the fake group: its cross-rank mean would divide this rank's times by the
    world size (the fake all-reduce sums nothing), and its interference probe waits for a fake
    collective that never reports completion. Here, and only here: the mean is this rank's value
    and interference is 1 (the prediction is compute-only anyway)."""
    import oases_fx.planner.profile as prof_mod

    prof_mod._all_reduce_mean = lambda values, group, device: list(values)
    prof_mod._measure_interference = lambda *a, **k: (1.0, 1.0, 1.0, 1.0)


def measured_steps(paths) -> dict:
    """(tp, hidden, layers, batch, seq, k, recompute) -> step ms, from rank_bench results."""
    got = {}
    for p in paths:
        for r in json.loads(Path(p).read_text())["rows"]:
            c = r["case"]
            if ("step_ms" in r and c["system"] == "oases" and c["collectives"] == "skip" and not c["options"]
                    and not c["trace"]):
                got[(c["tp"], c["hidden"], c["layers"], c["batch"], c["seq"], c["k"], c["recompute"])] = r["step_ms"]
    return got


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.planner_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=["analytical", "measure"], default="analytical")
    p.add_argument("--tp", type=int, default=2, help="one TP degree per process (one fake world)")
    p.add_argument("--hidden", default="1024,2048,4096")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--tiny", action="store_true", help="CPU smoke test shapes")
    p.add_argument("--device", default=None)
    p.add_argument("--measured", default="", help="comma-separated rank_bench results.json files")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    measured = measured_steps([s for s in args.measured.split(",") if s])
    rows = []
    for h in [int(x) for x in args.hidden.split(",") if x]:
        kw = dict(tp=args.tp, hidden=h, layers=args.layers, batch=args.batch, seq=args.seq)
        if args.tiny:
            kw.update(layers=1, batch=4, seq=16, vocab=64, head_dim=16, dtype="fp32")
        case = Case(**kw)
        for k, rc, ms in predictions(case, profile=args.profile, device=device):
            m = measured.get((case.tp, case.hidden, case.layers, case.batch, case.seq, k, rc))
            rows.append(dict(tp=case.tp, hidden=h, layers=case.layers, k=k, recompute=rc, profile=args.profile,
                             predicted_ms=round(ms, 3), measured_ms=m,
                             error_pct=None if m is None else round(100 * (ms / m - 1), 1)))
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    print("| tp | h | L | k | recompute | profile | predicted ms | measured ms | error |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        err = "-" if r["error_pct"] is None else f"{r['error_pct']:+.1f} %"
        meas = "-" if r["measured_ms"] is None else f"{r['measured_ms']:.2f}"
        print(f"| {r['tp']} | {r['hidden']} | {r['layers']} | {r['k']} | {r['recompute']} | {r['profile']} | "
              f"{r['predicted_ms']:.2f} | {meas} | {err} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
