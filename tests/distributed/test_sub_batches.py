"""Sub-batching and recomputation: errors, and bitwise equalities that must hold exactly."""
from tests import tasks
from tests.conftest import get_pool


def test_batch_not_divisible_by_k_is_a_clear_error():
    import torch

    idx = torch.zeros(3, 8, dtype=torch.long)
    res = get_pool(2).run(tasks.expect_error, kind="gpt", cfg=dict(vocab_size=64, block_size=16, n_layer=1,
                          n_head=4, n_embd=32), batch=3, seq=8, example_inputs=(idx, idx), num_sub_batches=2)
    kind, msg = res[0]
    assert kind == "InputError" and "batch of 3" in msg and "num_sub_batches=2" in msg


def test_recompute_with_dropout_is_bitwise_equal_to_no_recompute():
    # Same seed, dropout on: the fine and full recompute policies must reproduce the forward's
    # dropout masks in backward, so loss and gradients equal the no-recompute run bit for bit.
    res = get_pool(2).run(tasks.recompute_bitwise, k=2)[0]
    for policy, (same_loss, same_grads) in res.items():
        assert same_loss and same_grads, f"recompute={policy} changed values with dropout"
