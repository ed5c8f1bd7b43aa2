"""oases_fx.agreement.tensor_fingerprints on one process (no ranks needed)."""
import torch

from oases_fx.agreement import tensor_fingerprints


def test_fingerprint_of_a_tensor_over_2_24_elements():
    # A float32 linspace rounded n - 1 up to n past 2**24 elements and indexed out of bounds (compile()
    # failed at h=4096 on GPU); the fingerprint must work there and still see a change in the last element.
    n = 2**24 + 5
    t = torch.zeros(n)
    before = tensor_fingerprints([("w", t)])["w"]
    t[-1] = 1.0
    after = tensor_fingerprints([("w", t)])["w"]
    assert before != after
    assert tensor_fingerprints([("w", torch.zeros(n))])["w"] == before  # deterministic
