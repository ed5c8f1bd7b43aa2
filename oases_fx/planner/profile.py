"""Measure what the cost model needs on the real device: op times, collectives, interference, memory.

- Op times: every compute op of the model at every variant's shapes (sub-batch b/k; sharded or
  replicated), run on real tensors: warm-up, then the median of repeats (CUDA events on GPU,
  perf_counter on CPU); forward under no_grad (compiled graphs record no autograd), backward as
  ``autograd.grad`` of the op's outputs w.r.t. its floating-point inputs (weights included).
  Profile.op_time caps a backward at 2x its forward (2.5x for attention; see backward_cap): the
  eager autograd call's host time would otherwise stand in for the device time of small ops.
- All-reduce: t(bytes) = alpha + beta * bytes, a least-squares fit over log-spaced sizes on the
  actual TMP process group.
- Per-region TMP degrees d < T (Oases): all-reduce on the groups of d consecutive ranks, and
  all-gather and all-reduce on the cross groups of n = T/d ranks (stride d), each fitted the same
  way (Profile.collectives). The all-gather over the whole TMP group is fitted too when the model
  has a vocabulary-parallel LM head whose logits are a graph output. Subgroups are created with
  dist.new_group on every rank of the world, in the same order.
- Interference: a GEMM alone vs while all-reduces run (async_op=True), and all-reduces alone vs
  while GEMMs run; the slowdowns are clamped to [1, 3] (noisy on CPU/gloo).
- Device memory capacity.

All ranks end with the same Profile: each rank measures, the numbers are averaged with an
all_reduce, and rank 0's resulting JSON is broadcast. Profiles are cached on disk
($OASES_FX_CACHE or ~/.cache/oases_fx, under profiles/) keyed by device name, torch version,
TMP degree, the op shapes, the collectives measured and PROFILE_FORMAT; a cache hit is used only
when every rank has it.

On a TMP x data-parallel world, measuring subgroup collectives needs every rank of the world in
measure_profile at once (new_group is collective over the world; compile() profiles on every
rank), and the cache hit is agreed over the world so every TMP group takes the same path.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from oases_fx.mesh import cached_new_group
import torch.fx as fx

from oases_fx.planner.cost_model import ModelSpec
from oases_fx.timeline import AnalyticalCostModel, DeviceConstants

log = logging.getLogger("oases_fx")

PROFILE_FORMAT = 3
"""Bumped when the Profile JSON changes meaning (older cache files are ignored). 3: StepConstants."""


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ProfileOptions:
    warmup: int = 3
    """Untimed runs of each op before timing it."""
    repeats: int = 10
    """Timed runs of each op; the median is kept."""
    collective_sizes_bytes: tuple = tuple(64 * 1024 * 2 ** i for i in range(11))
    """All-reduce message sizes for the alpha-beta fit (default 64 KiB .. 64 MiB, log-spaced)."""
    collective_repeats: int = 5
    """Timed all-reduces per size (median)."""
    interference_gemm_n: int = 4096
    """Square GEMM size for the interference measurement (64..256 is plenty on CPU)."""
    interference_comm_bytes: int = 64 * 1024 * 1024
    """All-reduce size for the interference measurement."""
    interference_gemms: int = 20
    """GEMMs timed per interference repeat."""
    interference_repeats: int = 5
    """Interference repeats (median)."""
    measure_host: bool = False
    """Also measure the host constants (StepConstants.host_*) by timing torch.compile'd
    forward+backward steps of a tiny linear+GELU chain at two depths (two Inductor compiles, tens
    of seconds on a GPU host). Off: StepConstants.analytical()'s host numbers on CUDA, none on CPU
    (there the host is the device)."""
    hold_device: bool = False
    """Time each op behind a hold (GEMMs queued ahead, so the host's dispatch never shows in the
    events): device-only op times. Off by default: on an H200 (2026-12-04) held times predicted the
    h >= 2048 steps 3-6 % low (the hold runs the op at full boost clock, the step does not), unheld
    ones within 5 % in 17 of 27 TP=2 cells (measured during the planner work of 2026-12-04; the raw
    tables were not kept)."""
    copy_bytes: int = 256 * 1024 * 1024
    """Size of the device-to-device copy that measures StepConstants.copy_bw_bytes_per_s."""

    @classmethod
    def for_device(cls, device_type: str) -> "ProfileOptions":
        """Defaults sized for the device: on CPU (gloo) small GEMMs and messages keep profiling
        to a few seconds; on GPUs the full ranges above."""
        if device_type == "cpu":
            return cls(warmup=1, repeats=3, collective_sizes_bytes=tuple(16 * 1024 * 2 ** i for i in range(5)),
                       collective_repeats=3, interference_gemm_n=128, interference_comm_bytes=1024 * 1024,
                       interference_gemms=5, interference_repeats=3, copy_bytes=16 * 1024 * 1024)
        return cls()


@dataclass(frozen=True, kw_only=True)
class StepConstants:
    """Per-step costs that no single op's time holds (cost_model's kernel, copy and host terms).

    All zero (the default) turns the terms off: a profile built by hand prices ops and
    collectives only. analytical_profile uses :meth:`analytical`; measure_profile measures the
    device constants (and, with ProfileOptions.measure_host, the host ones).
    """

    kernel_overhead_us: float = 0.0
    """Device time per kernel beyond its roofline: the gap between back-to-back kernels of one
    stream plus the ramp and tail of a grid. Added per kernel to roofline op times; a measured op
    time already contains it (CUDA events around the op), so there it is added only to kernels
    the profile did not time (split/cat and accumulation copies)."""
    library_kernel_us: float = 0.0
    """Device time per library kernel (cuBLAS GEMM, cuDNN attention) beyond its roofline and
    kernel_overhead_us: a tiled kernel's fixed prologue (descriptors, pipeline fill) and epilogue
    drain, which a flop roofline omits and k sub-batches pay k times. Added to roofline op times
    only (a measured op time already contains it)."""
    host_step_us: float = 0.0
    """Host time of a step that does not grow with its kernels: the compiled module's call path,
    guards, the autograd engine's start and end, gradient hand-over."""
    host_per_kernel_us: float = 0.0
    """Host time per kernel the step issues (Inductor's wrapper line, the launch, the autograd
    node around it). The step is max(device, host_step_us + host_per_kernel_us * kernels): the
    host issues ahead of the device until the device outruns it."""
    host_per_checkpoint_us: float = 0.0
    """Host time per recomputed segment (recompute fine/full: one checkpointed (region, sub-batch)
    each; the checkpoint wrapper's call forward and the recomputation's dispatch backward)."""
    copy_bw_bytes_per_s: float = 0.0
    """Bandwidth of a device-to-device copy (split/cat at the sub-batch span's ends, the
    accumulator copy of the weight-gradient GEMMs for k > 1). 0: copies are not priced."""
    op_times_include_overhead: bool = False
    """The op table's times were measured one op at a time (they include kernel_overhead_us)."""
    source: str = "none"
    """Where the numbers came from (shown by explain and planner_check)."""

    @classmethod
    def analytical(cls, *, mem_bw_bytes_per_s: float = 3.0e12) -> "StepConstants":
        """Defaults, not measured on the machine they are used on.

        kernel_overhead_us = 3 us: NVIDIA H100/H200-class parts run back-to-back kernels of one
        stream 1-2 us apart (launch latency hidden by the queue), plus ~1 us of ramp and tail for a
        grid that does not fill its last wave.
        library_kernel_us = 2.5: fitted (least squares of the relative error, 0.25 us grid) to the
        device time of the CUDA-graph rows (cudagraphs=True: the replays hide the host, so the step
        is the device's) at TP=2, h=2048, k in {1, 2, 4}, L=2, collectives skipped:
        benchmarks/results/rank_bench run2 (k=1, 2, 4) and final1 (k=2, 4; its k=1 row's step
        max/min is 1.9, contaminated). Held out: the other graph rows (TP=2 h=1024 and 4096, TP=4
        h=2048; 10 rows) fall within 2.6 % of the device prediction with it, 4 of 10 within 5 %
        without it (the roofline misses the half-size GEMMs' fixed cost: 7.10 of RESULTS.md).
        host_step_us = 2904, host_per_kernel_us = 17.0, host_per_checkpoint_us = 447: the host's side
        of an Inductor-compiled oases_fx step (torch 2.11, one H200 host). step and per_kernel: the exact
        solve of host = step + per_kernel * kernels (kernels counted by cost_model.price_ops; Inductor
        launches about twice as many, so per_kernel is per *counted* kernel) through the two host-bound
        cells of benchmarks/results/rank_bench/planner14 (TP=2, h=1024, L=2, k=1 and 4, collectives
        skipped, recompute none; 2026-12-04, this code's host path: `planner_check --fit-host`). No step
        time was used. Held out, same day and code: the 4 other TP=2 cells (h=2048/4096, k=1/2;
        s24_split, s24_host_split) within 0.8 % of the step, TP=4 h=1024 k=1 -3.9 %, h=4096 k=2 +2.9 %;
        TP=4 k=4 (h=1024, 2048) host 9.95 / 10.94 ms against TP=2's 7.16 ms: -27 / -40 %, unexplained
        (RESULTS 7.12). per_checkpoint (447) is the earlier fit to run1's 9 TP=2 h=2048 rows (k x
        recompute; the only rows with checkpoints): this code was not re-measured with recompute.
        Host time moves by up to 30 % between runs of one program (RESULTS 7.11).
        The measured profile replaces step and per_kernel with the host probe's
        (ProfileOptions.measure_host). copy_bw = the roofline's memory bandwidth (PLANNER_DEVICE's:
        a measured copy).
        """
        return cls(kernel_overhead_us=3.0, library_kernel_us=2.5, host_step_us=2904.0, host_per_kernel_us=17.0,
                   host_per_checkpoint_us=447.0,
                   copy_bw_bytes_per_s=mem_bw_bytes_per_s, op_times_include_overhead=False,
                   source="analytical defaults (StepConstants.analytical)")


