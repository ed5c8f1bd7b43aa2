"""Rank tasks for the vocab-parallel tests (tests/distributed/test_vocab_parallel.py).

Like tests.tasks.compare_with_reference, but the plan has vocab_parallel=True, targets may hold
ignore_index (-100), and the compiled module is also inspected (local shapes, where the inserted
vocab nodes ended up). Nothing is compared here: the parent compares.
"""
from __future__ import annotations

import copy

import torch
from torch.distributed.device_mesh import init_device_mesh

import oases_fx
from oases_fx.plan import Plan
from tests.tasks import _call, build_model


def _vocab_nodes(gm):
    """(count in the top-level graph, count inside checkpointed submodules) of the vocab runtime calls."""
    from oases_fx import vocab

    top = sum(n.op == "call_function" and n.target in vocab.VOCAB_FNS for n in gm.graph.nodes)
    inner = 0
    for name, sub in gm.named_modules():
        if name and isinstance(sub, torch.fx.GraphModule):
            inner += sum(n.op == "call_function" and n.target in vocab.VOCAB_FNS for n in sub.graph.nodes)
    return top, inner


def _extra(logits, on):
    # Weighted by position and vocab entry so a wrong slice of the gradient cannot cancel out.
    if not on:
        return 0.0
    w = torch.linspace(-1.0, 1.0, logits.numel(), dtype=logits.dtype).view(logits.shape)
    return (logits * w).sum() * 0.1


def compare_vocab_parallel(rank, world_size, *, kind, cfg, batch, seq, k=1, recompute="none", steps=2,
                           ignored=0, backend="aot_eager", skip=False,
                           logits_in_loss=False):
    """Loss, returned logits, gathered gradients and parameters after `steps` SGD steps of the
    vocab-parallel compiled model and the unsharded eager reference. `ignored` target positions
    per row are set to -100 (ignore_index); `skip` compiles with skip_collectives (the floor benchmark).
    With `logits_in_loss`, backward also runs through the returned (all-gathered) logits."""
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    ref = _NllLM(cfg["vocab_size"], cfg["n_embd"]) if kind == "nll_lm" else build_model(kind, cfg)
    model = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(1234)
    idx = torch.randint(0, cfg["vocab_size"], (batch, seq), generator=g)
    tgt = torch.randint(0, cfg["vocab_size"], (batch, seq), generator=g)
    if ignored:
        tgt[:, :ignored] = -100
        tgt[0, :] = -100  # one row with no target at all
    plan = Plan(tp_degree=world_size, num_sub_batches=k, recompute=recompute, vocab_parallel=True)
    if kind in ("gpt", "nll_lm"):
        m = oases_fx.compile(model, mesh, example_inputs=(idx, tgt), backend=backend, verbose=False, plan=plan,
                             skip_collectives=skip)
    else:
        m = oases_fx.compile(model, mesh, example_kwargs=dict(input_ids=idx, labels=tgt), backend=backend,
                             verbose=False, plan=plan, skip_collectives=skip)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    losses, ref_losses = [], []
    for _ in range(steps):
        opt.zero_grad()
        ref_opt.zero_grad()
        call = "gpt" if kind == "nll_lm" else kind
        logits, loss = _call(call, m, idx, tgt)
        (loss + _extra(logits, logits_in_loss)).backward()
        r_logits, r_loss = _call(call, ref, idx, tgt)
        (r_loss + _extra(r_logits, logits_in_loss)).backward()
        losses.append(loss.detach())
        ref_losses.append(r_loss.detach())
        last = (logits.detach(), r_logits.detach(), m.full_grads(), {n: p.grad for n, p in ref.named_parameters()})
        opt.step()
        ref_opt.step()
    full = m.full_state_dict()
    # A round trip through load_full_state_dict must give back the same shards.
    def local(t):  # state_dict() holds DTensors on the tp axis (oases_fx.boundary): this rank's shard
        return t.to_local() if hasattr(t, "to_local") else t

    before = {n: local(t).clone() for n, t in m.state_dict().items()}
    m.load_full_state_dict(full)
    reload_ok = all(torch.equal(before[n], local(t)) for n, t in m.state_dict().items())
    local_shapes = {n: tuple(local(p).shape) for n, p in m.state_dict().items()}
    top, inner = _vocab_nodes(m.graphs.gm)
    loss_all_ranks = losses[-1]
    if rank != 0:
        return dict(loss=loss_all_ranks, local_shapes=local_shapes)
    logits, r_logits, grads, r_grads = last
    return dict(losses=torch.stack(losses), ref_losses=torch.stack(ref_losses), logits=logits, ref_logits=r_logits,
                grads=grads, ref_grads=r_grads, params=full, ref_params=ref.state_dict(), explain=m.explain(),
                local_shapes=local_shapes, reload_ok=reload_ok, vocab_top=top, vocab_in_ckpt=inner,
                loss=loss_all_ranks)


