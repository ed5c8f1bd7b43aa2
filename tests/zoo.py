"""The model zoo: small random-init causal LMs (no downloads) covering the constructs the sharding
analysis must handle, each built identically on every rank from a seed.

Every entry is ``Family(name, construct, build, num_blocks)``: ``build()`` returns the model,
``num_blocks`` the number of attention + MLP blocks a full Megatron plan shards (2 per layer; an
MoE layer's MLP counts one block per expert plus its shared expert). Sizes: hidden 32, 4 heads
of 8 (divisible by TP=4), 2 layers, vocab 64, sequence <= 16.

Hand-written models at the end: a Meta-reference-style Llama with complex rotary
(view_as_complex, polar), a Llama whose rotary is written with stack/flatten of rotated pairs,
and a dense-routed MoE whose experts are nn.Linear pairs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB, HIDDEN, HEADS, HEAD_DIM, LAYERS, INTER, SEQ = 64, 32, 4, 8, 2, 64, 16


@dataclass(frozen=True)
class Family:
    name: str
    construct: str
    """What this family exercises (for the README table)."""
    build: Callable[[], nn.Module]
    num_blocks: int
    """Attention + MLP blocks (column -> row pairs) a full Megatron plan shards."""
    hf: bool = True
    """Called as model(input_ids=..., labels=...) (True) or model(idx, targets) -> (logits, loss)."""


def _common(**kw):
    base = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=None, tie_word_embeddings=False)
    base.update(kw)
    return base


def _std(**kw):
    return _common(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                   intermediate_size=INTER, max_position_embeddings=SEQ * 2, **kw)


def _hf(cls_name: str, cfg_name: str, attn: str = "sdpa", **kw):
    def build():
        import transformers

        cfg = getattr(transformers, cfg_name)(**kw)
        cfg._attn_implementation = attn  # Bloom has only "eager" (baddbmm with the ALiBi bias)
        return getattr(transformers, cls_name)(cfg)

    return build


# --- hand-written models ----------------------------------------------------------------------------

class _RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _precompute_freqs_cis(dim, end, theta=10000.0):
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    t = torch.arange(end, device=freqs.device)
    freqs = torch.outer(t, freqs).float()
    return torch.polar(torch.ones_like(freqs), freqs)  # complex64


def _rotary_complex(xq, xk, freqs_cis):
    """Meta's llama/model.py apply_rotary_emb."""
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))  # (B, S, nh, hd/2)
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs_cis = freqs_cis.view(1, xq_.shape[1], 1, xq_.shape[-1])
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


def _rotary_stack(xq, xk, cos, sin):
    """Rotary on interleaved pairs written with stack/flatten (GPT-J / some reference codes)."""
    def rot(x):
        x1, x2 = x[..., ::2], x[..., 1::2]  # (B, S, nh, hd/2)
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)

    return rot(xq), rot(xk)


class _MetaAttention(nn.Module):
    def __init__(self, n_kv_heads, rotary):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = HEADS, n_kv_heads, HEAD_DIM
        self.wq = nn.Linear(HIDDEN, HEADS * HEAD_DIM, bias=False)
        self.wk = nn.Linear(HIDDEN, n_kv_heads * HEAD_DIM, bias=False)
        self.wv = nn.Linear(HIDDEN, n_kv_heads * HEAD_DIM, bias=False)
        self.wo = nn.Linear(HEADS * HEAD_DIM, HIDDEN, bias=False)
        self.rotary = rotary

    def forward(self, x, rope):
        B, S, _ = x.shape
        xq = self.wq(x).view(B, S, self.n_heads, self.head_dim)  # (B, S, nh, hd)
        xk = self.wk(x).view(B, S, self.n_kv_heads, self.head_dim)
        xv = self.wv(x).view(B, S, self.n_kv_heads, self.head_dim)
        if self.rotary == "complex":
            xq, xk = _rotary_complex(xq, xk, rope[:S])
        else:
            cos, sin = rope
            xq, xk = _rotary_stack(xq, xk, cos[:S, None, :], sin[:S, None, :])
        rep = self.n_heads // self.n_kv_heads
        if rep > 1:  # Meta's repeat_kv
            xk = xk[:, :, :, None, :].expand(B, S, self.n_kv_heads, rep, self.head_dim).reshape(
                B, S, self.n_heads, self.head_dim)
            xv = xv[:, :, :, None, :].expand(B, S, self.n_kv_heads, rep, self.head_dim).reshape(
                B, S, self.n_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (xq, xk, xv))  # (B, nh, S, hd)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).contiguous().view(B, S, -1))


