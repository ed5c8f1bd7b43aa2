"""The overlap numbers the sweep reports are computed from profiler traces: check them on a
synthetic trace whose answer is known."""
import json

from benchmarks.overlap_sweep import collective_table, overlap_from_trace


def _trace(tmp_path):
    ev = []
    for step in range(3):
        b = step * 10_000
        ev += [dict(cat="kernel", ph="X", name="sm90_gemm", ts=b, dur=100, pid=0),
               dict(cat="kernel", ph="X", name="ncclDevKernel_AllReduce", ts=b + 100, dur=200, pid=0),
               dict(cat="kernel", ph="X", name="sm90_gemm", ts=b + 150, dur=100, pid=0),
               dict(cat="kernel", ph="X", name="triton_poi_add", ts=b + 400, dur=50, pid=0)]
    p = tmp_path / "t.json"
    p.write_text(json.dumps({"traceEvents": ev}))
    return p


def test_overlap_fraction(tmp_path):
    frac, total = overlap_from_trace(_trace(tmp_path))
    assert total == 600.0 and frac == 0.5  # each 200 us all-reduce has one 100 us GEMM under it


def test_collective_table_lists_the_last_step(tmp_path):
    text = collective_table(_trace(tmp_path))
    rows = [ln for ln in text.splitlines() if not ln.startswith("#")]
    assert len(rows) == 1  # one all-reduce in the last step
    start, dur, frac = rows[0].split()[:3]
    assert (float(start), float(dur), frac) == (0.1, 0.2, "50%")
    assert "step 0.450 ms" in text
