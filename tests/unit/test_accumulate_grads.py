"""accumulate_grads (passes/accumulate_grads.py): a sum of matmuls in the backward graph becomes one
in-place accumulation (oases_fx::mm_accumulate), with the values of Inductor's addmm chain.

What is checked: the finder on a hand-built graph (what it takes, what it leaves, in which order it
accumulates) and the op's values against the addmm chain Inductor makes of the original graph,
bitwise, fp32 and bf16; the compiled GPT at k=1/2/4 on two gloo ranks (aot_eager): one rewrite per
TMP weight matrix (none at k=1), gradients equal to the pass-off run and to the unsharded eager
model (also with fine/full recompute, and dp=2 with dp_reduce="graph" after the pass); and under
Inductor (rank 0 of a fake TP=2 group, in a subprocess: the group is process-wide; on the GPU where
there is one) loss and every gradient bitwise equal to the pass-off run, fp32 at k=2 and bf16 at k=4.
On a GPU, the op is also checked bitwise against the addmm chain on cuBLAS.
"""
import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from oases_fx import meta as oases_meta
from oases_fx.passes.accumulate_grads import MM_ACCUMULATE, RECORD_KEY, accumulate_grads_pass, find_accumulations
from oases_fx.timeline import node_flops

ROOT = Path(__file__).resolve().parents[2]
aten = torch.ops.aten

# Against the unsharded eager model: the tolerances of tests/distributed/test_equivalence.py (sharding
# reorders fp32 sums; see there).
ATOL, RTOL = 2e-5, 1e-4
# aot_eager, pass on vs off, rewritten gradients only: the original graph rounds each mm's result
# before adding (round(round(m0) + round(m1))), the op adds each term inside the GEMM; the results
# differ by about one fp32 rounding (2^-24 relative) of the partial sums per term. The partial sums
# of these gradients are < 1e-1, so |difference| < 4 x 1e-1 x 2^-24 ~ 2.4e-8 at k = 4: 1e-7 leaves
# headroom and is still 1e5 below the gradient's size, far from a dropped or doubled sub-batch.
ACC_ATOL = 1e-7


# --- the finder and the op on a hand-built graph --------------------------------------------------

def _sums(g0, x0, g1, x1, g2, x2, g3, x3, w):
    def m(g, x):
        return g.t() @ x  # a weight gradient: dY^T X

    two = m(g0, x0).t().t() + m(g1, x1).t().t()        # through two transposes (what AOTAutograd emits)
    four = ((m(g0, x0) + m(g1, x1)) + m(g2, x2)) + m(g3, x3)
    right = m(g2, x2) + (m(g0, x0) + m(g1, x1))        # the chain as the second operand
    balanced = (m(g0, x0) + m(g1, x1)) + (m(g2, x2) + m(g3, x3))  # outer add left; each inner sum taken
    odd = m(g0, x0).t() + m(g1, x1).t()                # an odd number of transposes: left alone
    shared_mm = m(g0, x0)
    shared = shared_mm + m(g1, x1)                     # its mm has another user: left alone
    mixed = m(g0, x0) + w                              # a term that is no mm: left alone
    twice = m(g2, x2)
    twice = twice + twice                              # one mm added to itself: left alone
    return two, four, right, balanced, odd, shared, shared_mm, mixed, twice


def _inputs(dtype):
    g = torch.Generator().manual_seed(0)
    T, M, N = 24, 8, 8
    args = []
    for _ in range(4):
        args += [torch.randn(T, M, generator=g, dtype=dtype), torch.randn(T, N, generator=g, dtype=dtype)]
    return args + [torch.randn(M, N, generator=g, dtype=dtype)]


def _addmm_chain(pairs):
    """What Inductor makes of mm_0 + mm_1 + ...: addmm(...addmm(mm(a_0, b_0), a_1, b_1)..., a_i, b_i)."""
    out = torch.mm(*pairs[0])
    for a, b in pairs[1:]:
        out = torch.addmm(out, a, b)
    return out


