"""The cost model's per-step compute terms (oases_fx/planner/cost_model.py, profile.StepConstants).

Issue 14: the planner's compute-only prediction must see what k and the recompute policy cost
beyond the ops' own times: the split's copies, the weight-gradient accumulation copies, kernels
(launch/tail overhead on the device, issue time on the host, step = max(device, host)), Inductor's
fusion of neighbouring pointwise ops, and which ops each recompute policy re-runs. Each test
switches one term on and checks the prediction moves by exactly that term's formula, or that a
structural fact holds (which ops are recomputed). No timing is asserted.
"""
import dataclasses

import pytest
import torch

from oases_fx.models import GPT, GPTConfig
from oases_fx.passes.annotate_sharding import find_tmp_regions
from oases_fx.planner import (
    AlphaBeta, Choice, ModelSpec, OpSpec, Profile, RegionSpec, RegionVariant, analytical_profile, describe_model,
    predict,
)
from oases_fx.planner.cost_model import (
    ATTENTION_BACKWARD_KERNELS, CostCache, _is_extern, extern_kernels, is_identity_op, price_ops,
)
from oases_fx.planner.profile import StepConstants, measure_step_constants
from oases_fx.tracing import capture

BATCH, SEQ, HIDDEN, HEADS = 4, 16, 32, 4
FREE = AlphaBeta(alpha_us=0.0, beta_us_per_byte=0.0)


@pytest.fixture(scope="module")
def traced():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, block_size=SEQ, n_layer=2, n_head=HEADS, n_embd=HIDDEN)
    idx = torch.randint(0, 64, (BATCH, SEQ))
    gm = capture(GPT(cfg), (idx, idx.clone()), {}).gm
    regions, _ = find_tmp_regions(gm, 2)
    return gm, regions


def _spec(traced, ks=(1, 2, 4)):
    gm, regions = traced
    return describe_model(gm, regions, tp=2, batch=BATCH, k_choices=ks, degrees=(2,), vocab=False)


def _choice(model, k, rc="none"):
    return Choice(num_sub_batches=k, recompute=rc, shard=(True,) * len(model.regions))


