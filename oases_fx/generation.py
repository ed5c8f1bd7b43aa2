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
