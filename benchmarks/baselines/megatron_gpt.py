"""Megatron-Core's own GPTModel (megatron-core 0.19.2 wheel, local layer spec, no
TransformerEngine) holding the plain GPT's weights: the strongest hand-written TP baseline.

  megatron     TP=2 all-reduce TP. Its own overlap: the backward input-grad all-reduce of every
               column-parallel linear runs asynchronously behind that linear's weight-grad GEMM
               (needs CUDA_DEVICE_MAX_CONNECTIONS=1). The forward all-reduces are exposed.
  megatron_sp  the same with sequence parallelism (all-gather / reduce-scatter). The local spec's
               WrappedTorchNorm refuses SP and FusedLayerNorm needs apex, so the norms are a torch
               LayerNorm that marks its parameters `sequence_parallel` exactly as FusedLayerNorm
               does; their partial gradients are summed over TP after backward, as Megatron's
               finalize_model_grads does.

Both replace the local spec's unfused DotProductAttention (it materialises the s x s scores) by
F.scaled_dot_product_attention, so every system uses the same attention kernels (FINDINGS 5).
megatron-core is imported only inside the builders; it runs on CUDA only.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.baselines.common import (
    BuildContext,
    StateDict,
    System,
    SystemUnavailable,
    shard,
)
from oases_fx.models.gpt import GPTConfig

WHEEL_HINT = (
    "install the wheel that benchmarks/fetch_wheels.sh downloads: "
    "python3 -m pip install --no-deps .whl/megatron_core-0.19.2-*.whl"
)


def _import_megatron():
    try:
        import megatron.core  # noqa: F401
        from megatron.core import parallel_state
    except ImportError as e:  # also the case without triton, which megatron-core imports
        raise SystemUnavailable(f"megatron-core is not importable ({e}); {WHEEL_HINT}") from e
    return parallel_state


# --------------------------------------------------------------------------------------------
# Modules put into Megatron's layer spec
# --------------------------------------------------------------------------------------------


class SDPACoreAttention(nn.Module):
    """Megatron core-attention interface backed by F.scaled_dot_product_attention (causal).

    In: query/key/value (sq, b, np, hn) (np: heads on this rank). Out: (sq, b, np * hn).
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 attention_dropout=None, softmax_scale=None, cp_comm_type=None,
                 pg_collection=None, **kwargs):
        super().__init__()
        self.softmax_scale = softmax_scale  # None: 1/sqrt(hn), Megatron's default too
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        if getattr(config, "apply_query_key_layer_scaling", False):
            raise ValueError("SDPACoreAttention does not implement apply_query_key_layer_scaling")

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("SDPACoreAttention supports plain causal attention only")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # (b, np, sq, hn)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.softmax_scale,
            dropout_p=self.dropout_p if self.training else 0.0)
        sq, b = y.size(2), y.size(0)
        return y.permute(2, 0, 1, 3).reshape(sq, b, -1)  # (sq, b, np * hn)


class SequenceParallelLayerNorm(nn.LayerNorm):
    """torch LayerNorm with Megatron's norm-builder signature that accepts sequence parallelism.

    Under SP each rank normalises its own sequence slice, so the weight and bias gradients are
    partial sums over TP; the `sequence_parallel` attribute marks them for the all-reduce, as in
    megatron.core.fusions.fused_layer_norm.FusedLayerNorm.
    """

    def __init__(self, config, hidden_size, eps=1e-5, **kwargs):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        for p in (self.weight, self.bias):
            p.sequence_parallel = config.sequence_parallel


# --------------------------------------------------------------------------------------------
# Weights: plain GPT -> Megatron names and layouts
# --------------------------------------------------------------------------------------------


