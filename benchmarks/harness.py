"""Side-by-side benchmark: every TP system on the same GPT, batch, dtype, data and ranks, in one run.

Launch (one process per GPU; TP = world size):
    torchrun --nproc-per-node 2 -m benchmarks.harness --hidden 2048 --layers 4 --batch 8 \
        --seq 2048 --systems all --steps 30 --warmup 5 --out benchmarks/results
The PCIe-class interconnect is the same command launched with NCCL_P2P_DISABLE=1.
CPU smoke test (gloo): add --device cpu with a tiny shape, or use --dry-run.

Per hidden size: build the master weights (seeded, checked identical on all ranks) and the batch,
compute the reference loss with the eager unsharded GPT, build every system, check its loss on
the same batch, then time all systems round-robin (several rounds, CUDA events, median of the
per-step maximum over ranks). See benchmarks/README.md for the columns and the tolerances.
"""
from __future__ import annotations

import os

# NVLink multicast is off on the GPU machines and must stay off (FINDINGS 6). Set here, before
# torch initialises CUDA or NCCL, for this process; launchers should export them too, so that
# anything started before this module (or outside it) sees the same values. Megatron's
# grad-input overlap needs CUDA_DEVICE_MAX_CONNECTIONS=1; one process runs every system, so
# every system runs with it (launch with another value to measure its effect on the others).
_ENV_BEFORE = {k: os.environ.get(k) for k in (
    "NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS",
    "CUDA_DEVICE_MAX_CONNECTIONS", "NCCL_P2P_DISABLE")}
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

import torch  # noqa: E402
import torch._dynamo  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.baselines.common import (  # noqa: E402
    BuildContext,
    System,
    SystemUnavailable,
    fingerprint,
    flops_per_token,
    free_memory,
    load_plain_gpt,
    make_batch,
    make_master_state_dict,
)
from oases_fx.models.gpt import GPTConfig  # noqa: E402

GiB = 2**30


# --------------------------------------------------------------------------------------------
# The system under test: oases_fx, and its no-communication floor
# --------------------------------------------------------------------------------------------


def _build_oases(ctx: BuildContext, name: str, *, skip_collectives: bool, search_all: bool = False) -> System:
    try:
        import oases_fx
    except ImportError as e:
        raise SystemUnavailable(f"oases_fx is not importable: {e}") from e
    if not hasattr(oases_fx, "compile"):
        raise SystemUnavailable("oases_fx.compile does not exist yet")
    model = load_plain_gpt(ctx.cfg, ctx.state_dict, device=ctx.device, dtype=ctx.dtype)
    kwargs = dict(example_inputs=ctx.example, plan="auto",
                  num_sub_batches=ctx.options.get("oases_sub_batches"),
                  backend=ctx.backend if ctx.backend != "none" else "aot_eager")
    if skip_collectives:
        kwargs["skip_collectives"] = True  # wrong numerics by design: the physical overlap limit
    if search_all:  # the planner also searches per-region TMP degrees and vocab-parallel
        kwargs.update(planner_degrees="all", planner_vocab_parallel=(False, True))
    compiled = oases_fx.compile(model, ctx.mesh, **kwargs)

    def step(idx, targets):
        _, loss = compiled(idx, targets)
        loss.backward()
        return loss

    modules = [compiled] if isinstance(compiled, nn.Module) else [model]
    system = System(name, step, modules, notes=f"backend={kwargs['backend']}")
    system.explain = getattr(compiled, "explain", None)
    return system


def build_oases_fx(ctx: BuildContext) -> System:
    return _build_oases(ctx, "oases_fx", skip_collectives=False)


def build_oases_fx_search_all(ctx: BuildContext) -> System:
    return _build_oases(ctx, "oases_fx_search_all", skip_collectives=False, search_all=True)


def build_floor(ctx: BuildContext) -> System:
    return _build_oases(ctx, "floor", skip_collectives=True)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SystemSpec:
    name: str
    builder: str  # "module:function", imported when the system is built
    description: str
    loss_checked: bool = True


