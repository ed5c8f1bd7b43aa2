"""The two-stream execution model (oases_fx/timeline.py) on hand-built graphs with known answers.

Graphs are built node by node with fx.Graph and timed with a TableCostModel keyed by node name,
so every expected number below follows from the model in the module docstring by hand.
"""
import math

import pytest
import torch
import torch.fx as fx

from oases_fx import timeline as tl
from oases_fx.timeline import (
    AnalyticalCostModel,
    DeviceConstants,
    LiveBytes,
    TableCostModel,
    Timeline,
    op_key,
    peak_live_bytes,
    simulate,
)

aten = torch.ops.aten
c10d = torch.ops._c10d_functional


class _G:
    """Tiny graph builder: compute nodes, collectives and waits with meta["val"] on meta tensors."""

    def __init__(self, shape=(64, 64), dtype=torch.float32):
        self.g = fx.Graph()
        self.shape, self.dtype = shape, dtype
        self.x = self._ph("x")

    def _val(self, n, shape=None):
        n.meta["val"] = torch.empty(shape or self.shape, dtype=self.dtype, device="meta")
        return n

    def _ph(self, name):
        return self._val(self.g.placeholder(name))

    def compute(self, name, inp=None):
        n = self.g.call_function(aten.relu.default, (inp if inp is not None else self.x,))
        n.name = name
        return self._val(n)

    def ar(self, name, inp):
        n = self.g.call_function(c10d.all_reduce.default, (inp, "sum", "0"))
        n.name = name
        return self._val(n)

    def wait(self, name, ar):
        n = self.g.call_function(c10d.wait_tensor.default, (ar,))
        n.name = name
        return self._val(n)

    def done(self, *outs):
        self.g.output(tuple(outs))
        return list(self.g.nodes)


def _table(compute, comm, **kw):
    return TableCostModel(compute=compute, comm=comm, **kw)


def _check_accounting(t: Timeline):
    assert math.isclose(t.comm_exposed_us + t.comm_hidden_us, t.comm_total_us, abs_tol=1e-9)
    assert t.comm_total_us == pytest.approx(sum(iv.duration_us for iv in t.comm))


def test_fully_serial_makespan():
    # c1 -> ar -> wait -> c2: nothing can overlap, everything adds up.
    b = _G()
    c1 = b.compute("c1")
    ar = b.ar("ar", c1)
    w = b.wait("w", ar)
    c2 = b.compute("c2", w)
    t = simulate(b.done(c2), _table({"c1": 100.0, "c2": 30.0}, {"ar": 50.0}))
    assert t.makespan_us == 180.0
    assert t.comm_total_us == 50.0 and t.comm_exposed_us == 50.0 and t.comm_hidden_us == 0.0
    assert t.interval("ar").start_us == 100.0 and t.interval("ar").end_us == 150.0
    assert t.interval("w").start_us == 100.0 and t.interval("w").end_us == 150.0  # blocked
    assert t.interval("c2").start_us == 150.0
    _check_accounting(t)


def test_perfectly_overlapped_makespan():
    # c1 -> ar issued; independent c2 (80 us) runs under the 50 us collective; wait is free.
    b = _G()
    c1 = b.compute("c1")
    ar = b.ar("ar", c1)
    c2 = b.compute("c2")
    w = b.wait("w", ar)
    c3 = b.compute("c3", w)
    t = simulate(b.done(c2, c3), _table({"c1": 100.0, "c2": 80.0, "c3": 20.0}, {"ar": 50.0}))
    assert t.makespan_us == 200.0  # = total compute: the collective is fully hidden
    assert t.comm_hidden_us == 50.0 and t.comm_exposed_us == 0.0
    assert t.interval("w").duration_us == 0.0
    _check_accounting(t)


def test_partially_overlapped():
    b = _G()
    c1 = b.compute("c1")
    ar = b.ar("ar", c1)
    c2 = b.compute("c2")
    w = b.wait("w", ar)
    c3 = b.compute("c3", w)
    t = simulate(b.done(c2, c3), _table({"c1": 100.0, "c2": 30.0, "c3": 20.0}, {"ar": 50.0}))
    # ar [100, 150], c2 [100, 130], compute stream blocked [130, 150], c3 [150, 170]
    assert t.makespan_us == 170.0
    assert t.comm_hidden_us == 30.0 and t.comm_exposed_us == 20.0
    assert (t.interval("w").start_us, t.interval("w").end_us) == (130.0, 150.0)
    _check_accounting(t)


