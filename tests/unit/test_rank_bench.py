"""benchmarks/rank_bench.py on CPU: the per-rank benchmark's whole code path (driver, one process
per case, torch's fake process group, oases_fx and the torch.compile reference) at tiny shapes.
No timing is asserted: only that every case ran and reported its measurements."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from benchmarks import rank_bench
from benchmarks.rank_bench import Case

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(hidden=64, layers=1, batch=4, seq=16, vocab=64, head_dim=16, steps=2, warmup=1, dtype="fp32",
            backend="aot_eager")


def test_driver_runs_oases_on_the_fake_group(tmp_path):
    """The driver in its own process (the fake group is process-wide), one oases case at k=2 with
    the collectives kept: the path with the most parts; and the same case without the DTensor
    boundary's gradient hooks (the boundary-cost comparison, issue 12)."""
    cases = [Case(system="oases", k=2, collectives="fake", **TINY),
             Case(system="oases", k=2, collectives="fake", boundary=False, **TINY)]
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps([rank_bench.asdict(c) for c in cases]))
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.rank_bench", "--grid", str(grid), "--device", "cpu",
                           "--workers", "2", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["case"]["system"] for r in rows] == ["oases", "oases"]
    assert [r["key"].endswith("no-boundary") for r in rows] == [False, True]
    for r in rows:
        assert "error" not in r, r
        assert r["step_ms"] > 0 and r["host_ms"] > 0 and r["compile_s"] > 0
        assert math.isfinite(r["loss"])
    md = (out / "table.md").read_text()
    assert md.count("\n| oases ") == 2 and md.count("no-boundary") == 1
    # with and without the boundary the program and the batch are the same: the same loss
    assert rows[0]["loss"] == rows[1]["loss"]


def test_torch_compile_reference_in_process():
    """RankGPT under torch.compile needs no process group: run it here (dynamo's "eager" backend:
    the path is the same, the compile is seconds)."""
    import torch

    row = rank_bench.run_case(Case(system="torch_compile", **dict(TINY, backend="eager")), torch.device("cpu"))
    assert row["step_ms"] > 0 and row["host_ms"] > 0 and math.isfinite(row["loss"])
    # RankGPT is the rank's share: attention and MLP weights 1/tp of the plain GPT's
    full = sum(p.numel() for blk in rank_bench.GPT(rank_bench.gpt_config(Case(**TINY))).transformer.h
               for p in blk.parameters() if p.dim() == 2)
    rank = sum(p.numel() for blk in rank_bench.RankGPT(rank_bench.gpt_config(Case(**TINY)), 2).h
               for p in blk.parameters() if p.dim() == 2)
    assert rank * 2 == full


def test_table_relates_rows_to_k1_and_torch_compile():
    def row(system, k, ms):
        return dict(case=rank_bench.asdict(Case(system=system, k=k, **TINY)), key="", step_ms=ms, host_ms=1.0,
                    compile_s=1.0)

    md = rank_bench.table([row("torch_compile", 1, 10.0), row("oases", 1, 11.0), row("oases", 2, 12.1)])
    lines = [ln for ln in md.splitlines() if ln.startswith("| oases")]
    assert "+10.0 %" in lines[0]                    # k=1 vs torch.compile
    assert "+10.0 %" in lines[1] and "+21.0 %" in lines[1]  # k=2 vs k=1, vs torch.compile


def test_kernel_families():
    assert rank_bench.kernel_family("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT") == "gemm"
    assert rank_bench.kernel_family("cudnn_generated_fort_native_sdpa_sm90_flash_bprop") == "attention"
    assert rank_bench.kernel_family("triton_poi_fused_cat_transpose_view_9") == "copy"
    assert rank_bench.kernel_family("triton_red_fused_add_native_layer_norm_5") == "triton"
    assert rank_bench.kernel_family("Memcpy DtoD (Device -> Device)") == "copy"


def test_driver_saves_after_every_case(tmp_path):
    """results.json is rewritten after each finished case, so a grid killed from outside (the device's
    wall limit) keeps what it measured: once only written at the end, a killed run lost every row."""
    saved = []
    cases = [Case(system="no_such_system", **TINY), Case(system="no_such_system", hidden=32, **{
        k: v for k, v in TINY.items() if k != "hidden"})]
    rows = rank_bench.run_all(cases, workers=1, budget_s=600, out=tmp_path, device="cpu", case_timeout_s=120,
                              log=lambda s: None, save=lambda rows: saved.append([r["key"] for r in rows]))
    assert [len(s) for s in saved] == [1, 2]
    assert saved[-1] == [r["key"] for r in rows] and all("error" in r for r in rows)
