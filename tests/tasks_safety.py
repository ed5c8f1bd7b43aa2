"""Rank tasks for the runtime-safety tests (agreement, per-shard RNG, retrace key, released module,
bounded waiting). Top-level functions called as fn(rank, world_size, **kw) by tests/pool.py; they
return numbers or (error type, message) for the parent to check."""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import oases_fx

GPT_CFG = dict(vocab_size=64, block_size=16, n_layer=1, n_head=4, n_embd=32)


def _gpt(seed=0, **over):
    from oases_fx.models import GPT, GPTConfig

    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**GPT_CFG, **over}))


def _mesh(world_size):
    return init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))


def _batch(b=4, t=8, seed=0, dtype=torch.long):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, GPT_CFG["vocab_size"], (b, t), generator=g).to(dtype)


def _err(fn):
    try:
        fn()
    except Exception as e:
        return type(e).__name__, str(e)
    return None


# --- 1. agreement -------------------------------------------------------------------------------

def disagree_at_compile(rank, world_size, *, case):
    """Rank 1 differs from rank 0 in one way (`case`); compile's error (type, message) or None."""
    mesh = _mesh(world_size)
    seed, seq, k, dtype, plan = 0, 8, None, torch.float32, "megatron"
    if case == "seed":
        seed = rank
    elif case == "seq_auto":
        seq, plan = (8 if rank == 0 else 16), "auto"
    elif case == "k_auto":
        k, plan = (1 if rank == 0 else 2), "auto"
    elif case == "dtype_auto":
        dtype, plan = (torch.float32 if rank == 0 else torch.bfloat16), "auto"
    elif case != "same":
        raise ValueError(case)
    model = _gpt(seed).to(dtype)
    idx = _batch(t=seq)
    return _err(lambda: oases_fx.compile(model, mesh, example_inputs=(idx, idx), backend="eager", verbose=False,
                                         plan=plan, num_sub_batches=k, profile="analytical"))


def disagree_on_batch(rank, world_size, *, check_inputs="first", second_differs=False):
    """Same model on both ranks; the first call's batch differs by rank (or only the second call's):
    the error of the failing call (type, message, which call) or None."""
    mesh = _mesh(world_size)
    idx = _batch()
    m = oases_fx.compile(_gpt(), mesh, example_inputs=(idx, idx), backend="eager", verbose=False,
                         plan="megatron", check_inputs=check_inputs)
    calls = [_batch(seed=0), _batch(seed=rank if second_differs else 0)] if second_differs else [_batch(seed=rank)]
    for i, x in enumerate(calls):
        got = _err(lambda: m(x, x))
        if got is not None:
            return got + (i,)
    return None
