"""Megatron's vocab-parallel embedding, all-gather of logits and cross-entropy, over functional
collectives: what the vocab_parallel pass puts into the graph.

Each TMP rank s of T holds rows [s*V/T, (s+1)*V/T) of the vocabulary (``vocab_start`` to
``vocab_end``) of the embedding table and of the LM head.

- :func:`vocab_parallel_embedding`: ids outside the rank's rows are looked up as row 0 and their
  output rows zeroed, then the partial outputs are all-reduced (Megatron g: identity backward).
  Ids carry no gradient, so there is no f.
- :func:`gather_from_tp`: all-gather of local logits along the vocab (last) dim in forward, the
  rank's own slice of the gradient in backward. For consumers of the logits other than the loss
  (logits returned to the user): an all-gather of B*S*V elements.
- :func:`vocab_parallel_cross_entropy`: cross-entropy of local logits [N, V/T] against global
  targets [N]: all-reduce MAX of the row max, all-reduce SUM of the sum of exp and of the target
  logit (picked on the rank that owns it). Backward is softmax - onehot on the local shard, scaled
  by the reduction, with no communication. ``ignore_index`` rows count neither in the loss nor in
  the mean's denominator, exactly as ``F.cross_entropy``.

``skip_*`` variants drop the collectives (the benchmark floor of ``skip_collectives=True``):
shapes right, values wrong by design.
"""
from __future__ import annotations

import torch

from oases_fx.runtime import _all_gather, _all_reduce, reduce_from_tp

REDUCTIONS = {0: "none", 1: "mean", 2: "sum"}


# --- embedding --------------------------------------------------------------------------------

def _local_embedding(weight, ids, vocab_start, vocab_end, padding_idx):
    outside = (ids < vocab_start) | (ids >= vocab_end)
    local = torch.where(outside, torch.zeros_like(ids), ids - vocab_start)
    pad = padding_idx - vocab_start if padding_idx >= 0 and vocab_start <= padding_idx < vocab_end else -1
    out = torch.ops.aten.embedding.default(weight, local, pad)
    return out.masked_fill(outside.unsqueeze(-1), 0.0)


def vocab_parallel_embedding(weight, ids, vocab_start: int, vocab_end: int, padding_idx: int, group_name: str):
    """Embedding of global `ids` with this rank's rows `weight` = table[vocab_start:vocab_end]."""
    return reduce_from_tp(_local_embedding(weight, ids, vocab_start, vocab_end, padding_idx), group_name)


def skip_vocab_parallel_embedding(weight, ids, vocab_start: int, vocab_end: int, padding_idx: int, group_name: str):
    """vocab_parallel_embedding without its all-reduce (floor benchmark only; wrong values)."""
    return _local_embedding(weight, ids, vocab_start, vocab_end, padding_idx)


# --- all-gather of logits ---------------------------------------------------------------------

class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, rank, tp, group_name):
        ctx.rank, ctx.local = rank, x.shape[-1]
        return _all_gather(x, tp, x.dim() - 1, group_name)

    @staticmethod
    def backward(ctx, grad):
        return grad.narrow(-1, ctx.rank * ctx.local, ctx.local).contiguous(), None, None, None


def gather_from_tp(x: torch.Tensor, rank: int, tp: int, group_name: str) -> torch.Tensor:
    """All-gather along the last (vocab) dim forward; this rank's slice of the gradient backward."""
    return _GatherFromTP.apply(x, rank, tp, group_name)


def skip_gather_from_tp(x: torch.Tensor, rank: int, tp: int, group_name: str) -> torch.Tensor:
    """gather_from_tp without communication: the local shard repeated T times (floor benchmark only)."""
    return torch.cat([x] * tp, dim=-1)


# --- cross-entropy ----------------------------------------------------------------------------

class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_start, ignore_index, reduction, out_dtype, group_name, skip):
        def reduce(x, op):
            return x if skip else _all_reduce(x, group_name, op)

        x = logits.float() if logits.element_size() < 4 else logits  # half/bf16 computed in fp32
        n_local = x.shape[-1]
        row_max = reduce(x.amax(dim=-1), "max")
        shifted = x - row_max.unsqueeze(-1)
        ignored = target == ignore_index
        owned = (target >= vocab_start) & (target < vocab_start + n_local) & ~ignored
        local_t = torch.where(owned, target - vocab_start, torch.zeros_like(target))
        picked = shifted.gather(-1, local_t.unsqueeze(-1)).squeeze(-1) * owned
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        both = reduce(torch.stack([picked, sum_exp]), "sum")  # one all-reduce for both sums
        picked, sum_exp = both[0], both[1]
        per_row = torch.where(ignored, torch.zeros_like(sum_exp), sum_exp.log() - picked)
        count = (~ignored).sum().to(per_row.dtype)
        if reduction == 0:
            loss = per_row
        elif reduction == 2:
            loss = per_row.sum()
        else:
            loss = per_row.sum() / count
        softmax = exp / sum_exp.unsqueeze(-1)
        ctx.save_for_backward(softmax, local_t, owned, ignored, count)
        ctx.reduction, ctx.in_dtype = reduction, logits.dtype
        # Not loss.to(out_dtype) when the dtype already matches: that returns an alias of an
        # intermediate, and torch 2.11's compiled autograd.Function then hands backward a zero
        # gradient (every gradient from the loss lost; tests/unit/test_vocab_parallel.py checks it).
        return loss if loss.dtype == out_dtype else loss.to(out_dtype)

    @staticmethod
    def backward(ctx, grad):
        softmax, local_t, owned, ignored, count = ctx.saved_tensors
        onehot = torch.zeros_like(softmax).scatter_(-1, local_t.unsqueeze(-1), owned.unsqueeze(-1).to(softmax.dtype))
        g = grad.to(softmax.dtype)
        if ctx.reduction == 0:
            scale = g.unsqueeze(-1)
        elif ctx.reduction == 2:
            scale = g
        else:
            scale = g / count
        grad_in = (softmax - onehot) * scale
        grad_in = grad_in.masked_fill(ignored.unsqueeze(-1), 0.0)
        return grad_in.to(ctx.in_dtype), None, None, None, None, None, None, None


def vocab_parallel_cross_entropy(logits, target, vocab_start: int, ignore_index: int, reduction: int,
                                 out_dtype: torch.dtype, group_name: str):
    """F.cross_entropy(full_logits, target, ignore_index=..., reduction=...) from this rank's
    logits[:, vocab_start:vocab_start + V/T]; reduction is aten's int (0 none, 1 mean, 2 sum)."""
    return _VocabParallelCrossEntropy.apply(logits, target, vocab_start, ignore_index, reduction, out_dtype,
                                            group_name, False)


def skip_vocab_parallel_cross_entropy(logits, target, vocab_start: int, ignore_index: int, reduction: int,
                                      out_dtype: torch.dtype, group_name: str):
    """vocab_parallel_cross_entropy without its all-reduces (floor benchmark only; wrong values)."""
    return _VocabParallelCrossEntropy.apply(logits, target, vocab_start, ignore_index, reduction, out_dtype,
                                            group_name, True)


VOCAB_FNS = (vocab_parallel_embedding, skip_vocab_parallel_embedding, gather_from_tp, skip_gather_from_tp,
             vocab_parallel_cross_entropy, skip_vocab_parallel_cross_entropy)