SYSTEMS = [
    SystemSpec("megatron", "benchmarks.baselines.megatron_gpt:build_megatron",
               "Megatron-Core GPTModel, local spec + SDPA, grad-input AR overlapped with wgrad"),
    SystemSpec("megatron_sp", "benchmarks.baselines.megatron_gpt:build_megatron_sp",
               "Megatron-Core with sequence parallelism"),
    SystemSpec("torch_tp", "benchmarks.baselines.torch_tp:build_torch_tp",
               "parallelize_module + per-block torch.compile"),
    SystemSpec("torch_tp_sp", "benchmarks.baselines.torch_tp:build_torch_tp_sp",
               "torch_tp + sequence parallelism"),
    SystemSpec("torch_tp_sp_async", "benchmarks.baselines.torch_tp:build_torch_tp_sp_async",
               "torch_tp_sp + async TP (Inductor micro-pipeline TP, symmetric memory)"),
    SystemSpec("eager_tp", "benchmarks.baselines.domino:build_eager_tp",
               "hand-written Megatron-style TP in eager, no overlap (domino with k=1)"),
    SystemSpec("domino", "benchmarks.baselines.domino:build_domino",
               "hand-written 2-way batch split, async all-reduces overlapped (Domino-style)"),
    SystemSpec("oases_fx", "benchmarks.harness:build_oases_fx",
               "oases_fx.compile, plan=auto (default search: k, recompute, shard/replicate per block)"),
    SystemSpec("oases_fx_search_all", "benchmarks.harness:build_oases_fx_search_all",
               "oases_fx, plan=auto also searching per-block TMP degrees and vocab-parallel"),
    SystemSpec("floor", "benchmarks.harness:build_floor",
               "oases_fx graph with every collective skipped (no loss check)", loss_checked=False),
]
SYSTEM_NAMES = [s.name for s in SYSTEMS]


def _resolve(builder: str):
    module, fn = builder.split(":")
    if module == "benchmarks.harness":  # this file, possibly running as __main__: no second copy
        return globals()[fn]
    return getattr(importlib.import_module(module), fn)


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------

