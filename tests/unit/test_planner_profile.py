"""Profiling (oases_fx/planner/profile.py) and the model description it times, on CPU.

The profile is measured in this process on a one-rank gloo group (the "TMP group" of tp=1): op
times, an all-reduce alpha-beta fit and the interference factors are all exercised, with tiny
shapes and few repeats. The values are CPU noise; only their sanity is asserted.
"""
import math

import pytest
import torch
import torch.distributed as dist

from oases_fx.models import GPT, GPTConfig
from oases_fx.passes.annotate_sharding import find_tmp_regions
from oases_fx.planner import (
    AlphaBeta, ModelSpec, Profile, ProfileOptions, RegionSpec, RegionVariant, analytical_profile, choose_plan,
    collective_key, derived_collective, describe_model, explain_plan, fit_alpha_beta, load_cached_profile,
    measure_profile, required_collectives,
)
from oases_fx.tracing import capture

TINY_OPTIONS = ProfileOptions(warmup=1, repeats=3, collective_sizes_bytes=(4096, 16384, 65536),
                              collective_repeats=3, interference_gemm_n=64, interference_comm_bytes=65536,
                              interference_gemms=4, interference_repeats=2)
BATCH, SEQ, HIDDEN, HEADS = 4, 16, 32, 4


@pytest.fixture(scope="module")
def traced():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, block_size=SEQ, n_layer=2, n_head=HEADS, n_embd=HIDDEN)
    idx = torch.randint(0, 64, (BATCH, SEQ))
    return capture(GPT(cfg), (idx, idx.clone()), {})


@pytest.fixture(scope="module")
def group():
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    yield dist.group.WORLD
    if created:
        dist.destroy_process_group()


def test_alpha_beta_fit():
    sizes = [2 ** i for i in range(16, 27, 2)]
    ab = fit_alpha_beta(sizes, [12.0 + s / 20e3 for s in sizes])  # 12 us + 20 GB/s
    assert ab.alpha_us == pytest.approx(12.0, rel=1e-6)
    assert ab.beta_us_per_byte == pytest.approx(1 / 20e3, rel=1e-6)
    assert fit_alpha_beta([1e3, 1e6], [0.5, 100.0]).alpha_us >= 0  # negative intercept -> through the origin
    flat = fit_alpha_beta([1e3, 1e4, 1e5], [50.0, 49.0, 48.0])  # noise: no bandwidth term visible
    assert flat.beta_us_per_byte > 0 and flat.alpha_us >= 0


def test_describe_model_variant_shapes(traced):
    regions, _ = find_tmp_regions(traced.gm, 2)
    model = describe_model(traced.gm, regions, tp=2, batch=BATCH, k_choices=(1, 2, 3))
    assert model.k_choices == (1, 2)
    assert any("k=3" in n for n in model.notes)
    attn = model.regions[0]
    assert attn.kind == "attention"
    sharded, replicated = attn.variants[(2, True)], attn.variants[(2, False)]
    # Column c_attn (3h, h) is split on its output dim, the sub-batch is BATCH / 2.
    assert sharded.ops[0].column and f"[{3 * HIDDEN // 2},{HIDDEN}]" in sharded.ops[0].key
    assert f"[{BATCH // 2},{SEQ},{HIDDEN}]" in sharded.ops[0].key
    assert f"[{3 * HIDDEN},{HIDDEN}]" in replicated.ops[0].key
    sdpa = next(o for o in sharded.ops if "scaled_dot_product" in o.key)
    assert f"[{BATCH // 2},{HEADS // 2},{SEQ},{HIDDEN // HEADS}]" in sdpa.key
    hidden_bytes = BATCH // 2 * SEQ * HIDDEN * 4
    assert sharded.comm_fwd_bytes == sharded.comm_bwd_bytes == hidden_bytes
    assert replicated.comm_fwd_bytes == 0
    # Row bias stays whole: params are (3h*h + 3h + h*h) / 2 + h elements.
    assert sharded.param_numel == (3 * HIDDEN * HIDDEN + 3 * HIDDEN + HIDDEN * HIDDEN) // 2 + HIDDEN
    assert replicated.param_numel == 3 * HIDDEN * HIDDEN + 3 * HIDDEN + HIDDEN * HIDDEN + HIDDEN
    assert model.other_param_numel > 0 and model.tail_ops and model.head_ops


