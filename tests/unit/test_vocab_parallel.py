"""vocab_parallel without ranks: what find_vocab_parallel finds on traced graphs, and the runtime
functions' math at one rank (skip variants: no collective, so T=1 holds the whole vocabulary and
the results must equal torch's own exactly up to summation order)."""
import pytest
import torch
import torch.nn.functional as F

from oases_fx import vocab
from oases_fx.errors import ShardingError
from oases_fx.passes.vocab_parallel import find_vocab_parallel
from oases_fx.tracing import capture
from tests.tasks import build_model

CFG = dict(vocab_size=64, block_size=16, n_layer=1, n_head=4, n_embd=32)


def _traced(kind):
    m = build_model(kind, CFG)
    idx = torch.randint(0, 64, (2, 8))
    if kind == "gpt":
        return capture(m, (idx, idx.clone()), {}).gm
    return capture(m, (), dict(input_ids=idx, labels=idx.clone())).gm


def test_find_plain_gpt_tied():
    info = find_vocab_parallel(_traced("gpt"), tp=2)
    assert info.tied and info.vocab_size == 64 and info.hidden == 32
    assert [str(e.args[0].target) for e in info.embeddings] in (["lm_head.weight"], ["transformer.wte.weight"])
    assert len(info.losses) == 1 and info.losses[0].reduction == 1 and info.losses[0].ignore_index == -100
    assert info.logits_output  # GPT returns (logits, loss): logits all-gathered
    assert [n.target for n in info.chain] == [torch.ops.aten.view.default]


def test_find_hf_llama_untied():
    info = find_vocab_parallel(_traced("hf_llama"))
    assert not info.tied
    assert [str(e.args[0].target) for e in info.embeddings] == ["model.embed_tokens.weight"]
    assert str(info.lm_head.args[1].target) == "lm_head.weight" and len(info.losses) == 1


def test_find_refuses_indivisible_vocab():
    with pytest.raises(ShardingError, match="V=64 .* not divisible by the TMP degree 3.*pad the vocabulary"):
        find_vocab_parallel(_traced("gpt"), tp=3)


@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_cross_entropy_math_one_rank(reduction):
    torch.manual_seed(0)
    logits = torch.randn(12, 10, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 10, (12,))
    target[:3] = -100
    got = vocab.skip_vocab_parallel_cross_entropy(logits, target, 0, -100, reduction, torch.float64, "unused")
    want = F.cross_entropy(logits, target, reduction=vocab.REDUCTIONS[reduction])
    torch.testing.assert_close(got, want)
    w = torch.randn_like(got)
    g_got, = torch.autograd.grad((got * w).sum(), logits)
    g_want, = torch.autograd.grad((want * w).sum(), logits)
    torch.testing.assert_close(g_got, g_want)


@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_cross_entropy_gradient_survives_torch_compile(reduction):
    # The compiled program holds the cross-entropy as an autograd.Function under aot_eager; on torch
    # 2.11 a forward that returned an alias of an intermediate (a no-op .to) got a zero gradient
    # there, so every gradient from the loss was lost while the loss itself was right. fp32, 60
    # logits: torch's and ours differ only in summation order (< 1e-6).
    torch.manual_seed(0)
    logits = torch.randn(6, 10, requires_grad=True)
    target = torch.randint(0, 10, (6,))
    target[0] = -100

    def ours(x):
        return vocab.skip_vocab_parallel_cross_entropy(x * 2, target, 0, -100, reduction, torch.float32, "unused")

    torch._dynamo.reset()
    got = torch.compile(ours, backend="aot_eager", fullgraph=True)(logits)
    want = F.cross_entropy(logits * 2, target, reduction=vocab.REDUCTIONS[reduction])
    w = torch.randn_like(want)
    g_got, = torch.autograd.grad((got * w).sum(), logits)
    g_want, = torch.autograd.grad((want * w).sum(), logits)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g_got, g_want)
    assert g_want.abs().max() > 0.01  # a zero gradient cannot pass


def test_embedding_masks_ids_outside_the_rank_rows():
    table = torch.randn(8, 3)
    ids = torch.tensor([[0, 3, 4, 7]])
    lo = vocab.skip_vocab_parallel_embedding(table[:4], ids, 0, 4, -1, "unused")
    hi = vocab.skip_vocab_parallel_embedding(table[4:], ids, 4, 8, -1, "unused")
    torch.testing.assert_close(lo + hi, F.embedding(ids, table))
    assert lo[0, 2:].abs().sum() == 0 and hi[0, :2].abs().sum() == 0
