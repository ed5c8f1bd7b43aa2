"""The compiled program's call without torch.compile's per-call wrapping (issue 14: host time per step).

``torch.compile(gm)`` returns an OptimizedModule; each call goes through nn.Module's call, dynamo's
eval-frame wrapper (context managers, the frame callback), the guard check, and the transformed
bytecode that reads every parameter from the module tree and calls the compiled function (AOTAutograd's
runtime wrapper). Only the guard check and the compiled function are needed. Measured on a CPU
(benchmarks/host_profile.py, tiny GPT, 28 parameters): ~135 us per call around a 12 us guard check.

    before:  OptimizedModule.__call__ -> _call_impl -> eval_frame _fn -> frame callback: guards
             -> transformed forward: 28 parameter look-ups -> __compiled_fn(*args) -> rebuild output
    after:   guards.check({"self": gm, "idx": ..., ...}) -> a new compile generation (cudagraph trees
             tell iterations by it) -> compiled_fn(*static_and_inputs) -> output

Contract:
- Values are the same: the same compiled function is called with the same arguments (tensors, by
  identity) as dynamo's bytecode passes. Captured once, on the program's second call, by watching that
  call (the functions' globals in the GraphModule's module dict, swapped for recorders for one call); the
  capture is used only if every argument is either one of the call's inputs or one of the GraphModule's
  parameters/buffers, and the bytecode's output is rebuilt from the function's result exactly (same leaves,
  same structure). Per call, the GraphModule must still hold those very parameter/buffer objects (an `is`
  test per tensor: the guards check their metadata, not their identity).
- Soundness: every direct call first runs dynamo's own guard check of that cache entry (the same guards:
  global state, grad mode, autocast, saved-tensor hooks, torch-function modes, every input's and
  parameter's metadata, aliasing, the module tree) on the call's locals; a failed check, arguments that
  do not bind to forward's parameters one to one, global module hooks, an outer trace (dynamo, export,
  fx, jit) or a non-default torch.compiler.set_stance take torch.compile's own path for that call (which
  recompiles as it always did). A direct call runs the entry that ran at the capture whenever that entry's
  guards pass (its code is valid for any such call, whichever entry dynamo would try first). Not followed
  after the capture: torch._dynamo.config.disable switched on later (its read costs ~5 us per call).
- What torch.compile's call does on entry besides is done too: it starts a new GenerationTracker
  generation, from which cudagraph trees (cudagraphs=True) tell a new iteration.
- Nothing is skipped silently: ``DirectCall.state`` says "ready" or why it is "off" (debug log).

``ENABLED = False`` (module attribute; OASES_FX_DIRECT_CALL=0 in the environment) switches it off for every
program: the old path (tests, benchmarks).
"""
from __future__ import annotations

import logging
import operator
import os

import torch
import torch.utils._pytree as pytree

from oases_fx import _compat

log = logging.getLogger("oases_fx")

ENABLED = os.environ.get("OASES_FX_DIRECT_CALL", "1") != "0"
"""False (or the environment's OASES_FX_DIRECT_CALL=0 at import): every program is called through
torch.compile's OptimizedModule (the old path)."""


