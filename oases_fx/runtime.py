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


def _all_reduce(x: torch.Tensor, group_name: str, op: str = "sum") -> torch.Tensor:
    ops = c10d_functional()
    return ops.wait_tensor.default(ops.all_reduce.default(x.contiguous(), op, group_name))


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


# --- per-region TMP degree (Oases): the batch split over the cross group ---------------------------
# A region of degree d < T runs on n = T/d chunks of the batch: rank (chunk c, shard s) takes chunk c;
# the n ranks holding shard s form the cross group (group rank order = chunk order).


def _all_gather(x: torch.Tensor, n: int, dim: int, group_name: str) -> torch.Tensor:
    """The n ranks' x concatenated along `dim`, in group-rank order (all_gather_into_tensor
    gathers along dim 0; other dims are re-assembled from its n blocks)."""
    ops = c10d_functional()
    out = ops.wait_tensor.default(ops.all_gather_into_tensor.default(x.contiguous(), n, group_name))
    return out if dim == 0 else torch.cat(out.chunk(n, 0), dim)


def _own_chunk(x: torch.Tensor, n: int, c: int, dim: int) -> torch.Tensor:
    size = x.shape[dim] // n
    return x.narrow(dim, c * size, size)


class _BatchScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, n, c, dim, group_name):
        ctx.args = (n, dim, group_name)
        return _own_chunk(x, n, c, dim).clone()

    @staticmethod
    def backward(ctx, grad):
        n, dim, group_name = ctx.args
        return _all_gather(grad, n, dim, group_name), None, None, None, None


class _BatchGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, n, c, dim, group_name):
        ctx.args = (n, c, dim)
        return _all_gather(x, n, dim, group_name)

    @staticmethod
    def backward(ctx, grad):
        n, c, dim = ctx.args
        return _own_chunk(grad, n, c, dim).contiguous(), None, None, None, None


def batch_scatter(x: torch.Tensor, n: int, c: int, dim: int, group_name: str) -> torch.Tensor:
    """Enter a region of degree d < T: forward x.chunk(n, dim)[c]; backward the n chunks' gradients
    all-gathered along dim over the cross group (every rank held the same full x, the chunks'
    rows are disjoint, so the gathered gradient is the full one)."""
    return _BatchScatter.apply(x, n, c, dim, group_name)


def batch_gather(x: torch.Tensor, n: int, c: int, dim: int, group_name: str) -> torch.Tensor:
    """Leave a region of degree d < T: forward the n chunks all-gathered along dim over the cross
    group; backward this rank's chunk c of the gradient (downstream is replicated, so every rank
    holds the same full gradient)."""
    return _BatchGather.apply(x, n, c, dim, group_name)


def batch_slice(x: torch.Tensor, n: int, c: int, dim: int) -> torch.Tensor:
    """Chunk c of n along dim of an input without gradient (masks, position ids): no collective."""
    return _own_chunk(x, n, c, dim)


def skip_batch_scatter(x: torch.Tensor, n: int, c: int, dim: int, group_name: str) -> torch.Tensor:
    """batch_scatter with the backward gather skipped (floor benchmark only: gradients wrong)."""
    return _own_chunk(x, n, c, dim)


def skip_batch_gather(x: torch.Tensor, n: int, c: int, dim: int, group_name: str) -> torch.Tensor:
    """batch_gather with the collective skipped (floor benchmark only: values wrong, shape right:
    x repeated n times along dim)."""
    reps = [1] * x.dim()
    reps[dim] = n
    return x.repeat(reps)


# --- data parallelism inside the compiled backward (passes/dp_reduce.py) ---------------------------

class _AddToGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, acc):
        ctx.save_for_backward(acc)
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad):
        (acc,) = ctx.saved_tensors
        return grad + acc, None


def add_to_grad(w: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """Identity forward; backward: w's gradient plus `acc` (the gradient accumulated under no_sync), so
    the compiled backward reduces the accumulated and the new gradient in one dp all-reduce."""
    return _AddToGrad.apply(w, acc)


COLLECTIVE_FNS = (copy_to_tp, reduce_from_tp, skip_copy_to_tp, skip_reduce_from_tp,
                  batch_scatter, batch_gather, skip_batch_scatter, skip_batch_gather)


# --- weight-gradient accumulation over sub-batches (accumulate_grads) --------------------------

@torch.library.custom_op("oases_fx::mm_accumulate", mutates_args=())
def mm_accumulate(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """sum_i a[i] @ b[i], accumulated in one buffer: mm for the first term, then addmm_ (beta=1) in
    place. The same GEMM calls as Inductor's addmm chain for mm_0 + mm_1 + ..., without the copy of
    the accumulator into a new output that aten's out-of-place addmm makes before each GEMM."""
    out = torch.mm(a[0], b[0])
    for x, y in zip(a[1:], b[1:]):
        out.addmm_(x, y)
    return out


@mm_accumulate.register_fake
def _(a, b):
    return a[0].new_empty((a[0].shape[0], b[0].shape[1]))  # contiguous, as torch.mm's result

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