@dataclass(frozen=True, kw_only=True)
class AlphaBeta:
    """t(bytes) = alpha_us + beta_us_per_byte * bytes, fitted to (sizes_bytes, times_us)."""

    alpha_us: float
    """Fixed latency, microseconds (>= 0)."""
    beta_us_per_byte: float
    """Inverse bandwidth, microseconds per byte (> 0)."""
    sizes_bytes: tuple = ()
    """Measured message sizes."""
    times_us: tuple = ()
    """Measured times (median per size, averaged over ranks)."""

    def predict_us(self, nbytes: float) -> float:
        return self.alpha_us + self.beta_us_per_byte * float(nbytes)

    @property
    def bandwidth_gb_s(self) -> float:
        """Algorithm bandwidth bytes / (beta * bytes), GB/s."""
        return 1e-3 / self.beta_us_per_byte if self.beta_us_per_byte > 0 else math.inf


def _ab_dict(ab: AlphaBeta) -> dict:
    d = dataclasses.asdict(ab)
    d["sizes_bytes"], d["times_us"] = list(ab.sizes_bytes), list(ab.times_us)
    return d


def _ab_of(d: dict) -> AlphaBeta:
    d = dict(d)
    d["sizes_bytes"] = tuple(d.get("sizes_bytes", ()))
    d["times_us"] = tuple(d.get("times_us", ()))
    return AlphaBeta(**d)


def collective_key(op: str, ranks: int, *, cross: bool) -> str:
    """Profile.collectives key: "all_reduce:tp2", "all_reduce:cross4", "all_gather:cross2"."""
    return f"{op}:{'cross' if cross else 'tp'}{int(ranks)}"


def _ring_share(op: str, n: int) -> float:
    """Bytes each rank sends per byte of the message (all-gather: of the gathered tensor)."""
    if n <= 1:
        return 0.0
    return 2.0 * (n - 1) / n if op == "all_reduce" else (n - 1) / n


def derived_collective(all_reduce: AlphaBeta, tp: int, op: str, ranks: int) -> AlphaBeta:
    """A collective over ``ranks`` ranks from the TMP group's all-reduce fit, by ring scaling
    of its per-byte term (same link speed, same latency): for profiles that did not measure it."""
    ref = _ring_share("all_reduce", tp)
    if ref <= 0:  # a one-rank TMP group measured no link: the all-reduce's own line
        return AlphaBeta(alpha_us=all_reduce.alpha_us, beta_us_per_byte=all_reduce.beta_us_per_byte)
    beta = all_reduce.beta_us_per_byte * _ring_share(op, ranks) / ref
    return AlphaBeta(alpha_us=all_reduce.alpha_us, beta_us_per_byte=max(beta, MIN_BETA_US_PER_BYTE))


def required_collectives(model: ModelSpec) -> list:
    """collective_key()s the model's described degrees and vocab variant need beyond the TMP
    group's all-reduce, with (op, group layout, ranks): layout "tp" = d consecutive ranks, "cross"
    = n ranks of stride T/n."""
    tp = model.tp
    out = []
    for d in model.described_degrees:
        if d >= tp:
            continue
        n = tp // d
        if d > 1:
            out.append(("all_reduce", "tp", d))
        out.append(("all_gather", "cross", n))
        if n < tp:
            out.append(("all_reduce", "cross", n))
    v = model.vocab
    if v is not None and v.logits_gather_bytes:
        out.append(("all_gather", "cross", tp))
    return sorted(set(out), key=lambda x: (x[0], x[1], x[2]))