DRY_RUN = dict(device="cpu", hidden="64", layers="2", seq=32, batch=4, vocab=128, steps=3,
               warmup=1, rounds=1)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.harness", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", default="1024,2048,4096,8192",
                   help="comma-separated hidden sizes (default: the Oases grid)")
    p.add_argument("--layers", default="auto",
                   help="'auto' (4 for h<=4096, else 2), one int, or one int per hidden size")
    p.add_argument("--head-dim", type=int, default=64, help="heads = hidden / head-dim")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8, help="micro-batch, the same for every system")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--systems", default="all",
                   help=f"'all' or a comma-separated subset of {','.join(SYSTEM_NAMES)}")
    p.add_argument("--baseline", default="megatron", help="system the speedup column divides by")
    p.add_argument("--steps", type=int, default=30, help="timed steps per system (>= 20 advised)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per system after the check")
    p.add_argument("--rounds", type=int, default=3,
                   help="round-robin rounds; each times ceil(steps / rounds) steps per system")
    p.add_argument("--schedule", choices=["interleaved", "sequential"], default="interleaved",
                   help="interleaved: build all, time round-robin; sequential: build, time and "
                        "free one system at a time (when they do not fit together)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cuda", "cpu"], default=None,
                   help="default: cuda if available (NCCL), else cpu (gloo)")
    p.add_argument("--backend", default=None,
                   help="torch.compile backend for compiled systems: inductor (default on cuda), "
                        "aot_eager (default on cpu) or none")
    p.add_argument("--loss-tol", type=float, default=None,
                   help="max |loss - reference|, absolute (default 0.08 in bf16, 1e-3 in fp32; "
                        "README explains both)")
    p.add_argument("--domino-sub-batches", type=int, default=2)
    p.add_argument("--oases-sub-batches", type=int, default=None,
                   help="num_sub_batches for oases_fx.compile (default: None, the planner decides)")
    p.add_argument("--out", default=None,
                   help="results directory (results.json, RESULTS-fragment.md). Default: "
                        "benchmarks/results on cuda, nothing written on cpu")
    p.add_argument("--interconnect", default=None,
                   help="label for the interconnect (default: derived from NCCL_P2P_DISABLE)")
    p.add_argument("--timeout-min", type=float, default=20.0, help="process-group timeout")
    p.add_argument("--trace", default="",
                   help="comma-separated systems to profile for 3 steps after timing (CUDA): gzipped "
                        "chrome trace + per-collective overlap table in --out")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny CPU/gloo shapes for a smoke test: " +
                        ", ".join(f"{k}={v}" for k, v in DRY_RUN.items()))
    args = p.parse_args(argv)
    if args.dry_run:
        for k, v in DRY_RUN.items():
            setattr(args, k, v)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.loss_tol is None:
        args.loss_tol = 0.08 if args.dtype == "bf16" else 1e-3
    if args.backend is None:
        args.backend = "inductor" if args.device == "cuda" else "aot_eager"
    args.hidden_sizes = [int(h) for h in str(args.hidden).split(",") if h]
    if str(args.layers) == "auto":
        args.layer_counts = [4 if h <= 4096 else 2 for h in args.hidden_sizes]
    else:
        counts = [int(x) for x in str(args.layers).split(",")]
        if len(counts) == 1:
            counts = counts * len(args.hidden_sizes)
        if len(counts) != len(args.hidden_sizes):
            p.error("--layers needs one value or one per hidden size")
        args.layer_counts = counts
    args.trace_list = [t.strip() for t in args.trace.split(",") if t.strip()]
    if args.systems == "all":
        args.system_list = list(SYSTEM_NAMES)
    else:
        args.system_list = [s.strip() for s in args.systems.split(",") if s.strip()]
        unknown = [s for s in args.system_list + args.trace_list if s not in SYSTEM_NAMES]
        if unknown:
            p.error(f"unknown systems {unknown}; choose from {SYSTEM_NAMES}")
    for h in args.hidden_sizes:
        if h % args.head_dim:
            p.error(f"hidden {h} is not a multiple of --head-dim {args.head_dim}")
    if args.steps < 1 or args.rounds < 1:
        p.error("--steps and --rounds must be >= 1")
    return args


# --------------------------------------------------------------------------------------------
# Distributed helpers
# --------------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device
    ctrl: dist.ProcessGroup  # gloo group for status exchange and CPU-side barriers

    def agree(self, ok: bool, err: str) -> tuple[bool, str]:
        """All ranks learn whether every rank succeeded, and the first failure's reason."""
        got = [None] * self.world
        dist.all_gather_object(got, (ok, err), group=self.ctrl)
        bad = [(r, e) for r, (o, e) in enumerate(got) if not o]
        if not bad:
            return True, ""
        if len(bad) == self.world and len({e for _, e in bad}) == 1:
            return False, bad[0][1]  # every rank failed the same way
        return False, f"rank {bad[0][0]}: {bad[0][1]}"

    def max_over_ranks(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.ctrl)
        return t.tolist()

    def barrier(self) -> None:
        dist.barrier(group=self.ctrl)


def init_distributed(args) -> Dist:
    if "RANK" not in os.environ:
        raise SystemExit("launch with torchrun, e.g. torchrun --nproc-per-node 2 -m benchmarks.harness")
    timeout = datetime.timedelta(minutes=args.timeout_min)
    if args.device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // max(1, int(os.environ["WORLD_SIZE"]))))
    ctrl = dist.new_group(backend="gloo", timeout=timeout)
    return Dist(dist.get_rank(), dist.get_world_size(), device, ctrl)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip()


