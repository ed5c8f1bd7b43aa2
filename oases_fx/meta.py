"""The one node.meta key oases_fx writes: ``node.meta["oases"]``, a small typed record.

Every pass reads and writes its node marks through :func:`get` / :func:`update`, and the graph-level
record ``gm.meta["oases"]`` (:class:`GraphMeta`) through :func:`graph_meta`; nothing else in
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
    re-assembled), "copy_to_cross" (a parameter through f over the cross group); "dp_reduce" (a node of the dp
    gradient all-reduce in the backward graph: bucket copy, collective, wait, split); None otherwise."""
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


# --- graph level ---------------------------------------------------------------------------------
@dataclass(kw_only=True)
class GraphMeta:
    """The one graph-level record, ``gm.meta["oases"]``: what the passes found and did to one
    traced program. Read and write it through :func:`graph_meta` and its attributes.

    It also answers the dict-style accesses the passes used before it existed (``m["key"]``,
    ``m.get("key", d)``, ``m.setdefault("key", d)``, ``"key" in m``) with the field of that name,
    so code written against the old dict keeps working; a key that is no field lands in
    :attr:`extra`. A field that is None counts as absent (``get`` returns the default,
    ``setdefault`` writes it, ``in`` is False)."""

    analysis: Optional[object] = None
    """The per-trace analysis (oases_fx.analysis.Analysis): regions found, batch dims, vocab pattern,
    parameter table and every decision with its reason; None until the analysis has run."""
    regions: list = dataclasses.field(default_factory=list)
    """The TMP regions sharded (propagation.Region, degree set), in graph order (annotate_sharding)."""
    all_regions: list = dataclasses.field(default_factory=list)
    """Every region found, sharded or not (annotate_sharding)."""
    declined: list = dataclasses.field(default_factory=list)
    """(region or block name, reason) for every block not sharded (annotate_sharding)."""
    collectives: list = dataclasses.field(default_factory=list)
    """One line per collective inserted, "node: kind over group" (insert_collectives, vocab_parallel)."""
    rewrites: list = dataclasses.field(default_factory=list)
    """One line per shape constant rewritten for the shard (shard, vocab_parallel)."""
    notes: list = dataclasses.field(default_factory=list)
    """Tracing and RNG notes (tracing.capture, rng_streams)."""
    sharded_params: dict = dataclasses.field(default_factory=dict)
    """Parameter fqn -> (dim, pieces, full shape) for every parameter held as a shard (shard,
    vocab_parallel); read by full_state_dict / load_full_state_dict and parameter release."""
    param_degree: dict = dataclasses.field(default_factory=dict)
    """Parameter fqn -> TMP degree d of its region (d < tp: ranks 0..d-1 hold the shards) (shard)."""
    batch_dims: Optional[dict] = None
    """Node name -> the dim that carries the batch (analysis), None when not computed."""
    vocab_parallel: Optional[str] = None
    """One-line summary of the vocab-parallel rewrite (embedding, LM head, loss), None if not applied."""
    vocab_notes: list = dataclasses.field(default_factory=list)
    """Why vocab-parallel was or was not applied, and what it changed (vocab_parallel)."""
    sub_batch_notes: list = dataclasses.field(default_factory=list)
    """What split_sub_batches split, or why it did not."""
    recompute_notes: list = dataclasses.field(default_factory=list)
    """What recompute_policy saved and recomputed."""
    dp_acc: dict = dataclasses.field(default_factory=dict)
    """Parameter name -> the buffer that carries its gradient accumulated under no_sync into the
    program variant that reduces it (passes/dp_reduce.dp_accumulated_inputs_pass; dp_reduce="graph")."""
    allocated: list = dataclasses.field(default_factory=list)
    """Parameter names allocated after compile for a meta-device model (oases_fx.loading)."""
    extra: dict = dataclasses.field(default_factory=dict)
    """Keys written dict-style that are no field yet (give them a field)."""

    # --- dict-style compatibility ---------------------------------------------------------------
    def _has_field(self, key: str) -> bool:
        return key != "extra" and key in _GRAPH_FIELD_NAMES

    def __getitem__(self, key: str):
        if self._has_field(key):
            v = getattr(self, key)
            if v is None:
                raise KeyError(key)
            return v
        return self.extra[key]

    def __setitem__(self, key: str, value) -> None:
        if self._has_field(key):
            setattr(self, key, value)
        else:
            self.extra[key] = value

    def __contains__(self, key: str) -> bool:
        if self._has_field(key):
            return getattr(self, key) is not None
        return key in self.extra

    def get(self, key: str, default=None):
        if self._has_field(key):
            v = getattr(self, key)
            return default if v is None else v
        return self.extra.get(key, default)

    def setdefault(self, key: str, default=None):
        if key not in self:
            self[key] = default
        return self[key]

    @classmethod
    def from_dict(cls, d: dict) -> "GraphMeta":
        """A record holding a legacy dict's keys (fields by name, the rest in extra)."""
        rec = cls()
        for k, v in d.items():
            rec[k] = v
        return rec


_GRAPH_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(GraphMeta))


def graph_meta(gm: fx.GraphModule) -> GraphMeta:
    """The graph's record, created on first access (a dict left by older code is converted in
    place, so every later ``gm.meta["oases"]`` is the same record)."""
    rec = gm.meta.get(KEY)
    if not isinstance(rec, GraphMeta):
        rec = GraphMeta.from_dict(rec or {})
        gm.meta[KEY] = rec
    return rec