MIN_BETA_US_PER_BYTE = 1e-9
"""Floor of the fitted slope: 1e-9 us/B = 1e15 B/s, far above any link, but positive."""


def fit_alpha_beta(sizes_bytes: Sequence[float], times_us: Sequence[float]) -> AlphaBeta:
    """Least squares t = alpha + beta * bytes with alpha >= 0 and beta > 0.

    Weighted by 1/t so that small messages (latency-bound) count as much as large ones. If the
    unconstrained fit has alpha < 0 the line is refitted through the origin; a non-positive
    slope (noise on a fast or single-rank group) is floored at MIN_BETA_US_PER_BYTE.
    """
    import numpy as np

    x = np.asarray(sizes_bytes, dtype=np.float64)
    y = np.asarray(times_us, dtype=np.float64)
    if len(x) < 2 or len(set(x.tolist())) < 2:
        raise ValueError(f"an alpha-beta fit needs at least 2 distinct sizes, got {list(sizes_bytes)}")
    w = 1.0 / np.maximum(y, 1e-6)
    beta, alpha = np.polyfit(x, y, 1, w=w)
    if alpha < 0:
        alpha = 0.0
        beta = float(np.sum(w * w * x * y) / np.sum(w * w * x * x))
    if beta < MIN_BETA_US_PER_BYTE:
        beta = MIN_BETA_US_PER_BYTE
        alpha = max(float(np.sum(w * w * (y - beta * x)) / np.sum(w * w)), 0.0)
    return AlphaBeta(alpha_us=float(alpha), beta_us_per_byte=float(beta),
                     sizes_bytes=tuple(int(s) for s in x), times_us=tuple(float(t) for t in y))