def _linear_chain(ks=(1, 2), *, param_bytes=1 << 20, act_bytes=1 << 16):
    """One region of one column op (time 100/k us forward, 200/k backward) and no glue, nothing
    outside: its per-sub-batch work sums to the same for every k, so whatever k adds is a step term."""
    op_us, variants = {}, {}
    for k in ks:
        key = f"col|k{k}"
        op_us[key] = (100.0 / k, 200.0 / k)
        variants[(k, True)] = RegionVariant(
            ops=(OpSpec(key=key, part="region", out_bytes=act_bytes // k, column=True),),
            in_bytes=act_bytes // k, out_bytes=act_bytes // k, param_numel=param_bytes // 2, param_bytes=param_bytes)
    model = ModelSpec(regions=(RegionSpec(name="r0", kind="mlp", variants=variants),), tp=2, batch=8)
    prof = Profile(source="synthetic", device_name="x", torch_version="-", tp_degree=2, op_us=op_us,
                   all_reduce=FREE, memory_bytes=1 << 40)
    return model, prof


def test_k2_exceeds_k1_by_the_split_and_accumulation_copies():
    model, prof = _linear_chain()
    one, two = (predict(model, _choice(model, k), prof) for k in (1, 2))
    assert two.step_us == pytest.approx(one.step_us)  # no step constants: k is free
    bw = 1e12
    prof = dataclasses.replace(prof, step=StepConstants(copy_bw_bytes_per_s=bw))
    one, two = (predict(model, _choice(model, k), prof) for k in (1, 2))
    act, params = 1 << 16, 1 << 20
    cats = 2 * (2 * act / bw * 1e6)  # forward cat of the output + backward cat of the input grad: read + write
    accumulate = 3 * params / bw * 1e6  # sub-batch 2's weight grad: copy (read + write) + the GEMM's read
    assert two.step_us - one.step_us == pytest.approx(cats + accumulate, rel=1e-9)
    assert one.step_us == pytest.approx(300.0)  # k=1 has neither


def test_kernel_overhead_is_per_kernel_and_only_for_roofline_times():
    model, prof = _linear_chain(ks=(1,))
    base = predict(model, _choice(model, 1), prof)
    roof = predict(model, _choice(model, 1), dataclasses.replace(prof, step=StepConstants(kernel_overhead_us=5.0)))
    # the synthetic op is not a library op: one fused kernel forward, one backward
    assert roof.step_us - base.step_us == pytest.approx(2 * 5.0)
    timed = dataclasses.replace(prof, step=StepConstants(kernel_overhead_us=5.0, op_times_include_overhead=True))
    assert predict(model, _choice(model, 1), timed).step_us == pytest.approx(base.step_us)


def test_library_kernels_get_their_fixed_time_only_on_roofline_times(traced):
    model = _spec(traced)
    prof = analytical_profile(model)
    ops = model.regions[0].variants[(1, True)].ops  # the attention block: qkv, sdpa, proj, glue
    no_lib = dataclasses.replace(prof, step=dataclasses.replace(prof.step, library_kernel_us=0.0))
    lib = dataclasses.replace(prof, step=dataclasses.replace(prof.step, library_kernel_us=7.0))
    base, more = price_ops(ops, no_lib), price_ops(ops, lib)
    externs = [i for i, o in enumerate(ops) if _is_extern(o.key)]
    assert len(externs) == 3  # qkv, attention, proj
    for i, (a, b) in enumerate(zip(base, more)):
        if i in externs:  # each library kernel pays the constant once, forward and backward
            assert b.fwd_us - a.fwd_us == pytest.approx(7.0 * a.fwd_kernels)
            assert b.bwd_us - a.bwd_us == pytest.approx(7.0 * a.bwd_kernels)
        else:
            assert (b.fwd_us, b.bwd_us) == (a.fwd_us, a.bwd_us)
    sdpa = next(p for p in base if "attention" in p.op.key)
    assert (sdpa.fwd_kernels, sdpa.bwd_kernels) == (1, ATTENTION_BACKWARD_KERNELS) == extern_kernels(sdpa.op.key)
    # op times measured one op at a time hold the constant already
    timed = [dataclasses.replace(p, step=dataclasses.replace(p.step, op_times_include_overhead=True))
             for p in (no_lib, lib)]
    assert [(c.fwd_us, c.bwd_us) for c in price_ops(ops, timed[0])] == [(c.fwd_us, c.bwd_us)
                                                                        for c in price_ops(ops, timed[1])]


def test_planner_check_fits_the_host_constants_it_was_given():
    from benchmarks.planner_check import fit_host_constants

    truth = (4000.0, 20.0, 300.0)
    pts = [(kn, seg, truth[0] + truth[1] * kn + truth[2] * seg) for kn, seg in ((60, 0), (120, 0), (240, 0), (70, 4),
                                                                                (140, 8), (280, 16))]
    assert fit_host_constants(pts, 999.0) == pytest.approx(truth)
    # no recomputing point: the per-checkpoint constant is the one given, the others are fitted
    assert fit_host_constants([p for p in pts if not p[1]], 999.0) == pytest.approx([truth[0], truth[1], 999.0])
    with pytest.raises(SystemExit, match="fewer than 2 kernel counts"):
        fit_host_constants([(60, 0, 5000.0), (60, 0, 5100.0)], 0.0)


def test_host_bound_step_predicts_the_host_floor(traced):
    model = _spec(traced)
    prof = dataclasses.replace(analytical_profile(model), all_reduce=FREE)
    host = dataclasses.replace(prof.step, host_step_us=1e5, host_per_kernel_us=100.0)
    p = predict(model, _choice(model, 2), dataclasses.replace(prof, step=host))
    assert p.host_bound and p.step_us == p.host_us > p.device_us
    assert p.host_us == pytest.approx(1e5 + 100.0 * p.kernels)
    # device-bound when the host is free: the step is the device's
    free = predict(model, _choice(model, 2), dataclasses.replace(prof, step=dataclasses.replace(
        prof.step, host_step_us=0.0, host_per_kernel_us=0.0, host_per_checkpoint_us=0.0)))
    assert not free.host_bound and free.step_us == free.device_us == pytest.approx(p.device_us)


def test_more_sub_batches_launch_more_kernels_and_recompute_more(traced):
    model = _spec(traced)
    cache = CostCache(model, analytical_profile(model))
    n = {(k, rc): cache.step_kernels(_choice(model, k, rc)) for k in (1, 2, 4) for rc in ("none", "fine")}
    assert n[(1, "none")] < n[(2, "none")] < n[(4, "none")]
    assert n[(1, "none")] < n[(1, "fine")]
    # per extra sub-batch: every region's kernels once more, plus its accumulation copies
    per_sub = sum(sum(cache.region(r, 2, 2).kernels[:2]) + cache.region(r, 2, 2).kernels[4]
                  for r in range(len(model.regions)))
    assert n[(2, "none")] - n[(1, "none")] == pytest.approx(per_sub + 2 + sum(
        sum(cache.region(r, 2, 2).kernels[:2]) - sum(cache.region(r, 1, 2).kernels[:2])
        for r in range(len(model.regions))))


def test_recomputed_ops_are_those_backward_reads(traced):
    model = _spec(traced)
    _, regions = traced
    for spec, r in zip(model.regions, regions):
        v = spec.variants[(1, True)]
        by_name = {o.name: o for o in v.ops}
        assert not by_name[r.row.name].recomputed, "the row linear's output only feeds the all-reduce and adds"
        for c in r.columns:
            assert by_name[c.name].recomputed, "a column linear's output is read by the op after it"
        sdpa = [o for o in v.ops if "scaled_dot_product" in o.key]
        assert all(o.recomputed for o in sdpa), "attention's backward reads its output"


def test_fine_and_full_differ_by_the_row_linears_when_the_all_reduce_runs_again(traced):
    model = _spec(traced)
    prof = analytical_profile(model)  # all-reduces priced: full re-runs them on recomputed rows
    cache = CostCache(model, prof)
    for ri, spec in enumerate(model.regions):
        pc = cache.region(ri, 2, 2)
        priced = price_ops(spec.variants[(2, True)].ops, prof)
        rows = [p for p in priced if p.op.part == "region" and not p.op.recomputed]
        assert rows
        assert pc.re_full - pc.re_fine == pytest.approx(sum(p.fwd_us for p in rows))
        assert pc.re_full > pc.re_fine
    fine, full = (predict(model, _choice(model, 2, rc), prof) for rc in ("fine", "full"))
    assert full.device_us != fine.device_us
    # compute only (collectives free, as with skip_collectives): nothing needs the rows again
    free = dataclasses.replace(prof, all_reduce=FREE)
    cache = CostCache(model, free)
    assert all(cache.region(ri, 2, 2).re_full == cache.region(ri, 2, 2).re_fine for ri in range(len(model.regions)))


def test_dropout_p0_is_free_and_fused_pointwise_reads_less(traced):
    model = _spec(traced)
    prof = analytical_profile(model)
    glue = [o for o in model.regions[0].variants[(1, True)].ops if o.part == "glue"]
    drop = [o for o in glue if "dropout" in o.key]
    assert drop and all(is_identity_op(o.key) for o in drop)
    priced = {p.op.name: p for p in price_ops(model.regions[0].variants[(1, True)].ops, prof)}
    assert all(priced[o.name].fwd_us == 0 and priced[o.name].fwd_kernels == 0 for o in drop)
    norm = next(o for o in glue if "layer_norm" in o.key)  # reads the residual add's output inside the kernel
    f, _ = prof.op_time(norm.key)
    assert 0 < priced[norm.name].fwd_us - prof.step.kernel_overhead_us * priced[norm.name].fwd_kernels < f
    assert priced[norm.name].fwd_kernels == 0  # the add opened the fused kernel


def test_step_constants_round_trip_and_old_profiles_load():
    sc = StepConstants(kernel_overhead_us=2.5, host_step_us=10.0, host_per_kernel_us=3.0, host_per_checkpoint_us=4.0,
                       copy_bw_bytes_per_s=1e12, op_times_include_overhead=True, source="t")
    prof = Profile(source="synthetic", device_name="x", torch_version="-", tp_degree=2, op_us={"a": (1.0, 2.0)},
                   all_reduce=FREE, memory_bytes=1, step=sc)
    assert Profile.from_json(prof.to_json()).step == sc
    d = prof.to_dict()
    d.pop("step")  # written before StepConstants existed: no step terms
    assert Profile.from_dict(d).step == StepConstants()


def test_measured_step_constants_on_cpu():
    sc = measure_step_constants(torch.device("cpu"))
    assert sc.op_times_include_overhead and sc.kernel_overhead_us == 0.0  # an op's time has no separate launch
    assert sc.host_step_us == sc.host_per_kernel_us == sc.host_per_checkpoint_us == 0.0  # the CPU is the device
    assert sc.copy_bw_bytes_per_s > 0


def test_planner_check_writes_rows_and_re_predicts_from_its_profiles(tmp_path):
    # A subprocess: planner_check makes this process rank 0 of a fake TP world.
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out, again = tmp_path / "a.json", tmp_path / "b.json"
    base = [sys.executable, "-m", "benchmarks.planner_check", "--tiny", "--device", "cpu", "--hidden", "32"]
    subprocess.run(base + ["--out", str(out)], check=True, capture_output=True, text=True, cwd=root)
    r = subprocess.run(base + ["--profile-from", str(out), "--out", str(again)], check=True, capture_output=True,
                       text=True, cwd=root)
    a, b = json.loads(out.read_text()), json.loads(again.read_text())
    assert [x["predicted_ms"] for x in a["rows"]] == [x["predicted_ms"] for x in b["rows"]]
    assert len(a["rows"]) == 9 and {x["recompute"] for x in a["rows"]} == {"none", "fine", "full"}
    assert all(x["predicted_ms"] == pytest.approx(max(x["device_ms"], x["host_ms"]), abs=2e-3) for x in a["rows"])
    assert "| predicted ms | device / host ms |" in r.stdout
    grid = tmp_path / "grid.json"
    subprocess.run([sys.executable, "-m", "benchmarks.planner_check", "--write-grid", str(grid), "--tp-list", "2,4",
                    "--hidden", "1024"], check=True, capture_output=True, cwd=root)
    cases = json.loads(grid.read_text())
    assert len(cases) == 18 and all(c["collectives"] == "skip" and c["system"] == "oases" for c in cases)


def test_planner_check_reads_a_traced_row_only_where_no_untraced_one_is(tmp_path):
    import json

    from benchmarks.planner_check import measured_steps

    def row(step, trace, k=2):
        case = dict(system="oases", tp=4, hidden=4096, layers=2, batch=8, seq=2048, k=k, recompute="none",
                    collectives="skip", options={}, trace=trace)
        return dict(case=case, step_ms=step, host_ms=1.0)

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(dict(rows=[row(26.0, False), row(21.0, True, k=4)])))
    b.write_text(json.dumps(dict(rows=[row(20.0, True)])))  # listed last, but traced
    got = measured_steps([a, b])
    assert got[(4, 4096, 2, 8, 2048, 2, "none")]["step_ms"] == 26.0  # the untraced row wins
    assert got[(4, 4096, 2, 8, 2048, 4, "none")]["step_ms"] == 21.0  # traced, and the only one
    assert measured_steps([b])[(4, 4096, 2, 8, 2048, 2, "none")]["step_ms"] == 20.0
