"""Custom torch.autograd.Functions: torch.export keeps only their forward, so capture checks each
one's backward against autograd of its forward (tests/unit/test_custom_function_check.py) and
keeps only those that agree. Here a kept Function must train exactly: the block around it is
sharded and loss and every gradient equal the eager model's, which runs the Function's own
backward. Tolerances as test_equivalence (fp32, contractions <= 32 terms: ~1e-6 reordering error;
a dropped or wrong backward is off by O(1e-1))."""
import pytest
import torch

from tests import tasks, tasks_zoo
from tests.conftest import get_pool
from tests.distributed.test_equivalence import ATOL, RTOL, assert_matches


@pytest.mark.parametrize("k", [1, 2])
def test_function_with_a_correct_backward_is_kept_sharded_and_exact(k):
    for r in get_pool(2).run(tasks.custom_function_kept, k=k):
        assert r["regions"], "the MLP around the Function must be sharded"
        assert "tests.tasks._TanhGelu" in r["explain"] and "traced through its forward" in r["explain"]
        torch.testing.assert_close(r["loss"], r["ref_loss"], atol=ATOL, rtol=RTOL)
        assert r["grads"].keys() == r["ref_grads"].keys()
        for name, g in r["ref_grads"].items():
            torch.testing.assert_close(r["grads"][name], g, atol=ATOL, rtol=RTOL, msg=name)


def test_bloom_gelu_function_kept_mlps_sharded_attention_declined_with_reason():
    # Bloom's GeLUFunction (a hand-written tanh-GELU backward) is checked and kept. Its MLPs are
    # sharded; its attention folds heads into the batch dim ((B, H, S, D) -> (B*H, S, D)), which
    # the analysis declines with the reason and the source line; the model is still exact.
    r = get_pool(2).run(tasks_zoo.compare, name="bloom", k=2)[0]
    names = [n for n, _ in r["regions"]]
    assert sum(n.endswith(".mlp") for n in names) == 2, names
    assert "GeLUFunction" in r["explain"] and "traced through its forward" in r["explain"]
    attn = [why for block, why in r["declined"] if block.endswith("self_attention")]
    assert len(attn) == 2 and all("modeling_bloom.py" in w and "line" in w for w in attn), r["declined"]
    assert_matches(r)
