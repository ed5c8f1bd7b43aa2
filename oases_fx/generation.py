"""Inference on a compiled model: batches the plan's k does not divide, and Hugging Face generate().

Odd batches: a call whose batch k does not split runs with the largest k' <= k that splits it (and,
for regions below the full TMP degree, k' * tp/d pieces), logged once per new shape, since every
new shape is traced and compiled once anyway. k' = 1 is the unsplit program: exact, only without
the overlap of sub-batches.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional

log = logging.getLogger("oases_fx")


def batch_size_of(args, kwargs) -> Optional[int]:
    """The common leading dim of the tensor inputs (None if there is none or they disagree)."""
    import torch
    import torch.utils._pytree as pytree

    sizes = {t.shape[0] for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() > 0}
    return sizes.pop() if len(sizes) == 1 else None


def plan_for_batch(plan, batch_size: Optional[int], splits, say=None):
    """The plan to compile a call of `batch_size` with: `plan` itself when its k (and every region's
    k * n, `splits` = (region, d, n = tp/d) triples) divides the batch, else the same plan with the
    largest k' < k that does. A batch that no k' fits (a region's n does not divide it) is an
    InputError naming the region (check_batch_splits)."""
    from oases_fx.passes.split_sub_batches import check_batch_splits

    k = plan.num_sub_batches
    if batch_size is None or (k == 1 and not splits):
        return plan

    def fits(kk):
        return batch_size % kk == 0 and all(batch_size % (kk * n) == 0 for _, _, n in splits)

    if fits(k):
        return plan
    for kk in range(k - 1, 0, -1):
        if fits(kk):
            msg = (f"a batch of {batch_size} does not split into the plan's num_sub_batches={k}: this shape runs "
                   f"with k={kk} (the largest that divides it; exact, less overlap)")
            log.info("oases_fx: %s", msg)  # every rank; `say` prints it on rank 0
            if say is not None:
                say(msg)
            return dataclasses.replace(plan, num_sub_batches=kk)
    check_batch_splits(batch_size, 1, splits)  # raises, naming the region whose n does not divide the batch
    raise AssertionError("unreachable: k=1 with no region below the full degree always fits")


def convert_compiled(module, fn, apply):
    """OasesModule._apply (under .to(dtype), .half(), .bfloat16(), .float(), .double(), .to(device)):
    `apply` (nn.Module._apply) converts the shards in place (same Parameter objects, so an optimizer
    built before keeps them); a change of dtype then applies `fn` to the user's (meta) model too and
    bumps the module's conversion epoch, so the next call of each input shape traces and compiles
    again at the new dtype (graphs bake dtypes: casts, mask fill values). Moving to another device is
    an error: the mesh, the process groups and the compiled programs belong to the device compiled on."""
    import torch

    from oases_fx.errors import OasesError

    before = {name: (t.dtype, t.device) for name, t in _tensors(module)}
    probe = [(name, t) for name, t in _tensors(module)][:1]
    if probe:
        moved = fn(torch.empty(0, dtype=probe[0][1].dtype, device=probe[0][1].device))
        if moved.device != probe[0][1].device:
            raise OasesError(
                f"the compiled model lives on {probe[0][1].device} (its mesh, process groups and compiled programs "
                f"do); it cannot be moved to {moved.device} after oases_fx.compile. Fix: move the model (or build it "
                "under torch.device('meta')) and the example inputs to the target device before compile.")
    apply(fn)
    after = {name: (t.dtype, t.device) for name, t in _tensors(module)}
    if after != before:
        module._model._apply(fn)  # the meta model retraces at the new dtype
        module.__dict__["_conversion_epoch"] = module.__dict__.get("_conversion_epoch", 0) + 1
        changed = sorted({f"{str(before[n][0])}->{str(after[n][0])}" for n in before if before[n] != after[n]})
        log.info("oases_fx: parameters converted (%s): the next call of each shape traces and compiles again",
                 ", ".join(changed))
    return module


def _tensors(module):
    return list(module.named_parameters()) + list(module.named_buffers())