def _traced(dtype):
    args = _inputs(dtype)
    gm = make_fx(_sums, tracing_mode="fake")(*args)
    return gm, args


def test_finder_takes_chains_of_mms_and_leaves_the_rest():
    gm, _ = _traced(torch.float32)
    found = find_accumulations(gm.graph)
    # two, four, right, and balanced's two inner sums; not odd, shared, mixed, nor balanced's outer add
    assert sorted(len(a.mms) for a in found) == [2, 2, 2, 3, 4], [(a.root.name, len(a.mms)) for a in found]
    outs = list(gm.graph.nodes)[-1].args[0]
    roots = {a.root for a in found}
    assert outs[0] in roots and outs[1] in roots and outs[2] in roots
    assert outs[3] not in roots and set(outs[3].args) <= roots  # balanced: both inner sums, not the outer
    assert not roots & {outs[4], outs[5], outs[7], outs[8]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rewrite_gives_inductors_addmm_chain_bitwise(dtype):
    gm, args = _traced(dtype)
    want_graph = gm(*args)
    new = accumulate_grads_pass(copy.deepcopy(gm))
    assert len(new.meta[RECORD_KEY].rewritten) == 5
    assert sum(n.target is MM_ACCUMULATE for n in new.graph.nodes) == 5
    got = new(*args)
    g0, x0, g1, x1, g2, x2, g3, x3, w = args
    p0, p1, p2, p3 = [(g.t(), x) for g, x in ((g0, x0), (g1, x1), (g2, x2), (g3, x3))]
    want = {0: _addmm_chain([p0, p1]), 1: _addmm_chain([p0, p1, p2, p3]), 2: _addmm_chain([p0, p1, p2]),
            3: _addmm_chain([p0, p1]) + _addmm_chain([p2, p3])}
    for i, w_i in want.items():
        assert torch.equal(got[i], w_i), f"output {i}: not the addmm chain's value"
    for i in (4, 5, 6, 7, 8):  # not rewritten: bitwise the original graph's
        assert torch.equal(got[i], want_graph[i]), f"output {i} changed"
    # the original graph rounds each mm before adding, the rewrite adds inside the GEMM: they differ by
    # at most one rounding per term of a partial sum, elementwise <= k * eps * sum_i |a_i| @ |b_i|
    eps = torch.finfo(dtype).eps
    for i, pairs in ((0, [p0, p1]), (1, [p0, p1, p2, p3]), (2, [p0, p1, p2])):
        bound = len(pairs) * eps * sum(a.abs().float() @ b.abs().float() for a, b in pairs)
        err = (got[i].float() - want_graph[i].float()).abs()
        assert (err <= bound).all(), f"output {i}: {(err - bound).max().item()} over the rounding bound"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (cuBLAS)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_on_the_gpu_is_bitwise_the_addmm_chain(dtype):
    # weight-gradient layouts: a = dY^T (a transposed view), b = X; k = 4 terms
    g = torch.Generator(device="cuda").manual_seed(0)
    a = [torch.randn(2048, 1536, device="cuda", dtype=dtype, generator=g).t() for _ in range(4)]
    b = [torch.randn(2048, 1024, device="cuda", dtype=dtype, generator=g) for _ in range(4)]
    assert torch.equal(MM_ACCUMULATE(a, b), _addmm_chain(list(zip(a, b))))


def test_rewritten_node_takes_the_last_mms_place_and_meta():
    gm, _ = _traced(torch.float32)
    (acc,) = [a for a in find_accumulations(gm.graph) if len(a.mms) == 4]
    old = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    last = max(acc.mms, key=lambda m: old[m.name])
    for i, m in enumerate(acc.mms):
        oases_meta.update(m, stream="compute", start_us=float(i), end_us=float(i) + 0.5)
    root = acc.root.name
    flops = sum(node_flops(m) for m in acc.mms)
    accumulate_grads_pass(gm)
    (rec,) = [r for r in gm.meta[RECORD_KEY].rewritten if r[1] == root]
    new = next(n for n in gm.graph.nodes if n.name == rec[0])
    assert oases_meta.get(new).stream == "compute" and oases_meta.get(new).start_us == 3.0  # the last mm's
    assert node_flops(new) == flops == 4 * 2 * 8 * 8 * 24  # the schedule prices it as its GEMMs
    for n in gm.graph.nodes:  # everything before it came before the last mm, everything after came after
        if n is new or n.name not in old:
            continue
        before = list(gm.graph.nodes).index(n) < list(gm.graph.nodes).index(new)
        assert before == (old[n.name] < old[last.name]), f"{n.name} moved across the rewritten node"


def test_no_sum_of_mms_is_a_no_op():
    def f(g, x, w):
        return g.t() @ x + w, (g.t() @ x).t()

    gm = make_fx(f, tracing_mode="fake")(torch.randn(4, 3), torch.randn(4, 3), torch.randn(3, 3))
    code = gm.code
    accumulate_grads_pass(gm)
    assert gm.code == code and gm.meta[RECORD_KEY].rewritten == []


# --- the compiled GPT on two gloo ranks (aot_eager), against the pass-off run and the eager model --

CFG = dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32)


