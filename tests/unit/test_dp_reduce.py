"""dp_reduce on AOTAutograd backward graphs of a small model, in one process (a 1-rank gloo group: the
all-reduce is the identity, so values are checkable), and the dp_reduce / dp_bucket_mb options.

Values: the pass copies each gradient into a flat bucket, divides it by dp and splits it back, so with
dp=2 every parameter gradient must equal the eager gradient / 2 exactly (division by a power of two is
exact in fp32): compared with torch.equal.
"""
import functools

import pytest
import torch
import torch.nn as nn

from oases_fx import _compat
from oases_fx.config import CompileConfig
from oases_fx.errors import OasesError
from oases_fx.passes.dp_reduce import (RECORD_KEY, ROLE, _buckets, bucket_bytes_of, dp_accumulated_inputs_pass,
                                       dp_reduce_pass, is_backward_compute)
from oases_fx import meta as oases_meta
from tests.unit.graphs import single_rank_group


class MLP(nn.Module):
    def __init__(self, width=16, depth=4):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x.square().mean()


def _compiled(model, bucket_bytes, *, dp=2, skip=False):
    """torch.compile(model) through AOTAutograd with dp_reduce on the backward; returns (fn, graphs)."""
    group = single_rank_group()
    got = {"params": (), "bw": []}

    def backend(gm, example_inputs):
        params = tuple(i for i, t in enumerate(example_inputs) if isinstance(t, nn.Parameter) and t.requires_grad)
        got["params"] = params

        def bw(g, _):
            g = dp_reduce_pass(g, group_name=_compat.group_name(group), dp=dp, param_inputs=params,
                               bucket_bytes=bucket_bytes, skip=skip)
            got["bw"].append(g)
            return _compat.make_boxed_func(g.forward)

        return _compat.aot_autograd(fw_compiler=lambda g, _: _compat.make_boxed_func(g.forward), bw_compiler=bw,
                                    partition_fn=_compat.default_partition())(gm, example_inputs)

    return torch.compile(model, backend=backend, fullgraph=True, dynamic=False), got


def _grads(model, fn, x):
    model.zero_grad(set_to_none=True)
    fn(x).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("bucket_bytes", [1 << 20, 1088])
def test_gradients_are_averaged_exactly_and_buckets_issue_before_the_last_compute(bucket_bytes):
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(8, 16)
    want = _grads(model, model, x)
    fn, got = _compiled(model, bucket_bytes)
    grads = _grads(model, fn, x)
    for g, w in zip(grads, want):
        assert torch.equal(g, w / 2), (g - w / 2).abs().max()
    gm = got["bw"][-1]
    rec = gm.meta[RECORD_KEY]
    nodes = list(gm.graph.nodes)
    ars = [i for i, n in enumerate(nodes) if _compat.is_all_reduce(n)]
    waits = [i for i, n in enumerate(nodes) if _compat.is_wait(n)]
    last = max(i for i, n in enumerate(nodes) if is_backward_compute(n))
    assert len(ars) == len(rec.buckets) == len(waits)
    assert sorted(o for b in rec.buckets for o in b.outputs) == sorted(got["params"])  # each gradient once
    assert all(w > last for w in waits)  # waits at the end
    if bucket_bytes == 1 << 20:  # one bucket of all 8 gradients (4.3 KiB): issued after the last one
        assert len(rec.buckets) == 1 and ars[0] > last
    else:  # a cap of one layer (weight 1024 B + bias 64 B): a bucket per layer, the first three before the last compute
        assert len(rec.buckets) == 4, rec.lines()
        assert sum(a < last for a in ars) == 3, (ars, last)
        # in production order: the backward reaches the last layer first (inputs: w0 b0 x w1 b1 ...)
        assert [sorted(b.outputs) for b in rec.buckets] == [[7, 8], [5, 6], [3, 4], [0, 1]], rec.lines()
    assert all(oases_meta.get(n).role == ROLE for n in nodes
               if n.op == "call_function" and (_compat.is_all_reduce(n) or _compat.is_wait(n)))


