"""The key/value replication decision (kv heads < tp): which projections stay whole, which heads
each rank's attention reads, and the cases refused. Single process, traced zoo models."""
import pytest
import torch

from oases_fx.passes.annotate_sharding import find_tmp_regions
from oases_fx.propagation import Incompatible, check_kv_heads, kv_slice_bounds, linear_parts
from oases_fx.tracing import capture
from tests import zoo


def _regions(name, tp):
    fam = zoo.BY_NAME[name]
    idx = torch.randint(0, zoo.VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    kw = zoo.compile_inputs(fam, idx, idx)
    traced = capture(zoo.build(name), tuple(kw.get("example_inputs", ())), kw.get("example_kwargs", {}))
    return find_tmp_regions(traced.gm, tp)


def _attention(regions):
    return [r for r in regions if r.kind == "attention"]


def test_mqa_separate_projections_replicate_k_and_v_only():
    regions, declined = _regions("gemma", 2)  # 4 q heads, 1 kv head
    assert not declined and len(regions) == zoo.BY_NAME["gemma"].num_blocks
    for r in _attention(regions):
        st = r.state
        names = {str(linear_parts(c)[1].target).rsplit(".", 2)[-2] for c in st.replicated_columns}
        assert names == {"k_proj", "v_proj"}, names
        assert not st.replicate_qkv
        assert sorted(i for _, i, *_ in st.local_slices) == [1, 2]  # k and v sliced, q already sharded
        assert all(linear_parts(c)[1] not in st.weight_dim for c in st.replicated_columns)


def test_gqa_at_tp_four_replicates_kv_but_not_at_tp_two():
    two, _ = _regions("mistral", 2)  # 2 kv heads: one per rank at TP=2, ordinary sharding
    assert all(not r.state.replicated_columns for r in two)
    four, declined = _regions("mistral", 4)
    assert not declined
    assert all(len(r.state.replicated_columns) == 2 for r in _attention(four))


def test_fused_qkv_multi_query_replicates_the_fused_projection():
    regions, declined = _regions("falcon", 2)
    assert not declined
    for r in _attention(regions):
        assert r.state.replicate_qkv and r.state.replicated_columns == frozenset(r.columns)
        assert 0 in [i for _, i, *_ in r.state.local_slices]  # q sliced too


def test_kv_slice_bounds():
    # 4 q heads, 2 kv heads, tp 4: rank r reads kv head (r * 2) // 4
    assert [kv_slice_bounds(r, 4, 4, 2) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert [kv_slice_bounds(r, 2, 4, 1) for r in range(2)] == [(0, 1), (0, 1)]  # MQA
    assert [kv_slice_bounds(r, 2, 8, 4) for r in range(2)] == [(0, 2), (2, 4)]  # kv divisible by tp
    assert [kv_slice_bounds(r, 2, 4, 4) for r in range(2)] == [(0, 2), (2, 4)]  # repeated to q heads


def test_kv_heads_neither_dividing_nor_divisible_are_refused():
    check_kv_heads(4, 2, 4)
    check_kv_heads(4, 1, 2)
    with pytest.raises(Incompatible, match="key/value heads must divide or be divisible"):
        check_kv_heads(6, 3, 2)


def test_check_divisible_names_the_kv_problem():
    from oases_fx.api import _check_divisible
    from oases_fx.errors import ShardingError

    _check_divisible(zoo.build("mistral"), 4)  # 2 kv heads, tp 4: replicated kv, accepted
    with pytest.raises(ShardingError, match=r"num_key_value_heads=3.*Fix: use a 'tp' mesh axis"):
        _check_divisible(zoo.build("qwen2_kv3"), 2)