def guarded(d: Dist, what: str, fn):
    """Run fn on every rank; return (ok, reason, value) agreed across ranks. Tracebacks go to
    stderr; the reason is the exception type and its first line."""
    try:
        value, ok, err = fn(), True, ""
    except SystemUnavailable as e:
        value, ok, err = None, False, f"unavailable: {e}"
    except Exception as e:  # noqa: BLE001 - every failure becomes a row, never a crash
        value, ok, err = None, False, f"{what} failed: {_first_line(e)}"
        print(f"[rank {d.rank}] {what} raised:\n{traceback.format_exc()}", file=sys.stderr)
        if isinstance(e, torch.cuda.OutOfMemoryError):
            free_memory()
    ok, err = d.agree(ok, err)
    return ok, err, value


# --------------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------------


def time_steps(system: System, batch, n: int, device: torch.device) -> list[float]:
    """Milliseconds of n consecutive steps. On CUDA: events around each step, one sync at the end
    (the CPU may run ahead, as in training); on CPU: wall clock per step."""
    idx, targets = batch
    if device.type == "cuda":
        events = []
        for _ in range(n):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            system.step(idx, targets)
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in events]
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        system.step(idx, targets)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def allocated(device) -> int:
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated(device)


# --------------------------------------------------------------------------------------------
# One hidden size
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    system: str
    description: str
    status: str = "ok"  # "ok" or the reason it has no timing
    notes: str = ""
    loss: Optional[float] = None
    loss_diff: Optional[float] = None
    loss_argmax: Optional[float] = None
    loss_argmax_diff: Optional[float] = None
    loss_ok: Optional[bool] = None  # None: not checked (floor)
    build_s: Optional[float] = None
    first_steps_s: Optional[float] = None  # the two check steps, compile included
    resident_bytes: int = 0
    peak_bytes: Optional[int] = None
    step_ms: list = field(default_factory=list)
    step_ms_median: Optional[float] = None
    tokens_per_s: Optional[float] = None
    tflops_per_gpu: Optional[float] = None
    speedup: Optional[float] = None
    hidden_share: Optional[float] = None
    extra: dict = field(default_factory=dict)


def _loss_value(loss) -> float:
    if hasattr(loss, "full_tensor"):
        loss = loss.full_tensor()
    return float(loss.float().item())


def reference_losses(cfg, sd, batch, device, dtype):
    """Eager unsharded GPT: loss on the batch's targets, and on targets = its own argmax.

    Random targets make a weak check (a model with other weights of the same statistics gets
    nearly the same mean loss); the argmax targets make the loss depend on which logit is largest
    per token, so a wrong weight mapping moves it by ~1 (measured 0.7-1.5 at h=128-512).
    Both losses are computed in fp32 from the model's bf16 logits."""
    idx, targets = batch
    model = load_plain_gpt(cfg, sd, device=device, dtype=dtype)
    with torch.no_grad():
        logits = model(idx)  # (B, T, vocab)
        flat = logits.float().flatten(0, 1)
        argmax = logits.argmax(dim=-1)
        loss = F.cross_entropy(flat, targets.flatten()).item()
        loss_argmax = F.cross_entropy(flat, argmax.flatten()).item()
    del model, logits, flat
    free_memory()
    return loss, argmax, loss_argmax


def trace_system(system: System, batch, device: torch.device, rank: int, out, stem: str, log) -> None:
    """torch.profiler over 3 steps; rank 0 writes the gzipped chrome trace and, per NCCL kernel of
    the last step, how much of it ran under compute (benchmarks.overlap_sweep.collective_table)."""
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.overlap_sweep import profiled_steps, save_trace

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        profiled_steps(lambda: system.step(*batch))
        if device.type == "cuda":
            torch.cuda.synchronize()
    system.zero_grad()
    if rank != 0 or out is None:
        return
    os.makedirs(out, exist_ok=True)
    frac, total, table = save_trace(prof, os.path.join(out, f"trace_{stem}.json"))
    log(f"{stem}: trace: {frac:.1%} of NCCL kernel time ({total / 1e3:.1f} ms over 3 steps) ran under compute; "
        + table.strip().splitlines()[-1].lstrip("# "))


