"""Configuration: one frozen keyword-only dataclass per concern."""
from __future__ import annotations

import os
from typing import Optional
from dataclasses import dataclass, field

BACKENDS = ("inductor", "aot_eager", "eager")
DP_REDUCE = ("ddp", "graph")


@dataclass(frozen=True, kw_only=True)
class CompileConfig:
    backend: str = "inductor"
    """"inductor" (default), "aot_eager" (AOTAutograd without code generation: fast to compile,
    used by most tests) or "eager" (run the rewritten graph directly; for debugging)."""
    skip_collectives: bool = False
    """Replace every TMP collective by a no-op: the no-communication floor for benchmarks only.
    Results are wrong by design. With dp_reduce="graph" the backward graph's dp all-reduces are left
    out too (their bucket copies stay); with dp_reduce="ddp" DDP still reduces, outside the program."""
    disabled_passes: tuple = ()
    """Pass names to switch off (e.g. ("schedule_overlap",)). Each skipped pass is logged."""
    debug: bool = field(default_factory=lambda: os.environ.get("OASES_FX_DEBUG", "") not in ("", "0"))
    """Dump each graph before/after every pass and time the passes (env OASES_FX_DEBUG=1)."""
    schedule: dict = field(default_factory=dict)
    """Options for schedule_overlap (ScheduleOptions fields: max_in_flight, max_extra_live_bytes)."""
    profile: str = "measure"
    """How plan="auto" costs plans: "measure" (profile ops and collectives on this device, cached
    on disk) or "analytical" (roofline constants; no measurement)."""
    planner_degrees: object = "full"
    """TMP degrees plan="auto" may give a sharded region: "full" (default: only the mesh's "tp"
    size, as Megatron does), "all" (every divisor: Oases' per-block degree with data parallelism
    taking the rest), or a tuple of degrees. Default "full" because on 2 x H100 the planner's
    predictions for lower degrees were up to 21 % optimistic and its lower-degree choices ran up to
    17 % slower than its full-degree ones (benchmarks/RESULTS.md, sections 1 and 5)."""
    planner_vocab_parallel: tuple = (False,)
    """Whether plan="auto" may shard the embedding, LM head and loss over the vocabulary: (False,)
    (default: not searched; its cost model is not yet checked on GPUs), (False, True) lets the
    planner decide, (True,) forces it. A Plan with vocab_parallel=True always works."""
    strict: bool = False
    """Make any attention or MLP block the sharding analysis declines (an op without a rule, a
    layout it cannot shard) an error instead of running that block replicated."""
    verbose: bool = True
    """Print progress lines (tracing, planning, compiling) on rank 0."""
    check_inputs: str = "first"
    """Check that the TMP ranks of a group were given the same batch (a checksum gathered over the
    mesh, oases_fx.agreement): "first" (default: the first call of each compiled program), "every"
    (every call; a debug setting, one small all_gather_object per step) or "off"."""
    cudagraphs: bool = False
    """Replay the compiled forward and backward as CUDA graphs (Inductor's cudagraph trees, the
    same as torch.compile's mode="reduce-overhead"): the host issues one graph launch per graph
    instead of every kernel. backend="inductor" only. A graph Inductor declines (CPU tensors, ...)
    runs without; explain() and a logged warning say which and why. As with reduce-overhead, the
    outputs (gradients too) live in the graphs' memory: set gradients to None between steps
    (optimizer.zero_grad()) and clone an output kept past the next call."""
    accumulate_grads: Optional[bool] = None
    """Run each weight gradient's sum over sub-batches as one in-place GEMM accumulation
    (passes/accumulate_grads: no accumulator copy per sub-batch, the op oases_fx::mm_accumulate).
    None (default): on with cudagraphs=True, off without. Measured on one H200 (RESULTS 7.12): it saves
    no device time at h=2048 and costs ~1 ms of host time per step at k=2 (a Python custom op per
    weight), which a host-bound step pays; under CUDA graphs the host cost is replayed away."""
    inductor_options: dict = field(default_factory=dict)
    """Inductor settings for the compiled graphs, as torch.compile's ``options=`` takes them (names
    from ``torch._inductor.list_options()``), e.g. ``{"max_autotune_gemm": True}`` for autotuned GEMMs
    (torch.compile's mode="max-autotune" is this plus ``cudagraphs=True``). Refused: an unknown name,
    a setting oases_fx fixes so that Inductor keeps the overlap schedule's order
    (backend.INDUCTOR_KEEP_ORDER), and "triton.cudagraphs" (use ``cudagraphs=True``, which records
    Inductor's decision). backend="inductor" only."""
    dp_reduce: str = "ddp"
    """How gradients are averaged over a ("dp", "tp") mesh's "dp" axis: "ddp" (default: torch's
    DistributedDataParallel over the local shards; its reducer's buckets start when the compiled
    backward returns, comm hooks work) or "graph" (the all-reduces are inside the compiled backward
    graph, one per bucket, each issued as soon as its last gradient is produced: they overlap the
    rest of the backward; passes/dp_reduce.py). Either way ``model.no_sync()`` accumulates without dp
    traffic and the next backward reduces the accumulated gradient once. Ignored without a dp axis."""
    dp_bucket_mb: float = 25.0
    """Bucket size in MiB of the dp gradient all-reduce (DDP's bucket_cap_mb; both modes)."""
    collective_timeout_s: object = None
    """The bound on waiting in a TMP collective (oases_fx.watchdog). None (default): oases_fx's
    collectives run on the mesh's groups and wait as long as their timeout (init_process_group(
    timeout=...); torch's default 30 min for gloo, 10 min for NCCL). A number of seconds: compile()
    creates oases_fx's own TMP groups (same ranks) with that timeout, for the compiled program's and
    the planner's collectives. Either way a rank whose collective times out raises an OasesError
    naming the peer that failed (and its error) or saying none reported (a skipped backward or
    step). Make it longer than the slowest step and than compilation (a rank may compile while its
    peer waits in the first collective: Inductor can take minutes)."""

    compile_layers: str = "whole"
    """How the rewritten program is handed to torch.compile: "whole" (default: one graph; the
    schedule may overlap a collective with the next block's work) or "reuse" (oases_fx.layers: cut
    per repeated block, parameters as inputs; blocks of the same structure are compiled once and that
    artifact runs each of them, so the first step's compile time does not grow with depth; a
    collective's wait does not cross a block boundary). "each" cuts the same way and compiles every
    piece on its own (the reference for "reuse": same kernels, same values). Ignored by
    backend="eager"; with dp_reduce="graph" on a dp axis the program is compiled whole (logged)."""

    def __post_init__(self):
        if self.compile_layers not in ("whole", "reuse", "each"):
            raise ValueError(f"compile_layers={self.compile_layers!r}: expected 'whole' (one graph), 'reuse' "
                             "(per block, identical blocks compiled once) or 'each' (per block, each compiled)")
        if self.cudagraphs and self.compile_layers != "whole":
            from oases_fx.errors import OasesError

            raise OasesError(f"cudagraphs=True with compile_layers={self.compile_layers!r}: a block's artifact is "
                             "replayed with each block's own parameters, which a CUDA graph would capture by address "
                             "(one recording per block, or none). Fix: compile_layers='whole' with cudagraphs=True, "
                             "or cudagraphs=False.")
        if self.profile not in ("measure", "analytical"):
            raise ValueError(f"profile={self.profile!r}: expected 'measure' or 'analytical'")
        if not (self.planner_degrees in ("full", "all") or (
                isinstance(self.planner_degrees, tuple) and self.planner_degrees
                and all(isinstance(d, int) and d >= 1 for d in self.planner_degrees))):
            raise ValueError(f"planner_degrees={self.planner_degrees!r}: expected 'full', 'all' or a tuple of "
                             "positive TMP degrees")
        if not self.planner_vocab_parallel or not set(self.planner_vocab_parallel) <= {False, True}:
            raise ValueError(f"planner_vocab_parallel={self.planner_vocab_parallel!r}: expected a tuple of bools")
        if self.check_inputs not in ("first", "every", "off"):
            raise ValueError(f"check_inputs={self.check_inputs!r}: expected 'first', 'every' or 'off'")
        if self.collective_timeout_s is not None and not (
                isinstance(self.collective_timeout_s, (int, float)) and not isinstance(self.collective_timeout_s, bool)
                and self.collective_timeout_s > 0):
            raise ValueError(f"collective_timeout_s={self.collective_timeout_s!r}: expected None or a positive number "
                             "of seconds")
        if self.accumulate_grads not in (None, True, False):
            raise ValueError(f"accumulate_grads={self.accumulate_grads!r}: expected None (follow cudagraphs), True "
                             "or False")
        if self.dp_reduce not in DP_REDUCE:
            from oases_fx.errors import OasesError

            raise OasesError(f"dp_reduce={self.dp_reduce!r}: expected one of {DP_REDUCE} ('ddp': torch's DDP "
                             "reduces after the compiled backward; 'graph': bucketed all-reduces inside it)")
        if isinstance(self.dp_bucket_mb, bool) or not isinstance(self.dp_bucket_mb, (int, float)) \
                or not self.dp_bucket_mb > 0:
            from oases_fx.errors import OasesError

            raise OasesError(f"dp_bucket_mb={self.dp_bucket_mb!r}: expected a positive number of MiB (DDP's "
                             "bucket_cap_mb; default 25)")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r}: expected one of {BACKENDS}")
        if self.inductor_options:
            _check_inductor_options(self.inductor_options, self.backend)
        if self.cudagraphs and self.backend != "inductor":
            from oases_fx.errors import OasesError

            raise OasesError(f"cudagraphs=True needs backend='inductor' (got {self.backend!r}): CUDA graphs are "
                             "captured from Inductor's generated code. Fix: backend='inductor', or cudagraphs=False.")


