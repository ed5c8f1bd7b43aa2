"""The per-call host path (issue 14): the direct call of the compiled program (oases_fx.direct_call) gives
bitwise the values of torch.compile's own call, falls back to it whenever its checks fail, and the step
tracker watches the backward without an autograd node of its own. Rank 0 of a TP=2 world on torch's
fake process group (process-wide, so each case runs in its own process), tiny GPT, aot_eager. No timing
is asserted."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(case: str) -> dict:
    from tests.unit.graphs import run_module

    return run_module("tests.unit.test_host_path", case, timeout=600)


def test_direct_call_is_bitwise_the_torch_compile_call_over_steps():
    r = _run("equal")
    assert r["states"] == ["ready", "ready"], r
    assert r["loss_equal"] and r["grads_equal"], r
    assert r["through_torch_compile_after_capture"] == 0, r  # the direct path did run
    assert r["tracked"] == ["owed", "idle"], r
    # one new GenerationTracker generation per call, as torch.compile's own call starts (cudagraph trees
    # tell a new iteration by it)
    assert r["generations"] == {"torch.compile": 1, "direct": 1}, r


def test_direct_call_falls_back_when_its_checks_fail():
    r = _run("fallback")
    assert r["state"] == "ready", r
    # no_grad (a global-state guard), a replaced parameter (an identity the guards do not see), a global
    # module hook, a non-default compiler stance: each call went through torch.compile, and the values are
    # the old path's
    want = {"no_grad": 1, "replaced": 1, "hook": 1, "stance": 1}
    assert r["through_torch_compile"] == want, r
    assert r["equal"] == {k: True for k in want}, r
    assert r["late_capture"] == "ready", r


def test_gradient_hand_over_runs_once_per_backward_and_accumulates():
    r = _run("handover")
    # the program's outputs (logits, loss) share its backward node: the hand-over's start is registered once
    # on it, so it runs once per backward (not once per output, the second call returning early)
    assert r["start_calls"] == [1, 1, 1], r
    # a backward without zero_grad adds to the DTensor gradient in place: x + x is exact in floating point
    assert r["accumulated_is_twice"], r
    assert r["same_grad_objects"], r  # accumulated into the user's gradient tensors, not new ones
    assert r["reset_equal"], r  # after zero_grad the gradients are one step's again


# --- the child processes ------------------------------------------------------------------------

def _build(k=2, seed=0):
    import torch

    from benchmarks import rank_bench
    from benchmarks.rank_bench import Case

    case = Case(system="oases", hidden=32, layers=2, batch=4, seq=8, vocab=64, head_dim=16, k=k, dtype="fp32",
                backend="aot_eager", collectives="fake")
    dev = torch.device("cpu")
    torch.manual_seed(seed)
    _, module, _ = rank_bench.build(case, dev)
    return module, rank_bench.make_batch(case, dev)


def _steps(module, batch, n):
    import torch

    losses, grads = [], []
    for i in range(n):
        module.zero_grad(set_to_none=True)
        _, loss = module(*[t + 0 for t in batch])  # new input tensors each step, as a data loader gives
        loss.backward()
        losses.append(loss.detach().clone())
        grads.append([p.grad.to_local().clone() for p in module.parameters()])
        with torch.no_grad():  # an optimizer step, so later steps see new weights
            for p in module.parameters():
                p.sub_(0.1 * p.grad)
    return losses, grads


class _Counter:
    def __init__(self, fn):
        self.fn, self.n = fn, 0

    def __call__(self, *a, **k):
        self.n += 1
        return self.fn(*a, **k)


def _child_equal():
    import torch

    from oases_fx import direct_call

    out = {}
    direct_call.ENABLED = False
    m0, batch = _build()
    l0, g0 = _steps(m0, batch, 4)
    direct_call.ENABLED = True
    m1, _ = _build()
    prog = m1.graphs
    la, ga = _steps(m1, batch, 2)  # compiles, then captures
    d = direct_call.of(prog)
    states = [d.state]
    counter = d.compiled = _Counter(d.compiled)
    lb, gb = _steps(m1, batch, 2)
    states.append(d.state)
    out["through_torch_compile_after_capture"] = counter.n
    out["loss_equal"] = all(torch.equal(a, b) for a, b in zip(l0, la + lb))
    out["grads_equal"] = all(torch.equal(a, b) for g, h in zip(g0, ga + gb) for a, b in zip(g, h))
    out["states"] = states
    _, loss = m1(*batch)
    tracked = [m1._steps.state]
    loss.backward()
    tracked.append(m1._steps.state)
    out["tracked"] = tracked
    from torch._dynamo.mutation_guard import GenerationTracker

    gens = {}
    for label, on in (("torch.compile", False), ("direct", True)):
        direct_call.ENABLED = on
        before = GenerationTracker.generation
        _, loss = m1(*batch)
        gens[label] = GenerationTracker.generation - before
        loss.backward()
    out["generations"] = gens
    return out


def _child_fallback():
    import torch
    import torch.nn as nn

    from oases_fx import direct_call

    m, batch = _build()
    prog = m.graphs
    for _ in range(3):
        m.zero_grad(set_to_none=True)
        _, loss = m(*batch)
        loss.backward()
    d = direct_call.of(prog)
    out = {"state": d.state, "through_torch_compile": {}, "equal": {}}

    def one(label, ctx=None):
        counter = d.compiled = _Counter(d.compiled.fn if isinstance(d.compiled, _Counter) else d.compiled)
        direct_call.ENABLED = True
        _, got = m(*batch)
        out["through_torch_compile"][label] = counter.n
        direct_call.ENABLED = False
        _, ref = m(*batch)
        direct_call.ENABLED = True
        out["equal"][label] = bool(torch.equal(got, ref))

    with torch.no_grad():
        one("no_grad")
    name, p = next(iter(prog.gm.named_parameters()))
    mod_path, _, leaf = name.rpartition(".")
    mod = prog.gm.get_submodule(mod_path) if mod_path else prog.gm
    mod._parameters[leaf] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
    one("replaced")
    mod._parameters[leaf] = p
    h = torch.nn.modules.module.register_module_forward_pre_hook(lambda *a: None)
    try:
        one("hook")
    finally:
        h.remove()
    with torch.compiler.set_stance("eager_on_recompile"):
        one("stance")
    # a program whose second call runs under no_grad (a second dynamo cache entry): captured on the next
    # training call, from the entry that ran it
    m2, _ = _build()
    d2 = direct_call.of(m2.graphs)
    _, loss = m2(*batch)
    loss.backward()
    with torch.no_grad():
        m2(*batch)
    for _ in range(2):
        m2.zero_grad(set_to_none=True)
        _, loss = m2(*batch)
        loss.backward()
    out["late_capture"] = d2.state
    return out


def _child_handover():
    import torch

    m, batch = _build()
    b = m._boundary
    calls = _Counter(b._backward_start)
    b._backward_start = calls  # an instance attribute: what Boundary.call registers for a "sync" call
    out = {"start_calls": []}

    def backward():
        before = calls.n
        _, loss = m(*batch)
        loss.backward()
        out["start_calls"].append(calls.n - before)
        return [p.grad.to_local().clone() for p in m.parameters()]

    m.zero_grad(set_to_none=True)
    one = backward()  # compiles (forward; backward at its first run)
    m.zero_grad(set_to_none=True)
    one = backward()
    held = [p.grad for p in m.parameters()]
    two = backward()  # no zero_grad: accumulated
    out["accumulated_is_twice"] = all(torch.equal(t, o + o) for t, o in zip(two, one))
    out["same_grad_objects"] = all(p.grad is h for p, h in zip(m.parameters(), held))
    m.zero_grad(set_to_none=True)
    _, loss = m(*batch)
    loss.backward()
    out["reset_equal"] = all(torch.equal(p.grad.to_local(), o) for p, o in zip(m.parameters(), one))
    return out


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    got = {"equal": _child_equal, "fallback": _child_fallback, "handover": _child_handover}[sys.argv[1]]()
    print("RESULT " + json.dumps(got))
