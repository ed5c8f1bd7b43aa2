"""Rank tasks for per-region TMP degrees (tests/distributed/test_region_degree.py).

Plans are built here from a per-layer (attention degree, MLP degree) list and sent through JSON
(Plan.to_json -> Plan.from_json), so every test also checks that a plan with degrees round-trips.
The comparison itself is tests.tasks.compare_with_reference with that plan.
"""
from __future__ import annotations

import torch
from torch.distributed.device_mesh import init_device_mesh

import oases_fx
from oases_fx.plan import Plan, RegionPlan
from tests import tasks

REGION_NAMES = {
    "gpt": ("transformer.h.{}.attn", "transformer.h.{}.mlp"),
    "hf_gpt2": ("transformer.h.{}.attn", "transformer.h.{}.mlp"),
    "hf_llama": ("model.layers.{}.self_attn", "model.layers.{}.mlp"),
}


def degree_plan(kind: str, n_layer: int, tp: int, degrees, k: int = 1, recompute: str = "none") -> Plan:
    """A plan sharding every region; layer i's (attention, MLP) run at degrees[i % len(degrees)]."""
    regions = []
    for i in range(n_layer):
        for rkind, pattern, d in zip(("attention", "mlp"), REGION_NAMES[kind], degrees[i % len(degrees)]):
            regions.append(RegionPlan(name=pattern.format(i), kind=rkind, tp_degree=None if d == tp else d))
    plan = Plan(tp_degree=tp, num_sub_batches=k, recompute=recompute, regions=tuple(regions))
    again = Plan.from_json(plan.to_json())
    assert again == plan and again.digest() == plan.digest(), "a plan with region degrees must round-trip"
    return again


def compare_with_degrees(rank, world_size, *, kind, cfg, batch, seq, degrees, k=1, recompute="none", steps=1,
                         backend="aot_eager", mesh_shape=None):
    """tests.tasks.compare_with_reference under a plan with per-region degrees."""
    tp = mesh_shape[-1] if mesh_shape else world_size
    plan = degree_plan(kind, cfg["n_layer"], tp, degrees, k=k, recompute=recompute)
    return tasks.compare_with_reference(rank, world_size, kind=kind, cfg=cfg, batch=batch, seq=seq, backend=backend,
                                        steps=steps, mesh_shape=mesh_shape, compile_kwargs=dict(plan=plan))


def skip_collectives_shapes(rank, world_size, *, cfg, batch, seq, degrees, k=1):
    """With skip_collectives=True (values wrong by design) the shapes must still be right: the
    logits' and loss' shapes, and every gradient's shape equal to its (local shard) parameter's."""
    from oases_fx.models import GPT, GPTConfig

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    torch.manual_seed(0)
    model = GPT(GPTConfig(**cfg))
    idx = torch.randint(0, cfg["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))
    plan = degree_plan("gpt", cfg["n_layer"], world_size, degrees, k=k)
    m = oases_fx.compile(model, mesh, example_inputs=(idx, idx), plan=plan, backend="aot_eager", verbose=False,
                         skip_collectives=True)
    logits, loss = m(idx, idx)
    loss.backward()
    # Checkpoints of d-way shards: load a changed full state dict, read it back unchanged.
    want = {key: t + 1 for key, t in m.full_state_dict().items()}
    m.load_full_state_dict(want)
    back = m.full_state_dict()
    return dict(logits=tuple(logits.shape), loss=tuple(loss.shape),
                grads_fit=all(p.grad is not None and p.grad.shape == p.shape for p in m.parameters()),
                checkpoint_roundtrip=all(torch.equal(back[key], want[key]) for key in want),
                full_shapes={key: tuple(t.shape) for key, t in back.items()},
                # the unsharded shapes (the model given to compile() is released: its state_dict() raises)
                model_shapes={key: tuple(t.shape) for key, t in GPT(GPTConfig(**cfg)).state_dict().items()},
                explain=m.explain())


_NoConfigAttention3Heads = tasks._NoConfigAttention
"""3 heads of 8 (hidden 24) and no `config`: only the graph can tell the heads do not split."""


class _TableMLP(torch.nn.Module):
    """An MLP applied to a parameter table (no batch dim), added to the batched input."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(4, 16))
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 16)

    def forward(self, x):
        return (x + self.fc2(torch.nn.functional.gelu(self.fc1(self.table)))).sum()


def degree_error(rank, world_size, *, case):
    """Compile a plan with region degrees that cannot work; return (error type, message) or None."""
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    torch.manual_seed(0)
    try:
        if case == "batch":  # batch 2, k=2, attention at d=1 of tp=2: 2 does not split into k*n = 4
            from oases_fx.models import GPT, GPTConfig

            model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=4, n_embd=32))
            idx = torch.zeros(2, 8, dtype=torch.long)
            plan = degree_plan("gpt", 1, world_size, [(1, world_size)], k=2)
            oases_fx.compile(model, mesh, example_inputs=(idx, idx), plan=plan, backend="eager", verbose=False)
        elif case == "heads":  # 3 heads, region planned at d=2 of tp=4
            plan = Plan(tp_degree=world_size, regions=(RegionPlan(name="proj", kind="attention", tp_degree=2),))
            oases_fx.compile(_NoConfigAttention3Heads(), mesh, example_inputs=(torch.randn(4, 4, 24),), plan=plan,
                             backend="eager", verbose=False)
        elif case == "no_batch":  # the region's only input is a parameter: nothing to split at d=1
            plan = Plan(tp_degree=world_size, regions=(RegionPlan(name="fc2", kind="mlp", tp_degree=1),))
            oases_fx.compile(_TableMLP(), mesh, example_inputs=(torch.randn(2, 4, 16),), plan=plan,
                             backend="eager", verbose=False)
        elif case == "degree":  # 3 does not divide tp=4 (Plan refuses)
            Plan(tp_degree=world_size, regions=(RegionPlan(name="x", kind="mlp", tp_degree=3),))
        else:
            raise ValueError(case)
    except Exception as e:
        return type(e).__name__, str(e)
    return None
