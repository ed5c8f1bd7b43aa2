"""Input checks at the boundary: inputs whose dtype or device does not fit the model's parameters.

Without them a float64 batch for a float32 model, or a batch on another device, reaches Dynamo and
fails there as "Attempt to trace generator" or "Tensor device mismatch", naming neither.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from oases_fx.errors import InputError


@dataclass(frozen=True)
class ParamSignature:
    dtype: Optional[torch.dtype]
    """The floating dtype every floating parameter has (None: mixed dtypes, not checked)."""
    device: Optional[torch.device]
    """The one device of the parameters (None: meta parameters or several devices, not checked)."""

    @staticmethod
    def of(module: nn.Module) -> "ParamSignature":
        params = list(module.parameters())
        dtypes = {p.dtype for p in params if p.is_floating_point()}
        devices = {p.device for p in params}
        return ParamSignature(dtype=dtypes.pop() if len(dtypes) == 1 else None,
                              device=devices.pop() if len(devices) == 1 and not params[0].is_meta else None)


def _name(path) -> str:
    """"positional argument 0", "keyword argument 'input_ids'", with any nesting after it."""
    if len(path) < 2:
        return "input"
    head, first, rest = path[0], path[1], path[2:]
    base = (f"positional argument {first.idx}" if getattr(head, "idx", 1) == 0
            else f"keyword argument {getattr(first, 'key', first)!r}")
    return base + "".join(str(k) for k in rest)


def check_inputs(sig: ParamSignature, args, kwargs, *, what: str) -> None:
    """InputError naming the first input whose device differs from the parameters', or whose
    floating dtype differs from the parameters' (outside autocast, which casts on purpose)."""
    leaves, _ = pytree.tree_flatten_with_path((tuple(args), dict(kwargs)))
    for path, t in leaves:
        if not isinstance(t, torch.Tensor):
            continue
        if sig.device is not None and t.device != sig.device:
            raise InputError(
                f"{what}: input {_name(path)} is on {t.device} but the model's parameters are on {sig.device}. "
                f"Fix: move the inputs to the model's device (x.to('{sig.device}')), or compile a model that "
                f"lives on {t.device}.")
        if (sig.dtype is not None and t.is_floating_point() and t.dtype != sig.dtype
                and not torch.is_autocast_enabled(t.device.type)):
            raise InputError(
                f"{what}: input {_name(path)} is {t.dtype} but the model's parameters are {sig.dtype}. "
                f"Fix: cast the input (x.to({sig.dtype})), or the model (model.to({t.dtype})) before compile.")
