"""shard (ACT): replace sharded parameters by this rank's shard and rewrite shape constants.

Kind: ACT. Precondition: annotate_sharding has tagged the regions (gm.meta["oases"]["regions"]).
Invariant: every node's output on this rank is the traced full tensor's block for this rank along
its placement dim; shape constants (view/reshape/expand sizes, slice bounds, split sizes) are
re-derived from the traced full shapes and placements by each op family's localise
(oases_fx.rules), so head counts and hidden sizes baked into the graph follow the shard. Fused
weights whose output is split (qkv) are sharded per piece (interleaved).

    before:  view(getitem, [2, 16, 4, 8])      W_qkv: (96, 32)
    after:   view(getitem, [2, 16, 2, 8])      W_qkv: (48, 32) = rows [q_r; k_r; v_r]
"""
from __future__ import annotations

import torch
import torch.fx as fx

from oases_fx import meta
from oases_fx.errors import ShardingError, describe
from oases_fx.rules import SPLIT_OPS, family_of, kv_slice_bounds, localise, split_dim

aten = torch.ops.aten


def shard_tensor(full: torch.Tensor, dim: int, rank: int, tp: int, pieces=None) -> torch.Tensor:
    """Rank's block of `full` along `dim`; with `pieces`, rank's block of each piece, concatenated.
    Always a new tensor (never a view of `full`), so the full tensor can be freed."""
    if pieces:
        return torch.cat([p.chunk(tp, dim)[rank] for p in full.split(list(pieces), dim)], dim).contiguous()
    return full.chunk(tp, dim)[rank].clone(memory_format=torch.contiguous_format)


def unshard_tensors(shards: list, dim: int, pieces=None) -> torch.Tensor:
    """Inverse of shard_tensor over all ranks' shards (rank order)."""
    if pieces:
        tp = len(shards)
        local = [p // tp for p in pieces]
        per_rank = [s.split(local, dim) for s in shards]
        return torch.cat([torch.cat([pr[i] for pr in per_rank], dim) for i in range(len(pieces))], dim)
    return torch.cat(shards, dim)


def _placement_dim(text):
    return None if text in (None, "R", "P") else int(text[2:-1])


def _set_attr(gm: fx.GraphModule, fqn: str, value: torch.Tensor) -> None:
    mod_path, _, leaf = fqn.rpartition(".")
    mod = gm.get_submodule(mod_path) if mod_path else gm
    old = getattr(mod, leaf)
    if isinstance(old, torch.nn.Parameter):
        setattr(mod, leaf, torch.nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        mod.register_buffer(leaf, value)


def shard_pass(gm: fx.GraphModule, *, rank: int, tp: int) -> fx.GraphModule:
    """Replace parameters by local shards and rewrite shape arguments (ACT).

    A region of degree d (RegionMatch.degree, default tp) is sharded d-ways with shard index
    rank % d (d=1: weights stay full); below tp its batch also shrinks by n = tp/d (the
    batch_scatter insert_collectives puts on its inputs), so the batch dim of its view/expand
    constants is divided by n too (batch dims from gm.meta["oases"]["batch_dims"]).
    gm.meta["oases"]["param_degree"] records d for every parameter of a sharded region."""
    gm_meta = gm.meta.setdefault("oases", {})
    sharded = gm_meta.setdefault("sharded_params", {})
    degree_of = gm_meta.setdefault("param_degree", {})
    rewrites = gm_meta.setdefault("rewrites", [])
    batch_dims = gm_meta.get("batch_dims", {})
    for region in gm_meta.get("regions", []):
        st = region.state
        d = region.degree or tp
        n_chunks = tp // d
        if n_chunks > 1 and not batch_dims:
            raise AssertionError("shard: a region of degree < tp needs gm.meta['oases']['batch_dims']")
        for w in region.weights() + [b for b in st.bias_dim]:
            rec = meta.get(w)
            dim = _placement_dim(rec.placement)
            if dim is None or w.target in sharded or w.target in degree_of:
                continue
            degree_of[w.target] = d
            if d == 1:
                continue  # one shard: the full weight
            full = gm.get_parameter(w.target) if _is_param(gm, w.target) else gm.get_buffer(w.target)
            if full.shape[dim] % d:
                raise AssertionError(f"{w.target}: dim {dim} of {tuple(full.shape)} not divisible by {d}")
            _set_attr(gm, w.target, shard_tensor(full.detach(), dim, rank % d, d, rec.pieces))
            sharded[w.target] = (dim, rec.pieces, tuple(full.shape))
        head_slices = _slice_replicated_heads(gm, region, rank % d, d, batch_dims, rewrites)
        for n in region.nodes:
            if n in head_slices:
                continue  # already this rank's heads
            fam = family_of(n.target) if n.op == "call_function" else None
            if fam is None or fam.localise is None:
                continue
            if n.target in SPLIT_OPS and n_chunks > 1 and split_dim(n) == batch_dims.get(n.args[0].name):
                raise ShardingError(f"{describe(n)} splits the batch dim inside region '{region.name}', "
                                    f"which runs at TMP degree {d} on 1/{n_chunks} of the batch. Fix: run "
                                    "this region at the full TMP degree (tp_degree=None in its RegionPlan).")
            # The output dims that shrink on this rank: the sharded one by d, and (degree < tp) the
            # batch by n for the ops whose arguments carry it.
            p = st.placement.get(n)
            pd = next((v for v in p if v is not None), None) if isinstance(p, tuple) else p
            divide = {pd: d} if pd is not None else {}
            bdim = batch_dims.get(n.name) if n_chunks > 1 else None
            if bdim is not None and fam.batch_sized:
                divide[bdim] = divide.get(bdim, 1) * n_chunks
            got = localise(n, divide, from_trace=True)
            if got is not None:
                n.args, note = got
                rewrites.append(f"{n.name}: {note}")
    gm.graph.lint()
    gm.recompile()
    return gm


def _slice_replicated_heads(gm, region, rank: int, d: int, batch_dims: dict, rewrites: list) -> None:
    """Key/value projections kept replicated (kv heads < tp): each replicated operand of an attention op
    (propagation's local_slices) is sliced on its heads dim to the heads this rank's q heads read --
    a rank-dependent constant (every rank compiles its own graph). d=1: nothing to slice."""
    st = region.state
    out = set()
    if d == 1:
        return out
    for node, i, dim, q_heads, heads in st.local_slices:
        a = node.args[i]
        start, end = kv_slice_bounds(rank, d, q_heads, heads)
        with gm.graph.inserting_before(node):
            s = gm.graph.call_function(aten.slice.Tensor, (a, dim, start, end))
        s.meta["val"] = a.meta.get("val")  # the traced full shape, as every node of a region keeps
        meta.update(s, region=region.name, placement=f"S({dim})")
        st.placement[s] = dim
        if a.name in batch_dims:
            batch_dims[s.name] = batch_dims[a.name]
        node.args = node.args[:i] + (s,) + node.args[i + 1:]
        region.nodes.insert(region.nodes.index(node), s)
        out.add(s)
        rewrites.append(f"{node.name}: arg {i} ({a.name}, {heads} heads, replicated) sliced to heads [{start}:{end}]")
    return out


def _is_param(gm, fqn):
    try:
        gm.get_parameter(fqn)
        return True
    except AttributeError:
        return False
