import pytest

from oases_fx.propagation import Incompatible, _Indivisible, view_dim_map


@pytest.mark.parametrize("inp,out,dim,expect", [
    ([2, 16, 96], [2, 16, 4, 24], 2, 2),      # hidden -> heads: shard lands on heads
    ([2, 16, 4, 8], [2, 16, 32], 2, 2),       # heads -> hidden
    ([32, 32], [2, 16, 32], 1, 2),            # Conv1D's 2-D output back to 3-D
    ([2, 16, 32], [32, 32], 2, 1),
    ([2, 1, 16, 32], [2, 16, 32], 3, 2),      # size-1 dims are skipped
])
def test_view_dim_map(inp, out, dim, expect):
    assert view_dim_map(inp, out, dim, 2) == expect


def test_view_into_indivisible_heads_raises():
    with pytest.raises(_Indivisible) as e:
        view_dim_map([2, 16, 24], [2, 16, 3, 8], 2, 2)
    assert e.value.size == 3


def test_view_that_breaks_block_contiguity_is_incompatible():
    # sharded dim is the trailing dim of a merge: each rank's block is strided in the result
    with pytest.raises(Incompatible):
        view_dim_map([2, 16, 8], [2, 128], 2, 2)
