"""Rank tasks for tests/distributed/test_field_stack.py: a user's HF-style loop around a compiled tiny HF Llama
(TP=2, k=2, aot_eager) and the unsharded eager model -- hooks, writes to the released original, load_state_dict,
frozen/LoRA parameters, batch shapes, GradScaler, torch.compile on top, param groups by name + clip_grad_value_
+ DCP resume, export for the HF ecosystem. Each returns numbers or error texts; the parent compares."""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

import oases_fx
from tests.tasks import build_model

CFG = dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32)
SHARDED = "model.layers.0.mlp.up_proj.weight"  # column-parallel: each rank holds half of its rows


def _ids(b=4, t=8, seed=5):
    return torch.randint(0, 64, (b, t), generator=torch.Generator().manual_seed(seed))


def _compile(model, ids, k=2):
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    return oases_fx.compile(model, mesh, example_kwargs=dict(input_ids=ids, labels=ids), backend="aot_eager",
                            verbose=False, plan="megatron", num_sub_batches=k)


def _error(fn):
    try:
        fn()
    except oases_fx.OasesError as e:
        return str(e)
    return None


def _full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def _grads(model):
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def hooks_and_writes(rank, world_size):
    """Hooks (before compile: refused; after: refused on the original's and the shells' submodules, the compiled
    root's runs per call), and writes to released parameters (refused, the loss unchanged)."""
    ids = _ids()
    out = {}
    for kind in ("forward", "forward_pre", "full_backward"):
        model = build_model("hf_llama", CFG)
        getattr(model.model.layers[0].mlp, f"register_{kind}_hook")(lambda *a: None)
        out[f"compile_{kind}"] = _error(lambda: _compile(model, ids))
    model = build_model("hf_llama", CFG)
    with torch.no_grad():  # HF installs its output-capturing hooks here: collection only, let through
        model(input_ids=ids, output_hidden_states=True)
    m = _compile(model, ids)
    out["after_original"] = _error(lambda: model.model.layers[1].register_forward_hook(lambda *a: None))
    out["after_shell"] = _error(lambda: m.get_submodule("model.layers.0").register_forward_hook(lambda *a: None))
    calls = []
    m.register_forward_hook(lambda mod, args, kwargs, output: calls.append(output.logits.shape), with_kwargs=True)
    with torch.no_grad():
        loss0 = m(input_ids=ids, labels=ids).loss
    out["root_calls"] = len(calls)
    w = model.get_submodule("model.layers.0.mlp.up_proj").weight  # released: a meta stand-in
    with torch.no_grad():
        out["copy_"] = _error(lambda: w.copy_(torch.zeros(w.shape)))
    out["requires_grad_"] = _error(lambda: w.requires_grad_(False))
    out["init"] = _error(lambda: nn.init.zeros_(w))
    with torch.no_grad():
        out["loss_after_writes"] = (loss0, m(input_ids=ids, labels=ids).loss)
    return out


def load_state_dicts(rank, world_size):
    """load_state_dict on the compiled module: full (unsharded) tensors, strict=False with a missing key, and its
    own DTensor state_dict; the full parameters after each next to what was loaded."""
    ids = _ids()
    out = {}
    ref = build_model("hf_llama", CFG)
    m = _compile(copy.deepcopy(ref), ids)
    other = build_model("hf_llama", dict(CFG, seed=3))
    out["lsd_full"] = str(m.load_state_dict(other.state_dict()))
    out["after_lsd_full"] = (m.full_state_dict(), other.state_dict())
    part = {k: v + 1 for k, v in ref.state_dict().items() if k != "model.norm.weight"}
    res = m.load_state_dict(part, strict=False)
    out["lsd_partial"] = (list(res.missing_keys), list(res.unexpected_keys), m.full_state_dict(), part,
                          other.state_dict()["model.norm.weight"])
    own = {k: v.detach().clone() for k, v in m.state_dict().items()}
    m.load_state_dict({k: v * 0 for k, v in own.items()})
    m.load_state_dict(own)
    out["lsd_dtensor"] = (m.full_state_dict(), part)
    return out


