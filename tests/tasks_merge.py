"""Rank tasks for merge_collectives (passes/merge_collectives.py): compile a parallel-residual model
with plan="megatron", run one step, and return the all-reduces AOTAutograd's forward and
backward graphs hold plus the numbers to compare with the unsharded eager model. Nothing is
compared here (the parent compares)."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

import oases_fx
from oases_fx._compat import is_all_reduce
from tests import zoo


class _MLP(nn.Module):
    def __init__(self, h=zoo.HIDDEN, inner=zoo.INTER):
        super().__init__()
        self.up = nn.Linear(h, inner)
        self.down = nn.Linear(inner, h)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class _Layer(nn.Module):
    """x + scale * a(ln(x)) + b(ln(x)) (combine="scaled"), x + a(ln(x)) * b(ln(x)) ("product": not a
    sum, never merged), or x + a(ln1(x)); then + b(ln2(.)) ("sequential": Llama-style, never merged)."""

    def __init__(self, combine):
        super().__init__()
        self.combine = combine
        self.ln = nn.LayerNorm(zoo.HIDDEN)
        self.ln2 = nn.LayerNorm(zoo.HIDDEN) if combine == "sequential" else None  # no unused parameter
        self.a, self.b = _MLP(), _MLP()

    def forward(self, x):
        if self.combine == "sequential":
            x = x + self.a(self.ln(x))
            return x + self.b(self.ln2(x))
        h = self.ln(x)
        if self.combine == "product":
            return x + self.a(h) * self.b(h)
        return x + self.a(h) * 0.5 + self.b(h)


class TinyLM(nn.Module):
    """Two layers of _Layer between an embedding and an LM head; forward(idx, targets) -> (logits, loss)."""

    def __init__(self, combine="scaled"):
        super().__init__()
        self.emb = nn.Embedding(zoo.VOCAB, zoo.HIDDEN)
        self.layers = nn.ModuleList([_Layer(combine) for _ in range(zoo.LAYERS)])
        self.head = nn.Linear(zoo.HIDDEN, zoo.VOCAB, bias=False)

    def forward(self, idx, targets):
        h = self.emb(idx)
        for layer in self.layers:
            h = layer(h)
        logits = self.head(h)
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


TINY = {f"tiny_{c}": zoo.Family(f"tiny_{c}", c, (lambda c=c: TinyLM(c)), zoo.LAYERS * 2, hf=False)
        for c in ("scaled", "product", "sequential")}


def _family(name):
    return TINY.get(name) or zoo.BY_NAME[name]


def count_and_compare(rank, world_size, *, name, k=1, merge=True, recompute=None, batch=4, seq=8):
    """One step of family `name` compiled at TP=world_size with k sub-batches (merge_collectives on
    or switched off by name): all-reduces in the forward and backward graphs, the collective lines
    of explain(), and loss, logits, every gradient and the parameters after one SGD step next to
    the unsharded eager reference's."""
    fam = _family(name)
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    torch.manual_seed(0)
    ref = fam.build()
    model = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(1234)
    idx = torch.randint(0, zoo.VOCAB, (batch, seq), generator=g)
    tgt = torch.randint(0, zoo.VOCAB, (batch, seq), generator=g)
    kw = dict(plan="megatron", num_sub_batches=k, disabled_passes=() if merge else ("merge_collectives",))
    if recompute:
        kw["recompute"] = recompute
    m = oases_fx.compile(model, mesh, backend="aot_eager", verbose=False, **zoo.compile_inputs(fam, idx, tgt), **kw)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    logits, loss = zoo.call(fam, m, idx, tgt)
    loss.backward()
    r_logits, r_loss = zoo.call(fam, ref, idx, tgt)
    r_loss.backward()
    grads, r_grads = m.full_grads(), {n: p.grad for n, p in ref.named_parameters()}
    opt.step()
    ref_opt.step()
    full = m.full_state_dict()
    aot = m.graphs.aot
    num_fwd = sum(is_all_reduce(n) for n in aot.forward[-1].graph.nodes)
    num_bwd = sum(is_all_reduce(n) for n in aot.backward[-1].graph.nodes)
    if rank != 0:
        return None
    return dict(num_fwd=num_fwd, num_bwd=num_bwd, losses=loss.detach()[None], ref_losses=r_loss.detach()[None],
                logits=logits.detach(), ref_logits=r_logits.detach(), grads=grads, ref_grads=r_grads,
                params=full, ref_params=ref.state_dict(), explain=m.explain(),
                num_regions=len(m.graphs.gm.meta["oases"].regions))
