"""Capture: one path for every model (plain nn.Module, HF GPT-2, HF Llama): torch.export, non-strict.

Export runs the model on fake tensors and returns an aten training-IR graph that keeps linear,
SDPA and norms whole, with ``meta["val"]`` on every node and parameters as get_attr nodes under
the model's own state_dict names, which is what the sharding passes need.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from oases_fx import _compat
from oases_fx.errors import OasesError


@dataclass
class Traced:
    gm: fx.GraphModule
    """The traced graph (the model's call signature, pytree in/out)."""
    flat_inputs: list
    """The example inputs, flattened in placeholder order."""
    notes: list
    """What tracing changed (shown by explain())."""


@contextlib.contextmanager
def _hf_no_cache(model):
    """HF models must be traced with use_cache=False (a KV cache is not part of training)."""
    cfg = getattr(model, "config", None)
    old = getattr(cfg, "use_cache", None)
    if old:
        cfg.use_cache = False
    try:
        yield bool(old)
    finally:
        if old:
            cfg.use_cache = old


def _refuse_custom_functions(model, calls) -> None:
    """torch.export (non-strict) traces a custom autograd.Function's forward only: its backward
    would be replaced by autograd of the forward's ops, a silently wrong gradient. Refuse instead."""
    seen = {}
    for cls, where in calls:
        # torch.library.custom_op + register_autograd runs through a generated Function that export keeps
        # whole (the custom op is one node, AOTAutograd applies its registered backward): not dropped
        if not cls.__module__.startswith(("oases_fx.", "torch._library.")):
            seen.setdefault(f"{cls.__module__}.{cls.__qualname__}", where)
    if seen:
        what = "; ".join(f"{name} (applied at {where})" for name, where in seen.items())
        raise OasesError(
            f"{type(model).__name__} applies a custom torch.autograd.Function: {what}. torch.export (non-strict) "
            "traces only its forward, so its backward would be silently replaced by autograd of the forward's "
            "ops and the gradients would be wrong. Fix: write the op with differentiable torch ops (its "
            "backward is then derived exactly), or register it as a custom op with its own backward "
            "(torch.library.custom_op + register_autograd), which torch.export keeps whole."
        )


def capture(model: torch.nn.Module, args: tuple, kwargs: dict) -> Traced:
    from oases_fx import loading

    if loading.has_meta_tensors(model) and loading.input_device(args, kwargs).type != "meta":
        # meta-device init or released weights: trace on fake ones (meta inputs: on meta, as the planner CLI)
        with loading.fake_parameters(model, loading.input_device(args, kwargs)):
            return capture(model, args, kwargs)
    notes = []
    mode = loading.fake_mode_of_model(model)
    if mode is not None:  # fake weights: the inputs join their fake mode
        args, kwargs = pytree.tree_map(lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t,
                                       (tuple(args), dict(kwargs)))
    with _hf_no_cache(model) as changed:
        if changed:
            notes.append("traced with config.use_cache=False (no KV cache in training)")
        functions = []
        try:
            with _compat.recording_autograd_functions(functions):
                ep = torch.export.export(model, tuple(args), dict(kwargs), strict=False)
        except Exception as e:  # export's own message says which line; add what to do
            raise OasesError(
                f"could not trace {type(model).__name__} with torch.export (non-strict): "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Fix: make the model's "
                "forward traceable for the given example_inputs (no data-dependent Python control flow "
                "on tensor values), see the full error above."
            ) from e
    _refuse_custom_functions(model, functions)
    gm = ep.module()
    graph = gm.graph
    removed = 0
    for n in list(graph.nodes):
        if n.op == "call_module" and str(n.target).startswith("_guards"):
            graph.erase_node(n)
            removed += 1
        elif n.op == "call_function" and n.target is torch.ops.aten._assert_tensor_metadata.default:
            graph.erase_node(n)
            removed += 1
    for name in [k for k, _ in gm.named_children() if k.startswith("_guards")]:
        delattr(gm, name)
    if removed:
        notes.append(f"removed {removed} export guard/metadata assertion nodes (oases_fx checks inputs itself)")
    graph.lint()
    gm.recompile()
    flat, _ = pytree.tree_flatten((tuple(args), dict(kwargs)))
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(flat):
        flat = [x for x in flat if isinstance(x, torch.Tensor)]
    return Traced(gm=gm, flat_inputs=flat, notes=notes)
