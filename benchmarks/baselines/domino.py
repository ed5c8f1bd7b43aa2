"""A hand-written Domino-style baseline: Megatron-style TP in eager PyTorch, batch split in k
sub-batches whose all-reduces overlap the other sub-batches' compute (DeepSpeed Domino,
arXiv:2409.15241; the same idea as Oases, written by hand instead of compiled).

Systems: ``domino`` (k=2) and ``eager_tp`` (k=1: the same code and kernels without any overlap,
so domino's gain over it is what the batch split buys).

The model is cut into *units*, each a TP region of Megatron's f/g form (x = residual stream,
replicated; y_part = this rank's partial sum):

    embedding   y_part = vocab-parallel lookup(idx)           x' = AR(y_part) + wpe
    attention   h = LN1(x); y_part = proj(sdpa(qkv(h)))       x' = x + AR(y_part) + b_proj
    mlp         h = LN2(x); y_part = fc2(gelu(fc1(h)))        x' = x + AR(y_part) + b_fc2
    head        h = LN_f(x); loss = vocab-parallel CE(lm_head(h))   (input grad of h: AR)

Every unit of every sub-batch is its own small autograd graph (leaves at x, h and AR(y_part)),
and the step runs forward and backward as an explicit schedule, so the order is ours, not the
autograd engine's:

    forward,  per unit u, per sub-batch j:  wait AR_fwd(u-1, j); x = post(u-1, j);
                                            y_part = tp(u, j); launch AR_fwd(u, j)
    backward, per unit u (last to first), per sub-batch j:
                                            wait AR_bwd(u+1, j); LN backward of u+1;
                                            tp backward of (u, j); launch AR_bwd(u, j)

What overlaps: with k=2 every forward all-reduce of sub-batch A runs while sub-batch B computes
the same unit, and B's all-reduce runs while A computes the next unit (across layer boundaries);
the same holds for the backward input-gradient all-reduces. Effectively exposed: the embedding's
forward all-reduce of A (only B's lookup runs meanwhile) and layer 0's backward attention
all-reduce of B (only A's embedding backward runs meanwhile), plus the vocab-parallel
cross-entropy's three small blocking all-reduces per sub-batch. Whether an all-reduce really runs
concurrently is up to the GPU: NCCL kernels compete with GEMMs for SMs (FINDINGS 1). Not done:
recomputation, fusion, CUDA graphs; compute is eager PyTorch (SDPA for attention), like
Megatron's local spec.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.baselines.common import BuildContext, StateDict, System, shard
from oases_fx.models.gpt import GPTConfig


# --------------------------------------------------------------------------------------------
# Vocab-parallel cross-entropy (Megatron's _VocabParallelCrossEntropy)
# --------------------------------------------------------------------------------------------


class VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token CE of logits sharded on vocab, without gathering them: 3 all-reduces of (N,)."""

    @staticmethod
    def forward(ctx, logits_local, target, vocab_start, group):
        # logits_local: (N, V/tp) this rank's vocab slice; target: (N,) global token ids
        logits = logits_local.float()
        logits_max = logits.max(dim=-1).values
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        logits = logits - logits_max.unsqueeze(-1)

        vocab_end = vocab_start + logits.size(-1)
        not_here = (target < vocab_start) | (target >= vocab_end)
        target_local = (target - vocab_start).masked_fill(not_here, 0)
        target_logit = logits.gather(-1, target_local.unsqueeze(-1)).squeeze(-1)
        target_logit = target_logit.masked_fill(not_here, 0.0)
        dist.all_reduce(target_logit, group=group)

        exp = logits.exp_()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        loss = torch.log(sum_exp) - target_logit  # (N,)

        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, not_here, target_local)
        ctx.in_dtype = logits_local.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, not_here, target_local = ctx.saved_tensors
        grad = softmax.clone()
        # d loss / d logit = softmax - onehot(target) (onehot only on the rank holding the target)
        grad.scatter_add_(-1, target_local.unsqueeze(-1),
                          -(~not_here).to(grad.dtype).unsqueeze(-1))
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad.to(ctx.in_dtype), None, None, None


