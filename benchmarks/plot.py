"""Plots of benchmarks/harness.py results: throughput by hidden size, one line per system, one
panel per interconnect (and the same for speedup over the baseline).

    python3 -m benchmarks.plot benchmarks/results/results.json [more.json ...] --out benchmarks/results

Each input is a results.json (a list of runs) or a directory holding one. Where several runs
measured the same (interconnect, hidden size, system), the latest run wins.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def load_runs(paths: list[str]) -> list[dict]:
    runs = []
    for p in map(Path, paths):
        if p.is_dir():
            p = p / "results.json"
        data = json.loads(p.read_text())
        runs += data if isinstance(data, list) else [data]
    return runs


def collect(runs: list[dict], metric: str, rename: dict | None = None) -> dict:
    """{interconnect: {system: {hidden: value}}}, later runs overriding earlier ones."""
    out: dict = {}
    for run in sorted(runs, key=lambda r: r["meta"]["date"]):
        label = f"{run['meta']['interconnect']} ({run['meta']['card']} x{run['meta']['world_size']})"
        for config in run["configs"]:
            for row in config["rows"]:
                value = row.get(metric)
                if value is None:
                    continue
                name = (rename or {}).get(row["system"], row["system"])
                out.setdefault(label, {}).setdefault(name, {})[config["hidden"]] = value
    return out


def plot(data: dict, ylabel: str, title: str, path: Path, *, log_y: bool = False,
         hline: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted(data)
    systems = sorted({s for label in panels for s in data[label]})
    colors = {s: f"C{i % 10}" for i, s in enumerate(systems)}  # same colour in every panel
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6.5 * max(1, len(panels)), 4.8),
                             squeeze=False)
    for ax, label in zip(axes[0], panels):
        for system, by_hidden in sorted(data[label].items()):
            hs = sorted(by_hidden)
            style = "--" if system == "floor" else "-"
            ax.plot(hs, [by_hidden[h] for h in hs], style, marker="o", label=system,
                    color=colors[system])
        ax.set_xscale("log", base=2)
        if log_y:
            ax.set_yscale("log")
        if hline is not None:
            ax.axhline(hline, color="grey", linewidth=0.8)
        ax.set_xlabel("hidden size")
        ax.set_ylabel(ylabel)
        ax.set_title(label, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    if not panels:
        axes[0][0].text(0.5, 0.5, "no timed rows", ha="center")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="results.json files or directories holding one")
    p.add_argument("--out", default="benchmarks/results", help="directory for the PNG files")
    p.add_argument("--rename", action="append", default=[], metavar="SYSTEM=LABEL",
                   help="label a system differently in the legend (repeatable)")
    args = p.parse_args(argv)
    runs = load_runs(args.inputs)
    rename = dict(r.split("=", 1) for r in args.rename)
    out = Path(args.out)
    baseline = next((c["baseline"] for r in runs for c in r["configs"]), "megatron")
    written = []
    for metric, ylabel, name, kw in (
        ("tokens_per_s", "tokens / s (whole TP group)", "throughput.png", {"log_y": True}),
        ("tflops_per_gpu", "model TFLOP/s per GPU", "tflops.png", {}),
        ("speedup", f"speedup over {baseline}", "speedup.png", {"hline": 1.0}),
    ):
        path = out / name
        plot(collect(runs, metric, rename), ylabel, f"{ylabel} by hidden size", path, **kw)
        written.append(path)
    print("wrote " + ", ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