class _SwiGLU(nn.Module):
    def __init__(self, dim=HIDDEN, hidden=INTER):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class _DenseMoE(nn.Module):
    """Top-k routing computed densely (every expert on every token, weighted by a routing weight
    that is zero off the top k): traceable with no data-dependent shapes."""

    def __init__(self, num_experts=4, top_k=2):
        super().__init__()
        self.gate = nn.Linear(HIDDEN, num_experts, bias=False)
        self.experts = nn.ModuleList([_SwiGLU(HIDDEN, INTER // 2) for _ in range(num_experts)])
        self.top_k = top_k

    def forward(self, x):
        probs = F.softmax(self.gate(x), dim=-1)  # (B, S, E)
        top, idx = torch.topk(probs, self.top_k, dim=-1)
        weights = torch.zeros_like(probs).scatter(-1, idx, top / top.sum(-1, keepdim=True))
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            out = out + expert(x) * weights[..., e:e + 1]
        return out


class _Block(nn.Module):
    def __init__(self, n_kv_heads, rotary, moe):
        super().__init__()
        self.attention = _MetaAttention(n_kv_heads, rotary)
        self.feed_forward = _DenseMoE() if moe else _SwiGLU()
        self.attention_norm = _RMSNorm(HIDDEN)
        self.ffn_norm = _RMSNorm(HIDDEN)

    def forward(self, x, rope):
        h = x + self.attention(self.attention_norm(x), rope)
        return h + self.feed_forward(self.ffn_norm(h))


class MetaLlama(nn.Module):
    """Meta's reference Llama layout (llama/model.py), plain nn.Module; forward(idx, targets)."""

    def __init__(self, *, n_kv_heads=HEADS, rotary="complex", moe=False):
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList([_Block(n_kv_heads, rotary, moe) for _ in range(LAYERS)])
        self.norm = _RMSNorm(HIDDEN)
        self.output = nn.Linear(HIDDEN, VOCAB, bias=False)
        if rotary == "complex":
            self.register_buffer("freqs_cis", _precompute_freqs_cis(HEAD_DIM, SEQ * 2), persistent=False)
        else:
            ang = torch.outer(torch.arange(SEQ * 2).float(),
                              1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)))
            self.register_buffer("rope_cos", ang.cos(), persistent=False)
            self.register_buffer("rope_sin", ang.sin(), persistent=False)
        self.rotary = rotary

    def forward(self, idx, targets):
        h = self.tok_embeddings(idx)
        rope = self.freqs_cis if self.rotary == "complex" else (self.rope_cos, self.rope_sin)
        for layer in self.layers:
            h = layer(h, rope)
        logits = self.output(self.norm(h))
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


# --- the zoo ----------------------------------------------------------------------------------------

_L2 = 2 * LAYERS  # one attention + one MLP block per layer

FAMILIES = [
    Family("gpt_neox", "fused per-head qkv viewed (B,S,heads,3,hd); parallel residual",
           _hf("GPTNeoXForCausalLM", "GPTNeoXConfig", **_std(use_parallel_residual=True, hidden_dropout=0.0,
                                                              attention_dropout=0.0)), _L2),
    # MHA: a fused q/k/v of unequal pieces (GQA) has no DTensor placement at the boundary (boundary.py)
    Family("phi3", "fused qkv and gate_up split by slicing",
           _hf("Phi3ForCausalLM", "Phi3Config", **_std(num_key_value_heads=HEADS, resid_pdrop=0.0, embd_pdrop=0.0)),
           _L2),
    Family("falcon", "multi-query attention (1 kv head), fused qkv, parallel attention+MLP",
           _hf("FalconForCausalLM", "FalconConfig", **_common(
               hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, multi_query=True,
               parallel_attn=True, new_decoder_architecture=False, alibi=False, bias=False,
               hidden_dropout=0.0, attention_dropout=0.0, ffn_hidden_size=INTER)), _L2),
    Family("gpt_bigcode", "multi-query attention, fused c_attn split q / kv",
           _hf("GPTBigCodeForCausalLM", "GPTBigCodeConfig", **_common(
               n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=INTER, n_positions=SEQ * 2, multi_query=True,
               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)), _L2),
    Family("mistral", "GQA (2 kv heads: fewer than TP=4)",
           _hf("MistralForCausalLM", "MistralConfig", **_std(num_key_value_heads=2, sliding_window=None)), _L2),
    Family("qwen2", "GQA, q/k/v biases",
           _hf("Qwen2ForCausalLM", "Qwen2Config", **_std(num_key_value_heads=2)), _L2),
    Family("olmo2", "q/k RMSNorm over the full projected width",
           _hf("Olmo2ForCausalLM", "Olmo2Config", **_std(num_key_value_heads=HEADS)), _L2),
    Family("cohere", "q/k LayerNorm (per head), parallel attention+MLP from one norm",
           _hf("CohereForCausalLM", "CohereConfig", **_std(num_key_value_heads=HEADS, use_qk_norm=True)), _L2),
    Family("qwen3", "per-head q/k RMSNorm, GQA",
           _hf("Qwen3ForCausalLM", "Qwen3Config", **_std(num_key_value_heads=2, head_dim=HEAD_DIM)), _L2),
    Family("gemma3", "per-head q/k norm, GQA, sliding-window layers",
           _hf("Gemma3ForCausalLM", "Gemma3TextConfig", **_std(num_key_value_heads=2, head_dim=HEAD_DIM,
                                                               sliding_window=8)), _L2),
    Family("gemma", "multi-query (1 kv head), GeGLU",
           _hf("GemmaForCausalLM", "GemmaConfig", **_std(num_key_value_heads=1, head_dim=HEAD_DIM)), _L2),
    Family("gptj", "parallel attention+MLP, interleaved partial rotary",
           _hf("GPTJForCausalLM", "GPTJConfig", **_common(
               n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=INTER, n_positions=SEQ * 2, rotary_dim=4,
               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)), _L2),
    Family("phi", "partial rotary, parallel attention+MLP, dense out-proj",
           _hf("PhiForCausalLM", "PhiConfig", **_std(resid_pdrop=0.0, embd_pdrop=0.0)), _L2),
    Family("stablelm", "partial rotary, LayerNorm",
           _hf("StableLmForCausalLM", "StableLmConfig", **_std(num_key_value_heads=HEADS)), _L2),
    Family("opt", "learned positions, biases, ReLU MLP",
           _hf("OPTForCausalLM", "OPTConfig", **_common(
               hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, ffn_dim=INTER,
               max_position_embeddings=SEQ * 2, word_embed_proj_dim=HIDDEN, dropout=0.0,
               attention_dropout=0.0, enable_bias=True)), _L2),
    Family("bloom", "ALiBi, fused per-head qkv, eager attention (baddbmm, softmax)",
           _hf("BloomForCausalLM", "BloomConfig", attn="eager", **_common(
               hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS, hidden_dropout=0.0, attention_dropout=0.0)), _L2),
    Family("mixtral", "MoE (experts as 3-D parameters, grouped_mm), top-2 of 4, GQA",
           _hf("MixtralForCausalLM", "MixtralConfig", **_std(num_key_value_heads=2, num_local_experts=4,
                                                             num_experts_per_tok=2)), LAYERS * (1 + 4)),
    Family("mixtral_batched_mm", "3-D experts run by experts_implementation='batched_mm' (weight[expert_ids] + bmm)",
           _hf("MixtralForCausalLM", "MixtralConfig", **_std(num_key_value_heads=2, num_local_experts=4,
                                                             num_experts_per_tok=2, experts_implementation="batched_mm")),
           LAYERS * (1 + 4)),
    Family("olmoe", "MoE (3-D experts), q/k norm over the full width",
           _hf("OlmoeForCausalLM", "OlmoeConfig", **_std(num_key_value_heads=HEADS, num_experts=4,
                                                         num_experts_per_tok=2)), LAYERS * (1 + 4)),
    Family("granite", "embedding/residual/attention multipliers, logits divided by a scale",
           _hf("GraniteForCausalLM", "GraniteConfig", **_std(num_key_value_heads=2, embedding_multiplier=2.0,
                                                            residual_multiplier=0.5, attention_multiplier=0.3,
                                                            logits_scaling=4.0)), _L2),
    Family("codegen", "fused qkv in mp_num=4 groups (reshape to (B,S,4,-1), split q/v/k), partial rotary",
           _hf("CodeGenForCausalLM", "CodeGenConfig", **_common(
               n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=INTER, n_positions=SEQ * 2, n_ctx=SEQ * 2,
               rotary_dim=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)), _L2),
    Family("starcoder2", "GQA, biases everywhere, LayerNorm, GELU MLP (c_fc / c_proj)",
           _hf("Starcoder2ForCausalLM", "Starcoder2Config", **_std(num_key_value_heads=2, residual_dropout=0.0,
                                                                  embedding_dropout=0.0, sliding_window=None)), _L2),
    Family("smollm3", "no rotary on every 2nd layer (NoPE layers), GQA",
           _hf("SmolLM3ForCausalLM", "SmolLM3Config", **_std(num_key_value_heads=2, no_rope_layer_interval=2)), _L2),
    Family("glm", "interleaved partial rotary (half the head dim), fused gate_up, GQA",
           _hf("GlmForCausalLM", "GlmConfig", **_std(num_key_value_heads=2, head_dim=HEAD_DIM)), _L2),
    Family("qwen2_moe", "MoE (3-D experts) + a shared expert behind a sigmoid gate, GQA, q/k/v biases",
           _hf("Qwen2MoeForCausalLM", "Qwen2MoeConfig", **_std(num_key_value_heads=2, num_experts=4,
                                                               num_experts_per_tok=2, moe_intermediate_size=INTER // 2,
                                                               shared_expert_intermediate_size=INTER // 2)),
           LAYERS * (2 + 4)),
    Family("gemma2", "logit soft-capping (final and attention: tanh in eager attention), sliding window, GQA",
           _hf("Gemma2ForCausalLM", "Gemma2Config", attn="eager", **_std(
               num_key_value_heads=2, head_dim=HEAD_DIM, sliding_window=8, final_logit_softcapping=30.0,
               attn_logit_softcapping=50.0, query_pre_attn_scalar=HEAD_DIM)), _L2),
    Family("olmo", "LayerNorm without parameters", _hf("OlmoForCausalLM", "OlmoConfig", **_std(num_key_value_heads=HEADS)),
           _L2),
    Family("bitnet", "RMSNorm of the column output right before the row (attn/ffn sub-norm over the sharded width)",
           _hf("BitNetForCausalLM", "BitNetConfig", **_std(num_key_value_heads=2)), _L2),
    # layer 1 MoE: shared expert + Llama4TextExperts (bmm over every expert, declined), layer 0 dense
    Family("llama4", "MoE experts as a bmm over every expert (declined), shared expert, chunked attention, qk norm",
           _hf("Llama4ForCausalLM", "Llama4TextConfig", **_std(
               num_key_value_heads=2, head_dim=HEAD_DIM, num_local_experts=4, num_experts_per_tok=1,
               interleave_moe_layer_step=2, intermediate_size_mlp=INTER, attention_chunk_size=8, use_qk_norm=True)),
           _L2 + 1),
    # 6 heads, 3 kv heads: at TP=2 neither divides the other (a named error, not a zoo family to shard)
    Family("qwen2_kv3", "GQA with 3 kv heads (refused at TP=2: kv heads neither divide nor are divisible by tp)",
           _hf("Qwen2ForCausalLM", "Qwen2Config", **_common(
               hidden_size=48, num_hidden_layers=LAYERS, num_attention_heads=6, num_key_value_heads=3,
               intermediate_size=INTER, max_position_embeddings=SEQ * 2)), _L2),
    Family("meta_llama", "Meta reference Llama: complex rotary (view_as_complex, polar), GQA",
           lambda: MetaLlama(n_kv_heads=2, rotary="complex"), _L2, hf=False),
    Family("stack_rope_llama", "rotary with stack/flatten of rotated pairs, MHA",
           lambda: MetaLlama(n_kv_heads=HEADS, rotary="stack"), _L2, hf=False),
    Family("moe_llama", "dense-routed MoE with nn.Linear experts (4 experts, top-2)",
           lambda: MetaLlama(n_kv_heads=HEADS, rotary="complex", moe=True), LAYERS * (1 + 4), hf=False),
]

BY_NAME = {f.name: f for f in FAMILIES}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return BY_NAME[name].build()


def call(family: Family, model, idx, tgt):
    """(logits, loss) of one step."""
    if family.hf:
        out = model(input_ids=idx, labels=tgt)
        return out.logits, out.loss
    return model(idx, tgt)


def compile_inputs(family: Family, idx, tgt) -> dict:
    return dict(example_kwargs=dict(input_ids=idx, labels=tgt)) if family.hf else dict(example_inputs=(idx, tgt))