def test_collectives_serialize_on_comm_stream():
    b = _G()
    c1 = b.compute("c1")
    a1 = b.ar("a1", c1)
    a2 = b.ar("a2", c1)
    w1 = b.wait("w1", a1)
    w2 = b.wait("w2", a2)
    t = simulate(b.done(w1, w2), _table({"c1": 10.0}, {"a1": 40.0, "a2": 40.0}))
    assert (t.interval("a1").start_us, t.interval("a1").end_us) == (10.0, 50.0)
    assert (t.interval("a2").start_us, t.interval("a2").end_us) == (50.0, 90.0)
    assert t.makespan_us == 90.0 and t.comm_exposed_us == 80.0
    _check_accounting(t)


def test_collective_starts_after_compute_issued_before_it():
    # Host order: c1, c2 (independent), ar(c1). NCCL waits for the compute stream's position at
    # issue, so ar starts after c2, not when c1 (its input) finished.
    b = _G()
    c1 = b.compute("c1")
    c2 = b.compute("c2")
    ar = b.ar("ar", c1)
    w = b.wait("w", ar)
    t = simulate(b.done(c2, w), _table({"c1": 100.0, "c2": 50.0}, {"ar": 20.0}))
    assert t.interval("ar").start_us == 150.0
    assert t.makespan_us == 170.0


def test_interference_applies_to_overlapping_part():
    # c2 (100 us alone) overlaps ar [100, 150] at half speed: 25 us of work done there, 75 left.
    b = _G()
    c1 = b.compute("c1")
    ar = b.ar("ar", c1)
    c2 = b.compute("c2")
    w = b.wait("w", ar)
    nodes = b.done(c2, w)
    cm = _table({"c1": 100.0, "c2": 100.0}, {"ar": 50.0}, compute_interference=2.0)
    t = simulate(nodes, cm)
    assert t.interval("c2").end_us == pytest.approx(225.0)
    assert t.makespan_us == pytest.approx(225.0)
    assert t.comm_hidden_us == pytest.approx(50.0)
    # Comm slowed by compute instead: ar runs at half speed under c2 [100, 200].
    cm = _table({"c1": 100.0, "c2": 100.0}, {"ar": 50.0}, comm_interference=2.0)
    t = simulate(nodes, cm)
    assert (t.interval("ar").start_us, t.interval("ar").end_us) == (100.0, 200.0)
    _check_accounting(t)


def test_unwaited_trailing_collective_is_exposed():
    b = _G()
    c1 = b.compute("c1")
    ar = b.ar("ar", c1)
    t = simulate(b.done(ar), _table({"c1": 10.0}, {"ar": 30.0}))
    assert t.makespan_us == 40.0 and t.comm_exposed_us == 30.0
    _check_accounting(t)


def test_wait_before_its_collective_is_an_error():
    b = _G()
    c1 = b.compute("c1")
    ar = b.ar("ar", c1)
    w = b.wait("w", ar)
    nodes = b.done(w)
    bad = [nodes[0], nodes[1], nodes[3], nodes[2], nodes[4]]  # x, c1, w, ar, output
    with pytest.raises(ValueError, match="before its collective"):
        simulate(bad, _table({"c1": 1.0}, {"ar": 1.0}))


def test_negative_cost_is_an_error():
    b = _G()
    c1 = b.compute("c1")
    with pytest.raises(ValueError, match="c1"):
        simulate(b.done(c1), _table({"c1": -1.0}, {}))