def test_analytical_profile_covers_the_model(traced):
    regions, _ = find_tmp_regions(traced.gm, 2)
    model = describe_model(traced.gm, regions, tp=2, batch=BATCH)
    prof = analytical_profile(model)
    assert prof.missing(model.op_keys()) == []
    assert prof.label().startswith("analytical, not measured")
    plan = choose_plan(model, tp=2, batch=BATCH, seq_len=SEQ, profile=prof)
    assert "analytical, not measured" in plan.predicted["profile"]


def test_measure_profile_on_cpu_and_cache_hit(traced, group, tmp_path, monkeypatch):
    monkeypatch.setenv("OASES_FX_CACHE", str(tmp_path))
    regions, _ = find_tmp_regions(traced.gm, 1)
    model = describe_model(traced.gm, regions, tp=1, batch=BATCH, k_choices=(1, 2))
    prof = measure_profile(model, group=group, options=TINY_OPTIONS, progress=False)
    assert not prof.from_cache and prof.source == "measured"
    assert prof.missing(model.op_keys()) == []
    assert all(f > 0 and b >= 0 for f, b in prof.op_us.values())
    linear_bwd = [b for k, (f, b) in prof.op_us.items() if k.startswith("aten.linear")]
    assert linear_bwd and all(b > 0 for b in linear_bwd)
    ab = prof.all_reduce
    assert ab.alpha_us >= 0 and ab.beta_us_per_byte > 0 and len(ab.times_us) == 3
    assert all(math.isfinite(t) and t > 0 for t in ab.times_us)
    assert prof.compute_interference >= 1.0 and prof.compute_interference <= 3.0
    assert prof.comm_interference >= 1.0 and prof.comm_interference <= 3.0
    assert prof.memory_bytes > 0
    # JSON round trip, then the cache: a second call reads it, and the CLI's lookup finds it.
    assert Profile.from_json(prof.to_json()) == prof
    again = measure_profile(model, group=group, options=TINY_OPTIONS, progress=False)
    assert again.from_cache and again == prof
    found = load_cached_profile(model)
    assert found is not None and found == prof
    plan = choose_plan(model, tp=1, batch=BATCH, seq_len=SEQ, profile=again, k_choices=(1, 2))
    assert plan.predicted["step_ms"] > 0 and "measured" in plan.predicted["profile"]


def test_measure_profile_needs_a_group_of_tp_ranks(traced, group):
    regions, _ = find_tmp_regions(traced.gm, 2)
    model = describe_model(traced.gm, regions, tp=2, batch=BATCH)
    with pytest.raises(ValueError, match="tp=2"):
        measure_profile(model, group=group, options=TINY_OPTIONS, progress=False, cache=False)


# --- per-region degrees and vocab_parallel in the model description and the profile -----------

def test_describe_model_degree_variants(traced):
    regions, _ = find_tmp_regions(traced.gm, 2)
    model = describe_model(traced.gm, regions, tp=2, batch=BATCH, k_choices=(1, 2), degrees=(2, 1))
    assert model.described_degrees == (2, 1)
    attn = model.regions[0]
    full, d1 = attn.variants[(2, True)], attn.degree_variants[(2, 1)]
    # d=1: full weights (c_attn [3h, h]) at a quarter of the batch (k=2 sub-batches, n=2 groups).
    assert f"[{3 * HIDDEN},{HIDDEN}]" in d1.ops[0].key and f"[{BATCH // 4},{SEQ},{HIDDEN}]" in d1.ops[0].key
    assert d1.comm_fwd_bytes == d1.comm_bwd_bytes == 0  # no all-reduce over one rank
    sub_batch_bytes = BATCH // 2 * SEQ * HIDDEN * 4
    assert d1.gather_fwd_bytes == d1.gather_bwd_bytes == sub_batch_bytes  # the whole sub-batch assembled
    assert d1.param_numel == 2 * full.param_numel - HIDDEN  # all parameters (row bias was whole already)
    assert d1.grad_reduce_bytes == d1.param_bytes and (d1.degree, d1.cross) == (1, 2)
    assert d1.out_bytes == full.out_bytes // 2  # activations / n
    # Glue runs on the whole sub-batch (after the all-gather), as at the full degree.
    assert [o.key for o in d1.ops if o.part == "glue"] == [o.key for o in full.ops if o.part == "glue"]
    # degrees=(2,) describes no lower degree; the profile then needs no subgroup collective.
    plain = describe_model(traced.gm, regions, tp=2, batch=BATCH, k_choices=(1, 2), degrees=(2,), vocab=False)
    assert not plain.regions[0].degree_variants and required_collectives(plain) == []
    assert required_collectives(model) == [("all_gather", "cross", 2)]
    with pytest.raises(ValueError, match="do not divide"):
        describe_model(traced.gm, regions, tp=2, batch=BATCH, degrees=(3,))


