"""Plans: the parallel strategy as a JSON-serialisable value (save, load, diff, hash).

A plan says, per TMP region (an attention or MLP block found in the traced graph), whether it
is sharded, and globally the TMP degree, the number of sub-batches and the recompute policy.
Every rank must hold the same plan; :meth:`Plan.digest` is compared across ranks before the
first collective.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

RECOMPUTE_POLICIES = ("none", "fine", "full")


@dataclass(frozen=True, kw_only=True)
class RegionPlan:
    name: str
    """Module path of the region, e.g. "transformer.h.0.attn"."""
    kind: str
    """"attention" or "mlp"."""
    shard: bool = True
    """Megatron column/row sharding over the TMP group; False keeps the region replicated."""
    tp_degree: Optional[int] = None
    """This region's TMP degree d, a divisor of the plan's tp_degree (None: the plan's). Below the
    plan's degree the TMP group splits the batch as Oases does: tp/d groups of d ranks each shard
    the region over their d ranks and run 1/(tp/d) of the batch (data parallelism across the
    groups, weight gradients summed over them); d=1 is data parallelism inside the TMP group.
    Only with shard=True."""

    def __post_init__(self):
        if self.tp_degree is not None and (not self.shard or self.tp_degree < 1):
            raise ValueError(f"region {self.name}: tp_degree={self.tp_degree} needs shard=True and a degree >= 1")


@dataclass(frozen=True, kw_only=True)
class Plan:
    tp_degree: int
    """TMP degree (size of the mesh's "tp" axis)."""
    num_sub_batches: int = 1
    """k: the batch-parallel region runs as k sub-batches whose communication overlaps."""
    recompute: str = "none"
    """Activation recomputation: "none", "fine" (Oases: keep post-all-reduce outputs) or "full"."""
    regions: tuple = ()
    """RegionPlan per TMP region, in graph order."""
    vocab_parallel: bool = False
    """Embedding and LM head sharded over the vocabulary across the TMP group, with a parallel
    cross-entropy (Megatron's VocabParallelEmbedding, vocab-parallel output layer and loss)."""
    predicted: Optional[dict] = field(default=None, compare=False)
    """The planner's predicted breakdown (informational; not part of the plan's identity)."""

    def __post_init__(self):
        if self.recompute not in RECOMPUTE_POLICIES:
            raise ValueError(f"recompute={self.recompute!r}: expected one of {RECOMPUTE_POLICIES}")
        if self.num_sub_batches < 1:
            raise ValueError(f"num_sub_batches={self.num_sub_batches}: must be >= 1")
        for r in self.regions:
            if r.tp_degree is not None and self.tp_degree % r.tp_degree:
                raise ValueError(f"region {r.name}: tp_degree={r.tp_degree} does not divide the plan's "
                                 f"TMP degree {self.tp_degree}")

    def region_degree(self, name: str) -> Optional[int]:
        """The TMP degree sharded region `name` runs at; None when it is replicated or not planned."""
        r = self.region(name)
        if r is None or not r.shard:
            return None
        return r.tp_degree or self.tp_degree

    def region(self, name: str) -> Optional[RegionPlan]:
        return next((r for r in self.regions if r.name == name), None)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["regions"] = [dataclasses.asdict(r) for r in self.regions]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        d = dict(d)
        d["regions"] = tuple(RegionPlan(**r) for r in d.get("regions", ()))
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))

    def save(self, path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path) -> "Plan":
        return cls.from_json(Path(path).read_text())

    def digest(self) -> str:
        """Hash of everything that changes the computation (not the predictions)."""
        d = self.to_dict()
        d.pop("predicted", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def diff(self, other: "Plan") -> list:
        """Human-readable differences between two plans, one line each."""
        out = []
        for f in ("tp_degree", "num_sub_batches", "recompute", "vocab_parallel"):
            a, b = getattr(self, f), getattr(other, f)
            if a != b:
                out.append(f"{f}: {a} -> {b}")
        mine = {r.name: r for r in self.regions}
        theirs = {r.name: r for r in other.regions}
        for name in sorted(set(mine) | set(theirs)):
            a, b = mine.get(name), theirs.get(name)
            if a != b:
                out.append(f"region {name}: {a} -> {b}")
        return out