def megatron_qkv_from_fused(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """c_attn rows [Q; K; V] (each n_head blocks of hn) -> Megatron's per-head [q_i; k_i; v_i].

    Megatron's linear_qkv output is viewed as (..., num_query_groups, (np/ng + 2) * hn) and split
    into q, k, v per group; with ng = n_head (no GQA) that is hn rows each of q_i, k_i, v_i for
    head i, heads in order. Works for a weight (3h, h) and a bias (3h,).
    """
    q, k, v = w.chunk(3, dim=0)
    hn = q.size(0) // n_head
    per_head = [t.reshape(n_head, hn, *t.shape[1:]) for t in (q, k, v)]  # (nh, hn, ...)
    return torch.stack(per_head, dim=1).reshape(w.shape)  # (nh, 3, hn, ...) -> (3h, ...)


def megatron_state_dict_from_gpt(sd: StateDict, cfg: GPTConfig) -> StateDict:
    """Unsharded Megatron GPTModel parameters (names as in its named_parameters()) from the plain
    GPT. The LM head is tied to embedding.word_embeddings.weight (no output_layer.weight)."""
    out: StateDict = {
        "embedding.word_embeddings.weight": sd["transformer.wte.weight"],
        "embedding.position_embeddings.weight": sd["transformer.wpe.weight"],
        "decoder.final_layernorm.weight": sd["transformer.ln_f.weight"],
        "decoder.final_layernorm.bias": sd["transformer.ln_f.bias"],
    }
    pairs = {
        "ln_1": "input_layernorm",
        "attn.c_proj": "self_attention.linear_proj",
        "ln_2": "pre_mlp_layernorm",
        "mlp.c_fc": "mlp.linear_fc1",
        "mlp.c_proj": "mlp.linear_fc2",
    }
    for i in range(cfg.n_layer):
        src, dst = f"transformer.h.{i}.", f"decoder.layers.{i}."
        for s, d in pairs.items():
            for kind in ("weight", "bias"):
                out[dst + f"{d}.{kind}"] = sd[src + f"{s}.{kind}"]
        for kind in ("weight", "bias"):
            out[dst + f"self_attention.linear_qkv.{kind}"] = megatron_qkv_from_fused(
                sd[src + f"attn.c_attn.{kind}"], cfg.n_head)
    return out


def load_megatron_weights(model: nn.Module, full: StateDict, tp_attrs: dict, *, tp_rank: int,
                          tp_size: int) -> None:
    """Copy each parameter's shard: Megatron marks TP-sharded parameters with
    `tensor_model_parallel` and `partition_dim` (collected in `tp_attrs` before any .to())."""
    seen = set()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in full:
                raise KeyError(f"Megatron parameter {name} {tuple(p.shape)} has no source weight")
            t = full[name]
            is_tp, dim = tp_attrs.get(name, (False, None))
            if is_tp:
                t = shard(t, dim, tp_rank, tp_size)
            if t.shape != p.shape:
                raise ValueError(f"{name}: mapped shape {tuple(t.shape)} != Megatron shard "
                                 f"{tuple(p.shape)} (tp_rank {tp_rank})")
            p.copy_(t)
            seen.add(name)
    unused = set(full) - seen
    if unused:
        raise KeyError(f"weights not loaded into the Megatron model: {sorted(unused)}")


# --------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------


def build_megatron_model(cfg: GPTConfig, sd: StateDict, *, device: torch.device,
                         dtype: torch.dtype, sequence_parallel: bool):
    """Megatron GPTModel with the plain GPT's weights on `device` (model parallel state must be
    initialised already). Returns the model."""
    _import_megatron()
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import (
        TransformerBlock,
        TransformerBlockSubmodules,
    )
    from megatron.core.transformer.transformer_config import TransformerConfig

    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    config = TransformerConfig(
        num_layers=cfg.n_layer,
        hidden_size=cfg.n_embd,
        num_attention_heads=cfg.n_head,
        ffn_hidden_size=4 * cfg.n_embd,
        kv_channels=cfg.n_embd // cfg.n_head,
        tensor_model_parallel_size=tp_size,
        sequence_parallel=sequence_parallel,
        hidden_dropout=cfg.dropout,
        attention_dropout=cfg.dropout,
        layernorm_epsilon=1e-5,  # nn.LayerNorm's default, as in the plain GPT
        normalization="LayerNorm",
        add_bias_linear=cfg.bias,
        activation_func=F.gelu,  # exact (erf) GELU = nn.GELU(); bias_activation_fusion would use tanh
        gated_linear_unit=False,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        use_cpu_initialization=device.type == "cpu",
        perform_initialization=False,  # every weight is loaded below
        gradient_accumulation_fusion=False,  # needs apex; plain .grad accumulation instead
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        cross_entropy_loss_fusion=False,
    )
    layer_spec = get_gpt_layer_local_spec()
    layer_spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    decoder_spec = layer_spec
    if sequence_parallel:
        layer_spec.submodules.input_layernorm = SequenceParallelLayerNorm
        layer_spec.submodules.pre_mlp_layernorm = SequenceParallelLayerNorm
        decoder_spec = ModuleSpec(
            module=TransformerBlock,
            submodules=TransformerBlockSubmodules(
                layer_specs=[layer_spec] * cfg.n_layer, layer_norm=SequenceParallelLayerNorm),
        )
    model = GPTModel(  # TP layers allocate on the current CUDA device, torch norms on CPU
        config=config,
        transformer_layer_spec=decoder_spec,
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.block_size,
        pre_process=True,
        post_process=True,
        parallel_output=True,  # vocab-parallel logits + vocab-parallel cross-entropy
        share_embeddings_and_output_weights=True,
        position_embedding_type="learned_absolute",
    )
    tp_attrs = {n: (bool(getattr(p, "tensor_model_parallel", False)),
                    getattr(p, "partition_dim", None)) for n, p in model.named_parameters()}
    sp_names = {n for n, p in model.named_parameters() if getattr(p, "sequence_parallel", False)}
    # FINDINGS 5: the cast is needed with the local spec; it also moves the torch norms. The TP
    # attributes were read above because .to() may hand back new Parameter objects.
    model.to(device=device, dtype=dtype)
    load_megatron_weights(model, megatron_state_dict_from_gpt(sd, cfg), tp_attrs,
                          tp_rank=tp_rank, tp_size=tp_size)
    model.sp_param_names = sp_names
    return model


def _ensure_model_parallel(tp_size: int, seed: int, device: torch.device) -> None:
    parallel_state = _import_megatron()
    if parallel_state.model_parallel_is_initialized():
        have = parallel_state.get_tensor_model_parallel_world_size()
        if have != tp_size:
            raise RuntimeError(f"Megatron model parallel already initialised with tp={have}")
        return
    if dist.get_world_size() != tp_size:
        raise SystemUnavailable(f"benchmark uses pure TP: world size {dist.get_world_size()} "
                                f"!= tp {tp_size}")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp_size,
                                             create_gloo_process_groups=False)
    if device.type == "cuda":
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)


