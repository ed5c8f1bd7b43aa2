"""Bounded waiting: a rank whose step (or compile) fails tells its TMP peers through the c10d store,
and a rank whose collective times out raises an OasesError naming the peer that failed, or saying
that no peer reported and which ranks may be out of step.

The bound is the timeout of the process groups oases_fx's collectives run on: with
``CompileConfig.collective_timeout_s=T`` compile() creates oases_fx's own TMP groups with timeout T
(dist.new_group(ranks, timeout=T): every collective of the compiled program and of the planner
raises after at most T seconds of waiting); left at None, the mesh's own groups are used and the
bound is their timeout (init_process_group(timeout=...); torch's default is 30 minutes for gloo
and 10 minutes for NCCL). There is no faster mechanism: a gloo collective cannot be interrupted
(ProcessGroupGloo.abort() does not wake a pending recv on torch 2.13, measured) and
_abort_process_group is NCCL-only, so a waiting rank learns of a peer's failure when its wait
times out; it then reads the store, which costs nothing on the success path.

Per step on the success path: no store access and no thread. A rank that fails writes one key;
a rank that times out reads one key per peer.
"""
from __future__ import annotations

import datetime
import itertools
import json
from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

from oases_fx import _compat
from oases_fx.errors import OasesError

_SEQ = itertools.count()  # one channel per compile(); every rank compiles in the same order

_COLLECTIVE_FAILURE_TEXT = ("Timed out waiting", "timed out", "Connection closed by peer", "Connection reset by peer",
                            "Socket Timeout", "Watchdog caught collective operation timeout",
                            "NCCL communicator was aborted")


def is_collective_failure(e: BaseException) -> bool:
    """A collective that timed out or lost its peer (gloo's RuntimeError "Timed out waiting ...ms
    for recv operation to complete", "Connection closed by peer"; NCCL's DistBackendError)."""
    if isinstance(e, OasesError):
        return False
    if _compat.dist_backend_error() and isinstance(e, _compat.dist_backend_error()):
        return True
    return isinstance(e, RuntimeError) and any(s in str(e) for s in _COLLECTIVE_FAILURE_TEXT)


def collective_failure_in(e: BaseException) -> Optional[BaseException]:
    """The collective failure `e` is or carries (through __cause__ or __context__: when a timeout
    leaves compiled code, torch 2.13's Dynamo may raise its own Unsupported while handling it, with
    the timeout only as the context), else None."""
    seen = set()
    while e is not None and id(e) not in seen:
        if is_collective_failure(e):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def timeout_of(collective_timeout_s: Optional[float]) -> Optional[datetime.timedelta]:
    return None if collective_timeout_s is None else datetime.timedelta(seconds=float(collective_timeout_s))


def describe_bound(collective_timeout_s: Optional[float]) -> str:
    if collective_timeout_s is not None:
        return (f"oases_fx's TMP groups time out after {collective_timeout_s:g} s "
                "(CompileConfig.collective_timeout_s: oases_fx.compile(..., collective_timeout_s=seconds) sets it)")
    return ("the bound is the process group's timeout (init_process_group(timeout=...); torch's default is 30 min "
            "for gloo, 10 min for NCCL). Set a shorter one for oases_fx's own collectives with "
            "oases_fx.compile(..., collective_timeout_s=seconds)")


@dataclass
class FaultChannel:
    """Where the TMP ranks of one compile() leave a note when they fail."""

    prefix: str
    """Store key prefix, e.g. "oases_fx/faults/3" (one per compile(), the same on every rank)."""
    peers: tuple
    """Global ranks whose notes this rank reads (its TMP group, dp replicas too when the mesh spans them)."""
    collective_timeout_s: Optional[float]
    """The bound (None: the process groups' own timeout)."""
    phase: str = "oases_fx.compile() collectives (agreement checks, plan)"
    """What this rank is doing, for messages: "compile", "planning", "forward of call 3", ..."""

    @classmethod
    def for_ranks(cls, ranks, collective_timeout_s: Optional[float]) -> "FaultChannel":
        return cls(prefix=f"oases_fx/faults/{next(_SEQ)}", peers=tuple(int(r) for r in ranks),
                   collective_timeout_s=collective_timeout_s)

    def _key(self, rank: int) -> str:
        return f"{self.prefix}/{rank}"

    def report(self, exc: BaseException, where: Optional[str] = None) -> None:
        """Leave this rank's failure for its peers (best effort: a store that is gone is ignored,
        the caller re-raises the failure anyway)."""
        store = _compat.default_store()
        if store is None or not dist.is_initialized():
            return
        note = dict(rank=dist.get_rank(), where=where or self.phase, error=f"{type(exc).__name__}: {str(exc)[:500]}")
        try:
            store.set(self._key(note["rank"]), json.dumps(note))
        except Exception:
            pass

    def peer_failures(self) -> dict:
        """rank -> note of every peer that reported a failure (no waiting: store.check first)."""
        store = _compat.default_store()
        if store is None or not dist.is_initialized():
            return {}
        me, out = dist.get_rank(), {}
        for r in self.peers:
            if r == me:
                continue
            try:
                if store.check([self._key(r)]):
                    out[r] = json.loads(store.get(self._key(r)).decode())
            except Exception:  # the store's server (rank 0) is gone: nothing to read
                pass
        return out

    def timed_out(self, exc: BaseException, where: Optional[str] = None) -> OasesError:
        """The OasesError for a collective of this rank that timed out or lost its peer in `where`."""
        where = where or self.phase
        me = dist.get_rank() if dist.is_initialized() else 0
        failed = self.peer_failures()
        if failed:
            told = "; ".join(f"rank {r} failed in the {n['where']}: {n['error']}" for r, n in sorted(failed.items()))
            head = (f"rank {me}: a TMP collective in the {where} did not complete because "
                    f"{'rank' if len(failed) == 1 else 'ranks'} {', '.join(map(str, sorted(failed)))} failed ({told}). "
                    "Fix: see that rank's error; this rank stopped instead of waiting for it.")
        else:
            others = [r for r in self.peers if r != me]
            head = (f"rank {me}: a TMP collective in the {where} did not complete: "
                    f"{'rank' if len(others) == 1 else 'ranks'} {', '.join(map(str, others))} did not arrive, and none "
                    "reported an error. A rank may have skipped a backward() or a step, called the model with a "
                    "different batch, died, or be much slower. Fix: run the same forward and backward calls in the "
                    "same order on every TMP rank.")
        return OasesError(f"{head} Waiting is bounded: {describe_bound(self.collective_timeout_s)}. "
                          f"The collective's own error: {type(exc).__name__}: {str(exc)[:300]}")


_CURRENT: list = []  # the channel of the compile() running now (set by agreement.errors_shared)


def current() -> Optional[FaultChannel]:
    return _CURRENT[-1] if _CURRENT else None
