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


def _marked_trace(tmp_path, gpu_marks: bool):
    """3 steps, the GPU idle gaps NOT separating the steps (the last step's kernels start with a
    long gap inside it), each step marked as the harness marks it."""
    from benchmarks.overlap_sweep import STEP_MARK

    ev, corr = [], 0
    for step in range(3):
        b = step * 10_000
        ev.append(dict(cat="user_annotation", ph="X", name=STEP_MARK, ts=b, dur=1_000, pid=9))
        if gpu_marks:
            ev.append(dict(cat="gpu_user_annotation", ph="X", name=STEP_MARK, ts=b + 2_000, dur=7_000, pid=0))
        for name, ts, dur in (("sm90_gemm", 2_000, 100), ("ncclDevKernel_AllReduce", 2_100, 200),
                              ("sm90_gemm", 6_000, 100), ("ncclDevKernel_AllReduce", 6_100, 300)):
            corr += 1
            ev.append(dict(cat="cuda_runtime", ph="X", name="cudaLaunchKernel", ts=b + 10 * corr % 900, dur=5,
                           pid=9, args=dict(correlation=corr)))
            ev.append(dict(cat="kernel", ph="X", name=name, ts=b + ts, dur=dur, pid=0, args=dict(correlation=corr)))
    p = tmp_path / "m.json"
    p.write_text(json.dumps({"traceEvents": ev}))
    return p


def test_collective_table_uses_the_step_marks(tmp_path):
    for gpu_marks, how in ((True, "GPU step range"), (False, "launched in the last CPU step range")):
        text = collective_table(_marked_trace(tmp_path, gpu_marks))
        rows = [ln for ln in text.splitlines() if not ln.startswith("#")]
        assert how in text
        assert [float(r.split()[1]) for r in rows] == [0.2, 0.3]  # exactly the last step's two all-reduces
        assert "step 4.400 ms" in text  # from its first kernel (2.0) to its last end (6.4)