@dataclass(frozen=True, kw_only=True)
class Profile:
    """Measured (or analytical) costs for one device, torch version, TMP degree and model shapes."""

    source: str
    """"measured" or "analytical" (roofline constants, not measured)."""
    device_name: str
    """torch.cuda.get_device_name() (or "cpu-<arch>-<n>cores"; for analytical: the constants)."""
    torch_version: str
    """torch.__version__ of the measuring process."""
    tp_degree: int
    """Size of the TMP group the collectives were timed on."""
    op_us: Mapping
    """Op key (cost_model.OpSpec.key) -> (forward_us, backward_us)."""
    all_reduce: AlphaBeta
    compute_interference: float = 1.0
    """Compute runs this many times slower while an all-reduce runs (>= 1)."""
    comm_interference: float = 1.0
    """An all-reduce runs this many times slower while compute runs (>= 1)."""
    memory_bytes: int
    """Device memory capacity (the smallest over ranks)."""
    collectives: Mapping = field(default_factory=dict)
    """Alpha-beta fits of the other collectives, by collective_key(): "all_reduce:tp<d>" (groups
    of d consecutive ranks), "all_reduce:cross<n>" and "all_gather:cross<n>" (groups of n ranks,
    stride T/n; n = T is the whole TMP group). All-gather bytes are the gathered (output) tensor.
    A missing entry is derived from ``all_reduce`` by ring scaling (derived_collective)."""
    notes: tuple = ()
    """Ops that could not be run at their shapes (timed by the roofline instead), etc."""
    key: str = ""
    """Cache key (device, torch, tp, shapes)."""
    format: int = PROFILE_FORMAT
    """PROFILE_FORMAT of the writer."""
    step: StepConstants = field(default_factory=StepConstants)
    """Kernel, copy and host constants (cost_model's per-step terms); all zero: off."""
    from_cache: bool = field(default=False, compare=False)
    """True when this object was read from the disk cache (not serialised)."""

    def op_time(self, key: str) -> tuple:
        try:
            f, b = self.op_us[key]
        except KeyError:
            raise KeyError(
                f"the {self.source} profile for {self.device_name} (tp={self.tp_degree}) has no time for op "
                f"{key!r}. Fix: measure a profile for this model, batch and k choices "
                "(oases_fx.planner.measure_profile), or use analytical_profile()."
            ) from None
        cap = backward_cap(key)
        if cap is not None and f > 0:
            b = min(b, cap * f)
        return float(f), float(b)

    def capped_backwards(self, keys) -> list:
        """The keys among ``keys`` whose measured backward op_time caps (see backward_cap)."""
        out = []
        for k in dict.fromkeys(keys):
            f, b = self.op_us.get(k, (0.0, 0.0))
            cap = backward_cap(k)
            if cap is not None and f > 0 and b > cap * f:
                out.append(k)
        return out

    def missing(self, keys) -> list:
        return sorted(k for k in keys if k not in self.op_us)

    def missing_collectives(self, model: ModelSpec) -> list:
        """required_collectives of model that this profile did not measure."""
        return [collective_key(op, n, cross=lay == "cross") for op, lay, n in required_collectives(model)
                if collective_key(op, n, cross=lay == "cross") not in self.collectives]

    def collective(self, name: str) -> AlphaBeta:
        """The fit of collective_key ``name``: measured, or derived from the TMP all-reduce."""
        ab = self.collectives.get(name)
        if ab is not None:
            return ab
        op, _, where = name.partition(":")
        n = int(where.lstrip("tpcross"))
        if op == "all_reduce" and n == self.tp_degree:
            return self.all_reduce
        return derived_collective(self.all_reduce, self.tp_degree, op, n)

    def all_reduce_us(self, nbytes: float, ranks: int, *, cross: bool = False) -> float:
        """An all-reduce of nbytes over ``ranks`` ranks (consecutive, or a cross group)."""
        if ranks <= 1 or nbytes <= 0:
            return 0.0
        if ranks == self.tp_degree:
            return self.all_reduce.predict_us(nbytes)
        return self.collective(collective_key("all_reduce", ranks, cross=cross)).predict_us(nbytes)

    def all_gather_us(self, nbytes: float, ranks: int) -> float:
        """An all-gather over a cross group of ``ranks`` ranks; nbytes: the gathered tensor."""
        if ranks <= 1 or nbytes <= 0:
            return 0.0
        return self.collective(collective_key("all_gather", ranks, cross=True)).predict_us(nbytes)

    def label(self) -> str:
        if self.source == "analytical":
            return f"analytical, not measured ({self.device_name})"
        return f"{self.source} on {self.device_name}, torch {self.torch_version}"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("from_cache")
        d["op_us"] = {k: [float(v[0]), float(v[1])] for k, v in sorted(self.op_us.items())}
        d["notes"] = list(self.notes)
        d["all_reduce"]["sizes_bytes"] = list(self.all_reduce.sizes_bytes)
        d["all_reduce"]["times_us"] = list(self.all_reduce.times_us)
        d["collectives"] = {k: _ab_dict(v) for k, v in sorted(self.collectives.items())}
        return d

    @classmethod
    def from_dict(cls, d: dict, *, from_cache: bool = False) -> "Profile":
        d = dict(d)
        ar = dict(d["all_reduce"])
        ar["sizes_bytes"] = tuple(ar.get("sizes_bytes", ()))
        ar["times_us"] = tuple(ar.get("times_us", ()))
        d["all_reduce"] = AlphaBeta(**ar)
        d["collectives"] = {k: _ab_of(v) for k, v in d.get("collectives", {}).items()}
        d["op_us"] = {k: (float(v[0]), float(v[1])) for k, v in d["op_us"].items()}
        d["notes"] = tuple(d.get("notes", ()))
        names = {f.name for f in dataclasses.fields(StepConstants)}
        d["step"] = StepConstants(**{k: v for k, v in dict(d.get("step") or {}).items() if k in names})
        return cls(**d, from_cache=from_cache)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, *, from_cache: bool = False) -> "Profile":
        return cls.from_dict(json.loads(text), from_cache=from_cache)

    def save(self, path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(self.to_json())
        os.replace(tmp, path)  # atomic: ranks sharing a filesystem may write the same file

    @classmethod
    def load(cls, path, *, from_cache: bool = False) -> "Profile":
        return cls.from_json(Path(path).read_text(), from_cache=from_cache)


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where profiles are kept: $OASES_FX_CACHE/profiles or ~/.cache/oases_fx/profiles."""
    root = os.environ.get("OASES_FX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "oases_fx")
    return Path(root) / "profiles"


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_")[:60] or "device"


def profile_key(*, device_name: str, torch_version: str, tp: int, op_keys: Sequence[str],
                collectives: Sequence = ()) -> str:
    """The cache key: device, torch version, TMP degree, the NCCL/CUDA environment that changes
    the interconnect's speed (NCCL_P2P_DISABLE and friends), a digest of the op shapes and of the
    collectives measured (required_collectives), and the profile format."""
    env = sorted((k, v) for k, v in os.environ.items()
                 if k.startswith("NCCL_") or k in ("CUDA_DEVICE_MAX_CONNECTIONS",))
    colls = [collective_key(op, n, cross=lay == "cross") for op, lay, n in collectives]
    digest = hashlib.sha256(json.dumps([sorted(op_keys), env, sorted(colls), PROFILE_FORMAT]).encode()).hexdigest()[:16]
    return f"{_slug(device_name)}-torch{_slug(torch_version)}-tp{tp}-{digest}"


def load_cached_profile(model: ModelSpec, *, device_name: Optional[str] = None) -> Optional[Profile]:
    """A cached measured profile that times every op of ``model`` at its TMP degree, or None.

    With no device_name, any device's profile qualifies (the most recently written wins): the
    CLI plans on a laptop with the profile compile() measured on the GPU machine.
    """
    d = cache_dir()
    if not d.is_dir():
        return None
    keys = model.op_keys()
    if device_name is not None:
        p = d / f"{profile_key(device_name=device_name, torch_version=torch.__version__, tp=model.tp, op_keys=keys, collectives=required_collectives(model))}.json"
        cands = [p] if p.exists() else []
    else:
        cands = sorted(d.glob(f"*-tp{model.tp}-*.json"), key=lambda p: (p.stat().st_mtime, p.name), reverse=True)
    for p in cands:
        try:
            prof = Profile.load(p, from_cache=True)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if prof.format == PROFILE_FORMAT and prof.tp_degree == model.tp and not prof.missing(keys) \
                and not prof.missing_collectives(model):
            return prof
    return None


# ---------------------------------------------------------------------------------------------
# Analytical profile (no device)
# ---------------------------------------------------------------------------------------------

DEFAULT_MEMORY_BYTES = 80 * 1024 ** 3
"""Analytical default device memory: one H100 (80 GiB)."""


def _backward_factor(node: Optional[fx.Node]) -> float:
    # Linear: dgrad + wgrad = 2x forward flops. Attention backward: dQ, dK, dV plus the recomputed
    # scores, the 2.5x timeline.node_flops uses for attention backward ops.
    name = str(getattr(node, "target", ""))
    return 2.5 if "attention" in name else 2.0


def backward_cap(op_key: str) -> Optional[float]:
    """The most a measured backward may cost, as a multiple of the same op's measured forward
    (None: not capped). Profile.op_time applies it.

    Why: the profile times a backward as one eager ``autograd.grad`` call, and the autograd
    engine's host work (~50 us on an H100 host) is longer than the device time of a small
    backward, so small ops measure host time: a dropout(p=0) backward 56 us for a copy, a
    1x2048x1024 linear's backward 196 us against 31 us forward. The compiled backward pays none of
    that (Inductor launches its kernels directly). On the planner-accuracy sweep (RESULTS.md
    section 5, 2 x H100, h=1024-4096) the uncapped profile over-predicted the h=1024 plans by up to
    100 %; with this cap the largest error was 21 %. The factors are the analytical profile's
    flop ratios (no constant fitted): linear dgrad + wgrad = 2x forward, attention 2.5x,
    elementwise and normalisation ops read and write about twice the forward's bytes.
    Embedding backward is a scatter-add whose cost is unrelated to the gather forward: not capped.
    """
    name = op_key.split("(", 1)[0]
    if "embedding" in name:
        return None
    return 2.5 if "attention" in name else 2.0


PLANNER_DEVICE = DeviceConstants(peak_flops=670e12, mem_bw_bytes_per_s=4.0e12)
"""The analytical profile's default device: one H200 (the card oases_fx is benchmarked on), from
microbenchmarks on it (2026-12-04, nvidia-h200 machine, torch 2.11): a bf16 GEMM of 4096^3-8192^3
sustained for 3 s runs at 657-680 TFLOP/s (a 10-product burst: ~790-800, the rate
timeline.DeviceConstants' H100 default uses; a training step is sustained, power-limited work),
and a 256 MiB device-to-device copy moves 4.03 TB/s counting reads and writes. Communication
constants are DeviceConstants' defaults. schedule_overlap keeps timeline's own defaults."""

ATTENTION_FLOPS_PER_S = 350e12
"""Fused (flash) attention throughput at head_dim 64 on an H100/H200-class part, flop/s, forward
and backward alike: FlashAttention-2 and cuDNN's SDPA reach ~300-350 TFLOP/s there (FlashAttention-3
paper, Shah et al. 2024, fig. 5), well under the GEMM peak the roofline uses for matmuls. Causal
attention counts half the flops (timeline.node_flops)."""


def _attention_us(node, c: DeviceConstants) -> Optional[float]:
    """Roofline time of a fused attention op at ATTENTION_FLOPS_PER_S, or None for other ops."""
    from oases_fx.timeline import node_flops, value_bytes

    name = str(getattr(node, "target", ""))
    if "attention" not in name:
        return None
    moved = value_bytes(node) + sum(value_bytes(a) for a in node.all_input_nodes)
    return max(node_flops(node) / ATTENTION_FLOPS_PER_S, moved / c.mem_bw_bytes_per_s) * 1e6


def analytical_profile(model: ModelSpec, *, constants: Optional[DeviceConstants] = None,
                       memory_bytes: int = DEFAULT_MEMORY_BYTES, step: Optional[StepConstants] = None) -> Profile:
    """A Profile from timeline.AnalyticalCostModel's roofline and alpha-beta constants.

    Forward times are the roofline of each op at its variant shapes on ``constants`` (default
    PLANNER_DEVICE; fused attention at ATTENTION_FLOPS_PER_S, not the GEMM peak); backward = 2x
    forward (2.5x for attention).
    step: the per-step constants. Default: StepConstants.analytical() with the default device
    constants; with explicit ``constants`` (another device) its device-side terms only (kernel
    overhead, copies at that memory bandwidth) and no host term: the host numbers are those of
    the default device's host, and a caller describing another machine passes its own.
    Label: "analytical, not measured".
    """
    c = constants or dataclasses.replace(PLANNER_DEVICE, group_size=model.tp)
    if step is None:
        step = StepConstants.analytical(mem_bw_bytes_per_s=c.mem_bw_bytes_per_s)
        if constants is not None:
            step = dataclasses.replace(step, host_step_us=0.0, host_per_kernel_us=0.0, host_per_checkpoint_us=0.0,
                                       source=step.source + ", device terms only (explicit DeviceConstants)")
    cm = AnalyticalCostModel(c)
    op_us = {}
    for o in model.all_ops():
        if o.key in op_us:
            continue
        f = cm.compute_us(o.node) if o.node is not None else 0.0
        att = _attention_us(o.node, c) if o.node is not None else None
        f = att if att is not None else f
        op_us[o.key] = (f, f * _backward_factor(o.node))
    n = max(model.tp, 1)

    def line(op, ranks):
        share = _ring_share(op, ranks)
        return AlphaBeta(alpha_us=c.comm_alpha_us,
                         beta_us_per_byte=max(share / c.comm_bus_bw_bytes_per_s * 1e6, MIN_BETA_US_PER_BYTE))

    ar = line("all_reduce", n)
    colls = {collective_key(op, r, cross=lay == "cross"): line(op, r) for op, lay, r in required_collectives(model)}
    return Profile(
        source="analytical", device_name=f"roofline {c.peak_flops / 1e12:.0f} TFLOP/s, "
        f"{c.mem_bw_bytes_per_s / 1e12:.2f} TB/s, all-reduce {c.comm_bus_bw_bytes_per_s / 1e9:.0f} GB/s busbw",
        torch_version=torch.__version__, tp_degree=model.tp, op_us=op_us, all_reduce=ar,
        compute_interference=c.compute_interference, comm_interference=c.comm_interference,
        memory_bytes=int(memory_bytes), collectives=colls, notes=("analytical cost model constants, not measured",),
        step=step,
    )


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores"


def _device_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return DEFAULT_MEMORY_BYTES


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Timer:
    """Times single calls: CUDA events on GPU, perf_counter on CPU. Microseconds.

    With ``hold`` (ProfileOptions.hold_device), median_us on CUDA times the device alone: the timed
    calls are enqueued behind a hold (GEMMs lasting longer than the host takes to issue them), so
    they run back to back and the events around each see its kernels and the gaps between them,
    not the host's dispatch. Without it, an op whose kernels are shorter than its eager dispatch
    (tens of us) is timed as the dispatch."""

    HOLD_GEMM_N = 2048
    """Square bf16 GEMM the hold is made of (~20-30 us each on an H100/H200)."""

    def __init__(self, device: torch.device, *, hold: bool = False):
        self.device = device
        self.hold = hold
        self._hold_mm = None

    def _hold(self, host_us: float) -> None:
        """Keep the device busy for about 1.5 x host_us (plus 50 us)."""
        if self._hold_mm is None:
            n = self.HOLD_GEMM_N
            a = torch.randn(n, n, device=self.device, dtype=torch.bfloat16)
            c = torch.empty_like(a)
            for _ in range(3):
                torch.mm(a, a, out=c)
            torch.cuda.synchronize(self.device)
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(20):
                torch.mm(a, a, out=c)
            e1.record()
            e1.synchronize()
            self._hold_mm = (a, c, max(e0.elapsed_time(e1) * 1e3 / 20, 1.0))
        a, c, mm_us = self._hold_mm
        for _ in range(min(int(math.ceil((1.5 * host_us + 50.0) / mm_us)), 800)):
            torch.mm(a, a, out=c)

    def median_us(self, fn, *, warmup: int, repeats: int) -> float:
        host = []
        for _ in range(max(warmup, 1)):
            t0 = time.perf_counter()
            fn()
            host.append((time.perf_counter() - t0) * 1e6)
        _sync(self.device)
        times = []
        if self.device.type == "cuda":
            pairs = []
            if self.hold:  # the host's issue time of the timed calls, events included (~5 us a pair)
                self._hold(repeats * (statistics.median(host) + 10.0))
            for _ in range(repeats):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                pairs.append((a, b))
            torch.cuda.synchronize(self.device)
            times = [a.elapsed_time(b) * 1e3 for a, b in pairs]
        else:
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e6)
        return float(statistics.median(times))

    def span_us(self, fn) -> float:
        """One timed call of fn (which may launch many kernels)."""
        _sync(self.device)
        if self.device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            return a.elapsed_time(b) * 1e3
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6


def _materialize(val, device: torch.device):
    if isinstance(val, torch.Tensor):
        shape, dtype = tuple(int(s) for s in val.shape), val.dtype
        if dtype.is_floating_point or dtype.is_complex:
            return torch.randn(shape, dtype=dtype, device=device)
        if dtype == torch.bool:
            return torch.ones(shape, dtype=dtype, device=device)
        return torch.zeros(shape, dtype=dtype, device=device)  # indices: 0 is always in range
    if isinstance(val, (list, tuple)):
        return type(val)(_materialize(v, device) for v in val)
    return val


def _flat_tensors(x) -> list:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for y in x for t in _flat_tensors(y)]
    return []


def _measure_op(node: fx.Node, device: torch.device, timer: _Timer, opts: ProfileOptions) -> tuple:
    """(forward_us, backward_us) of one op at the shapes in its placeholders' meta["val"]."""
    inputs = {a: _materialize(a.meta["val"], device) for a in node.all_input_nodes}
    args = fx.node.map_arg(node.args, lambda a: inputs[a])
    kwargs = fx.node.map_arg(node.kwargs, lambda a: inputs[a])
    if "device" in kwargs:
        kwargs = dict(kwargs, device=device)
    target = node.target
    with torch.no_grad():
        fwd = timer.median_us(lambda: target(*args, **kwargs), warmup=opts.warmup, repeats=opts.repeats)
    mutable = isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable
    leaves = [t for t in _flat_tensors(list(inputs.values())) if t.dtype.is_floating_point]
    if mutable or not leaves:
        return fwd, 0.0
    for t in leaves:
        t.requires_grad_(True)
    outs = [o for o in _flat_tensors(target(*args, **kwargs)) if o.requires_grad]
    if not outs:
        return fwd, 0.0
    grads = [torch.randn_like(o) for o in outs]
    bwd = timer.median_us(
        lambda: torch.autograd.grad(outs, leaves, grads, retain_graph=True, allow_unused=True),
        warmup=opts.warmup, repeats=opts.repeats)
    return fwd, bwd


def _comm_device(group) -> torch.device:
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce_mean(values: list, group, device: torch.device) -> list:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, group=group)
    return (t / dist.get_world_size(group)).tolist()


