"""Per-shard random numbers: what rng_streams puts into the graph in place of a sharded random op.

Megatron keeps a second RNG state per TMP rank (its model-parallel RNG tracker: seed + 2718 +
tp_rank) and forks into it around dropout inside TMP regions, so shards draw independent masks
while replicated parts keep the shared stream. A compiled graph cannot swap generator states, so
oases_fx gets the same independence from the shared stream alone: a sharded dropout draws the
mask of the *full* (unsharded) tensor, exactly as the unsharded model's dropout would
(``empty(full).bernoulli_(1 - p)``, the CPU kernel's own recipe), and keeps this rank's slice.
Consequences:
  - shards' masks are independent (they are disjoint slices of one full mask) and every TMP rank's
    generator advances by the same amount, so replicated dropout stays identical across ranks;
  - recomputation replays it like any random op (torch.utils.checkpoint restores the RNG state,
    AOTAutograd saves random ops' outputs), and the same seed gives the same masks on every run;
  - cost: the mask is drawn at full size (tp x the shard's random numbers, freed at once).
Every TMP rank must hold the same generator state (torch.manual_seed(same seed) on every rank, as
Megatron requires of its default stream): compile() checks it (oases_fx.agreement).

Attention with dropout inside a sharded region is computed unfused (math attention, the
(batch, heads, q, k) weights materialised) so that its mask can be drawn the same way.

``spec`` is a tuple of (dim, parts, index): the local tensor is piece ``index`` of ``parts``
along ``dim`` of the full one (the TMP shard, and for a region of degree d < tp its batch chunk).
"""
from __future__ import annotations

import math

import torch


def _full_keep(like: torch.Tensor, p: float, spec) -> torch.Tensor:
    """The keep-mask (1 or 0, scaled by 1/(1-p)) of the full tensor, sliced to `like`'s piece."""
    full = list(like.shape)
    for dim, parts, _ in spec:
        full[dim] *= parts
    noise = torch.empty(full, dtype=like.dtype, device=like.device).bernoulli_(1 - p)
    if p < 1:
        noise.div_(1 - p)
    for dim, parts, index in spec:
        size = like.shape[dim]
        noise = noise.narrow(dim, index * size, size)
    return noise


def sharded_dropout(x: torch.Tensor, p: float, train: bool, spec) -> torch.Tensor:
    """aten.dropout on a shard: this rank's slice of the full tensor's dropout mask."""
    if not train or p == 0:
        return x
    return x * _full_keep(x, p, spec)


def sharded_native_dropout(x: torch.Tensor, p: float, train: bool, spec):
    """aten.native_dropout on a shard: (output, keep mask as bool)."""
    if not train:
        return x, torch.ones_like(x, dtype=torch.bool)
    keep = _full_keep(x, p, spec)
    return x * keep, keep != 0


def sharded_sdpa_dropout(q, k, v, attn_mask, dropout_p: float, is_causal: bool, scale, enable_gqa: bool, spec):
    """scaled_dot_product_attention with dropout on a shard of the heads, as math attention so the
    attention weights' dropout mask is this rank's slice of the full one."""
    L, S = q.size(-2), k.size(-2)
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    if enable_gqa:
        rep = q.size(-3) // k.size(-3)
        k, v = k.repeat_interleave(rep, -3), v.repeat_interleave(rep, -3)
    w = (q @ k.transpose(-2, -1)) * scale  # (B, h, L, S)
    if is_causal:
        causal = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
        w = w.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        w = w.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else w + attn_mask
    w = torch.softmax(w, dim=-1)
    if dropout_p > 0:
        w = w * _full_keep(w, dropout_p, spec)
    return w @ v


RNG_FNS = (sharded_dropout, sharded_native_dropout, sharded_sdpa_dropout)
