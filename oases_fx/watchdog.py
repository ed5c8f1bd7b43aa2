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


# --- backward: which call's backward this rank owes, runs or finished ------------------------------
import functools
import logging
import threading
import time
import weakref

import torch
import torch.utils._pytree as pytree

log = logging.getLogger("oases_fx")


class _BackwardMarker(torch.autograd.Function):
    """Identity on a call's outputs; its backward runs first in that call's backward pass and
    queues a callback that runs only if the whole backward pass succeeds. Used only for outputs
    that require grad without an autograd node (StepTracker.mark)."""

    @staticmethod
    def forward(ctx, tracker, call, *xs):
        ctx.set_materialize_grads(False)
        ctx.tracker, ctx.call = tracker, call
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *grads):
        ctx.tracker._started(ctx.call)
        return (None, None) + grads


def _output_tensors(out):
    """The tensors of a call's output (a tensor, or tuples/lists/dicts of them, as Hugging Face's
    ModelOutput is), or None for any other structure (then pytree's flatten is asked)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        vals = out
    elif isinstance(out, dict):
        vals = out.values()
    else:
        return None
    got = []
    for v in vals:
        if v is None or isinstance(v, (int, float, bool, str)):
            continue
        sub = _output_tensors(v)
        if sub is None:
            return None
        got.extend(sub)
    return got


class StepTracker:
    """Per OasesModule: the state of the last training call's backward on this rank, read before
    the next forward (a backward that started and raised, one that never ran) and by the watchdog
    thread (a backward that waits long while a peer reported a failure). Per step: one pre-hook on
    the autograd node of each grad-requiring output (the compiled program's backward node, shared by
    its outputs) and a callback at the end of backward; no store access."""

    def __init__(self, channel: FaultChannel):
        self.channel = channel
        self.call: Optional[int] = None
        self.state = "idle"  # "owed" (outputs need grad, no backward yet), "started", "idle"
        self.started_at = 0.0
        self.said: set = set()
        self._task = None  # the backward pass (graph task) whose start was seen last

    def mark(self, out, call: int):
        """Watch `out`'s backward: a pre-hook on the autograd node of each output that requires grad
        (the node runs first in any backward through the output; several outputs share one). `out` is
        returned unchanged, or, where a grad-requiring output has no node (a leaf returned as is) or
        the structure is not tensors in tuples/lists/dicts, passed through one identity autograd node."""
        if not torch.is_grad_enabled():
            return out
        flat = _output_tensors(out)
        nodes = []
        if flat is not None:
            for t in flat:
                if t.requires_grad:
                    fn = t.grad_fn
                    if fn is None:  # a leaf: no node to hook
                        return self._mark_through_node(out, call)
                    if fn not in nodes:
                        nodes.append(fn)
        if not nodes:
            return out if flat is not None else self._mark_through_node(out, call)
        hook = functools.partial(self._pre_hook, call)
        for fn in nodes:
            fn.register_prehook(hook)
        self.call, self.state = call, "owed"
        return out

    def _pre_hook(self, call: int, grad_outputs):
        task = _compat.current_backward_id()
        if task != self._task or self.state != "started" or self.call != call:  # once per backward pass
            self._task = task
            self._started(call)
        return None

    def _mark_through_node(self, out, call: int):
        """`out` with its grad-requiring tensors passed through the marker (unchanged otherwise)."""
        try:
            flat, spec = pytree.tree_flatten(out)
            idx = [i for i, t in enumerate(flat) if isinstance(t, torch.Tensor) and t.requires_grad]
            if not idx:
                return out
            marked = _BackwardMarker.apply(self, call, *[flat[i] for i in idx])
            for i, t in zip(idx, marked):
                flat[i] = t
            out = pytree.tree_unflatten(flat, spec)
        except Exception as e:  # an output structure pytree cannot rebuild: no tracking, said once
            if "mark" not in self.said:
                self.said.add("mark")
                log.warning("oases_fx: cannot track backward() of this model's outputs (%s: %s); a rank whose "
                            "backward fails is then seen by its peers only when their collectives time out",
                            type(e).__name__, e)
            return out
        self.call, self.state = call, "owed"
        return out

    def _started(self, call: int) -> None:
        self.call, self.state, self.started_at = call, "started", time.monotonic()
        _compat.queue_backward_callback(lambda: self._done(call))
        _Watchdog.watch(self)

    def _done(self, call: int) -> None:
        if self.call == call:
            self.state = "idle"

    def before_forward(self, call: int) -> None:
        """Raise if this rank's previous backward raised (its peers may wait in it; this forward's
        collectives would pair with theirs); warn once if it never ran."""
        prev, state = self.call, self.state
        self.state = "idle"
        if state == "started":
            where = f"backward of call {prev}"
            err = OasesError(
                f"rank {dist.get_rank() if dist.is_initialized() else 0}: the {where} raised on this rank (its error "
                f"reached the caller of backward()), and now call {call} starts. The TMP ranks are out of step: the "
                "other ranks may be waiting in that backward's collectives, and this call's collectives would pair "
                "with theirs (wrong values or a hang). Fix: stop every rank after a failed step (or restart them "
                "together); do not continue the loop on one rank.")
            self.channel.report(err, where)
            raise err
        if state == "owed" and "owed" not in self.said:
            self.said.add("owed")
            log.warning("oases_fx: call %d starts although call %d's outputs required grad and no backward() ran on "
                        "this rank. If the other TMP ranks run call %d's backward, their collectives pair with this "
                        "call's (wrong values or a hang). Fix: call backward() on every rank, or run forwards that "
                        "no backward follows under torch.no_grad() or model.eval(). (Said once.)", call, prev, prev)


class _Watchdog:
    """One daemon thread per process: while a backward of some OasesModule has run for more than
    POLL_S, it reads the peers' failure notes every POLL_S and logs once per call when a peer failed
    (or when the bound passed with no note). It cannot stop the wait (gloo cannot be interrupted):
    the backward still raises torch's own timeout error within the bound, after this line."""

    POLL_S = 1.0
    _lock = threading.Lock()
    _thread: Optional[threading.Thread] = None
    _watched: "weakref.WeakSet" = weakref.WeakSet()

    @classmethod
    def watch(cls, tracker: StepTracker) -> None:
        cls._watched.add(tracker)
        if cls._thread is None:
            with cls._lock:
                if cls._thread is None:
                    cls._thread = threading.Thread(target=cls._run, name="oases_fx-watchdog", daemon=True)
                    cls._thread.start()

    @classmethod
    def _run(cls) -> None:
        while True:
            time.sleep(cls.POLL_S)
            for t in list(cls._watched):
                try:
                    cls._check(t)
                except Exception:  # a store gone at exit: nothing to say
                    pass

    @classmethod
    def _check(cls, t: StepTracker) -> None:
        if t.state != "started" or time.monotonic() - t.started_at < cls.POLL_S:
            return
        call, waited = t.call, time.monotonic() - t.started_at
        failed = t.channel.peer_failures()
        me = dist.get_rank() if dist.is_initialized() else 0
        bound = t.channel.collective_timeout_s
        if failed and ("peer", call) not in t.said:
            t.said.add(("peer", call))
            told = "; ".join(f"rank {r} failed in the {n['where']}: {n['error']}" for r, n in sorted(failed.items()))
            log.error("oases_fx: rank %d is waiting in the backward of call %d (%.1f s so far) for a TMP collective "
                      "that will not complete: %s. This rank's backward raises torch's timeout error when the wait "
                      "ends; %s.", me, call, waited, told, describe_bound(bound))
        elif not failed and bound is not None and waited > 0.8 * bound and ("none", call) not in t.said:
            t.said.add(("none", call))
            log.error("oases_fx: rank %d's backward of call %d has waited %.1f s of the %g s bound and no TMP peer "
                      "reported an error: a rank may have skipped a backward() or a step, or died. This rank's "
                      "backward raises torch's timeout error when the wait ends; %s.", me, call, waited, bound,
                      describe_bound(bound))
