"""Megatron's f/g pair over functional collectives: what insert_collectives puts into the graph.

f (`copy_to_tp`): identity forward, all-reduce of the gradient backward (enters a TMP region).
g (`reduce_from_tp`): all-reduce forward, identity backward (leaves a TMP region).
The functional all_reduce's own autograd would all-reduce the gradient again (FINDINGS 4), so
both directions are written here; their collectives appear in AOTAutograd's forward and
backward graphs as `_c10d_functional.all_reduce` + `wait_tensor`, which the scheduler moves.
"""
from __future__ import annotations

import torch

from oases_fx._compat import c10d_functional


def _all_reduce(x: torch.Tensor, group_name: str) -> torch.Tensor:
    ops = c10d_functional()
    return ops.wait_tensor.default(ops.all_reduce.default(x.contiguous(), "sum", group_name))


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group_name):
        ctx.group_name = group_name
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group_name), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group_name):
        return _all_reduce(x, group_name)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_tp(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """Megatron f: identity forward, gradient all-reduced over the TMP group in backward."""
    return _CopyToTP.apply(x, group_name)


def reduce_from_tp(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """Megatron g: partial sums all-reduced over the TMP group in forward, identity backward."""
    return _ReduceFromTP.apply(x, group_name)


def skip_copy_to_tp(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """f with the collective skipped: for the no-communication floor benchmark only (wrong values)."""
    return x


def skip_reduce_from_tp(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """g with the collective skipped: for the no-communication floor benchmark only (wrong values)."""
    return x


COLLECTIVE_FNS = (copy_to_tp, reduce_from_tp, skip_copy_to_tp, skip_reduce_from_tp)


# --- recomputation (recompute_policy) ----------------------------------------------------------

def _fine_policy(ctx, op, *args, **kwargs):
    """Oases fine-grained recompute: keep every collective's output, recompute the rest, so the
    recomputation in backward needs no communication."""
    from torch.utils.checkpoint import CheckpointPolicy

    ops = c10d_functional()
    if op in (ops.all_reduce.default, ops.all_gather_into_tensor.default, ops.wait_tensor.default):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _fine_context():
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_fine_policy)


def checkpoint_fine(fn, *args):
    """Run fn(*args) under selective checkpointing: collectives saved, everything else recomputed.
    RNG state is stashed and restored by torch.utils.checkpoint (preserve_rng_state), so dropout
    masks in the recomputation equal the forward's."""
    from torch.utils.checkpoint import checkpoint

    return checkpoint(fn, *args, use_reentrant=False, context_fn=_fine_context, preserve_rng_state=True)


def checkpoint_full(fn, *args):
    """Run fn(*args) under full checkpointing: only the inputs are saved (collectives re-run)."""
    from torch.utils.checkpoint import checkpoint

    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True)