def run_config(d: Dist, args, cfg: GPTConfig, log) -> dict:
    device = d.device
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    sd = make_master_state_dict(cfg, seed=args.seed, device=device, dtype=dtype)
    fp = fingerprint(sd)
    lo, hi = -d.max_over_ranks([-fp])[0], d.max_over_ranks([fp])[0]
    if lo != hi:
        raise RuntimeError(f"ranks initialised different weights (fingerprints {lo} .. {hi}); "
                           "seeded init must be deterministic on this device")
    batch = make_batch(cfg, batch=args.batch, seq=args.seq, seed=args.seed + 1, device=device)
    ref_loss, argmax_targets, ref_loss_argmax = reference_losses(cfg, sd, batch, device, dtype)
    log(f"reference (eager unsharded GPT, {args.dtype}): loss {ref_loss:.4f}, "
        f"argmax-target loss {ref_loss_argmax:.4f}")

    specs = [s for s in SYSTEMS if s.name in args.system_list]
    rows = {s.name: Row(s.name, s.description) for s in specs}
    systems: dict[str, System] = {}
    options = {"domino_sub_batches": args.domino_sub_batches,
               "oases_sub_batches": args.oases_sub_batches}
    n_per_round = math.ceil(args.steps / args.rounds)

    def build_and_check(spec: SystemSpec) -> None:
        row = rows[spec.name]
        before = allocated(device)
        group = dist.new_group(list(range(d.world)))  # own communicators over the same ranks
        from torch.distributed.device_mesh import DeviceMesh

        mesh = DeviceMesh.from_group(group, device.type, mesh_dim_names=("tp",))
        ctx = BuildContext(cfg=cfg, mesh=mesh, device=device, dtype=dtype, state_dict=sd,
                           example=batch, backend=args.backend, options=options)
        t0 = time.perf_counter()
        ok, err, system = guarded(d, "build", lambda: _resolve(spec.builder)(ctx))
        row.build_s = time.perf_counter() - t0
        if not ok:
            row.status = err
            log(f"{spec.name}: {err}")
            return
        row.notes = system.notes

        def check():
            loss = _loss_value(system.step(*batch))
            loss_argmax = _loss_value(system.step(batch[0], argmax_targets))
            return loss, loss_argmax

        t0 = time.perf_counter()
        ok, err, losses = guarded(d, "first steps", check)
        row.first_steps_s = time.perf_counter() - t0
        if not ok:
            row.status = err
            log(f"{spec.name}: {err}")
            system.close()
            return
        row.loss, row.loss_argmax = losses
        row.loss_diff, row.loss_argmax_diff = row.loss - ref_loss, row.loss_argmax - ref_loss_argmax
        if spec.loss_checked:
            row.loss_ok = max(abs(row.loss_diff), abs(row.loss_argmax_diff)) <= args.loss_tol
        counter = getattr(system, "async_tp_counter", None)
        if counter is not None:
            row.extra["async_tp_graphs_seen"] = counter.graphs
            row.extra["async_tp_fused"] = counter.fused
            row.extra["async_tp_unfused_collectives"] = counter.unfused
            row.notes += (f"; async-TP rewrites in {counter.graphs} graphs: {counter.fused} "
                          f"fused, {counter.unfused} all-gather/reduce-scatter left"
                          if counter.graphs else
                          "; async-TP rewrites unknown (Inductor cache hit; "
                          "TORCHINDUCTOR_FX_GRAPH_CACHE=0 TORCHINDUCTOR_AUTOGRAD_CACHE=0 to count)")
        explain = getattr(system, "explain", None)
        if callable(explain):
            try:
                row.extra["explain"] = str(explain())[:20000]
            except Exception as e:  # noqa: BLE001 - explain is informational
                row.extra["explain"] = f"explain() failed: {_first_line(e)}"
        system.zero_grad()
        row.resident_bytes = allocated(device) - before
        check_txt = ("not checked (collectives skipped by design)" if row.loss_ok is None else
                     "OK" if row.loss_ok else f"MISMATCH (tol {args.loss_tol})")
        log(f"{spec.name}: built in {row.build_s:.1f} s, first steps {row.first_steps_s:.1f} s; "
            f"loss {row.loss:.4f} (Δ {row.loss_diff:+.4f}), argmax-target loss "
            f"{row.loss_argmax:.4f} (Δ {row.loss_argmax_diff:+.4f}): {check_txt}")
        systems[spec.name] = system

    def run_block(name: str, n: int, measure_memory: bool) -> None:
        system, row = systems[name], rows[name]
        d.barrier()
        if measure_memory and device.type == "cuda":
            base = allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        ok, err, times = guarded(d, "timed steps", lambda: time_steps(system, batch, n, device))
        if ok and measure_memory and device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) - base + row.resident_bytes
            row.peak_bytes = int(d.max_over_ranks([float(peak)])[0])
        system.zero_grad()
        if not ok:
            row.status = err
            log(f"{name}: {err}")
            system.close()
            del systems[name]
            return
        row.step_ms += d.max_over_ranks(times)  # a TP step is as slow as its slowest rank

    def warm(name: str) -> None:
        if args.warmup > 0:
            ok, err, _ = guarded(d, "warm-up", lambda: time_steps(systems[name], batch,
                                                                    args.warmup, device))
            systems[name].zero_grad()
            if not ok:
                rows[name].status = err
                log(f"{name}: {err}")
                systems.pop(name).close()

    if args.schedule == "interleaved":
        for spec in specs:
            build_and_check(spec)
        for name in list(systems):
            warm(name)
        for r in range(args.rounds):
            names = list(systems)
            names = names[r % len(names):] + names[:r % len(names)] if names else names
            for name in names:  # rotated each round: no system always follows the same one
                run_block(name, n_per_round, measure_memory=(r == 0))
    else:
        for spec in specs:
            build_and_check(spec)
            if spec.name in systems:
                warm(spec.name)
            for r in range(args.rounds):
                if spec.name in systems:
                    run_block(spec.name, n_per_round, measure_memory=(r == 0))
            if spec.name in systems:
                systems.pop(spec.name).close()
    for name in args.trace_list:
        if name in systems:
            ok, err, _ = guarded(d, "trace", lambda: trace_system(systems[name], batch, device, d.rank,
                                                                  args.out, f"{name}_h{cfg.n_embd}", log))
            if not ok:
                log(f"{name}: trace {err}")
    for system in systems.values():
        system.close()
    systems.clear()
    free_memory()

    tokens = args.batch * args.seq
    fpt = flops_per_token(cfg, args.seq)
    for row in rows.values():
        if row.step_ms and row.status == "ok":
            row.step_ms_median = statistics.median(row.step_ms)
            row.tokens_per_s = tokens / (row.step_ms_median / 1e3)
            row.tflops_per_gpu = fpt * tokens / (row.step_ms_median / 1e3) / d.world / 1e12
        elif row.status == "ok":
            row.status = "no timing"
    derive_relative(rows, args.baseline)
    if args.baseline not in rows or rows[args.baseline].step_ms_median is None:
        log(f"no speedup column: baseline {args.baseline!r} has no timing (--baseline to change)")
    return dict(
        hidden=cfg.n_embd, layers=cfg.n_layer, heads=cfg.n_head, seq=args.seq, batch=args.batch,
        vocab=cfg.vocab_size, dtype=args.dtype, tp=d.world, flops_per_token=fpt,
        reference_loss=ref_loss, reference_loss_argmax=ref_loss_argmax, loss_tol=args.loss_tol,
        baseline=args.baseline, rows=[row.__dict__ for row in rows.values()],
    )