def test_table_cost_model_lookup_order_and_miss():
    b = _G()
    c1 = b.compute("c1")
    c2 = b.compute("c2")
    ar = b.ar("ar", c2)
    b.done(c1, ar)
    key = op_key(c1)
    assert key == "aten.relu.default(float32[64,64])"
    cm = _table({"c1": 5.0, key: 7.0}, {"ar": 3.0})
    assert cm.compute_us(c1) == 5.0  # by name first
    assert cm.compute_us(c2) == 7.0  # then by op_key
    assert cm.comm_us(ar) == 3.0
    with pytest.raises(KeyError, match="ar"):
        _table({}, {}).comm_us(ar)
    fb = _table({}, {}, fallback=AnalyticalCostModel())
    assert fb.comm_us(ar) == pytest.approx(AnalyticalCostModel().comm_us(ar))


def test_analytical_cost_model_formulas():
    g = fx.Graph()
    a = g.placeholder("a")
    w = g.placeholder("w")
    a.meta["val"] = torch.empty(1024, 2048, dtype=torch.bfloat16, device="meta")
    w.meta["val"] = torch.empty(2048, 4096, dtype=torch.bfloat16, device="meta")
    mm = g.call_function(aten.mm.default, (a, w))
    mm.meta["val"] = torch.empty(1024, 4096, dtype=torch.bfloat16, device="meta")
    ar = g.call_function(c10d.all_reduce.default, (mm, "sum", "0"))
    ar.meta["val"] = mm.meta["val"]
    v = g.call_function(aten.view.default, (mm, [-1]))
    v.meta["val"] = torch.empty(1024 * 4096, dtype=torch.bfloat16, device="meta")
    g.output((ar, v))
    c = DeviceConstants(peak_flops=1e15, mem_bw_bytes_per_s=1e12, comm_alpha_us=5.0,
                        comm_bus_bw_bytes_per_s=100e9, group_size=4)
    cm = AnalyticalCostModel(c)
    flops = 2 * 1024 * 4096 * 2048
    moved = 2 * (1024 * 2048 + 2048 * 4096 + 1024 * 4096)
    assert tl.node_flops(mm) == flops
    assert cm.compute_us(mm) == pytest.approx(max(flops / 1e15, moved / 1e12) * 1e6)
    nbytes = 1024 * 4096 * 2
    assert cm.comm_us(ar) == pytest.approx(5.0 + nbytes * (2 * 3 / 4) / 100e9 * 1e6)
    assert cm.compute_us(v) == 0.0  # a view launches no kernel
    assert isinstance(cm, tl.CostModel) and isinstance(_table({}, {}), tl.CostModel)


def test_attention_flops():
    g = fx.Graph()
    q, k, v = (g.placeholder(n) for n in "qkv")
    for p in (q, k, v):
        p.meta["val"] = torch.empty(2, 8, 128, 64, device="meta")  # (B, H, S, D)
    op = aten._scaled_dot_product_flash_attention_for_cpu.default
    n = g.call_function(op, (q, k, v), {"is_causal": True})
    g.output(n)
    assert tl.node_flops(n) == 2 * (2 * 8 * 128) * 128 * (64 + 64) / 2


def test_live_bytes_frees_after_last_use_and_keeps_outputs():
    b = _G(shape=(10,), dtype=torch.float32)  # 40 B each
    c1 = b.compute("c1")
    c2 = b.compute("c2", c1)
    c3 = b.compute("c3", c2)
    nodes = b.done(c3)
    lb = LiveBytes(b.g)
    lives = []
    for n in nodes:
        lb.emit(n)
        lives.append(lb.live)
    # x is an input (not counted); c1 freed after c2 ran, c2 after c3; c3 is returned.
    assert lives == [0, 40, 40, 40, 40]
    assert lb.peak == 80 and peak_live_bytes(nodes) == 80


def test_summary_and_png(tmp_path):
    b = _G()
    c1 = b.compute("c1")
    ar = b.ar("ar", c1)
    c2 = b.compute("c2")
    w = b.wait("w", ar)
    t = simulate(b.done(c2, w), _table({"c1": 100.0, "c2": 30.0}, {"ar": 50.0}))
    s = t.summary()
    assert "makespan 150.0 us" in s and "exposed 20.0 us" in s and "hidden 30.0 us" in s
    path = tmp_path / "timeline.png"
    t.to_png(str(path), title="test")
    assert path.stat().st_size > 1000