# --------------------------------------------------------------------------------------------
# The Megatron-style sharded model (parameters only; the step below runs it)
# --------------------------------------------------------------------------------------------


class MegatronStyleGPT(nn.Module):
    """This rank's shards of the plain GPT, in Megatron's layout.

    Column-parallel (sharded on output rows): qkv (interleaved: this rank's slice of each of q, k,
    v), fc1, the vocab rows of the tied wte/lm_head. Row-parallel (sharded on input columns):
    attention proj, fc2; their biases are replicated and added after the all-reduce.
    Replicated: LayerNorms, the position table.
    """

    def __init__(self, cfg: GPTConfig, tp_size: int):
        super().__init__()
        h, V = cfg.n_embd, cfg.vocab_size
        if cfg.n_head % tp_size or V % tp_size:
            raise ValueError(f"n_head={cfg.n_head} and vocab={V} must be divisible by tp={tp_size}")
        if not cfg.bias:
            raise ValueError("MegatronStyleGPT expects the benchmark GPT with biases (bias=True)")
        if cfg.dropout:
            raise ValueError("MegatronStyleGPT has no dropout; the benchmark runs with dropout=0")
        self.cfg, self.tp_size = cfg, tp_size
        self.head_dim = h // cfg.n_head
        P = nn.Parameter
        e = torch.empty
        self.wte = P(e(V // tp_size, h))
        self.wpe = P(e(cfg.block_size, h))
        self.layers = nn.ModuleList()
        for _ in range(cfg.n_layer):
            layer = nn.Module()
            layer.ln1_w, layer.ln1_b = P(e(h)), P(e(h))
            layer.qkv_w, layer.qkv_b = P(e(3 * h // tp_size, h)), P(e(3 * h // tp_size))
            layer.proj_w, layer.proj_b = P(e(h, h // tp_size)), P(e(h))
            layer.ln2_w, layer.ln2_b = P(e(h)), P(e(h))
            layer.fc1_w, layer.fc1_b = P(e(4 * h // tp_size, h)), P(e(4 * h // tp_size))
            layer.fc2_w, layer.fc2_b = P(e(h, 4 * h // tp_size)), P(e(h))
            self.layers.append(layer)
        self.lnf_w, self.lnf_b = P(e(h)), P(e(h))


def megatron_style_state_dict_from_gpt(sd: StateDict, cfg: GPTConfig, rank: int,
                                       world: int) -> StateDict:
    """Rank `rank`'s shards of the plain GPT's weights, named as MegatronStyleGPT's parameters."""
    h = cfg.n_embd
    out: StateDict = {
        "wte": shard(sd["transformer.wte.weight"], 0, rank, world),
        "wpe": sd["transformer.wpe.weight"],
        "lnf_w": sd["transformer.ln_f.weight"],
        "lnf_b": sd["transformer.ln_f.bias"],
    }
    for i in range(cfg.n_layer):
        p, o = f"transformer.h.{i}.", f"layers.{i}."
        # c_attn rows are [Q; K; V]; the rank needs its heads of each: [Q_r; K_r; V_r]
        q, k, v = sd[p + "attn.c_attn.weight"].split(h, dim=0)
        out[o + "qkv_w"] = torch.cat([shard(t, 0, rank, world) for t in (q, k, v)], dim=0)
        qb, kb, vb = sd[p + "attn.c_attn.bias"].split(h, dim=0)
        out[o + "qkv_b"] = torch.cat([shard(t, 0, rank, world) for t in (qb, kb, vb)], dim=0)
        out[o + "proj_w"] = shard(sd[p + "attn.c_proj.weight"], 1, rank, world)
        out[o + "proj_b"] = sd[p + "attn.c_proj.bias"]
        out[o + "fc1_w"] = shard(sd[p + "mlp.c_fc.weight"], 0, rank, world)
        out[o + "fc1_b"] = shard(sd[p + "mlp.c_fc.bias"], 0, rank, world)
        out[o + "fc2_w"] = shard(sd[p + "mlp.c_proj.weight"], 1, rank, world)
        out[o + "fc2_b"] = sd[p + "mlp.c_proj.bias"]
        for ln, name in (("ln_1", "ln1"), ("ln_2", "ln2")):
            out[o + f"{name}_w"] = sd[p + f"{ln}.weight"]
            out[o + f"{name}_b"] = sd[p + f"{ln}.bias"]
    return out


# --------------------------------------------------------------------------------------------
# Units: pre (replicated), tp (local compute -> partial sum), post (residual after the AR)
# --------------------------------------------------------------------------------------------


@dataclass
class _Seg:
    """One unit of one sub-batch: its leaves and graph ends (legend: x residual, h pre output)."""

    x_in: Optional[torch.Tensor] = None  # leaf: residual stream entering the unit
    h: Optional[torch.Tensor] = None  # pre(x_in), graph from x_in
    h_leaf: Optional[torch.Tensor] = None  # leaf: h detached, input of the TP compute
    y_part: Optional[torch.Tensor] = None  # tp(h_leaf): partial sum (or the loss, for the head)
    y_full: Optional[torch.Tensor] = None  # all-reduced y_part, leaf of post
    x_out: Optional[torch.Tensor] = None  # post(x_in, y_full), graph from x_in and y_full
    work: Optional[object] = None  # pending async all-reduce


class DominoTP:
    """Runs MegatronStyleGPT forward + backward with `num_sub_batches` interleaved sub-batches."""

    def __init__(self, model: MegatronStyleGPT, group: dist.ProcessGroup, num_sub_batches: int):
        self.model = model
        self.group = group
        self.k = num_sub_batches
        self.rank = dist.get_rank(group)
        self.vocab_start = self.rank * model.wte.size(0)
        # unit list: ("emb", None), ("attn", layer), ("mlp", layer), ..., ("head", None)
        self.units = [("emb", None)]
        for layer in model.layers:
            self.units += [("attn", layer), ("mlp", layer)]
        self.units.append(("head", None))

    # ---- per-unit pieces -------------------------------------------------------------------

    def _pre(self, kind, layer, x):
        h = x.size(-1)
        if kind == "attn":
            return F.layer_norm(x, (h,), layer.ln1_w, layer.ln1_b)
        if kind == "mlp":
            return F.layer_norm(x, (h,), layer.ln2_w, layer.ln2_b)
        return F.layer_norm(x, (h,), self.model.lnf_w, self.model.lnf_b)  # head

    def _tp(self, kind, layer, inp, targets):
        m = self.model
        if kind == "emb":  # inp: idx (b, T)
            not_here = (inp < self.vocab_start) | (inp >= self.vocab_start + m.wte.size(0))
            local = (inp - self.vocab_start).masked_fill(not_here, 0)
            return F.embedding(local, m.wte).masked_fill(not_here.unsqueeze(-1), 0.0)
        if kind == "attn":  # inp: (b, T, h)
            b, T, _ = inp.shape
            qkv = F.linear(inp, layer.qkv_w, layer.qkv_b)  # (b, T, 3 h/tp): [q_r | k_r | v_r]
            q, k, v = qkv.chunk(3, dim=-1)
            q = q.view(b, T, -1, m.head_dim).transpose(1, 2)  # (b, nh/tp, T, hs)
            k = k.view(b, T, -1, m.head_dim).transpose(1, 2)
            v = v.view(b, T, -1, m.head_dim).transpose(1, 2)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            y = y.transpose(1, 2).reshape(b, T, -1)  # (b, T, h/tp)
            return F.linear(y, layer.proj_w)  # partial (b, T, h); bias after the all-reduce
        if kind == "mlp":
            return F.linear(F.gelu(F.linear(inp, layer.fc1_w, layer.fc1_b)), layer.fc2_w)
        # head: vocab-parallel logits (b, T, V/tp) and CE, mean over this sub-batch's tokens
        logits = F.linear(inp, m.wte)
        per_token = VocabParallelCrossEntropy.apply(
            logits.flatten(0, 1), targets.flatten(0, 1), self.vocab_start, self.group)
        return per_token.mean()

    def _post(self, kind, layer, x_in, y_full):
        if kind == "emb":
            T = y_full.size(1)
            return y_full + self.model.wpe[:T]
        bias = layer.proj_b if kind == "attn" else layer.fc2_b
        return x_in + y_full + bias

    def _all_reduce(self, t):
        return dist.all_reduce(t, group=self.group, async_op=True)

    # ---- the schedule ---------------------------------------------------------------------

    def step(self, idx, targets):
        k = self.k
        if idx.size(0) % k:
            raise ValueError(f"batch {idx.size(0)} is not divisible by num_sub_batches={k}")
        idx_s, tgt_s = idx.chunk(k, dim=0), targets.chunk(k, dim=0)
        segs = [[None] * k for _ in self.units]  # segs[u][j]
        x_cur = [None] * k  # residual leaf entering the next unit, per sub-batch
        losses = [None] * k

        # forward: unit by unit, sub-batch by sub-batch; AR(u, j) overlaps (u, j+1) and (u+1, j)
        for u, (kind, layer) in enumerate(self.units):
            for j in range(k):
                if u > 0:  # finish the previous unit of this sub-batch
                    prev = segs[u - 1][j]
                    prev_kind, prev_layer = self.units[u - 1]
                    prev.work.wait()
                    prev.y_full.requires_grad_()
                    prev.x_out = self._post(prev_kind, prev_layer, prev.x_in, prev.y_full)
                    x_cur[j] = prev.x_out.detach().requires_grad_()
                seg = _Seg(x_in=x_cur[j])
                if kind == "emb":
                    seg.y_part = self._tp(kind, layer, idx_s[j], None)
                else:
                    seg.h = self._pre(kind, layer, seg.x_in)
                    seg.h_leaf = seg.h.detach().requires_grad_()
                    seg.y_part = self._tp(kind, layer, seg.h_leaf, tgt_s[j])
                if kind == "head":
                    losses[j] = seg.y_part
                else:
                    seg.y_full = seg.y_part.detach()  # y_part is not saved by any backward node
                    seg.work = self._all_reduce(seg.y_full)
                segs[u][j] = seg

        # backward: head first (each sub-batch's mean loss weighs 1/k of the batch mean)
        head = len(self.units) - 1
        for j in range(k):
            seg = segs[head][j]
            seg.y_part.backward(torch.full_like(seg.y_part, 1.0 / k))
            seg.work = self._all_reduce(seg.h_leaf.grad)
        for u in range(head - 1, -1, -1):
            kind, layer = self.units[u]
            for j in range(k):
                nxt = segs[u + 1][j]  # its input-grad all-reduce was launched one step earlier
                nxt.work.wait()
                nxt.h.backward(nxt.h_leaf.grad)  # LN backward, accumulates into nxt.x_in.grad
                grad_x = nxt.x_in.grad  # complete: residual part came from nxt.x_out backward
                seg = segs[u][j]
                seg.x_out.backward(grad_x)  # residual + bias: fills seg.x_in.grad, y_full.grad
                seg.y_part.backward(seg.y_full.grad)  # TP compute: weight grads, h_leaf.grad
                if kind != "emb":
                    seg.work = self._all_reduce(seg.h_leaf.grad)
                segs[u + 1][j] = None  # free this sub-batch's saved tensors of unit u+1

        loss = losses[0].detach()
        for extra in losses[1:]:
            loss = loss + extra.detach()
        return loss / k


def build_megatron_style_model(ctx: BuildContext) -> MegatronStyleGPT:
    with torch.device("meta"):
        model = MegatronStyleGPT(ctx.cfg, ctx.tp_size)
    model.to_empty(device=ctx.device)
    model.to(ctx.dtype)
    sd = megatron_style_state_dict_from_gpt(ctx.state_dict, ctx.cfg, ctx.tp_rank, ctx.tp_size)
    model.load_state_dict(sd, strict=True)
    return model


def _build(ctx: BuildContext, name: str, num_sub_batches: int) -> System:
    model = build_megatron_style_model(ctx)
    runner = DominoTP(model, ctx.group, num_sub_batches)
    notes = f"eager, {num_sub_batches} sub-batch(es)"
    return System(name, runner.step, [model], notes=notes)


def build_domino(ctx: BuildContext) -> System:
    return _build(ctx, "domino", int(ctx.options.get("domino_sub_batches", 2)))


def build_eager_tp(ctx: BuildContext) -> System:
    return _build(ctx, "eager_tp", 1)