class LoRALinear(nn.Module):
    """A hand-written LoRA adapter (peft is not installed here): frozen base + trainable low-rank b(a(x))."""

    def __init__(self, base: nn.Linear, r: int = 4):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.a = nn.Linear(base.in_features, r, bias=False)
        self.b = nn.Linear(r, base.out_features, bias=False)
        nn.init.normal_(self.b.weight, std=0.02)  # non-zero: the base's input gradient path is exercised

    def forward(self, x):
        return self.base(x) + self.b(self.a(x))


def frozen(rank, world_size, *, case):
    """AdamW over the trainable parameters, 2 steps: "embedding" frozen before compile, or "lora" (every base
    weight frozen, LoRA on q_proj/v_proj). Each step's full gradients and the final parameters, both models."""
    torch.manual_seed(0)
    ref = build_model("hf_llama", CFG)
    if case == "lora":
        ref.requires_grad_(False)
        for layer in ref.model.layers:
            layer.self_attn.q_proj = LoRALinear(layer.self_attn.q_proj)
            layer.self_attn.v_proj = LoRALinear(layer.self_attn.v_proj)
    else:
        ref.model.embed_tokens.weight.requires_grad_(False)
    m = _compile(copy.deepcopy(ref), _ids())
    opts = [torch.optim.AdamW([p for p in mm.parameters() if p.requires_grad], lr=1e-2) for mm in (m, ref)]
    grads, ref_grads = [], []
    for s in range(2):
        x = _ids(seed=s)
        for mm, opt in zip((m, ref), opts):
            opt.zero_grad()
            mm(input_ids=x, labels=x).loss.backward()
        grads.append(m.full_grads())
        ref_grads.append(_grads(ref))
        for opt in opts:
            opt.step()
    return dict(grads=grads, ref_grads=ref_grads, params=m.full_state_dict(), ref_params=ref.state_dict(),
                explain=m.explain())


def shapes(rank, world_size):
    """Compiled for batch 6: then batch 3 (the last DataLoader batch, drop_last=False; k=2 does not divide it),
    a longer sequence (packing), and eval with batch 1 under no_grad: loss and full gradients of each."""
    ref = build_model("hf_llama", CFG)
    m = _compile(copy.deepcopy(ref), _ids(6, 8))
    out = []
    for i, (b, t) in enumerate([(6, 8), (3, 8), (6, 12)]):
        x = _ids(b, t, seed=10 + i)
        m.zero_grad()
        ref.zero_grad()
        loss = m(input_ids=x, labels=x).loss
        loss.backward()
        r_loss = ref(input_ids=x, labels=x).loss
        r_loss.backward()
        out.append(((b, t), loss.detach(), r_loss.detach(), m.full_grads(), _grads(ref)))
    m.eval()
    ref.eval()
    with torch.no_grad():
        x = _ids(1, 8, seed=3)
        logits = (_full(m(input_ids=x).logits), ref(input_ids=x).logits)
    return dict(steps=out, eval_logits=logits)


def grad_scaler(rank, world_size):
    """GradScaler (fp32 model: autocast is refused, see test_errors): scale(loss).backward(), unscale_, clip,
    step, update for 3 steps; in step 1 an inf is written into rank 0's shard of a sharded gradient only (the
    reference: the same entry of its full gradient). Every rank's scale after each step, the parameters."""
    ref = build_model("hf_llama", CFG)
    m = _compile(copy.deepcopy(ref), _ids())
    opts = [torch.optim.AdamW(mm.parameters(), lr=1e-2) for mm in (m, ref)]
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) for _ in range(2)]
    scales = [[], []]
    for s in range(3):
        x = _ids(seed=s)
        for j, (mm, opt, sc) in enumerate(zip((m, ref), opts, scalers)):
            opt.zero_grad()
            sc.scale(mm(input_ids=x, labels=x).loss).backward()
            if s == 1:
                g = dict(mm.named_parameters())[SHARDED].grad
                if isinstance(g, DTensor):
                    if rank == 0:
                        g.to_local()[0, 0] = float("inf")  # row 0 is rank 0's
                else:
                    g[0, 0] = float("inf")
            sc.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(mm.parameters(), 1.0)
            sc.step(opt)
            sc.update()
            scales[j].append(sc.get_scale())
    return dict(scales=scales[0], ref_scales=scales[1], params=m.full_state_dict(), ref_params=ref.state_dict())