def _all_reduce_int(value: int, op, group, device: torch.device) -> int:
    t = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=op, group=group)
    return int(t.item())


def _barrier(group, device: torch.device) -> None:
    _all_reduce_int(0, dist.ReduceOp.SUM, group, device)


def _broadcast_text(text: Optional[str], group) -> str:
    obj = [text]
    dist.broadcast_object_list(obj, src=dist.get_global_rank(group, 0), group=group)
    return obj[0]


def _time_all_reduce(x: torch.Tensor, group, timer: _Timer, opts: ProfileOptions, device) -> float:
    times = []
    for i in range(opts.warmup + opts.collective_repeats):
        _barrier(group, device)  # start together: a skewed start would count as collective time
        t = timer.span_us(lambda: dist.all_reduce(x, group=group))
        if i >= opts.warmup:
            times.append(t)
    return float(statistics.median(times))


def _time_all_gather(x: torch.Tensor, out: torch.Tensor, group, timer: _Timer, opts: ProfileOptions,
                     device) -> float:
    def run():
        try:
            dist.all_gather_into_tensor(out, x, group=group)
        except (RuntimeError, NotImplementedError, AttributeError):  # backends without the flat form
            dist.all_gather(list(out.chunk(dist.get_world_size(group))), x, group=group)

    times = []
    for i in range(opts.warmup + opts.collective_repeats):
        _barrier(group, device)
        t = timer.span_us(run)
        if i >= opts.warmup:
            times.append(t)
    return float(statistics.median(times))


