"""The pass runner and the torch.compile backend (AOTAutograd, then Inductor or aot_eager).

Pass lists are built in one place (oases_fx.api) with their options bound; the runner knows
nothing about any pass. The forward and backward graphs that AOTAutograd hands over go through
their own pass lists before code generation; the final graphs are kept for explain() and tests.
"""
from __future__ import annotations

import bisect

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.fx as fx

from oases_fx import _compat
from oases_fx.errors import OasesError

log = logging.getLogger("oases_fx")


@dataclass(frozen=True)
class GraphPass:
    name: str
    fn: Callable  # gm -> gm, options already bound


@dataclass
class PassRecord:
    name: str
    seconds: float
    skipped: bool = False


def run_passes(gm: fx.GraphModule, passes, *, disabled=(), debug=False, stage="", records=None):
    """Apply `passes` in order; a failure says which pass and which passes ran before it."""
    done = []
    for p in passes:
        if p.name in disabled:
            log.warning("oases_fx: pass %s switched off by config", p.name)
            if records is not None:
                records.append(PassRecord(p.name, 0.0, skipped=True))
            continue
        if debug:
            log.warning("oases_fx [%s] before %s:\n%s", stage, p.name, gm.graph)
        t0 = time.perf_counter()
        try:
            gm = p.fn(gm)
        except OasesError:
            raise
        except Exception as e:
            raise RuntimeError(
                f"oases_fx pass {p.name} ({stage}) failed after passes {done}: {type(e).__name__}: {e}"
            ) from e
        dt = time.perf_counter() - t0
        if records is not None:
            records.append(PassRecord(p.name, dt))
        if debug:
            log.warning("oases_fx [%s] after %s (%.3f s):\n%s", stage, p.name, dt, gm.graph)
        done.append(p.name)
    return gm


# Inductor settings that keep our order: no peak-memory reordering, no comm reordering of its own
# (schedule_overlap already placed issue and wait), no fusion across the sub-batches' waits.
INDUCTOR_KEEP_ORDER = {
    "reorder_for_peak_memory": False,
    "reorder_for_compute_comm_overlap": False,
    # Inductor's locality reordering moves kernels next to their consumers, which pulls the
    # sub-batches' work back together and the all-reduce issues later (seen in a GPU trace).
    "reorder_for_locality": False,
    # Horizontal fusion joins kernels that share an input; sub-batch A's and B's residual-add +
    # layer norm share only the norm's weights, and fused into one kernel they make A's next block
    # wait for B's all-reduce (seen in the h=4096 trace: every second all-reduce exposed). Raising
    # the threshold keeps horizontal fusion for kernels sharing >= 1 MiB (vertical fusion is not
    # affected by this setting).
    "score_fusion_memory_threshold": 1 << 20,
}


def inductor_config_patches(*, cudagraphs: bool = False, options: Optional[dict] = None) -> dict:
    """Inductor settings for our forward and backward graphs: the user's ``options``
    (CompileConfig.inductor_options, checked there never to touch the keys below), keep our order,
    and with ``cudagraphs`` replay each graph as a CUDA graph (cudagraph trees, what torch.compile's
    mode="reduce-overhead" sets)."""
    patches = dict(options or {})
    patches.update(INDUCTOR_KEEP_ORDER)
    if cudagraphs:
        patches["triton.cudagraphs"] = True
    return patches


@dataclass(frozen=True)
class CudagraphRecord:
    """Whether Inductor kept CUDA graphs for one compiled graph (it declines some: CPU tensors,
    dynamic shapes, unsupported ops), and why not."""

    stage: str  # "forward" / "backward"
    applied: bool
    reason: str = ""
    devices: tuple = ()


def record_cudagraphs(compiled, kwargs, stage: str, keep: "CompiledGraphs", *, on_entry: bool = True) -> CudagraphRecord:
    """After Inductor's per-graph compile: read whether it kept CUDA graphs (its `cudagraphs` flag,
    which it switches off when it declines) and say so: a warning when the graph runs on a GPU
    (the user asked and does not get it), an info line on CPU (nothing to capture)."""
    flag = kwargs.get("cudagraphs")
    applied = bool(flag) if flag is not None else False
    reason = "" if applied else str(getattr(compiled, "disabled_cudagraphs_reason", "") or (
        "not reported by Inductor" if on_entry else "Inductor switched CUDA graphs off for the whole module "
        "when it declined the forward graph"))
    devices = tuple(sorted(getattr(compiled, "device_types", ()) or ()))
    rec = CudagraphRecord(stage, applied, reason, devices)
    keep.cudagraphs.append(rec)
    if not applied:
        (log.warning if "cuda" in devices else log.info)(
            "oases_fx: cudagraphs=True but Inductor runs the %s graph without CUDA graphs: %s", stage, reason)
    return rec


