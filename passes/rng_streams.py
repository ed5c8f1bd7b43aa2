"""rng_streams (ACT): random ops inside sharded TMP regions draw per-shard masks.

Kind: ACT. Precondition: annotate_sharding and shard have run (placements known, shapes local);
runs after split_sub_batches (each sub-batch copy draws its own mask) and before recompute_policy
(its checkpoints replay the rewritten op). Invariant: replicated and partial-sum nodes keep the shared stream
untouched (a partial sum may share its mask: mask*(a+b) = mask*a + mask*b); a random op whose
output is sharded on dim d is replaced by oases_fx.rng's version, which draws the full tensor's
mask from the shared stream and keeps this rank's slice (see oases_fx/rng.py for why not
Megatron's per-rank generator). A random op this pass does not know inside a sharded region is a
ShardingError naming it (never the same mask on every shard, silently).

    before:  h = gelu(fc1(x))  # S(2)        d = dropout(h, 0.1, True)
    after:   h = gelu(fc1(x))  # S(2)        d = sharded_dropout(h, 0.1, True, ((2, 2, rank),))
    before:  y = scaled_dot_product_attention(q, k, v, None, 0.1, True)          # S(1), heads
    after:   y = sharded_sdpa_dropout(q, k, v, None, 0.1, True, None, False, ((1, 2, rank),))
"""
from __future__ import annotations

import re

import torch
import torch.fx as fx

from oases_fx import meta, rng
from oases_fx.errors import ShardingError, describe

aten = torch.ops.aten
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
_RANDOM = {aten.rand_like.default, aten.randn_like.default, aten.bernoulli.default, aten.bernoulli.p,
           aten.bernoulli_.float, aten.rand.default, aten.randn.default, aten.randint_like.default,
           aten.feature_dropout.default, aten.alpha_dropout.default, aten.feature_alpha_dropout.default}


def _arg(node, i, name, default):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _sharded_dim(node):
    m = re.fullmatch(r"S\((\d+)\)", meta.get(node).placement or "")
    return int(m.group(1)) if m else None


def rng_streams_pass(gm: fx.GraphModule, *, rank: int, tp: int) -> fx.GraphModule:
    """Replace dropout / attention dropout on sharded tensors by per-shard draws."""
    gm_meta = gm.meta.setdefault("oases", {})
    notes = gm_meta.setdefault("notes", [])
    degree = {r.name: (r.degree or tp) for r in gm_meta.get("regions", [])}
    batch_dims = gm_meta.get("batch_dims", {})
    done = []
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or meta.get(n).region is None:
            continue
        dim = _sharded_dim(n)
        if dim is None:
            continue
        if n.target in _RANDOM:
            raise ShardingError(f"random op inside the sharded region {meta.get(n).region}: {describe(n)}: oases_fx "
                                "cannot give its shards independent random numbers. Fix: use nn.Dropout / "
                                "F.dropout there, or move the op out of the region.")
        d = degree.get(meta.get(n).region, tp)
        spec = ((dim, d, rank % d),)
        if d < tp:  # a batch chunk of n = tp/d: its rows are a slice of the full batch too
            spec += ((batch_dims.get(n.name, 0), tp // d, rank // d),)
        if n.target in (aten.dropout.default, aten.native_dropout.default):
            p, train = _arg(n, 1, "p", 0.5), _arg(n, 2, "train", True)
            if not train or p == 0:
                continue
            fn = rng.sharded_dropout if n.target is aten.dropout.default else rng.sharded_native_dropout
            args = (n.args[0], p, train, spec)
        elif n.target is aten.scaled_dot_product_attention.default:
            a = [_arg(n, i, name, None) for i, name in enumerate(_SDPA_ARGS)]
            if not a[4]:
                continue
            args = (*a[:4], float(a[4]), bool(a[5]), n.kwargs.get("scale"), bool(n.kwargs.get("enable_gqa", False)),
                    spec)
            fn = rng.sharded_sdpa_dropout
        else:
            continue
        with gm.graph.inserting_after(n):
            new = gm.graph.call_function(fn, args)
        new.meta = dict(n.meta)
        n.replace_all_uses_with(new)
        gm.graph.erase_node(n)
        done.append(f"{new.name} ({meta.get(new).region}, {fn.__name__})")
    if done:
        notes.append(f"per-shard dropout masks (slices of the full mask, shared RNG stream): {', '.join(done)}")
        if any("sdpa" in x for x in done):
            notes.append("attention with dropout in a sharded region runs as math attention (weights materialised); "
                         "attention dropout 0 keeps the fused kernel")
    gm.graph.lint()
    gm.recompile()
    return gm
