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
    refuse_hooks(model, "the model given to oases_fx.compile, which compile() released (the compiled module runs "
                        "instead of it)")
    if _state["hook"] is None:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        _state["hook"] = register_optimizer_step_pre_hook(_optimizer_step_pre_hook)


# --- module hooks: the compiled program runs none of the model's own -------------------------------

_HOOK_KINDS = (("_forward_pre_hooks", "forward pre-hook"), ("_forward_hooks", "forward hook"),
               ("_backward_pre_hooks", "backward pre-hook"), ("_backward_hooks", "backward hook"))
_REGISTER = ("register_forward_pre_hook", "register_forward_hook", "register_full_backward_pre_hook",
             "register_full_backward_hook", "register_backward_hook")
_HOOK_FIX = ("oases_fx traces the model once (torch.export) and runs the compiled program per step, not the "
             "model's modules: a forward (pre-)hook runs at trace time only (what it returns is compiled in, but "
             "activation logging, counters and other side effects happen once, at compile, never per step), and "
             "backward hooks never run (a hook that changes gradients would be silently lost). Fix: remove them "
             "before oases_fx.compile (handle.remove()); to see activations, return them from the model's "
             "forward; a hook on the compiled module itself (compiled.register_forward_hook) runs on every call.")


_HOOKS_LET_THROUGH = ("oases_fx.", "torch.", "transformers.utils.output_capturing")


def _hook_name(fn) -> str:
    fn = getattr(fn, "__func__", fn)
    return getattr(fn, "__qualname__", None) or type(fn).__qualname__


def check_no_module_hooks(model: nn.Module) -> None:
    """At compile: the model's (and its submodules') hooks would silently not run per step (see _HOOK_FIX).
    Let through: oases_fx's own guards, torch's (torch.nn.utils' weight_norm/spectral_norm pre-hooks compute
    values only, traced exactly) and Hugging Face's output capturing (installed by a first call with
    output_hidden_states/output_attentions; it only collects outputs the traced call returns)."""
    found = []
    for path, mod in model.named_modules():
        for attr, kind in _HOOK_KINDS:
            for fn in getattr(mod, attr, {}).values():
                owner = getattr(getattr(fn, "__func__", fn), "__module__", None) or type(fn).__module__ or ""
                if owner.startswith(_HOOKS_LET_THROUGH):
                    continue
                found.append(f"{kind} {_hook_name(fn)} on {path or '(the root)'!r} ({type(mod).__name__})")
    if found:
        raise OasesError(f"{type(model).__name__} has module hooks the compiled program would not run: "
                         f"{'; '.join(found[:6])}{' ...' if len(found) > 6 else ''}. {_HOOK_FIX}")


def _refuse_hook(mod: nn.Module, path: str, meth: str, where: str):
    bound = getattr(type(mod), meth).__get__(mod)

    def register(*args, **kwargs):
        if _state["retracing"]:  # torch.export's own bookkeeping while the OasesModule retraces
            return bound(*args, **kwargs)
        raise OasesError(f"{meth} on {path or '(the root)'!r} ({type(mod).__name__}) of {where}: the hook would "
                         f"never run. {_HOOK_FIX}")
    return register


def refuse_hooks(root: nn.Module, where: str, *, keep_root: bool = False) -> None:
    """After compile: registering a hook on a module of `root` (the released original, or the compiled
    module's parameter shells) raises instead of returning a handle to a hook that never runs.
    keep_root: the compiled module's own root keeps nn.Module's methods (its hooks run per call)."""
    for path, mod in root.named_modules():
        if keep_root and path == "":
            continue
        for meth in _REGISTER:
            mod.__dict__[meth] = _refuse_hook(mod, path, meth, where)


# --- the released parameters: meta stand-ins that refuse writes --------------------------------------

class ReleasedParameter(nn.Parameter):
    """What compile() leaves in the user's module where a sharded weight was: a meta tensor of the full
    shape. An in-place write to it (``p.copy_``, ``nn.init.*``, ``requires_grad_``, ``p.data = ...``) would
    change nothing the compiled module reads and raise nothing (a meta tensor accepts every op), so writes
    raise OasesError; reads (shape, dtype, empty_like for retracing) pass."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if not _state["retracing"] and (name == "__set__" or (name.endswith("_") and not name.startswith("_"))):
            what = f"setting .{func.__self__.__name__}" if name == "__set__" else f"{name}()"
            shape = next((tuple(a.shape) for a in (*args, *(kwargs or {}).values()) if isinstance(a, ReleasedParameter)),
                         None)
            raise OasesError(
                f"{what} on a parameter of shape {shape} of the model given to oases_fx.compile, which compile() "
                "released: it is a meta stand-in now, so the write would silently change nothing the compiled "
                "module reads. Fix: write through the compiled module: compiled.load_full_state_dict(sd), or "
                "with torch.no_grad(): dict(compiled.named_parameters())[name].copy_(distribute_tensor(full, "
                "p.device_mesh, p.placements)) for a DTensor p; freeze with "
                "dict(compiled.named_parameters())[name].requires_grad_(False) (or on the model before compile).")
        return nn.Parameter.__torch_function__(func, types, args, kwargs or {})
