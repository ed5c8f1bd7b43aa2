"""The planner prices merge_collectives (passes/merge_collectives.py): a parallel-residual layer's
attention + MLP, both sharded at the full degree, cost one forward all-reduce (and one backward
where the blocks read the same norm output), as the pass makes them. Single process, traced zoo
models, the analytical profile (deterministic: the expected ordering follows from its bytes)."""
import dataclasses

import pytest
import torch

from oases_fx.passes.annotate_sharding import find_tmp_regions
from oases_fx.planner import Choice, analytical_profile, describe_model, predict
from oases_fx.tracing import capture
from tests import zoo

BATCH, SEQ = 4, 8


def _described(name, tp=2, **kw):
    fam = zoo.BY_NAME[name]
    idx = torch.randint(0, zoo.VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    ckw = zoo.compile_inputs(fam, idx, idx)
    traced = capture(zoo.build(name), tuple(ckw.get("example_inputs", ())), ckw.get("example_kwargs", {}))
    regions, _ = find_tmp_regions(traced.gm, tp)
    return regions, describe_model(traced.gm, regions, tp=tp, batch=BATCH, k_choices=(1, 2), vocab=False, **kw)


def _comm_us(pred, i):
    r = pred.per_region[i]
    return r.exposed_comm_us + r.hidden_comm_us


@pytest.mark.parametrize("name, backward", [("gptj", True), ("gpt_neox", False), ("phi", True)])
def test_parallel_pairs_found(name, backward):
    regions, model = _described(name)
    layers = len(regions) // 2
    # one pair per layer: (attention, mlp) of that layer, adjacent in graph order
    assert [(i, j) for i, j, _, _ in model.merged] == [(2 * n, 2 * n + 1) for n in range(layers)]
    assert {regions[i].kind for i, _, _, _ in model.merged} == {"attention"}
    assert all(fwd for _, _, fwd, _ in model.merged)
    # gpt_neox has one norm per block (ln1(x), ln2(x)): the backward keeps two all-reduces
    assert all(bwd == backward for _, _, _, bwd in model.merged)
    assert any("merge_collectives" in n for n in model.notes)


def test_sequential_layers_have_no_pairs():
    _, model = _described("opt")  # x + attn(ln1(x)), then + mlp(ln2(.)): nothing to merge
    assert model.merged == ()


def test_disabled_pass_is_not_priced():
    _, model = _described("gptj", merge_collectives=False)
    assert model.merged == ()


@pytest.mark.parametrize("k", [1, 2])
def test_merged_pair_costs_one_all_reduce(k):
    regions, model = _described("gptj")
    unmerged = dataclasses.replace(model, merged=())
    prof = analytical_profile(model)
    n = len(regions)
    shard = Choice.of_states(num_sub_batches=k, recompute="none", states=[2] * n, tp=2)
    merged_p, plain_p = predict(model, shard, prof), predict(unmerged, shard, prof)
    for i, j, _, _ in model.merged:
        # the attention block's forward g and the MLP block's backward f are gone; what remains
        # (attention: its backward f; MLP: its forward g) costs what it cost unmerged
        assert _comm_us(plain_p, i) > _comm_us(merged_p, i) > 0
        assert _comm_us(plain_p, j) > _comm_us(merged_p, j) > 0
    total = lambda p: sum(_comm_us(p, i) for i in range(n))  # noqa: E731
    assert total(merged_p) == pytest.approx(total(plain_p) / 2, rel=1e-6)  # 4 all-reduces a layer -> 2
    # one block replicated: its partner keeps both of its all-reduces
    i, j, _, _ = model.merged[0]
    states = [2] * n
    states[j] = 0
    half = Choice.of_states(num_sub_batches=k, recompute="none", states=states, tp=2)
    assert _comm_us(predict(model, half, prof), i) == pytest.approx(_comm_us(predict(unmerged, half, prof), i))
