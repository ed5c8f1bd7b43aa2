"""recompute_policy (TAG): Oases' fine-grained recomputation through AOTAutograd's own machinery.

Kind: TAG (the marks are made by torch.utils.checkpoint's selective policy, which AOTAutograd
turns into node.meta["recompute"] on the joint graph and its partitioner obeys). Precondition:
insert_collectives (and split_sub_batches, if k > 1) have run. Invariant: values are unchanged;
only what backward keeps versus recomputes changes.

The batch-parallel span (oases_fx.layers.block_span: the first block from its own first op, the
last block through its last) is cut into segments, one per TMP region (its end is the
post-all-reduce output: g plus the row bias; a block's own ops after its last region join that
region's segment, so no segment spans two blocks: split_sub_batches.SegmentCounter), and per
sub-batch. Each (segment, sub-batch) is outlined into a
submodule called under checkpoint:
  - "fine" (Oases): collectives' outputs MUST_SAVE, everything else PREFER_RECOMPUTE, so the
    recomputation in backward needs no communication; segment inputs (outputs of the previous
    segment: post-all-reduce outputs, the residual stream) are saved.
  - "full": plain checkpoint; the forward all-reduces run again in backward.
  - "none": unchanged.
RNG: torch.utils.checkpoint stashes and restores the RNG state (preserve_rng_state=True), and
under torch.compile AOTAutograd's partitioner saves random ops' outputs instead of recomputing
them, so dropout masks in the recomputation equal the forward's (tests check bitwise equality).

    before:  h0 = layer_norm(x0, w, c); f0 = copy_to_tp(h0); q = linear(f0, Wqkv) ... y0 = reduce_from_tp(.)
             z0 = add(y0, b)
    after:   ckpt = checkpoint_fine(oases_ckpt_0_sb0, x0, w, c, Wqkv, ..., b); z0 = getitem(ckpt, 0)
"""
from __future__ import annotations

import torch.fx as fx

from oases_fx import meta, runtime
from oases_fx.meta import graph_meta
from oases_fx.layers import block_span
from oases_fx.passes.graph_utils import outline, stable_topo_sort
from oases_fx.passes.split_sub_batches import SegmentCounter

def recompute_policy_pass(gm: fx.GraphModule, *, policy: str) -> fx.GraphModule:
    """Outline each (TMP segment, sub-batch) under checkpoint with the policy's marks."""
    notes = graph_meta(gm).recompute_notes
    if policy == "none":
        return gm
    wrapper = {"fine": runtime.checkpoint_fine, "full": runtime.checkpoint_full}[policy]
    span = block_span(gm.graph)
    if not span:
        notes.append("no TMP region: nothing to recompute")
        return gm
    activation = set()  # nodes that depend on a graph input (not only on parameters and constants)
    for n in gm.graph.nodes:
        if n.op == "placeholder" or any(a in activation for a in n.all_input_nodes):
            activation.add(n)
    groups: dict = {}
    segments = SegmentCounter(gm.graph)
    for n in span:
        if n.op != "call_function" or meta.get(n).role in ("chunk", "cat"):
            continue
        sb = meta.get(n).sub_batch
        if sb is None and any(meta.get(a).sub_batch is not None for a in n.all_input_nodes):
            continue  # a join of sub-batches: stays outside
        if sb is None and n not in activation:
            continue  # batch-independent (weights, tables): computed once, outside
        stream = -1 if sb is None else sb
        groups.setdefault((segments.at(n, stream), stream), []).append(n)
    for (s, sb), group in sorted(groups.items()):
        outline(gm, group, f"oases_ckpt_{s}_" + ("all" if sb < 0 else f"sb{sb}"), wrapper)
    stable_topo_sort(gm.graph)
    gm.graph.lint()
    gm.recompile()
    notes.append(f"{policy} recompute: {len(groups)} checkpointed segments "
                 f"({len(set(s for s, _ in groups))} per sub-batch)"
                 + ("; collectives' outputs saved, recomputation needs no communication" if policy == "fine" else ""))
    return gm