def derive_relative(rows: dict, baseline: str) -> None:
    """speedup = T_baseline / T; hidden share = (T_baseline - T) / (T_baseline - T_floor): the
    fraction of the baseline's communication-caused time that the system removed (1.0 = as fast
    as the no-communication floor; negative = slower than the baseline)."""
    t_base = rows[baseline].step_ms_median if baseline in rows else None
    t_floor = rows["floor"].step_ms_median if "floor" in rows else None
    for row in rows.values():
        t = row.step_ms_median
        if t is None or t_base is None:
            continue
        row.speedup = t_base / t
        if t_floor is not None and t_base > t_floor and row.system != "floor":
            row.hidden_share = (t_base - t) / (t_base - t_floor)


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

COLUMNS = ["system", "step ms", "tokens/s", "TFLOP/s/GPU", "peak GiB", "vs {baseline}",
           "hidden share", "Δloss rand/argmax", "status / notes"]


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def table_rows(config: dict) -> list[list[str]]:
    out = []
    for r in config["rows"]:
        if r["loss_diff"] is None:
            dl = "-"
        else:
            dl = f"{r['loss_diff']:+.3f}/{r['loss_argmax_diff']:+.3f}"
            dl += "" if r["loss_ok"] is None else (" ok" if r["loss_ok"] else " MISMATCH")
        status = r["status"] if r["status"] != "ok" else r["notes"]
        out.append([
            r["system"], _fmt(r["step_ms_median"], ".2f"), _fmt(r["tokens_per_s"], ",.0f"),
            _fmt(r["tflops_per_gpu"], ".1f"),
            _fmt(None if r["peak_bytes"] is None else r["peak_bytes"] / GiB, ".2f"),
            _fmt(r["speedup"], ".3f"), _fmt(r["hidden_share"], ".2f"), dl, status,
        ])
    return out


