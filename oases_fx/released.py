"""The user's original module after compile(): released, and loud about it.

compile() takes ownership of the model, as FSDP's fully_shard does: the full-size weights it
sharded are replaced by meta tensors in the user's module (api._release_full_parameters) and the
trained weights live in the OasesModule. Using the original afterwards used to fail silently:
its state_dict() wrote meta tensors, and an optimizer built from its parameters before compile
stepped tensors that no longer receive gradients. Now:
  - the original's forward(), state_dict() and load_state_dict() raise OasesError (the
    OasesModule's own retracing of the original for new input shapes runs inside
    :func:`retracing`, which lets them through);
  - an optimizer whose param_groups hold any parameter that compile() released (the full tensors
    it replaced, or their meta stand-ins) raises OasesError at its first step(): chosen over a
    check at compile because compile cannot see optimizers, and the step is the first moment
    the mistake matters (one global optimizer step pre-hook, torch.optim's public API; each
    optimizer is checked once per parameter count, so the cost per step is a dict lookup).
"""
from __future__ import annotations

import contextlib
import weakref

import torch.nn as nn

from oases_fx.errors import OasesError

_RELEASED: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()  # id -> released parameter or meta stand-in
_CHECKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # optimizer -> parameter count checked
_state = {"retracing": 0, "hook": None}

_FIX = ("Fix: use the module oases_fx.compile returned (model = oases_fx.compile(model, ...)): call it, build the "
        "optimizer from its parameters(), save with its state_dict() / full_state_dict().")


@contextlib.contextmanager
def retracing():
    """The OasesModule traces the released original again (new input shapes): no guard inside."""
    _state["retracing"] += 1
    try:
        yield
    finally:
        _state["retracing"] -= 1


def _guard(what: str):
    def hook(module, *args, **kwargs):
        if _state["retracing"] or "_oases_module" in module.__dict__:  # our retrace, or generate()'s proxy
            return None
        raise OasesError(f"{type(module).__name__}.{what} was called on the model given to oases_fx.compile, which "
                         "compile() released (its sharded weights are meta tensors now; the trained weights are in "
                         f"the compiled module). {_FIX}")
    return hook


def _optimizer_step_pre_hook(optimizer, args, kwargs):
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if _CHECKED.get(optimizer) == len(params):
        return None
    bad = sum(1 for p in params if _RELEASED.get(id(p)) is p)
    if bad:
        raise OasesError(f"{type(optimizer).__name__}.step(): {bad} of its {len(params)} parameters belong to the model "
                         "given to oases_fx.compile, which compile() released: they never receive gradients, so "
                         "this optimizer would not train the compiled model. Build the optimizer after compile from "
                         f"the compiled module's parameters(). {_FIX}")
    _CHECKED[optimizer] = len(params)
    return None


def guard(model: nn.Module, before: list) -> None:
    """After compile released `model`'s sharded weights: `before` is model.parameters() from before
    the release. Install the guards (see the module docstring)."""
    now = {id(p) for p in model.parameters()}
    for p in before:
        if id(p) not in now:
            _RELEASED[id(p)] = p
    for p in model.parameters():
        if p.is_meta:
            _RELEASED[id(p)] = p
    model.register_forward_pre_hook(_guard("forward()"))
    model.register_state_dict_pre_hook(_guard("state_dict()"))
    model.register_load_state_dict_pre_hook(_guard("load_state_dict()"))
    if _state["hook"] is None:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        _state["hook"] = register_optimizer_step_pre_hook(_optimizer_step_pre_hook)