def test_describe_model_vocab_parallel(traced):
    regions, _ = find_tmp_regions(traced.gm, 2)
    model = describe_model(traced.gm, regions, tp=2, batch=BATCH, k_choices=(1,))
    v = model.vocab
    assert v is not None and v.vocab == 64
    # The plain GPT returns (logits, loss): the logits are all-gathered.
    assert v.logits_gather_bytes == BATCH * SEQ * 64 * 4
    assert v.emb_reduce_bytes == v.lm_grad_reduce_bytes == BATCH * SEQ * HIDDEN * 4
    assert v.ce_reduce_bytes == BATCH * SEQ * 4
    assert v.param_numel == 64 * HIDDEN  # tied embedding / LM head: one table
    assert any(f"[{64 // 2},{HIDDEN}]" in o.key and o.key.startswith("aten.linear") for o in v.tail_ops)
    assert any(f"[{BATCH * SEQ},{64 // 2}]" in o.key and "cross_entropy" in o.key for o in v.tail_ops)
    assert any(f"[{64 // 2},{HIDDEN}]" in o.key and o.key.startswith("aten.embedding") for o in v.head_ops)
    assert ("all_gather", "cross", 2) in required_collectives(model)
    # The detection can be swapped (passes.vocab_parallel.find_vocab_parallel later).
    none = describe_model(traced.gm, regions, tp=2, batch=BATCH, k_choices=(1,),
                          find_vocab=lambda gm: (None, "custom: no pattern"))
    assert none.vocab is None and none.vocab_reason == "custom: no pattern"
    prof = analytical_profile(none)
    plan = choose_plan(none, tp=2, batch=BATCH, seq_len=SEQ, profile=prof)
    assert not plan.vocab_parallel and "rejected: vocab_parallel: custom: no pattern" in explain_plan(plan, use_rich=False)
    # V % T != 0: skipped with the reason.
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=66, block_size=SEQ, n_layer=1, n_head=HEADS, n_embd=HIDDEN)
    idx = torch.randint(0, 66, (BATCH, SEQ))
    odd = capture(GPT(cfg), (idx, idx.clone()), {})
    regs, _ = find_tmp_regions(odd.gm, 4)
    m = describe_model(odd.gm, regs, tp=4, batch=BATCH, k_choices=(1,))
    assert m.vocab is None and "66 is not divisible by the TMP degree 4" in m.vocab_reason


def test_analytical_profile_has_the_collectives_and_plans_the_full_space(traced):
    regions, _ = find_tmp_regions(traced.gm, 2)
    model = describe_model(traced.gm, regions, tp=2, batch=BATCH, k_choices=(1, 2))
    prof = analytical_profile(model)
    assert prof.missing_collectives(model) == []
    ag = prof.collectives[collective_key("all_gather", 2, cross=True)]
    assert ag.beta_us_per_byte == pytest.approx(prof.all_reduce.beta_us_per_byte / 2)  # ring: (n-1)/n vs 2(n-1)/n
    assert Profile.from_json(prof.to_json()) == prof
    plan = choose_plan(model, tp=2, batch=BATCH, seq_len=SEQ, profile=prof)
    assert set(plan.predicted["degrees"]) == {2, 1}
    assert "vocab_parallel" in explain_plan(plan, use_rich=False)


