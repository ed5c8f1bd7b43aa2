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
    Profile, ProfileOptions, analytical_profile, choose_plan, describe_model, fit_alpha_beta,
    load_cached_profile, measure_profile,
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
