"""The one node.meta key oases_fx writes: ``node.meta["oases"]``, a small typed record.

Every pass reads and writes its marks through :func:`get` / :func:`update`; nothing else in
``node.meta`` is owned by oases_fx.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch.fx as fx

KEY = "oases"


@dataclass(frozen=True, kw_only=True)
class OasesMeta:
    region: Optional[str] = None
    """TMP region this node belongs to (e.g. ``"transformer.h.0.attn"``), None outside regions."""
    role: Optional[str] = None
    """What the node is to TMP: "column", "row", "copy_to_tp" (Megatron f),
    "reduce_from_tp" (Megatron g), "row_bias", "chunk", "cat", or for a region of degree d < tp:
    "batch_scatter" / "batch_slice" (its input's batch chunk), "batch_gather" (its output
    re-assembled), "copy_to_cross" (a parameter through f over the cross group); None otherwise."""
    placement: Optional[str] = None
    """Output placement: "R" (replicated), "S(d)" (sharded on dim d over tp), "P" (partial sum)."""
    pieces: Optional[tuple] = None
    """For a column weight whose output is split (fused qkv): the full sizes of the pieces, each
    sharded separately so rank r holds its slice of every piece (interleaved shard)."""
    sub_batch: Optional[int] = None
    """Which sub-batch copy the node computes (split_sub_batches), None outside the split region."""
    recompute: Optional[str] = None
    """Recompute decision: "save" or "recompute" (recompute_policy)."""
    stream: Optional[str] = None
    """Stream the schedule puts the node on: "compute" or "comm" (schedule_overlap)."""
    start_us: Optional[float] = None
    """Predicted start time on its stream, microseconds from graph start (schedule_overlap)."""
    end_us: Optional[float] = None
    """Predicted end time, microseconds (schedule_overlap)."""


def get(node: fx.Node) -> OasesMeta:
    """The node's record (an empty one if no pass has marked it)."""
    return node.meta.get(KEY) or OasesMeta()


def update(node: fx.Node, **fields) -> OasesMeta:
    """Replace fields of the node's record; returns the new record."""
    rec = dataclasses.replace(get(node), **fields)
    node.meta[KEY] = rec
    return rec