def _build(ctx: BuildContext, name: str, *, sequence_parallel: bool,
           require_cuda: bool = True) -> System:
    """require_cuda=False only for CPU experiments that patch megatron's CUDA calls."""
    if require_cuda and ctx.device.type != "cuda":
        raise SystemUnavailable("megatron-core's TP layers allocate on torch.cuda.current_device(); "
                                "CUDA only")
    notes = []
    if os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS") != "1":
        notes.append("CUDA_DEVICE_MAX_CONNECTIONS!=1: its grad-input overlap is not guaranteed")
    _ensure_model_parallel(ctx.tp_size, seed=1234, device=ctx.device)
    from megatron.core import parallel_state

    model = build_megatron_model(ctx.cfg, ctx.state_dict, device=ctx.device, dtype=ctx.dtype,
                                 sequence_parallel=sequence_parallel)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    sp_params = [p for n, p in model.named_parameters() if n in model.sp_param_names]
    positions = {}

    def step(idx, targets):
        b, s = idx.shape
        if (b, s) not in positions:
            positions[(b, s)] = torch.arange(s, device=idx.device).unsqueeze(0).expand(b, s)
        per_token = model(idx, positions[(b, s)], None, labels=targets)  # (b, s) fp32
        loss = per_token.mean()
        loss.backward()
        if sequence_parallel:  # finalize_model_grads' layernorm all-reduce, one coalesced call
            grads = [p.grad for p in sp_params if p.grad is not None]
            if grads:
                flat = torch._utils._flatten_dense_tensors(grads)
                dist.all_reduce(flat, group=tp_group)
                for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                    g.copy_(synced)
        return loss

    notes.append("local spec + SDPA core attention"
                 + (", SP torch LayerNorm" if sequence_parallel else ""))
    return System(name, step, [model], notes="; ".join(notes))


def build_megatron(ctx: BuildContext) -> System:
    return _build(ctx, "megatron", sequence_parallel=False)


def build_megatron_sp(ctx: BuildContext) -> System:
    return _build(ctx, "megatron_sp", sequence_parallel=True)
