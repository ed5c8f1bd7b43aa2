"""What every baseline shares: the build context, the System wrapper the harness times, the master
weights and data, a torchtitan-style GPT with separate q/k/v, and the model-FLOP formula.

Every system loads the *same* weights: the plain GPT's state dict (oases_fx/models/gpt.py naming),
mapped to its own layout by a pure function of tensors that the CPU tests check.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from oases_fx.models.gpt import GPT, GPTConfig

StateDict = dict[str, torch.Tensor]


class SystemUnavailable(RuntimeError):
    """A system cannot run in this environment (missing package, unsupported device or option).

    The harness prints a row with this message instead of timing the system; it is never skipped
    silently.
    """


# --------------------------------------------------------------------------------------------
# Build context and the System the harness times
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class BuildContext:
    cfg: GPTConfig
    """Model shape; every system builds this GPT."""
    mesh: "torch.distributed.device_mesh.DeviceMesh"
    """1-D mesh over the TP ranks, mesh_dim_names=("tp",); each system gets its own process group
    over the same ranks, so communicators (and symmetric-memory registration) are not shared."""
    device: torch.device
    """Device of this rank (cuda:<local_rank> or cpu)."""
    dtype: torch.dtype
    """Parameter and activation dtype (bf16 in the benchmark, fp32 in tests)."""
    state_dict: StateDict
    """Master weights in plain-GPT naming (unsharded, identical on every rank)."""
    example: tuple[torch.Tensor, torch.Tensor]
    """(idx, targets) of the benchmark shape on `device`, for systems that compile on examples."""
    backend: str = "inductor"
    """torch.compile backend for the compiled systems ("inductor", "aot_eager" or "none")."""
    options: dict = field(default_factory=dict)
    """Free-form per-system options from the command line (e.g. num_sub_batches)."""

    @property
    def group(self) -> dist.ProcessGroup:
        return self.mesh.get_group()

    @property
    def tp_rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def tp_size(self) -> int:
        return dist.get_world_size(self.group)


class System:
    """One built system: ``step(idx, targets)`` runs forward + backward and returns the loss.

    Every system does the same work per step: gradients are set to None, forward computes the mean
    token cross-entropy over the whole batch, backward fills every parameter's gradient. No
    optimizer step (it is identical elementwise work for all systems and hides nothing).
    """

    def __init__(
        self,
        name: str,
        step_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        modules: list[nn.Module],
        *,
        notes: str = "",
        wrap_call: Optional[Callable[[], "object"]] = None,
    ):
        self.name = name
        self._step_fn = step_fn
        self.modules = modules
        self.notes = notes
        self._wrap_call = wrap_call  # context-manager factory around every step (config patches)

    def parameters(self):
        seen = set()
        for m in self.modules:
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None
            if hasattr(p, "main_grad"):
                p.main_grad = None

    def step(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.zero_grad()
        if self._wrap_call is None:
            loss = self._step_fn(idx, targets)
        else:
            with self._wrap_call():
                loss = self._step_fn(idx, targets)
        return loss.detach()

    def close(self) -> None:
        """Drop every reference to the model (extras such as `explain` included) and free it."""
        self.zero_grad()
        for key in list(vars(self)):
            if key not in ("name", "notes"):
                delattr(self, key)
        self.modules, self._step_fn, self._wrap_call = [], None, None
        free_memory()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# Master weights and data
# --------------------------------------------------------------------------------------------


def make_master_state_dict(cfg: GPTConfig, *, seed: int, device: torch.device,
                           dtype: torch.dtype) -> StateDict:
    """Initialise the plain GPT (fp32, on `device`, seeded) and return its weights in `dtype` on CPU.

    Every rank calls this with the same seed; the harness checks a fingerprint across ranks.
    The tied LM head appears under both names, as in the GPT's own state_dict.
    """
    torch.manual_seed(seed)
    with torch.device(device):
        model = GPT(cfg)
    sd = {k: v.detach().to("cpu", dtype) for k, v in model.state_dict().items()}
    sd["lm_head.weight"] = sd["transformer.wte.weight"]  # keep the tie as one tensor
    del model
    free_memory()
    return sd


def fingerprint(sd: StateDict) -> float:
    """A cheap float64 checksum of the weights, to check that all ranks hold the same ones."""
    total = 0.0
    for i, k in enumerate(sorted(sd)):
        t = sd[k]
        total += (i + 1) * float(t.sum(dtype=torch.float64)) + float(t.abs().sum(dtype=torch.float64))
    return total


def make_batch(cfg: GPTConfig, *, batch: int, seq: int, seed: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random tokens (same on every rank): idx and next-token targets, both (B, T) int64."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g)
    return tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)


def load_plain_gpt(cfg: GPTConfig, sd: StateDict, *, device: torch.device,
                   dtype: torch.dtype) -> GPT:
    """The plain GPT on `device` in `dtype` holding the master weights (oases_fx, reference)."""
    with torch.device("meta"):
        model = GPT(cfg)  # no random init: every weight is overwritten below
    model.to_empty(device=device)
    model.to(dtype)
    model.transformer.wte.weight = model.lm_head.weight  # re-assert the tie after to_empty
    model.load_state_dict(sd, strict=True)
    return model


def shard(t: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s contiguous 1/world slice of `t` along `dim` (Megatron's and DTensor's Shard)."""
    if t.size(dim) % world:
        raise ValueError(f"cannot shard size {t.size(dim)} (dim {dim}) over {world} ranks")
    return t.chunk(world, dim=dim)[rank]


