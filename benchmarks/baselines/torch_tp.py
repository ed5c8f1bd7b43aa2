"""PyTorch's own tensor parallelism: parallelize_module (DTensor) + torch.compile, torchtitan style.

Three systems share one plan builder:
  torch_tp           Megatron-style TP (colwise q/k/v/fc1, rowwise o/fc2, vocab-parallel embedding
                     and LM head with loss_parallel), every TransformerBlock compiled.
  torch_tp_sp        the same plus sequence parallelism (norms and residual stream sharded on the
                     sequence; all-gather before, reduce-scatter after each TP region).
  torch_tp_sp_async  torch_tp_sp with async TP: Inductor's micro-pipeline TP pass rewrites
                     all-gather->matmul and matmul->reduce-scatter into symmetric-memory pipelined
                     kernels. It silently skips what it cannot match, so the row reports how many
                     rewrites it made.
The model is TitanGPT (common.py): the plain GPT's math with separate q/k/v linears, because a
DTensor colwise split of a fused qkv weight gives each rank [q_0..; k_..] rows instead of its
slice of each of q, k and v.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from benchmarks.baselines.common import BuildContext, System, SystemUnavailable, build_titan_gpt


def parallelize_titan_gpt(model, mesh, *, sequence_parallel: bool) -> None:
    """Apply torchtitan's Llama TP plan (adapted: learned positions, biases, tied LM head) in place.

    Placements: S(d) sharded on dim d, R replicated. Residual stream: R (or S(1), the sequence,
    with `sequence_parallel`). Logits: S(-1) (vocab), consumed by loss_parallel.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleOutput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    residual = Shard(1) if sequence_parallel else Replicate()
    top_plan = {
        # vocab-parallel embedding: each rank looks up its rows, partial sums reduced (or
        # reduce-scattered onto the sequence dim with SP)
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=residual),
        # vocab-parallel LM head; logits stay sharded on vocab for loss_parallel
        "output": ColwiseParallel(input_layouts=residual, output_layouts=Shard(-1),
                                  use_local_output=False),
    }
    if sequence_parallel:
        top_plan["norm"] = SequenceParallel()
        # position table (T, h) stays a plain replicated weight; its output is cut to this rank's
        # sequence slice (backward all-gathers the slice gradients, so the weight's grad is whole)
        top_plan["pos_embeddings"] = PrepareModuleOutput(
            output_layouts=Replicate(), desired_output_layouts=Shard(0))
    parallelize_module(model, mesh, top_plan)

    for block in model.layers:
        plan = {
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=residual),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=residual),
        }
        if sequence_parallel:
            plan.update({
                "attention_norm": SequenceParallel(),
                "attention": PrepareModuleInput(input_layouts=(Shard(1),),
                                                desired_input_layouts=(Replicate(),)),
                "ffn_norm": SequenceParallel(),
                "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),),
                                                   desired_input_layouts=(Replicate(),)),
            })
        parallelize_module(block, mesh, plan)

    # parallelize_module replaced the tied weight by two DTensors; both are Shard(0) over vocab,
    # so one parameter serves both again and its gradient sums both uses, as in the plain GPT
    model.output.weight = model.tok_embeddings.weight


def _compile_blocks(model, backend: str) -> None:
    """torchtitan compiles per TransformerBlock (fullgraph); embedding, head and loss stay eager."""
    if backend == "none":
        return
    for i, block in enumerate(model.layers):
        model.layers.register_module(str(i), torch.compile(block, backend=backend, fullgraph=True))


def _async_tp_counter():
    """An Inductor post-grad pass that counts what micro-pipeline TP fused and what it left."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class CountAsyncTP(CustomGraphPass):
        def __init__(self):
            self.graphs = 0  # 0 after a cache hit: Inductor did not run its passes
            self.fused = 0
            self.unfused = 0

        def __call__(self, graph):
            self.graphs += 1
            for node in graph.nodes:
                name = str(node.target)  # e.g. symm_mem.fused_all_gather_matmul.default
                if "symm_mem.fused_" in name:
                    self.fused += 1
                elif "all_gather_into_tensor" in name or "reduce_scatter_tensor" in name:
                    self.unfused += 1

        def uuid(self):
            return "benchmarks-count-async-tp"

    return CountAsyncTP()


def _build(ctx: BuildContext, name: str, *, sequence_parallel: bool, async_tp: bool) -> System:
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import loss_parallel

    cfg = ctx.cfg
    if cfg.n_head % ctx.tp_size:
        raise ValueError(f"{name}: n_head={cfg.n_head} is not divisible by tp={ctx.tp_size}")
    if sequence_parallel and ctx.example[0].size(1) % ctx.tp_size:
        raise ValueError(f"{name}: sequence length must be divisible by tp={ctx.tp_size} for SP")

    wrap_call = None
    counter = None
    if async_tp:
        if ctx.device.type != "cuda":
            raise SystemUnavailable("async TP needs CUDA symmetric memory")
        if ctx.backend != "inductor":
            raise SystemUnavailable(f"async TP is an Inductor pass; backend is {ctx.backend!r}")
        from torch.distributed import _symmetric_memory as symm_mem

        if hasattr(symm_mem, "enable_symm_mem_for_group"):  # deprecated no-op from torch 2.12 on
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                symm_mem.enable_symm_mem_for_group(ctx.group.group_name)
        counter = _async_tp_counter()

        def wrap_call():
            # Patched only around this system's calls (compiles happen inside them), so no other
            # system is compiled with async TP or the counting pass.
            import torch._inductor.config as inductor_config

            return inductor_config.patch(_micro_pipeline_tp=True,
                                         post_grad_custom_post_pass=counter)

    model = build_titan_gpt(cfg, ctx.state_dict, device=ctx.device, dtype=ctx.dtype)
    parallelize_titan_gpt(model, ctx.mesh, sequence_parallel=sequence_parallel)
    _compile_blocks(model, ctx.backend)

    def step(idx, targets):
        with loss_parallel():
            logits = model(idx)  # DTensor (B, T, vocab) sharded on vocab
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(0, 1))
            loss.backward()  # loss_parallel must cover the backward too
        return loss.full_tensor() if isinstance(loss, DTensor) else loss

    notes = "per-block torch.compile" if ctx.backend != "none" else "eager (no compile)"
    system = System(name, step, [model], notes=notes,
                    wrap_call=wrap_call if async_tp else None)
    if counter is not None:
        system.async_tp_counter = counter  # read by the harness after the first steps
    return system


def build_torch_tp(ctx: BuildContext) -> System:
    return _build(ctx, "torch_tp", sequence_parallel=False, async_tp=False)


def build_torch_tp_sp(ctx: BuildContext) -> System:
    return _build(ctx, "torch_tp_sp", sequence_parallel=True, async_tp=False)


def build_torch_tp_sp_async(ctx: BuildContext) -> System:
    return _build(ctx, "torch_tp_sp_async", sequence_parallel=True, async_tp=True)

