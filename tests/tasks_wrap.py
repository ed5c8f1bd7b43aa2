"""Rank tasks for tests/distributed/test_wrappers.py: torch's wrappers and parameter swaps applied to a
compiled model after oases_fx.compile. Each returns what the parent compares (nothing is compared here)."""
from __future__ import annotations

import copy

import torch
from torch.distributed.device_mesh import init_device_mesh

import oases_fx
from tests.tasks import build_model

CFG = dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32)


class _Parent(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, idx, tgt):
        return self.inner(idx, tgt)


def _sgd_losses(model, steps, train_batch, seen_batch=None) -> list:
    """SGD(lr=0.1) steps on train_batch; each step's loss on seen_batch (default: the training loss)
    before its update."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(steps):
        if seen_batch is not None:
            with torch.no_grad():
                losses.append(float(model(*seen_batch)[1]))
        _, loss = model(*train_batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if seen_batch is None:
            losses.append(float(loss.detach()))
    return losses


def wrapped_training(rank, world_size, *, wrap: str, steps: int = 3):
    """Compile a GPT on a (dp=2, tp=world/2) mesh (or a tp mesh for wrap="assign"), apply `wrap`, train
    `steps` SGD steps on this dp rank's half of a batch; return the losses and the eager reference's
    (the full batch's mean gradient = the dp average; its loss on this rank's half before each step),
    or the error raised."""
    two_d = wrap != "assign"
    mesh = (init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("dp", "tp")) if two_d
            else init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",)))
    ref = build_model("gpt", CFG)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, CFG["vocab_size"], (4, 8), generator=g)
    tgt = torch.randint(0, CFG["vocab_size"], (4, 8), generator=g)
    half = mesh["dp"].get_local_rank() if two_d else None
    x, y = (idx[2 * half:2 * half + 2], tgt[2 * half:2 * half + 2]) if two_d else (idx, tgt)
    model = oases_fx.compile(copy.deepcopy(ref), mesh, example_inputs=(x, y), plan="megatron", backend="aot_eager",
                             verbose=False)
    if wrap in ("fully_shard", "fully_shard_parent"):
        from torch.distributed.fsdp import fully_shard

        if wrap == "fully_shard_parent":
            model = _Parent(model)
        fully_shard(model, mesh=mesh["dp"])
    elif wrap == "assign":  # a new Parameter where compile() registered its DTensor
        old = model.transformer.h[0].mlp.c_fc.weight
        model.transformer.h[0].mlp.c_fc.weight = torch.nn.Parameter(old.detach().clone())
    out = dict(losses=[], error=None)
    try:
        out["losses"] = _sgd_losses(model, steps, (x, y))
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
    out["ref"] = _sgd_losses(copy.deepcopy(ref), steps, (idx, tgt), seen_batch=(x, y))
    return out


def pre_wrapped(rank, world_size, *, wrap: str, steps: int = 3):
    """A model wrapped or distributed by torch BEFORE oases_fx.compile (TP=world mesh); 3 SGD steps on
    one batch beside the eager model's, or the error compile raised."""
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    ref = build_model("gpt", CFG)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, CFG["vocab_size"], (4, 8), generator=g)
    tgt = torch.randint(0, CFG["vocab_size"], (4, 8), generator=g)
    m = copy.deepcopy(ref)
    if wrap == "parallelize_module":
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        parallelize_module(m, mesh, {"transformer.h.0.mlp.c_fc": ColwiseParallel(),
                                     "transformer.h.0.mlp.c_proj": RowwiseParallel()})
    elif wrap == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        m = DistributedDataParallel(m)
    elif wrap == "torch_compile":
        m = torch.compile(m)
    out = dict(losses=[], error=None, ref=[])
    try:
        om = oases_fx.compile(m, mesh, example_inputs=(idx, tgt), plan="megatron", backend="aot_eager", verbose=False)
        if wrap == "twice":
            oases_fx.compile(om, mesh, example_inputs=(idx, tgt), plan="megatron", backend="aot_eager",
                             verbose=False)
        out["losses"] = _sgd_losses(om, steps, (idx, tgt))
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
    out["ref"] = _sgd_losses(copy.deepcopy(ref), steps, (idx, tgt))
    return out