def _layout_ranks(tmp_ranks: Sequence[int], layout: str, size: int) -> list:
    """The subgroups of one TMP group: "tp" = blocks of `size` consecutive ranks, "cross" = `size`
    ranks of stride len/size (the ranks holding the same position of their d-group)."""
    T = len(tmp_ranks)
    if layout == "tp":
        return [list(tmp_ranks[i:i + size]) for i in range(0, T, size)]
    stride = T // size
    return [list(tmp_ranks[i::stride]) for i in range(stride)]


def _subgroup(group, layout: str, size: int):
    """This rank's subgroup of ``group`` (dist.new_group is collective over the whole world: every
    rank creates every TMP group's subgroups, in the same order). The whole group for size T."""
    ranks = dist.get_process_group_ranks(group)
    if size == len(ranks):
        return group
    world = dist.get_world_size()
    if world == len(ranks):
        tmp_groups = [tuple(ranks)]
    else:  # a TMP x data-parallel mesh: learn every TMP group (every rank profiles its own)
        everyone = [None] * world
        dist.all_gather_object(everyone, tuple(ranks))
        tmp_groups = sorted(set(everyone))
    me, mine = dist.get_rank(), None
    for tg in tmp_groups:
        for sub in _layout_ranks(tg, layout, size):
            g = cached_new_group(tuple(sub))  # the compiled program reuses these communicators
            if me in sub:
                mine = g
    return mine


def _poll_done(works) -> bool:
    return all(w.is_completed() for w in works)


