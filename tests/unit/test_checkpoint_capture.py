"""torch.utils.checkpoint inside a model: use_reentrant=False is traced exactly (its recomputation is
autograd of the same ops); use_reentrant=True runs the block under no_grad inside an autograd.Function
whose backward torch.export does not keep, so the traced program has no gradient through it (before:
the numeric Function check failed on its own probe with "mixed dtype (CPU)" and blamed the backward;
at the first backward: "element 0 of tensors does not require grad"). It must be refused at capture,
naming the checkpointed module, its forward's source line and use_reentrant=False."""
import inspect

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from oases_fx.errors import OasesError
from oases_fx.tracing import capture


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(x)))


class _Net(nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.reentrant = reentrant

    def forward(self, x):
        x = checkpoint(self.blocks[0], x, use_reentrant=self.reentrant)
        return self.blocks[1](x).square().mean()


def test_reentrant_checkpoint_is_refused_naming_the_module_line_and_fix():
    line = inspect.getsourcelines(_Block.forward)[1]
    with pytest.raises(OasesError) as e:
        capture(_Net(reentrant=True), (torch.randn(2, 4, 8),), {})
    msg = str(e.value)
    assert "use_reentrant=True" in msg and "module 'blocks.0' (_Block)" in msg, msg
    assert f"{__file__}:{line}" in msg and "use_reentrant=False" in msg and "recompute=" in msg, msg


def test_hf_gradient_checkpointing_reentrant_names_the_decoder_layer():
    # transformers checkpoints functools.partial(layer.__call__, ...) (GradientCheckpointingLayer)
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=16))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    idx = torch.randint(0, 32, (2, 4))
    with pytest.raises(OasesError, match=r"module 'model.layers.0' \(LlamaDecoderLayer\), forward at .*modeling_llama.py"):
        capture(model, (), dict(input_ids=idx, labels=idx))


def test_non_reentrant_checkpoint_traces_to_the_same_gradients():
    torch.manual_seed(0)
    net, x = _Net(reentrant=False), torch.randn(2, 4, 8)
    gm = capture(net, (x,), {}).gm
    params = dict(gm.named_parameters())
    assert params.keys() == dict(net.named_parameters()).keys()
    gm(x).backward()
    net(x).backward()
    for n, p in net.named_parameters():  # the same ops in the same order: bitwise equal
        assert params[n].grad is not None, n
        torch.testing.assert_close(params[n].grad, p.grad, atol=0, rtol=0, msg=n)