def _check_inductor_options(options, backend: str) -> None:
    """CompileConfig.inductor_options: a dict of known Inductor settings that leave our order alone."""
    import difflib

    from oases_fx.errors import OasesError

    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise OasesError(f"inductor_options={options!r}: expected a dict of Inductor setting names to values, "
                         "e.g. {'max_autotune_gemm': True}")
    if backend != "inductor":
        raise OasesError(f"inductor_options={options!r} with backend={backend!r}: they configure Inductor's code "
                         "generation. Fix: backend='inductor', or drop inductor_options.")
    from torch._inductor import list_options

    from oases_fx.backend import INDUCTOR_KEEP_ORDER

    known = set(list_options())
    for key in options:
        if key == "triton.cudagraphs":
            raise OasesError("inductor_options sets 'triton.cudagraphs'. Fix: cudagraphs=True (oases_fx then "
                             "records, per graph, whether Inductor kept the CUDA graph, and explain() says why not).")
        if key in INDUCTOR_KEEP_ORDER:
            raise OasesError(f"inductor_options sets {key!r}, which oases_fx fixes to "
                             f"{INDUCTOR_KEEP_ORDER[key]!r} so that Inductor keeps the sub-batch overlap schedule's "
                             "order (oases_fx/backend.py INDUCTOR_KEEP_ORDER says why). Fix: drop it; to compare "
                             "without the schedule, use disabled_passes=('schedule_overlap',).")
        if key not in known:
            near = difflib.get_close_matches(key, known, n=3)
            raise OasesError(f"inductor_options: {key!r} is not an Inductor setting"
                             + (f" (did you mean {', '.join(map(repr, near))}?)" if near else "")
                             + ". Fix: a name from torch._inductor.list_options().")