def _fences(scheduler) -> list:
    """Positions (in Inductor's node order, which is ours) of collective issues and waits."""
    got = getattr(scheduler, "_oases_fences", None)
    if got is None:
        got = sorted(n.min_order for n in scheduler.nodes if _compat.is_collective_or_wait_kernel(n))
        scheduler._oases_fences = got
    return got


def crosses_fence(fences: list, node1, node2) -> bool:
    """True if a collective issue or wait lies strictly between the two (possibly fused) nodes'
    original positions: fusing them would move the earlier node's work past it."""
    lo = min(node1.min_order, node2.min_order)
    hi = max(node1.max_order, node2.max_order)
    i = bisect.bisect_right(fences, lo)
    return i < len(fences) and fences[i] < hi


def keep_sub_batches_apart_choices():
    """An InductorChoices subclass that refuses any fusion across a collective issue or wait.

    Fusing two kernels runs both where the later one was: when a wait lies between them, the
    earlier kernel (sub-batch A's work) waits for the collective too. Seen: sub-batch A's and B's
    layer-norm backward joined through the accumulation of the norm's weight gradient (in the
    generated code; score_fusion_memory_threshold does not stop it), and A's and B's residual-add +
    layer norm (in a GPU trace). None when this torch has no such hook.
    """
    base = _compat.inductor_choices_base()
    if base is None:
        return None

    class KeepSubBatchesApart(base):
        @staticmethod
        def can_fuse(scheduler, node1, node2, shared_data_score):
            if crosses_fence(_fences(scheduler), node1, node2):
                return False
            return base.can_fuse(scheduler, node1, node2, shared_data_score)

    return KeepSubBatchesApart


@dataclass
class CompiledGraphs:
    """The AOTAutograd graphs after our passes (the last compile's), for explain() and tests."""

    forward: list = field(default_factory=list)
    backward: list = field(default_factory=list)
    records: list = field(default_factory=list)
    cudagraphs: list = field(default_factory=list)  # CudagraphRecord per compiled graph (cudagraphs=True)
    param_inputs: tuple = ()
    """Positions of the compiled graph's inputs that are trainable parameters (from dynamo's example
    inputs, the last compile's): the backward's gradient outputs at these positions are the parameters'."""
    on_backward_failure: Optional[Callable] = None
    """exception -> the OasesError to raise instead, or None: set by the OasesModule (oases_fx.watchdog
    names the peer a timed-out collective of the backward waited for)."""


class _GuardedBackward:
    """The compiled backward graph, boxed as AOTAutograd calls it, whose exceptions pass through
    ``keep.on_backward_failure``: a collective of the backward that timed out is raised as the
    OasesError naming the peer and the bound, not gloo's raw timeout from inside autograd. Every
    other attribute is the compiled graph's (Inductor's post-compile steps read and set them)."""

    def __init__(self, inner, keep):
        # in the instance's __dict__: torch wraps the compiled backward (dynamo's disable) with
        # functools.wraps, which copies __dict__, not class attributes
        self.__dict__.update(_inner=inner, _keep=keep, _boxed_call=True)

    def __call__(self, args):
        try:
            return self._inner(args)
        except Exception as e:
            handler = self._keep.on_backward_failure
            err = handler(e) if handler is not None else None
            if err is None:
                raise
            raise err from e

    def __getattr__(self, name):
        return getattr(self.__dict__["_inner"], name)

    def __setattr__(self, name, value):
        setattr(self.__dict__["_inner"], name, value)


def _guard_backward(compiled, keep):
    return _GuardedBackward(compiled, keep) if getattr(compiled, "_boxed_call", False) else compiled