def vocab_error(rank, world_size, *, kind, cfg, batch=2, seq=8, model=None):
    """Compile with vocab_parallel=True; return (error type, message) or None."""
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    plan = Plan(tp_degree=world_size, vocab_parallel=True)
    idx = torch.randint(0, cfg.get("vocab_size", 8), (batch, seq))
    try:
        if kind == "gpt":
            oases_fx.compile(build_model(kind, cfg), mesh, example_inputs=(idx, idx), backend="eager",
                             verbose=False, plan=plan)
        elif kind == "smoothing":
            oases_fx.compile(_SmoothedLM(cfg["vocab_size"]), mesh, example_inputs=(idx, idx), backend="eager",
                             verbose=False, plan=plan)
        elif kind == "no_embedding":
            oases_fx.compile(_NoEmbedding(), mesh, example_inputs=(torch.randn(batch, seq, 16),), backend="eager",
                             verbose=False, plan=plan)
        else:
            raise ValueError(kind)
    except Exception as e:
        return type(e).__name__, str(e)
    return None


class _SmoothedLM(torch.nn.Module):
    """Embedding -> LM head -> cross-entropy with label smoothing (not vocab-parallelisable)."""

    def __init__(self, vocab_size):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab_size, 16)
        self.head = torch.nn.Linear(16, vocab_size, bias=False)

    def forward(self, idx, tgt):
        logits = self.head(self.emb(idx))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten(), label_smoothing=0.1)


class _NoEmbedding(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 16)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x))).sum()


def retrace_after_step(rank, world_size):
    """After an SGD step, a call with other shapes in eval mode retraces onto the shards the
    optimizer updated (the tied table included) and matches the updated unsharded model."""
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    ref = build_model("gpt", GPT_SMALL)
    model = copy.deepcopy(ref)
    idx = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    m = oases_fx.compile(model, mesh, example_inputs=(idx, idx), backend="aot_eager", verbose=False,
                         plan=Plan(tp_degree=world_size, vocab_parallel=True))
    for mod in (m, ref):
        opt = torch.optim.SGD(mod.parameters(), lr=1.0)
        mod(idx, idx)[1].backward()
        opt.step()
    small = idx[:2, :4].contiguous()
    m.eval()
    ref.eval()
    with torch.no_grad():
        out, loss = m(small, small)
        want, want_loss = ref(small, small)
    return dict(err=max((out - want).abs().max().item(), (loss - want_loss).abs().item()), programs=len(m._programs))


GPT_SMALL = dict(vocab_size=64, block_size=16, n_layer=1, n_head=4, n_embd=32)



class _NllLM(torch.nn.Module):
    """Untied embedding -> MLP block -> LM head with a bias -> log_softmax + nll_loss(reduction="sum")
    divided by the number of counted targets (HF's num_items_in_batch form): the traced graph has
    aten.log_softmax + aten.nll_loss_nd instead of aten.cross_entropy_loss."""

    def __init__(self, vocab_size, hidden):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(vocab_size, hidden)
        self.fc1 = torch.nn.Linear(hidden, 2 * hidden)
        self.fc2 = torch.nn.Linear(2 * hidden, hidden)
        self.head = torch.nn.Linear(hidden, vocab_size)

    def forward(self, idx, tgt):
        x = self.emb(idx)
        x = x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))
        logits = self.head(x)
        lp = torch.nn.functional.log_softmax(logits.float().view(-1, logits.size(-1)), dim=-1)
        loss = torch.nn.functional.nll_loss(lp, tgt.view(-1), reduction="sum") / (tgt != -100).sum()
        return logits, loss