def config_title(c: dict) -> str:
    return (f"h={c['hidden']} L={c['layers']} heads={c['heads']} b={c['batch']} s={c['seq']} "
            f"vocab={c['vocab']} {c['dtype']} TP={c['tp']}; reference loss "
            f"{c['reference_loss']:.4f}, argmax-target {c['reference_loss_argmax']:.4f}")


def print_table(config: dict, meta: dict) -> None:
    header = [c.format(baseline=config["baseline"]) for c in COLUMNS]
    rows = table_rows(config)
    title = f"{config_title(config)} | {meta['card']} x{config['tp']}, {meta['interconnect']}"
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=title, show_lines=False)
        for i, h in enumerate(header):
            t.add_column(h, justify="left" if i in (0, len(header) - 1) else "right",
                         overflow="fold")
        for r in rows:
            t.add_row(*r)
        Console(width=200).print(t)
    except ImportError:
        print(title)
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def markdown_section(run: dict) -> str:
    m = run["meta"]
    lines = [f"## {m['date']}: {m['card']} x{m['world_size']}, {m['interconnect']}", "",
             f"torch {m['torch']}, NCCL {m['nccl']}, CUDA {m['cuda']}; "
             f"env {', '.join(f'{k}={v}' for k, v in m['env'].items())}", "",
             f"Command: `{m['command']}`", ""]
    for c in run["configs"]:
        header = [h.format(baseline=c["baseline"]) for h in COLUMNS]
        lines += [f"### {config_title(c)}", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        for r in table_rows(c):
            lines.append("| " + " | ".join(x.replace("|", "/") for x in r) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _git_commit() -> Optional[str]:
    """HEAD's commit read from .git (no git command), best effort."""
    try:
        git = Path(__file__).resolve().parent.parent / ".git"
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        if (git / ref).exists():
            return (git / ref).read_text().strip()
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return None


def collect_meta(args, d: Dist) -> dict:
    cuda = d.device.type == "cuda"
    if args.interconnect:
        interconnect = args.interconnect
    elif not cuda:
        interconnect = "gloo (cpu)"
    elif os.environ.get("NCCL_P2P_DISABLE") == "1":
        interconnect = "pcie-class (NCCL_P2P_DISABLE=1)"
    else:
        interconnect = "nvlink (default)"
    nccl = None
    if cuda:
        v = torch.cuda.nccl.version()
        nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    env_keys = ["NCCL_P2P_DISABLE", "NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                "NVSHMEM_DISABLE_NVLS", "CUDA_DEVICE_MAX_CONNECTIONS", "NCCL_ALGO", "NCCL_PROTO"]
    launcher_env = " ".join(f"{k}={v}" for k, v in _ENV_BEFORE.items() if v is not None)
    argv = " ".join(shlex.quote(a) for a in sys.argv[1:])
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        card=torch.cuda.get_device_name(d.device) if cuda else "cpu",
        world_size=d.world, interconnect=interconnect, torch=torch.__version__,
        cuda=torch.version.cuda, nccl=nccl, git_commit=_git_commit(),
        env={k: os.environ[k] for k in env_keys if k in os.environ},
        env_set_by_launcher={k: v for k, v in _ENV_BEFORE.items() if v is not None},
        command=(f"{launcher_env} " if launcher_env else "")
        + f"torchrun --nproc-per-node {d.world} -m benchmarks.harness {argv}",
        backend=args.backend, schedule=args.schedule, steps=args.steps, warmup=args.warmup,
        rounds=args.rounds, seed=args.seed,
    )


def write_results(out_dir: Path, run: dict) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "results.json"
    runs = []
    if json_path.exists():
        old = json.loads(json_path.read_text())
        runs = old if isinstance(old, list) else [old]
    runs.append(run)
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(runs, indent=1, default=str))
    tmp.replace(json_path)
    md_path = out_dir / "RESULTS-fragment.md"
    with md_path.open("a") as f:
        f.write(markdown_section(run) + "\n")
    return json_path, md_path


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def heads_for(hidden: int, head_dim: int, tp: int) -> int:
    """hidden / head_dim heads; tiny smoke-test widths get the fewest heads TP can shard instead
    (h=64 with head dim 64 would give one head, which TP=2 cannot split)."""
    n_head = hidden // head_dim
    if n_head % tp == 0:
        return n_head
    for n in range(tp, hidden + 1, tp):
        if hidden % n == 0:
            return n
    raise ValueError(f"no head count divides hidden={hidden} and is a multiple of tp={tp}")


def main(argv=None) -> int:
    args = parse_args(argv)
    d = init_distributed(args)

    def log(msg: str) -> None:
        if d.rank == 0:
            print(f"[bench] {msg}", flush=True)

    # Each compiled system adds cache entries to shared code objects (TitanBlock.forward is one
    # per system and size); past Dynamo's recompile limit a frame silently runs eager.
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
    meta = collect_meta(args, d)
    log(f"{meta['card']} x{d.world}, {meta['interconnect']}, torch {meta['torch']}, "
        f"NCCL {meta['nccl']}, backend {args.backend}, systems {','.join(args.system_list)}")
    configs = []
    for hidden, layers in zip(args.hidden_sizes, args.layer_counts):
        n_head = heads_for(hidden, args.head_dim, d.world)
        cfg = GPTConfig(vocab_size=args.vocab, block_size=args.seq, n_layer=layers,
                        n_head=n_head, n_embd=hidden, dropout=0.0, bias=True)
        log(f"=== hidden {hidden}, layers {layers}, heads {n_head} "
            f"(head dim {hidden // n_head}) ===")
        config = run_config(d, args, cfg, log)
        configs.append(config)
        # Every system of this size is closed; drop Dynamo's caches so that compiled blocks of
        # the next size neither pile up against the recompile limit nor reuse stale entries.
        torch._dynamo.reset()
        if d.rank == 0:
            print_table(config, meta)
    run = dict(meta=meta, configs=configs)
    if d.rank == 0:
        out = args.out or ("benchmarks/results" if d.device.type == "cuda" else None)
        if out:
            json_path, md_path = write_results(Path(out), run)
            log(f"wrote {json_path} and {md_path}")
        else:
            log("no --out on cpu: nothing written")
    d.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