class DirectCall:
    """Calls the torch.compile'd GraphModule `gm` (`compiled` = torch.compile(gm)) as torch.compile
    would, with the per-call wrapping left out once the program has been compiled (module docstring)."""

    def __init__(self, gm, compiled):
        self.gm, self.compiled = gm, compiled
        self.source = compiled  # the program's callable this was made for (oases_fx.direct_call.of)
        self.state = "new"  # "new": calls pass through; "ready": direct; "off: <why>": torch.compile's path
        self._calls = 0
        self._code = type(gm).forward.__code__
        self._names = self._code.co_varnames[1:self._code.co_argcount]  # forward's parameters after self
        self._guard = self._fn = self._static = self._slots = self._build = None
        self._held_at = self._held_t = None  # ((dicts), (keys)) and (tensors): one C-level identity test per call

    def _ordered(self, args, kwargs):
        """The call's inputs in forward's parameter order, or None where they do not bind one to one."""
        if not kwargs:
            return args if len(args) == len(self._names) else None
        if len(args) + len(kwargs) != len(self._names) or any(n in kwargs for n in self._names[:len(args)]):
            return None
        try:
            return (*args, *(kwargs[n] for n in self._names[len(args):]))
        except KeyError:
            return None

    def __call__(self, *args, **kwargs):
        if self.state == "ready" and ENABLED:
            ins = self._ordered(args, kwargs)
            if ins is not None and not _compat.direct_call_blocked():
                f_locals = dict(zip(self._names, ins))
                f_locals["self"] = self.gm
                if self._guard.check(f_locals) and all(map(operator.is_, map(dict.get, *self._held_at), self._held_t)):
                    full = list(self._static)
                    for pos, i in self._slots:
                        full[pos] = ins[i]
                    _compat.new_compile_generation()  # as torch.compile's call: cudagraph trees read it
                    return self._build(self._fn(*full))
            return self.compiled(*args, **kwargs)
        self._calls += 1
        # the first call compiled the program; captured on a training call (grad on), the one to speed up
        if self.state == "new" and self._calls >= 2 and ENABLED and torch.is_grad_enabled():
            return self._capture(args, kwargs)
        return self.compiled(*args, **kwargs)

    def _off(self, why: str) -> None:
        self.state = f"off: {why}"
        log.debug("oases_fx: the compiled program is called through torch.compile on every call: %s", why)

    def _capture(self, args, kwargs):
        """Call the program through torch.compile once more, recording the compiled function's
        arguments and result; become "ready" if they can be rebuilt from the call's inputs."""
        ins = self._ordered(args, kwargs)
        if ins is None or len({id(a) for a in ins}) != len(ins):
            self._off("arguments that do not bind one to one to forward's parameters, or repeated")
            return self.compiled(*args, **kwargs)
        if _compat.direct_call_blocked() or _compat.dynamo_disabled() or not _compat.has_compile_generation():
            self._off("traced, hooked, a non-default compiler stance or dynamo disabled at capture, or no "
                      "compile generation in this torch")
            return self.compiled(*args, **kwargs)
        entries = _compat.dynamo_frame_entries(self._code)
        g = type(self.gm).forward.__globals__
        fns = {name: g.get(name) for _, name in entries}
        if not entries or any(fn is None for fn in fns.values()):
            self._off("no dynamo cache entry calling one compiled function found in the GraphModule's globals")
            return self.compiled(*args, **kwargs)
        seen = []

        def recorder(name, fn):
            def rec(*a):
                res = fn(*a)
                seen.append((name, a, res))
                return res
            return rec

        for name, fn in fns.items():
            g[name] = recorder(name, fn)
        try:
            out = self.compiled(*args, **kwargs)
        finally:
            g.update(fns)
        try:
            self._adopt(entries, fns, seen, ins, out)
        except Exception as e:  # noqa: BLE001 - an unexpected structure: keep torch.compile's path
            self._off(f"{type(e).__name__}: {e}")
        return out

    def _adopt(self, entries, fns, seen, args, out) -> None:
        if len(seen) != 1:
            return self._off(f"the compiled function ran {len(seen)} times in one call")
        name, fargs, res = seen[0]
        guard = next(gm for gm, n in entries if n == name)  # the entry that ran (several after recompiles)
        f_locals = dict(zip(self._names, args))
        f_locals["self"] = self.gm
        if not guard.check(f_locals):  # the guards just passed in dynamo: this check must agree
            return self._off("dynamo's guard check does not accept the call's own locals")
        fn = fns[name]
        inputs = {id(a): i for i, a in enumerate(args)}
        holders = {}  # id(tensor) -> (the module's _parameters or _buffers dict, key): where bytecode reads it
        for mod in self.gm.modules(remove_duplicate=False):
            for d in (mod._parameters, mod._buffers):
                for key, t in d.items():
                    if t is not None:
                        holders.setdefault(id(t), (d, key))
        static, slots, held = [], [], []
        for pos, a in enumerate(fargs):
            if id(a) in inputs:
                static.append(None)
                slots.append((pos, inputs[id(a)]))
            elif id(a) in holders:
                static.append(a)
                held.append((*holders[id(a)], a))
            else:
                return self._off(f"argument {pos} of the compiled function is neither an input nor a parameter")
        leaves, spec = pytree.tree_flatten(out)
        if not isinstance(res, (list, tuple)) or len(res) != len(leaves) or any(
                x is not y for x, y in zip(res, leaves)):
            return self._off("the program's output is not the compiled function's result as it is")
        if spec.type is tuple and all(c.is_leaf() for c in spec.children()):
            build = tuple
        else:
            build = lambda r: pytree.tree_unflatten(list(r), spec)  # noqa: E731
        rebuilt_leaves, rebuilt_spec = pytree.tree_flatten(build(res))
        if rebuilt_spec != spec or any(x is not y for x, y in zip(rebuilt_leaves, leaves)):
            return self._off("the program's output structure cannot be rebuilt")
        self._guard, self._fn, self._static, self._slots, self._build = guard, fn, static, slots, build
        # checked per call: the module still holds the very tensors passed here
        self._held_at = (tuple(d for d, _, _ in held), tuple(k for _, k, _ in held))
        self._held_t = tuple(t for _, _, t in held)
        self.state = "ready"


def of(program) -> DirectCall:
    """The DirectCall of an oases_fx program (api._Program: .gm, .compiled), made at its first call and
    again whenever ``program.compiled`` is replaced (tests inject faults that way)."""
    d = program.__dict__.get("direct")
    if d is None or d.source is not program.compiled:  # made anew where the program's callable was replaced
        d = program.__dict__["direct"] = DirectCall(program.gm, program.compiled)
    return d