def make_backend(*, backend: str, fw_passes, bw_passes, disabled=(), debug=False, keep: CompiledGraphs,
                 cudagraphs: bool = False, inductor_options: Optional[dict] = None):
    """A torch.compile backend: dynamo graph -> AOTAutograd -> our passes -> Inductor / aot_eager.
    ``cudagraphs``: Inductor replays each compiled graph as a CUDA graph (inductor only);
    ``inductor_options``: further Inductor settings (CompileConfig.inductor_options)."""
    if cudagraphs and backend != "inductor":
        raise OasesError(f"cudagraphs=True needs backend='inductor', not {backend!r}")

    def passes_for(positions: tuple):
        """The pass runner of one dynamo graph's compile: its forward now, its backward lazily at the
        first backward(). ``positions`` (that graph's trainable-parameter inputs) travel in the
        closure, not in ``keep``: a second graph compiled before the first's backward (a recompile
        for another shape or mode, another layer piece) must not hand its positions to the first's
        backward passes (dp_reduce reads them from ``gm.meta[PARAM_INPUTS_KEY]``)."""

        def apply(gm, is_backward):
            gm.meta[PARAM_INPUTS_KEY] = positions
            passes = bw_passes if is_backward else fw_passes
            gm = run_passes(gm, passes, disabled=disabled, debug=debug,
                            stage="backward" if is_backward else "forward", records=keep.records)
            (keep.backward if is_backward else keep.forward).append(gm)
            return gm

        return apply

    partition = _compat.default_partition()
    if backend == "aot_eager":

        def aot_eager_backend(gm, example_inputs, positions):
            apply = passes_for(positions)

            def fw(gm, example_inputs):
                return _compat.make_boxed_func(apply(gm, False).forward)

            def bw(gm, example_inputs):
                return _guard_backward(_compat.make_boxed_func(apply(gm, True).forward), keep)

            return _compat.aot_autograd(fw_compiler=fw, bw_compiler=bw, partition_fn=partition)(gm, example_inputs)

        return _recording_inputs(aot_eager_backend, keep)

    assert backend == "inductor", backend
    inner = _compat.inductor_inner_compile()

    choices_cls = keep_sub_batches_apart_choices()
    if choices_cls is None:
        log.warning("oases_fx: this torch has no Inductor choices hook; kernels of different sub-batches "
                    "may be fused across a collective's wait (less overlap, same values)")
    patches = inductor_config_patches(cudagraphs=cudagraphs, options=inductor_options)

    def inductor_backend(gm, example_inputs, positions):
        apply = passes_for(positions)

        def inner_compile(gm, example_inputs, **kwargs):
            # Called for the forward and, lazily at the first backward(), the backward graph: the
            # fusion fence is installed here so it covers both.
            is_backward = bool(kwargs.get("is_backward", False))
            on_entry = bool(kwargs.get("cudagraphs"))  # one flag for forward and backward: off here if the forward declined
            gm = apply(gm, is_backward)
            if choices_cls is None:
                out = inner(gm, example_inputs, **kwargs)
            else:
                with _compat.inductor_choices_handler(choices_cls()):
                    out = inner(gm, example_inputs, **kwargs)
            if cudagraphs:
                record_cudagraphs(out, kwargs, "backward" if is_backward else "forward", keep, on_entry=on_entry)
            return _guard_backward(out, keep) if is_backward else out

        # No AOTAutograd cache: a hit returns compiled forward/backward code without calling our
        # passes, whose result depends on more than its key sees (the plan's measured link, the
        # schedule options); Inductor's own FX graph cache still applies, keyed on our output.
        with _compat.no_autograd_cache():
            return _compat.inductor_compile_fx(gm, example_inputs, inner_compile=inner_compile,
                                               config_patches=patches)

    return _recording_inputs(inductor_backend, keep)


PARAM_INPUTS_KEY = "oases_param_inputs"
"""gm.meta key of an AOT forward/backward graph: the positions of its dynamo graph's inputs that are
trainable parameters (the backward returns one gradient per input, in input order)."""


def _recording_inputs(backend_fn, keep: CompiledGraphs):
    """The backend: notes which of dynamo's graph inputs are trainable parameters before AOTAutograd
    runs, hands them to this graph's passes (backend_fn's third argument) and keeps the last ones in
    keep.param_inputs (for explain() and tests)."""

    def fn(gm, example_inputs):
        positions = tuple(i for i, t in enumerate(example_inputs)
                          if isinstance(t, torch.nn.Parameter) and t.requires_grad)
        keep.param_inputs = positions
        return backend_fn(gm, example_inputs, positions)

    return fn


def compile_module(gm: fx.GraphModule, backend_fn):
    return torch.compile(gm, backend=backend_fn, fullgraph=True, dynamic=False)


def compile_program(gm: fx.GraphModule, backend_fn, *, layers: str = "whole"):
    """(the compiled program, oases_fx.layers.LayerReport or None). layers="whole": one torch.compile
    of gm; "reuse" / "each": gm cut into pieces per repeated block (oases_fx.layers), identical pieces
    compiled once ("reuse") or every piece on its own ("each")."""
    if layers == "whole":
        return compile_module(gm, backend_fn), None
    from oases_fx import layers as _layers

    return _layers.compile_layers(gm, lambda piece: compile_module(piece, backend_fn), mode=layers)