# --------------------------------------------------------------------------------------------
# Model FLOPs (nanoGPT estimate_mfu, after PaLM appendix B)
# --------------------------------------------------------------------------------------------


def num_params(cfg: GPTConfig, *, non_embedding: bool = True) -> int:
    """Parameters of the plain GPT as nanoGPT's get_num_params counts them: the tied wte/lm_head
    once, and without the position table when `non_embedding` (a lookup does no FLOPs)."""
    with torch.device("meta"):
        model = GPT(cfg)
    n = sum(p.numel() for p in model.parameters())  # parameters() yields the tied weight once
    if non_embedding:
        n -= model.transformer.wpe.weight.numel()
    return n


def flops_per_token(cfg: GPTConfig, seq: int) -> float:
    """Training FLOPs per token, forward + backward: 6*N + 12*L*h*T.

    N: parameters excluding the position table (6N: 2 FLOPs per multiply-add, x3 for the backward).
    12*L*h*T: attention scores and the weighted sum of values (QK^T and AV), forward + backward,
    counted for the full T x T square as PaLM and nanoGPT do (causal masking is not subtracted).
    Source: nanoGPT model.py estimate_mfu, PaLM (arXiv:2204.02311) appendix B.
    """
    return 6.0 * num_params(cfg) + 12.0 * cfg.n_layer * cfg.n_embd * seq


# --------------------------------------------------------------------------------------------
# torchtitan-style GPT: separate q/k/v linears (DTensor colwise on a fused qkv splits wrongly)
# --------------------------------------------------------------------------------------------


class TitanAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        h = cfg.n_embd
        self.head_dim = h // cfg.n_head
        self.wq = nn.Linear(h, h, bias=cfg.bias)
        self.wk = nn.Linear(h, h, bias=cfg.bias)
        self.wv = nn.Linear(h, h, bias=cfg.bias)
        self.wo = nn.Linear(h, h, bias=cfg.bias)

    def forward(self, x):
        B, T, _ = x.shape
        # -1 heads: under TP each rank holds n_head / tp of them
        q = self.wq(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh_local, T, hs)
        k = self.wk(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, h_local)
        return self.wo(y)


class TitanFeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.w2 = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x):
        return self.w2(F.gelu(self.w1(x)))


class TitanBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attention_norm = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attention = TitanAttention(cfg)
        self.ffn_norm = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.feed_forward = TitanFeedForward(cfg)

    def forward(self, x):
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class TitanGPT(nn.Module):
    """The plain GPT's math with torchtitan's module layout (no dropout: the benchmark uses 0)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.dropout:
            raise ValueError("TitanGPT has no dropout; the benchmark runs with dropout=0")
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_embeddings = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.layers = nn.ModuleList([TitanBlock(cfg) for _ in range(cfg.n_layer)])
        self.norm = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.output = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.output.weight = self.tok_embeddings.weight  # tied, as in the plain GPT

    def forward(self, idx, targets=None):
        T = idx.size(1)
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
        h = self.tok_embeddings(idx) + self.pos_embeddings(pos)
        for layer in self.layers:
            h = layer(h)
        logits = self.output(self.norm(h))  # (B, T, vocab) (sharded on vocab under loss_parallel)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(0, 1))
        return logits, loss


def titan_state_dict_from_gpt(sd: StateDict, cfg: GPTConfig) -> StateDict:
    """Plain-GPT weights -> TitanGPT names; the fused c_attn is split into q, k, v (each (h, h))."""
    h = cfg.n_embd
    out: StateDict = {
        "tok_embeddings.weight": sd["transformer.wte.weight"],
        "pos_embeddings.weight": sd["transformer.wpe.weight"],
        "output.weight": sd["transformer.wte.weight"],
    }
    pairs = [("ln_1", "attention_norm"), ("ln_2", "ffn_norm"), ("attn.c_proj", "attention.wo"),
             ("mlp.c_fc", "feed_forward.w1"), ("mlp.c_proj", "feed_forward.w2")]
    for i in range(cfg.n_layer):
        src, dst = f"transformer.h.{i}.", f"layers.{i}."
        for s, d in pairs:
            for kind in ("weight", "bias"):
                if src + f"{s}.{kind}" in sd:
                    out[dst + f"{d}.{kind}"] = sd[src + f"{s}.{kind}"]
        for kind in ("weight", "bias"):
            key = src + f"attn.c_attn.{kind}"
            if key in sd:
                q, k, v = sd[key].split(h, dim=0)  # c_attn rows: [Q; K; V]
                out[dst + f"attention.wq.{kind}"] = q
                out[dst + f"attention.wk.{kind}"] = k
                out[dst + f"attention.wv.{kind}"] = v
    for kind in ("weight", "bias"):
        if f"transformer.ln_f.{kind}" in sd:
            out[f"norm.{kind}"] = sd[f"transformer.ln_f.{kind}"]
    return out


def build_titan_gpt(cfg: GPTConfig, sd: StateDict, *, device: torch.device,
                    dtype: torch.dtype) -> TitanGPT:
    """An unsharded TitanGPT holding the plain GPT's weights."""
    with torch.device("meta"):
        model = TitanGPT(cfg)
    model.to_empty(device=device)
    model.to(dtype)
    model.output.weight = model.tok_embeddings.weight  # to_empty keeps the tie; be explicit
    model.load_state_dict(titan_state_dict_from_gpt(sd, cfg), strict=True)
    return model