def compiled_grads(rank, world_size, *, k, mesh_shape=None, extra=None):
    """Rank task (tests/pool.py): the GPT compiled at k sub-batches with the pass on and off, one
    step on the same weights and batch (4 sequences per dp rank); the gathered gradients, what the pass
    rewrote, the unsharded eager model's gradients on the whole batch, and the TMP weight matrices
    (2-D sharded parameters). With a (dp, tp) mesh_shape, extra=dict(dp_reduce="graph") puts the dp
    all-reduce into the backward graph after this pass."""
    import oases_fx
    from torch.distributed.device_mesh import init_device_mesh
    from tests import tasks

    names = ("dp", "tp") if mesh_shape else ("tp",)
    mesh = init_device_mesh("cpu", tuple(mesh_shape or (world_size,)), mesh_dim_names=names)
    dp = mesh.size(0) if mesh_shape else 1
    local = slice(4 * (mesh.get_local_rank("dp") if mesh_shape else 0), None)
    ref = tasks.build_model("gpt", CFG)
    g = torch.Generator().manual_seed(1234)
    idx = torch.randint(0, CFG["vocab_size"], (4 * dp, 8), generator=g)
    tgt = torch.randint(0, CFG["vocab_size"], (4 * dp, 8), generator=g)
    x, y = idx[local][:4], tgt[local][:4]
    out = {}
    # on: asked for (the default follows cudagraphs, off here); off: the default
    for run, acc in (("on", dict(accumulate_grads=True)), ("off", {})):
        m = oases_fx.compile(copy.deepcopy(ref), mesh, example_inputs=(x, y), backend="aot_eager", verbose=False,
                             plan="megatron", num_sub_batches=k, **acc, **(extra or {}))
        _, loss = m(x, y)
        loss.backward()
        bw = m.graphs.aot.backward[-1]
        rec = bw.meta.get(RECORD_KEY)
        ops = [n for n in bw.graph.nodes if n.target is MM_ACCUMULATE]
        dp_rec = bw.meta.get("oases_dp_reduce")
        timed = {iv.name for ivs in bw.meta["oases_timeline"].streams.values() for iv in ivs}
        out[run] = dict(loss=loss.detach(), grads=m.full_grads(), ops=len(ops),
                        rewritten=None if rec is None else len(rec.rewritten),
                        streams=sorted({str(oases_meta.get(n).stream) for n in ops}),
                        timed=all(n.name in timed for n in ops),
                        dp_buckets=None if dp_rec is None else len(dp_rec.buckets),
                        explained=[l for l in m.explain().splitlines() if l.startswith("Weight-gradient accumulation")],
                        tmp=sorted(n for n, (_, _, shape) in m.graphs.gm.meta["oases"]["sharded_params"].items()
                                   if len(shape) == 2))
    _, r_loss = ref(idx, tgt)
    r_loss.backward()
    out["ref"] = dict(loss=r_loss.detach(), grads={n: p.grad for n, p in ref.named_parameters()})
    return out if rank == 0 else None


