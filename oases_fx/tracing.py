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


def capture(model: torch.nn.Module, args: tuple, kwargs: dict) -> Traced:
    from oases_fx import loading

    if loading.has_meta_tensors(model):  # meta-device init or released weights: trace on fake ones
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
        try:
            ep = torch.export.export(model, tuple(args), dict(kwargs), strict=False)
        except Exception as e:  # export's own message says which line; add what to do
            raise OasesError(
                f"could not trace {type(model).__name__} with torch.export (non-strict): "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Fix: make the model's "
                "forward traceable for the given example_inputs (no data-dependent Python control flow "
                "on tensor values), see the full error above."
            ) from e
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
