"""Where the sub-batch split's extra step time goes: GPU kernels of k=1 and k=k' side by side.

One process, rank 0 of a fake TP world (rank_bench's method, FINDINGS 7). For each k the case is
built, warmed up, and `--steps` steps are profiled; the device kernels are read from the
profiler's trace events (kernel and memcpy/memset events only: the op-level events that
`key_averages()` mixes in repeat the kernels' time). Per kernel name: launches and microseconds
per step; per family (gemm, attention, cat/copy, reduction, other Triton, other); the step's
busy time (union of kernel intervals) and its idle time (step wall minus busy).

    python -m benchmarks.split_trace --hidden 2048 --ks 1,2 --out OUT/split
"""
from __future__ import annotations

import argparse
import gzip
import json
import statistics
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.rank_bench import Case, _sync, build, device_step_times, gpu_lock, kernel_family, make_batch


def family(name: str) -> str:
    """rank_bench.kernel_family's attention and GEMM, the rest told apart finer (its "copy" also
    holds fused Triton kernels whose name has "cat", which are not copies)."""
    base = kernel_family(name)
    if base in ("attention", "gemm"):
        return base
    n = name.lower()
    if "memcpy" in n or "memset" in n:
        return "memcpy/memset"
    if n.startswith("triton"):
        parts = n.split("_")
        if "cat" in parts or "split" in parts:
            return "triton (fused cat/split)"
        return "triton"
    if "reduce_kernel" in n:
        return "aten reduction"
    if "elementwise" in n or "copy" in n:
        return "aten elementwise/copy"
    return "other"


def kernels_of(trace_path: Path, steps: int) -> dict:
    events = json.loads(trace_path.read_text())["traceEvents"]
    per = defaultdict(lambda: [0, 0.0])
    spans = []
    for ev in events:
        if ev.get("ph") != "X" or ev.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        per[ev["name"]][0] += 1
        per[ev["name"]][1] += float(ev["dur"])
        spans.append((float(ev["ts"]), float(ev["ts"]) + float(ev["dur"])))
    spans.sort()
    busy, end = 0.0, None
    lo = None
    for a, b in spans:
        if end is None or a > end:
            if end is not None:
                busy += end - lo
            lo, end = a, b
        else:
            end = max(end, b)
    if end is not None:
        busy += end - lo
    return {"kernels": {n: (c / steps, us / steps) for n, (c, us) in per.items()},
            "busy_us": busy / steps, "launches": sum(c for c, _ in per.values()) / steps}


def profile_case(case: Case, device, steps: int, out: Path) -> dict:
    from torch.profiler import ProfilerActivity, profile

    batch = make_batch(case, device)
    step, module, _ = build(case, device)
    step(*batch)
    with gpu_lock():
        for _ in range(case.warmup):
            step(*batch)
        dev = device_step_times(step, batch, case.steps, device)
        _sync(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step(*batch)
            _sync(device)
    prog = next(iter(module._programs.values()), None)
    for stage in ("forward", "backward"):  # the graphs Inductor compiled, after our passes
        gms = getattr(getattr(prog, "aot", None), stage, None) or []
        if gms:
            (out / f"h{case.hidden}_k{case.k}_{stage}.txt").write_text(str(gms[-1].graph))
    path = out / f"trace_h{case.hidden}_k{case.k}.json"
    prof.export_chrome_trace(str(path))
    got = kernels_of(path, steps)
    got["step_ms"] = statistics.median(dev)
    with gzip.open(str(path) + ".gz", "wt") as f:  # kept small: the raw trace for a second look
        f.write(path.read_text())
    path.unlink()
    return got


def table(results: dict) -> str:
    ks = sorted(results)
    fams = defaultdict(lambda: {k: [0.0, 0.0] for k in ks})
    for k in ks:
        for n, (c, us) in results[k]["kernels"].items():
            fams[family(n)][k][0] += c
            fams[family(n)][k][1] += us
    head = "| family | " + " | ".join(f"k={k}: launches, us" for k in ks) + " |"
    lines = [head, "|---|" + "---|" * len(ks)]
    for f in sorted(fams):
        lines.append(f"| {f} | " + " | ".join(f"{fams[f][k][0]:.0f}, {fams[f][k][1]:.0f}" for k in ks) + " |")
    lines.append("| busy (union of kernels) us | " + " | ".join(f"{results[k]['busy_us']:.0f}" for k in ks) + " |")
    lines.append("| step ms (median) | " + " | ".join(f"{results[k]['step_ms']:.3f}" for k in ks) + " |")
    lines.append("| idle us (step - busy) | " + " | ".join(
        f"{results[k]['step_ms'] * 1e3 - results[k]['busy_us']:.0f}" for k in ks) + " |")
    lines.append("")
    names = sorted({n for k in ks for n in results[k]["kernels"]},
                   key=lambda n: -max(results[k]["kernels"].get(n, (0, 0))[1] for k in ks))
    lines.append("| kernel | " + " | ".join(f"k={k}" for k in ks) + " |")
    lines.append("|---|" + "---|" * len(ks))
    for n in names[:80]:
        lines.append(f"| `{n[:100]}` | " + " | ".join(
            "{:.0f} x, {:.1f} us".format(*results[k]["kernels"].get(n, (0, 0))) for k in ks) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", default="2048", help="comma-separated")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--ks", default="1,2")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--options", default="{}", help="oases_fx.compile options as JSON (e.g. '{\"cudagraphs\": true}')")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    for h in (int(x) for x in a.hidden.split(",")):
        results = {}
        for k in (int(x) for x in a.ks.split(",")):
            case = Case(system="oases", tp=a.tp, hidden=h, layers=a.layers, k=k, options=json.loads(a.options))
            results[k] = profile_case(case, device, a.steps, out)
            print(f"h={h} k={k}: step {results[k]['step_ms']:.3f} ms, busy {results[k]['busy_us']:.0f} us, "
                  f"{results[k]['launches']:.0f} launches", flush=True)
        text = f"## h={h}, L={a.layers}, TP={a.tp}, collectives skipped\n\n" + table(results)
        (out / f"split_trace_h{h}.md").write_text(text + "\n")
        (out / f"split_trace_h{h}.json").write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1))
        print(text, flush=True)


if __name__ == "__main__":
    main()