def _measure_interference(group, device, timer: _Timer, opts: ProfileOptions, dtype, comm_device) -> tuple:
    """(gemm alone, gemm under all-reduce, all-reduce alone, all-reduce under gemm), microseconds.

    Both "under" cases overlap for their whole duration: the concurrent side is sized (and for the
    collective, repeated) to outlast the measured side.
    """
    n = opts.interference_gemm_n
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    x = torch.zeros(max(opts.interference_comm_bytes // dtype.itemsize, 1), dtype=dtype, device=device)
    gemm_us = timer.median_us(lambda: torch.mm(a, b), warmup=opts.warmup, repeats=opts.repeats)
    ar_us = _time_all_reduce(x, group, timer, opts, comm_device)
    gemms = opts.interference_gemms
    # Same number of collectives on every rank, enough to outlast `gemms` GEMMs 1.5 times.
    m = max(1, math.ceil(1.5 * gemms * gemm_us / max(ar_us, 1e-3)))
    m = min(_all_reduce_int(m, dist.ReduceOp.MAX, group, comm_device), 256)

    def run_gemms():
        for _ in range(gemms):
            torch.mm(a, b)

    gemm_alone, gemm_under, ar_alone, ar_under = [], [], [], []
    for _ in range(opts.interference_repeats):
        gemm_alone.append(timer.span_us(run_gemms) / gemms)
        _barrier(group, comm_device)
        _sync(device)
        works = [dist.all_reduce(x, group=group, async_op=True) for _ in range(m)]
        gemm_under.append(timer.span_us(run_gemms) / gemms)
        for w in works:
            w.wait()
        _sync(device)
        # All-reduces alone / under GEMMs, timed on the host by polling their completion.
        for under, out in ((False, ar_alone), (True, ar_under)):
            _barrier(group, comm_device)
            _sync(device)
            t0 = time.perf_counter()
            works = [dist.all_reduce(x, group=group, async_op=True) for _ in range(m)]
            launched = 0
            while not _poll_done(works):
                if under and launched < 100 * gemms:
                    torch.mm(a, b)
                    launched += 1
            out.append((time.perf_counter() - t0) * 1e6 / m)
            for w in works:
                w.wait()
            _sync(device)
    med = statistics.median
    return med(gemm_alone), med(gemm_under), med(ar_alone), med(ar_under)


def _measure_kernel_overhead_us(device: torch.device, timer: "_Timer", n: int = 200) -> float:
    """Device time per kernel of ``n`` back-to-back one-element kernels, replayed from a CUDA graph
    (no host in the way): the launch gap plus the smallest kernel, StepConstants.kernel_overhead_us.
    Without CUDA graphs, the eager launches' device span (an upper bound: the host may gate it).
    0 on CPU (an op's time there has no separate launch)."""
    if device.type != "cuda":
        return 0.0
    x = torch.zeros(1, device=device)

    def kernels():
        for _ in range(n):
            x.add_(1.0)

    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            kernels()
        torch.cuda.current_stream(device).wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            kernels()
        return timer.median_us(g.replay, warmup=2, repeats=5) / n
    except Exception as e:  # no graph capture here (an old driver, a capture-unsafe allocator mode)
        log.info("oases_fx: kernel overhead measured without CUDA graphs (%s: %s)", type(e).__name__, e)
        return timer.median_us(kernels, warmup=1, repeats=3) / n


def _measure_copy_bw(device: torch.device, timer: "_Timer", nbytes: int) -> float:
    """Bytes per second of a device-to-device copy (read + write counted)."""
    x = torch.empty(max(nbytes // 2, 1), dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    us = timer.median_us(lambda: y.copy_(x), warmup=2, repeats=5)
    return 2.0 * x.numel() * x.element_size() / (us * 1e-6) if us > 0 else 0.0


HOST_PROBE_BLOCK_KERNELS = 6
"""Kernels of one linear(+bias) + GELU block of the host probe, by cost_model.price_ops' count:
the linear's GEMM forward and dgrad, wgrad and bias-grad backward (1 + 3), the GELU's fused
pointwise kernel each way (1 + 1)."""


_HOST_PROBE: dict = {}
"""(device, dtype) -> the host probe's result: one pair of compiles per process."""


def _measure_host_constants(device: torch.device, dtype: torch.dtype, depths=(2, 8), repeats: int = 10) -> tuple:
    key = (str(device), dtype)
    if key not in _HOST_PROBE:
        _HOST_PROBE[key] = _probe_host(device, dtype, depths, repeats)
    return _HOST_PROBE[key]


def _probe_host(device: torch.device, dtype: torch.dtype, depths, repeats) -> tuple:
    """(host_step_us, host_per_kernel_us): the host's wall time of a torch.compile'd (Inductor)
    forward + backward of a chain of `depth` linear+GELU blocks at tiny shapes, started with the
    device idle (so the device never gates it: what is timed is issue), at two depths. The slope
    per block over HOST_PROBE_BLOCK_KERNELS is the per-kernel cost; the intercept is the step's."""
    import torch.nn as nn

    times = []
    for depth in depths:
        torch.manual_seed(0)
        m = nn.Sequential(*[nn.Sequential(nn.Linear(64, 64), nn.GELU()) for _ in range(depth)]).to(device, dtype)
        cm = torch.compile(m)
        x = torch.randn(16, 64, device=device, dtype=dtype, requires_grad=True)

        def step():
            for p in m.parameters():
                p.grad = None
            cm(x).sum().backward()

        for _ in range(3):
            step()
        ts = []
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            step()
            ts.append((time.perf_counter() - t0) * 1e6)
        _sync(device)
        times.append(statistics.median(ts))
    per_block = max((times[1] - times[0]) / (depths[1] - depths[0]), 0.0)
    per_kernel = per_block / HOST_PROBE_BLOCK_KERNELS
    return max(times[0] - per_block * depths[0], 0.0), per_kernel


def measure_step_constants(device: torch.device, *, options: "ProfileOptions" = None,
                           dtype: torch.dtype = torch.bfloat16) -> StepConstants:
    """StepConstants measured on this device (one process; measure_profile averages over ranks).

    kernel_overhead_us and copy_bw_bytes_per_s always; the host constants with
    options.measure_host on CUDA, else StepConstants.analytical()'s on CUDA; none on CPU, where
    an op's measured time already is the host's."""
    options = options or ProfileOptions.for_device(device.type)
    timer = _Timer(device)
    ko = _measure_kernel_overhead_us(device, timer)
    bw = _measure_copy_bw(device, timer, options.copy_bytes)
    host = None
    if options.measure_host and device.type == "cuda":  # on CPU the ops' own times hold the host
        try:
            host = _measure_host_constants(device, dtype)
        except Exception as e:  # no working Inductor here: say so, and fall back
            log.warning("oases_fx: host probe failed (%s: %s); analytical host constants used", type(e).__name__, e)
    if host is not None:
        host_step, host_kernel = host
        src = "measured (kernel overhead, copy bandwidth, host probe)"
    elif device.type == "cuda":
        d = StepConstants.analytical()
        host_step, host_kernel = d.host_step_us, d.host_per_kernel_us
        src = "measured (kernel overhead, copy bandwidth); host: analytical defaults"
    else:
        host_step = host_kernel = 0.0
        src = "measured (copy bandwidth); no host term on CPU"
    ckpt = StepConstants.analytical().host_per_checkpoint_us if device.type == "cuda" else 0.0
    return StepConstants(kernel_overhead_us=ko, host_step_us=host_step, host_per_kernel_us=host_kernel,
                         host_per_checkpoint_us=ckpt, copy_bw_bytes_per_s=bw, op_times_include_overhead=True,
                         source=src + ("; host per checkpoint: analytical default" if ckpt else ""))


class _NoBar:
    def update(self, n=1):
        pass

    def set_description(self, s):
        pass


@contextlib.contextmanager
def _progress(total: int, enabled: bool, desc: str):
    """A progress bar: rich if installed, else tqdm, else none."""
    if not enabled:
        yield _NoBar()
        return
    try:
        from rich.progress import Progress

        with Progress(transient=True) as prog:
            task = prog.add_task(desc, total=total)

            class _Bar:
                def update(self, n=1):
                    prog.update(task, advance=n)

                def set_description(self, s):
                    prog.update(task, description=s)

            yield _Bar()
        return
    except ImportError:
        pass
    try:
        from tqdm import tqdm

        with tqdm(total=total, desc=desc, leave=False) as bar:
            yield bar
        return
    except ImportError:
        yield _NoBar()


def _model_dtype(model: ModelSpec) -> torch.dtype:
    for r in model.regions:
        for v in r.variants.values():
            for o in v.ops:
                val = o.node.meta.get("val") if o.node is not None else None
                if isinstance(val, torch.Tensor) and val.dtype.is_floating_point:
                    return val.dtype
    return torch.float32


def measure_profile(model: ModelSpec, *, group=None, device: Optional[torch.device] = None,
                    options: ProfileOptions = ProfileOptions(), cache: bool = True,
                    progress: bool = True) -> Profile:
    """Measure (or read from the cache) the profile of ``model`` on this device and TMP group.

    Collective: call on every rank of ``group`` (default: the world). ``device`` defaults to the
    current CUDA device for an NCCL group, else the CPU. Every rank returns the same Profile.
    """
    if not dist.is_initialized():
        raise RuntimeError(
            "measure_profile needs an initialised process group (the TMP group): collectives are timed "
            "on it. Fix: dist.init_process_group(...) first, or use analytical_profile(model).")
    group = group if group is not None else dist.group.WORLD
    comm_device = _comm_device(group)
    device = torch.device(device) if device is not None else comm_device
    world = dist.get_world_size(group)
    if world != model.tp:
        raise ValueError(f"measure_profile: the group has {world} ranks but the model spec is for tp={model.tp}")
    rank0 = dist.get_rank(group) == 0
    keys = model.op_keys()
    name = _device_name(device)
    colls = required_collectives(model)
    key = profile_key(device_name=name, torch_version=torch.__version__, tp=model.tp, op_keys=keys,
                      collectives=colls)
    path = cache_dir() / f"{key}.json"

    local = None
    if cache and path.exists():
        try:
            local = Profile.load(path, from_cache=True)
            if local.format != PROFILE_FORMAT or local.missing(keys) or local.missing_collectives(model):
                local = None
        except (OSError, ValueError, KeyError, TypeError):
            local = None
    # Agree over the whole world, not only this TMP group: measuring subgroup collectives creates
    # groups with dist.new_group, which every rank of the world must call, so either every TMP
    # group reads its cache or every one measures (a cache on some hosts only must not hang).
    if cache and _all_reduce_int(local is not None, dist.ReduceOp.MIN, None if colls else group, comm_device):
        text = _broadcast_text(local.to_json() if rank0 else None, group)  # bitwise the same everywhere
        return Profile.from_json(text, from_cache=True)

    ops = {}
    for o in model.all_ops():
        ops.setdefault(o.key, o)
    timer = _Timer(device, hold=options.hold_device)
    dtype = _model_dtype(model)
    sizes = list(options.collective_sizes_bytes)
    notes = []
    fallback = AnalyticalCostModel(DeviceConstants(group_size=model.tp))
    values = []
    with _progress(len(ops) + len(sizes) * (1 + len(colls)) + 1, progress and rank0, "oases_fx: profiling") as bar:
        for k in sorted(ops):
            o = ops[k]
            bar.set_description(f"op {k.split('(')[0]}")
            try:
                f, b = _measure_op(o.node, device, timer, options)
            except Exception as e:  # an op that cannot run at the variant shapes (baked constants)
                f = fallback.compute_us(o.node)
                b = f * _backward_factor(o.node)
                notes.append(f"{k[:120]}: not runnable at these shapes ({type(e).__name__}); roofline time used")
            values += [f, b]
            bar.update()
        bar.set_description("all-reduce")
        ar_times = []
        for s in sizes:
            x = torch.zeros(max(s // dtype.itemsize, 1), dtype=dtype, device=device)
            ar_times.append(_time_all_reduce(x, group, timer, options, comm_device))
            bar.update()
        coll_times = []
        for op, layout, n in colls:
            bar.set_description(f"{op} over {n} ranks ({layout})")
            sub = _subgroup(group, layout, n)
            for s in sizes:
                if op == "all_reduce":
                    x = torch.zeros(max(s // dtype.itemsize, 1), dtype=dtype, device=device)
                    coll_times.append(_time_all_reduce(x, sub, timer, options, comm_device))
                else:
                    x = torch.zeros(max(s // dtype.itemsize // n, 1), dtype=dtype, device=device)
                    out = torch.zeros(x.numel() * n, dtype=dtype, device=device)
                    coll_times.append(_time_all_gather(x, out, sub, timer, options, comm_device))
                bar.update()
        bar.set_description("interference")
        intf = _measure_interference(group, device, timer, options, dtype, comm_device)
        bar.update()
        bar.set_description("kernel, copy and host constants")
        sc = measure_step_constants(device, options=options, dtype=dtype)
    sc_values = [sc.kernel_overhead_us, sc.host_step_us, sc.host_per_kernel_us, sc.copy_bw_bytes_per_s]
    avg = _all_reduce_mean(values + ar_times + list(intf) + coll_times + sc_values, group, comm_device)
    sc = dataclasses.replace(sc, **dict(zip(("kernel_overhead_us", "host_step_us", "host_per_kernel_us",
                                             "copy_bw_bytes_per_s"), avg[-4:])))
    avg = avg[:-4]
    mem = _all_reduce_int(_device_memory(device), dist.ReduceOp.MIN, group, comm_device)
    n_ops = len(ops)
    op_us = {k: (avg[2 * i], avg[2 * i + 1]) for i, k in enumerate(sorted(ops))}
    ar_avg = avg[2 * n_ops: 2 * n_ops + len(sizes)]
    base = 2 * n_ops + len(sizes)
    g_alone, g_under, c_alone, c_under = avg[base:base + 4]
    coll_avg = avg[base + 4:]
    fits = {}
    for i, (op, layout, n) in enumerate(colls):
        ts = coll_avg[i * len(sizes):(i + 1) * len(sizes)]
        ss = [max(s // dtype.itemsize // (n if op == "all_gather" else 1), 1) * dtype.itemsize
              * (n if op == "all_gather" else 1) for s in sizes]
        fits[collective_key(op, n, cross=layout == "cross")] = fit_alpha_beta(ss, ts)
    clamp = lambda v: min(max(v, 1.0), 3.0)  # noqa: E731
    notes.append(f"interference: GEMM {g_alone:.1f} us alone, {g_under:.1f} us under all-reduce; "
                 f"all-reduce {c_alone:.1f} us alone, {c_under:.1f} us under GEMMs (clamped to [1, 3])")
    prof = Profile(
        source="measured", device_name=name, torch_version=torch.__version__, tp_degree=model.tp,
        op_us=op_us, all_reduce=fit_alpha_beta([int(s) for s in sizes], ar_avg),
        compute_interference=clamp(g_under / g_alone if g_alone > 0 else 1.0),
        comm_interference=clamp(c_under / c_alone if c_alone > 0 else 1.0),
        memory_bytes=mem, collectives=fits, notes=tuple(notes), key=key, step=sc,
    )
    text = _broadcast_text(prof.to_json() if rank0 else None, group)
    prof = Profile.from_json(text)
    if cache:
        try:
            prof.save(path)
        except OSError as e:  # a read-only home: plan anyway (the profile is the same on all ranks)
            log.warning("oases_fx: profile cache %s not written: %s", path, e)
    return prof


__all__ = ["ProfileOptions", "StepConstants", "PLANNER_DEVICE", "ATTENTION_FLOPS_PER_S", "AlphaBeta", "fit_alpha_beta",
           "Profile", "cache_dir", "profile_key",
           "collective_key", "derived_collective", "required_collectives",
           "load_cached_profile", "analytical_profile", "measure_profile", "measure_step_constants",
           "DEFAULT_MEMORY_BYTES"]
