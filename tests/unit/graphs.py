"""Small traced graphs for the per-pass unit tests (single process, no collectives run)."""
import torch

from oases_fx.models import GPT, GPTConfig
from oases_fx.tracing import capture

TINY = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32)


def traced_gpt(cfg=TINY, batch=2, seq=8):
    torch.manual_seed(0)
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (batch, seq))
    return model, capture(model, (idx, idx.clone()), {}), idx


def single_rank_group():
    """A 1-rank gloo group, so collectives can run in a unit test."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    return dist.group.WORLD