def _check(r, k, dp=1):
    on, off, ref = r["on"], r["off"], r["ref"]
    tmp = on["tmp"]
    assert len(tmp) == 4 * CFG["n_layer"], tmp  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    # one rewrite per TMP weight matrix whose gradient is summed over sub-batches; none at k=1
    assert on["rewritten"] == on["ops"] == (len(tmp) if k > 1 else 0), (on["rewritten"], on["ops"], k)
    assert off["ops"] == 0 and off["rewritten"] is None
    assert len(on["explained"]) == 1 and f"{on['rewritten']} sum(s)" in on["explained"][0], on["explained"]
    assert off["explained"] == []  # switched off: no record, no line
    if k > 1:
        assert on["streams"] == ["compute"] and on["timed"], on["streams"]  # in the re-simulated timeline
    assert torch.equal(on["loss"], off["loss"])
    for name, g_off in off["grads"].items():
        if name in tmp:
            torch.testing.assert_close(on["grads"][name], g_off, atol=ACC_ATOL, rtol=0, msg=lambda m: f"{name}: {m}")
        else:
            assert torch.equal(on["grads"][name], g_off), f"{name}: not rewritten, yet changed"
    if dp == 1:  # with dp, the reference's loss is the mean of the dp ranks' losses
        torch.testing.assert_close(on["loss"], ref["loss"], atol=ATOL, rtol=RTOL)
    for name, g_ref in ref["grads"].items():
        torch.testing.assert_close(on["grads"][name], g_ref, atol=ATOL, rtol=RTOL, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("k", [1, 2, 4])
def test_gpt_gradients_with_the_pass_equal_pass_off_and_eager(pool2, k):
    _check(pool2.run(compiled_grads, k=k)[0], k)


@pytest.mark.parametrize("recompute", ["fine", "full"])
def test_recomputed_forward_in_the_backward_keeps_the_rewrites_exact(pool2, recompute):
    # the backward graph holds the recomputed forward too: only the weight-gradient sums are rewritten
    _check(pool2.run(compiled_grads, k=2, extra=dict(recompute=recompute))[0], 2)


def test_dp_reduce_in_the_graph_averages_the_accumulated_gradients(pool4):
    # dp=2 x tp=2, dp_reduce="graph": dp_reduce runs after this pass and buckets the mm_accumulate outputs
    r = pool4.run(compiled_grads, k=2, mesh_shape=(2, 2), extra=dict(dp_reduce="graph"))[0]
    assert r["on"]["dp_buckets"] and r["off"]["dp_buckets"], (r["on"]["dp_buckets"], r["off"]["dp_buckets"])
    _check(r, 2, dp=2)


# --- Inductor: bitwise the pass-off run (fake TP=2 group, in a subprocess) ------------------------

def _inductor_run(spec: dict) -> dict:
    """In the subprocess: per (k, dtype), the GPT compiled by Inductor with the pass on and off (on the
    GPU where there is one: the same claim on cuBLAS and Triton)."""
    torch.set_num_threads(1)
    from benchmarks.rank_bench import Case, build, make_batch

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    out = {}
    for k, dtype in spec["cases"]:
        got = {}
        for run, acc in (("on", True), ("off", False)):
            case = Case(system="oases", tp=2, hidden=32, layers=2, batch=4, seq=8, vocab=64, head_dim=16, k=k,
                        collectives="fake", dtype=dtype, backend="inductor", options=dict(accumulate_grads=acc))
            torch.manual_seed(0)
            step, module, _ = build(case, dev)
            loss = step(*make_batch(case, dev))
            bw = module.graphs.aot.backward[-1]
            got[run] = dict(loss=float(loss), grads={n: p.grad.to_local().float().flatten().cpu().tolist()
                                                     for n, p in module.named_parameters() if p.grad is not None},
                            ops=sum(n.target is MM_ACCUMULATE for n in bw.graph.nodes))
        out[f"k={k} {dtype}"] = got
    return out


@pytest.mark.parametrize("cases", [[[2, "fp32"], [4, "bf16"]]])
def test_gpt_under_inductor_is_bitwise_the_pass_off_run(cases):
    res = _subprocess(dict(cases=cases))
    for what, r in res.items():
        on, off = r["on"], r["off"]
        assert on["ops"] == 4 * 2 and off["ops"] == 0, (what, on["ops"], off["ops"])  # 4 TMP weights x 2 layers
        assert on["loss"] == off["loss"], what
        assert set(on["grads"]) == set(off["grads"]), what
        for name in on["grads"]:
            assert on["grads"][name] == off["grads"][name], f"{what}: gradient of {name} differs (not bitwise)"


# --- the schedule: the rewrite does not make the predicted backward slower ----------------------

def _schedule_run(spec: dict) -> dict:
    """In the subprocess: the k-sub-batch GPT's backward as schedule_overlap gets it, scheduled and then
    rewritten (the pipeline's order), under scaled H100-like constants (tasks.schedule_memory's) on an
    NVLink-like and a PCIe-class link; predicted makespan and peak live bytes with the pass and without."""
    torch.set_num_threads(1)
    from benchmarks.rank_bench import Case, build, make_batch
    from oases_fx.passes.schedule_overlap import ScheduleOptions, schedule_overlap_pass
    from oases_fx.timeline import AnalyticalCostModel, DeviceConstants, peak_live_bytes, simulate

    case = Case(system="oases", tp=2, hidden=64, layers=2, batch=4, seq=16, vocab=64, head_dim=16, k=spec["k"],
                collectives="fake", dtype="fp32", backend="aot_eager",
                options=dict(disabled_passes=["schedule_overlap", "accumulate_grads"]))
    torch.manual_seed(0)
    step, module, _ = build(case, torch.device("cpu"))
    step(*make_batch(case, torch.device("cpu")))
    bw = module.graphs.aot.backward[-1]
    out = {}
    for link in (250.0, 27.5):
        cm = AnalyticalCostModel(DeviceConstants(peak_flops=800e12 / 4096, mem_bw_bytes_per_s=3e12 / 4096,
                                                 comm_alpha_us=1.0, comm_bus_bw_bytes_per_s=link * 1e9 / 4096))
        g = schedule_overlap_pass(copy.deepcopy(bw), options=ScheduleOptions(), cost_model=cm)
        off = simulate(list(g.graph.nodes), cm)
        off_peak = peak_live_bytes(list(g.graph.nodes))
        g = accumulate_grads_pass(g, cost_model=cm)
        on = g.meta["oases_timeline"]
        out[str(link)] = dict(off=off.makespan_us, on=on.makespan_us, off_peak=off_peak,
                              on_peak=peak_live_bytes(list(g.graph.nodes)), ops=len(g.meta[RECORD_KEY].rewritten))
    return out


@pytest.mark.parametrize("k", [2, 4])
def test_rewrite_does_not_slow_the_predicted_backward_nor_grow_its_memory(k):
    # The rewrite moves the earlier sub-batches' weight-gradient GEMMs to the last one's place, so less
    # compute may sit under an early all-reduce; the predicted makespan must not grow (what the GPU's step
    # sees; the share of communication hidden can drop where the adds removed were compute under it), and
    # the earlier terms' mm results no longer live until the sum: the predicted peak must not grow.
    res = _subprocess(dict(mode="schedule", k=k))
    for link, r in res.items():
        assert r["ops"] == 4 * 2, r
        assert r["on"] <= r["off"] * (1 + 1e-9), f"{link} GB/s: predicted makespan {r['on']} vs {r['off']} us"
        assert r["on_peak"] <= r["off_peak"], f"{link} GB/s: predicted peak {r['on_peak']} vs {r['off_peak']} B"


def _subprocess(spec: dict) -> dict:
    from tests.unit.graphs import run_module

    return run_module("tests.unit.test_accumulate_grads", json.dumps(spec), timeout=1200)


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    run = _schedule_run if spec.get("mode") == "schedule" else _inductor_run
    print("RESULT " + json.dumps(run(spec)), flush=True)
