"""plan="auto" choosing SHARDED plans on CPU, checked against the unsharded model.

On the CPU gloo ranks the measured profile (and the default H100 constants at these toy sizes)
make the planner replicate every region, so the automatic path would only ever be checked on an
all-replicated plan. Here the planner runs on an analytical device where communication is ~free
(tests.tasks.FAST_LINK), so it must shard; the plan it picks goes through the same passes as any
other and must match the reference to the tolerances of test_equivalence (explained there).
"""
import pytest

from tests import tasks
from tests.conftest import get_pool
from tests.distributed.test_equivalence import assert_matches

CFG = dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32)


def _sharded(plan):
    return [r["name"] for r in plan["regions"] if r["shard"]], [r["name"] for r in plan["regions"]]


@pytest.mark.parametrize("k,recompute", [(None, None), (2, "fine"), (4, "full"), (2, "none")])
def test_auto_plan_on_a_fast_link_shards_and_matches_unsharded(k, recompute):
    kw = {} if k is None else dict(num_sub_batches=k, recompute=recompute)
    r = get_pool(2).run(tasks.auto_plan_compare, cfg=dict(CFG, seed=k or 0), batch=4, seq=8, **kw)[0]
    sharded, regions = _sharded(r["plan"])
    # Free communication: sharding a region halves its compute at no cost, so every region is sharded.
    assert len(regions) == 4 and sharded == regions, r["explain"]
    if k is not None:  # what was asked for is what was planned and compiled
        assert (r["plan"]["num_sub_batches"], r["plan"]["recompute"]) == (k, recompute)
    assert "analytical" in r["explain"]
    assert_matches(r)


def test_auto_plan_on_the_whole_search_space_with_a_fast_link_matches_unsharded():
    # Every degree and vocab-parallel searched: with free communication the planner shards the
    # embedding/LM head over the vocabulary too, and the result is still exact.
    r = get_pool(2).run(tasks.auto_plan_compare, cfg=dict(CFG, seed=5), batch=4, seq=8, planner_degrees="all",
                        planner_vocab_parallel=(False, True))[0]
    sharded, regions = _sharded(r["plan"])
    assert sharded == regions and r["plan"]["vocab_parallel"], r["explain"]
    assert_matches(r)