def double_compile(rank, world_size):
    """torch.compile(compiled_model) by the user: 2 steps through it, loss and full gradients vs the reference;
    the oases program's AOTAutograd graphs (it still compiled)."""
    ref = build_model("hf_llama", CFG)
    m = _compile(copy.deepcopy(ref), _ids())
    c = torch.compile(m, backend="aot_eager")
    out = []
    for s in range(2):
        x = _ids(seed=s)
        m.zero_grad()
        ref.zero_grad()
        loss = c(input_ids=x, labels=x).loss
        loss.backward()
        r_loss = ref(input_ids=x, labels=x).loss
        r_loss.backward()
        out.append((loss.detach(), r_loss.detach(), m.full_grads(), _grads(ref)))
    return dict(steps=out, graphs=(len(m.graphs.aot.forward), len(m.graphs.aot.backward)))


def _groups(model):
    """HF Trainer's grouping by name: no weight decay for biases and norms."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if ("bias" in n or "norm" in n) else decay).append(p)
    return [dict(params=decay, weight_decay=0.1), dict(params=no_decay, weight_decay=0.0)]


def groups_resume_export(rank, world_size, *, path, steps=4, accum=2):
    """AdamW with param groups by name, 2 micro-batches per step with zero_grad(set_to_none=False),
    clip_grad_value_; after step 1 get_state_dict + dcp.save, then a model compiled from other weights and a
    new optimizer resumed by dcp.load + set_state_dict; then the full state dict loaded into a fresh unsharded
    HF model (the save_pretrained path) and its logits next to the compiled model's (eval)."""
    ref = build_model("hf_llama", CFG)
    m = _compile(copy.deepcopy(ref), _ids())
    opt = torch.optim.AdamW(_groups(m), lr=1e-2)
    ref_opt = torch.optim.AdamW(_groups(ref), lr=1e-2)
    losses = []
    for s in range(steps):
        for a in range(accum):
            x = _ids(seed=100 + s * accum + a)
            loss = m(input_ids=x, labels=x).loss
            (loss / accum).backward()
            r_loss = ref(input_ids=x, labels=x).loss
            (r_loss / accum).backward()
            losses.append((loss.detach(), r_loss.detach()))
        for mm, o in ((m, opt), (ref, ref_opt)):
            torch.nn.utils.clip_grad_value_(mm.parameters(), 0.01)  # below most entries: clamps many
            o.step()
            o.zero_grad(set_to_none=False)
        if s == 1:
            msd, osd = get_state_dict(m, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
            m = _compile(build_model("hf_llama", dict(CFG, seed=9)), _ids())
            opt = torch.optim.AdamW(_groups(m), lr=1e-2)
            msd, osd = get_state_dict(m, opt)
            state = {"model": msd, "optim": osd}
            dcp.load(state, checkpoint_id=path)
            set_state_dict(m, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    groups = [(len(g["params"]), g["weight_decay"]) for g in opt.param_groups]
    full = m.full_state_dict()
    hf = build_model("hf_llama", dict(CFG, seed=11))
    hf.load_state_dict(full)
    x = _ids(2, 8, seed=77)
    m.eval()
    hf.eval()
    with torch.no_grad():
        logits = (_full(m(input_ids=x).logits), hf(input_ids=x).logits)
    return dict(losses=losses, params=full, ref_params=ref.state_dict(), groups=groups,
                ref_groups=[(len(g["params"]), g["weight_decay"]) for g in ref_opt.param_groups], logits=logits)