def test_derived_collectives_scale_like_a_ring():
    ar = AlphaBeta(alpha_us=10.0, beta_us_per_byte=1e-3)
    a2 = derived_collective(ar, 8, "all_reduce", 2)
    assert a2.alpha_us == 10.0 and a2.beta_us_per_byte == pytest.approx(1e-3 * 1.0 / (2 * 7 / 8))
    g8 = derived_collective(ar, 8, "all_gather", 8)
    assert g8.beta_us_per_byte == pytest.approx(1e-3 / 2)
    prof = Profile(source="synthetic", device_name="x", torch_version="-", tp_degree=8, op_us={}, all_reduce=ar,
                   memory_bytes=1)
    assert prof.all_reduce_us(1e6, 8) == pytest.approx(ar.predict_us(1e6))
    assert prof.all_reduce_us(1e6, 1) == 0.0 and prof.all_gather_us(1e6, 1) == 0.0
    assert prof.all_gather_us(1e6, 4) == pytest.approx(derived_collective(ar, 8, "all_gather", 4).predict_us(1e6))


def test_op_time_caps_a_host_bound_backward_at_the_flop_ratio():
    # Measured eager backwards of small ops are the autograd engine's host time (RESULTS.md
    # section 5): op_time caps them at 2x the forward (2.5x attention); embedding is not capped,
    # and a backward already under the cap is kept as measured.
    ops = {
        "aten.add.Tensor(bfloat16[1,2048,1024],bfloat16[1,2048,1024])|_,_": (10.0, 80.0),
        "aten.scaled_dot_product_attention.default(bfloat16[1,16,2048,64])|_": (100.0, 400.0),
        "aten.embedding.default(bfloat16[512,1024],int64[8,2048])|_,_": (25.0, 390.0),
        "aten.linear.default(bfloat16[8,2048,1024],bfloat16[4096,1024])|_,_": (193.0, 380.0),
        "aten.view.default(bfloat16[8,2048,1024])|_": (0.0, 5.0),
    }
    prof = Profile(source="measured", device_name="x", torch_version="-", tp_degree=2, op_us=ops,
                   all_reduce=AlphaBeta(alpha_us=10.0, beta_us_per_byte=1e-3), memory_bytes=1)
    got = [prof.op_time(k) for k in ops]
    assert got == [(10.0, 20.0), (100.0, 250.0), (25.0, 390.0), (193.0, 380.0), (0.0, 5.0)]
    assert prof.op_us == ops  # the measurement itself is kept as it was (and saved so)
    assert prof.capped_backwards(list(ops) + list(ops)) == list(ops)[:2]


SUBGROUP_OPTIONS = ProfileOptions(warmup=1, repeats=2, collective_sizes_bytes=(4096, 65536), collective_repeats=2,
                                  interference_gemm_n=32, interference_comm_bytes=4096, interference_gemms=2,
                                  interference_repeats=1)


def _measure_subgroups(rank, world, port, out_dir):
    import datetime
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OASES_FX_CACHE=out_dir)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        # A model with no ops: only the collectives (and interference) are measured.
        empty = RegionVariant(ops=())
        spec = RegionSpec(name="r", kind="mlp", variants={(1, True): empty, (1, False): empty},
                          degree_variants={(1, 2): empty, (1, 1): empty})
        model = ModelSpec(regions=(spec,), tp=world, batch=4, degrees=(4, 2, 1))
        prof = measure_profile(model, options=SUBGROUP_OPTIONS, progress=False)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            f.write(prof.to_json())
        again = measure_profile(model, options=SUBGROUP_OPTIONS, progress=False)  # the cache: no new groups needed
        assert again.from_cache and again == prof
    finally:
        dist.destroy_process_group()


def test_measure_profile_times_collectives_on_subgroups(tmp_path):
    # Four gloo ranks: groups of 2 consecutive ranks (d=2 all-reduce) and cross groups of stride 2
    # (n=2 all-gather and gradient all-reduce) and of the whole group (d=1 all-gather), made with
    # dist.new_group on every rank.
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_measure_subgroups, args=(4, port, str(tmp_path)), nprocs=4, join=True)
    texts = [(tmp_path / f"rank{r}.json").read_text() for r in range(4)]
    assert all(t == texts[0] for t in texts)  # the same profile on every rank
    prof = Profile.from_json(texts[0])
    assert set(prof.collectives) == {"all_reduce:tp2", "all_reduce:cross2", "all_gather:cross2", "all_gather:cross4"}
    for ab in prof.collectives.values():
        assert ab.alpha_us >= 0 and ab.beta_us_per_byte > 0 and len(ab.times_us) == 2
        assert all(math.isfinite(t) and t > 0 for t in ab.times_us)
