"""oases_fx.saved_views: saved views replaced by their base, saved once (issue 14's host time). Values must be
bitwise the same as without the rewrite (the same ops on the same storage); the count of saved tensors must
fall where views of one buffer were saved. The GPT case runs as rank 0 of a TP=2 world on torch's fake process
group (process-wide: its own process), tiny GPT, aot_eager."""
import json
import sys
from pathlib import Path

import torch

from oases_fx import saved_views

ROOT = Path(__file__).resolve().parents[2]


def _compiled(fn, stats_out):
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    part = saved_views.wrap_partition(min_cut_rematerialization_partition)
    stats_out.append(part.stats)
    graphs = []

    def fw(gm, ex):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    return torch.compile(fn, backend=aot_autograd(fw_compiler=fw, bw_compiler=lambda gm, ex: gm.forward,
                                                  partition_fn=part), fullgraph=True), graphs


def _attention(x, w):
    q, k, v = (x @ w).split(16, -1)  # one fused qkv matmul
    q, k, v = (t.view(2, 8, 1, 16).transpose(1, 2) for t in (q, k, v))
    # the attention's backward needs q, k and v: the partitioner saves three views of the matmul's output
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum()


def test_views_of_one_buffer_are_saved_once_with_the_same_values():
    g0 = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 8, 32, generator=g0), torch.randn(32, 48, generator=g0, requires_grad=True)
    ref = _attention(x, w)
    (gref,) = torch.autograd.grad(ref, w)
    stats = []
    fn, graphs = _compiled(_attention, stats)
    got = fn(x, w)
    (ggot,) = torch.autograd.grad(got, w)
    assert stats[0] == [2], stats  # q, k, v -> the matmul's output, saved once
    saved = list(next(iter(graphs[0].graph.find_nodes(op="output"))).args[0])[1:]
    bases = [saved_views.view_chain(s)[0] for s in saved]
    assert len(set(bases)) == len(bases), saved  # no two saved tensors are views of one base
    # the rewrite moves views, not arithmetic: bitwise equal to the uncompiled function (the compiled graph
    # runs the same aten ops in the same order; aot_eager, no fusion)
    assert torch.equal(got, ref) and torch.equal(ggot, gref)


def test_graphs_saving_symbolic_values_are_left_unchanged():
    stats = []

    def f(x, w):
        return (x @ w).relu().sum()

    from torch._dynamo.backends.common import aot_autograd

    part = saved_views.wrap_partition(__import__("torch._functorch.partitioners", fromlist=["x"])
                                      .min_cut_rematerialization_partition)
    stats.append(part.stats)
    torch._dynamo.reset()
    fn = torch.compile(f, backend=aot_autograd(fw_compiler=lambda gm, ex: gm.forward,
                                               bw_compiler=lambda gm, ex: gm.forward, partition_fn=part),
                       dynamic=True, fullgraph=True)
    x, w = torch.randn(6, 5), torch.randn(5, 3, requires_grad=True)
    fn(x, w).backward()
    got = part.stats
    # dynamic shapes save the sizes (symbolic ints) with the tensors: the pair is not rewritten, and says why
    assert got == ["saves more than tensors with a version-counter check"], got
    w0 = w.detach().requires_grad_()
    f(x, w0).backward()
    assert torch.equal(w.grad, w0.grad)  # aot_eager runs the same aten ops as eager


def _run(case: str) -> dict:
    from tests.unit.graphs import run_module

    return run_module("tests.unit.test_saved_views", case, timeout=600)


def test_gpt_k2_saves_fewer_tensors_bitwise_the_same():
    r = _run("gpt")
    assert r["removed"] and all(isinstance(n, int) and n > 0 for n in r["removed"]), r
    assert r["outputs_after"] == r["outputs_before"] - r["removed"][-1], r
    assert r["equal"], r  # loss and every gradient over three steps with parameter updates


def _child_gpt():
    from oases_fx import _compat
    from tests.unit.test_host_path import _build

    def steps(m, batch):
        res = []
        for _ in range(3):
            m.zero_grad(set_to_none=True)
            _, loss = m(*batch)
            loss.backward()
            res.append([loss.detach().clone()] + [p.grad.to_local().clone() for p in m.parameters()])
            with torch.no_grad():
                for p in m.parameters():
                    p.sub_(0.1 * p.grad)
        g = m.graphs.aot.forward[-1].graph
        return res, len(next(iter(g.find_nodes(op="output"))).args[0])

    m, batch = _build(k=2)
    ref, n_before = steps(m, batch)
    orig = _compat.default_partition
    part = saved_views.wrap_partition(orig())
    _compat.default_partition = lambda: part  # what make_backend reads for aot_eager
    try:
        m2, _ = _build(k=2)
        got, n_after = steps(m2, batch)
    finally:
        _compat.default_partition = orig
    equal = all(torch.equal(a, b) for r, g in zip(ref, got) for a, b in zip(r, g))
    return {"removed": part.stats, "outputs_before": n_before, "outputs_after": n_after, "equal": equal}


if __name__ == "__main__":
    torch.set_num_threads(1)
    print("RESULT " + json.dumps({"gpt": _child_gpt}[sys.argv[1]]()))