def test_skip_keeps_the_bucket_copies_and_leaves_the_all_reduce_out():
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(8, 16)
    want = _grads(model, model, x)
    fn, got = _compiled(model, 1088, dp=1, skip=True)
    grads = _grads(model, fn, x)
    for g, w in zip(grads, want):
        assert torch.equal(g, w)  # dp=1: copies and a division by 1 only
    gm = got["bw"][-1]
    assert not any(_compat.is_all_reduce(n) or _compat.is_wait(n) for n in gm.graph.nodes)
    assert gm.meta[RECORD_KEY].skipped and len(gm.meta[RECORD_KEY].buckets) == 4


def test_buckets_close_at_the_cap_per_dtype_in_production_order():
    f32, bf16 = torch.float32, torch.bfloat16
    members = [(0, 5, 10, 40, f32), (1, 4, 10, 40, bf16), (2, 3, 10, 40, f32), (3, 2, 10, 40, f32),
               (4, 1, 10, 40, bf16)]
    got = _buckets(members, 80)
    assert [[m[1] for m in b] for b in got] == [[5, 3], [2], [4, 1]]  # in the order they complete


def test_accumulated_inputs_add_the_buffer_to_the_gradient_once_for_tied_parameters():
    import torch.fx as fx

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return (x @ self.w @ self.w.t()).sum()

    m = Tied()
    g = fx.Graph()
    x = g.placeholder("x")
    w1, w2 = g.get_attr("w"), g.get_attr("w")  # two reads of one parameter (as a tied weight traced twice)
    y = g.call_function(torch.matmul, (x, w1))
    y = g.call_function(torch.matmul, (y, g.call_function(torch.t, (w2,))))
    g.output(g.call_method("sum", (y,)))
    gm = fx.GraphModule(m, g)
    dp_accumulated_inputs_pass(gm)
    from oases_fx.meta import graph_meta

    assert graph_meta(gm).dp_acc == {"w": "_oases_dp_acc_0"}
    xin = torch.randn(2, 4)
    gm._buffers["_oases_dp_acc_0"] = torch.full((4, 4), 3.0)
    gm(xin).backward()
    got = m.w.grad.clone()
    m.w.grad = None
    m(xin).backward()
    torch.testing.assert_close(got, m.w.grad + 3.0)


def test_options_are_checked_with_the_choices_named():
    assert CompileConfig().dp_reduce == "ddp" and CompileConfig().dp_bucket_mb == 25.0
    with pytest.raises(OasesError, match="'ddp', 'graph'"):
        CompileConfig(dp_reduce="fsdp")
    for bad in (0, -1, "25", True):
        with pytest.raises(OasesError, match="dp_bucket_mb"):
            CompileConfig(dp_bucket_mb=bad)
    assert bucket_bytes_of(25) == 25 * 2 ** 20 and bucket_bytes_of(None) == 25 * 2 ** 20


@pytest.mark.parametrize("backend_name", ["aot_eager", "inductor"])
def test_each_backward_gets_its_own_graphs_parameter_positions(backend_name):
    """The backward graph is compiled lazily, at the first backward(): a second dynamo graph compiled
    after the first's forward but before its backward (a recompile for another shape or mode, another
    layer piece) must not hand the first's backward passes its own parameter positions. Here the two
    graphs take their Parameter at different positions; the old keep.param_inputs, read at backward
    compile, gave the first backward the second graph's (0,) instead of its (1,)."""
    from oases_fx import backend as _backend

    seen = []

    def probe(gm):
        seen.append(gm.meta[_backend.PARAM_INPUTS_KEY])
        return gm

    keep = _backend.CompiledGraphs()
    fn = _backend.make_backend(backend=backend_name, fw_passes=[], bw_passes=[_backend.GraphPass("probe", probe)],
                               keep=keep)
    w = nn.Parameter(torch.randn(4, 4))
    x = torch.randn(3, 4)
    first = torch.compile(lambda x, w: (x @ w).tanh().sum(), backend=fn, fullgraph=True, dynamic=False)
    # dynamo orders a graph's inputs by first use: the Parameter is input 0 here
    second = torch.compile(lambda w, x: (w.t() @ x.t()).sin().sum(), backend=fn, fullgraph=True, dynamic=False)
    loss1 = first(x, w)
    loss2 = second(w, x)
    assert keep.param_inputs == (0,)  # the last compile's, as explain() shows
    loss1.backward()
    loss2.backward()
    assert seen == [(1,), (0,)]
