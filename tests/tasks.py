"""Work that every gloo rank runs for the distributed tests (top-level, importable functions).

Each task builds the same model on every rank (same seed), runs the unsharded eager reference
and the oases_fx-compiled sharded model on the same batch, gathers the sharded gradients back
to full tensors and returns numbers for the parent to compare. Nothing is compared here, so a
hypothesis failure shrinks in the parent.
"""
from __future__ import annotations

import collections
import copy

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import oases_fx


def build_model(kind: str, cfg: dict):
    torch.manual_seed(cfg.get("seed", 0))
    if kind == "gpt":
        from oases_fx.models import GPT, GPTConfig

        return GPT(GPTConfig(**{k: v for k, v in cfg.items() if k != "seed"}))
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if kind == "hf_gpt2":
        c = GPT2Config(vocab_size=cfg["vocab_size"], n_positions=cfg["block_size"], n_embd=cfg["n_embd"],
                       n_layer=cfg["n_layer"], n_head=cfg["n_head"], resid_pdrop=0.0, embd_pdrop=0.0,
                       attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(c)
    if kind == "hf_llama":
        c = LlamaConfig(vocab_size=cfg["vocab_size"], hidden_size=cfg["n_embd"],
                        intermediate_size=cfg.get("intermediate", 2 * cfg["n_embd"]),
                        num_hidden_layers=cfg["n_layer"], num_attention_heads=cfg["n_head"],
                        num_key_value_heads=cfg.get("n_kv_head", cfg["n_head"]),
                        max_position_embeddings=cfg["block_size"], bos_token_id=0, eos_token_id=0,
                        pad_token_id=None)
        return LlamaForCausalLM(c)
    raise ValueError(kind)


def _call(kind, model, idx, tgt):
    if kind == "gpt":
        logits, loss = model(idx, tgt)
        return logits, loss
    out = model(input_ids=idx, labels=tgt)
    return out.logits, out.loss


_PROGRAMS: "collections.OrderedDict" = collections.OrderedDict()
"""Rank-side cache of compiled programs for the property tests: key -> (OasesModule, dp, dp rank).
A program compiled for one shape is reused by every example of that shape, with the example's
weights loaded (load_full_state_dict), so an example costs a step, not a compile."""
_MAX_PROGRAMS = 32


def _compiled(kind, model, mesh, idx, tgt, backend, compile_kwargs):
    if kind == "gpt":
        return oases_fx.compile(model, mesh, example_inputs=(idx, tgt), backend=backend, verbose=False,
                                **compile_kwargs)
    return oases_fx.compile(model, mesh, example_kwargs=dict(input_ids=idx, labels=tgt), backend=backend,
                            verbose=False, **compile_kwargs)


def compare_with_reference(rank, world_size, *, kind, cfg, batch, seq, backend="aot_eager", mesh_shape=None,
                           steps=1, compile_kwargs=None, data_seed=1234, cache=False):
    """Loss, logits and every gradient (gathered) of the compiled sharded model and the unsharded
    eager reference, for the parent to compare. With steps > 1, SGD steps are taken on both.

    cfg["seed"] seeds the weights, data_seed the inputs and targets. cache=True reuses the program
    compiled for the same (kind, shapes, options) by an earlier call on this rank and loads this
    call's weights into it, so the compiled model starts from exactly the reference's weights."""
    names = ("dp", "tp") if mesh_shape and len(mesh_shape) == 2 else ("tp",)
    compile_kwargs = dict(compile_kwargs or {})
    compile_kwargs.setdefault("plan", "megatron")  # shard every region (plan="auto" may replicate some)
    ref = build_model(kind, cfg)
    key = repr((kind, sorted((k, v) for k, v in cfg.items() if k != "seed"), batch, seq, backend, mesh_shape,
                sorted(compile_kwargs.items())))
    hit = _PROGRAMS.get(key) if cache else None
    if hit is None:
        mesh = init_device_mesh("cpu", tuple(mesh_shape or (world_size,)), mesh_dim_names=names)
        dp = mesh.size(0) if len(names) == 2 else 1
        dp_rank = mesh.get_local_rank("dp") if len(names) == 2 else 0
    else:
        m, dp, dp_rank = hit
        _PROGRAMS.move_to_end(key)
    g = torch.Generator().manual_seed(data_seed)
    idx = torch.randint(0, cfg["vocab_size"], (batch * dp, seq), generator=g)
    tgt = torch.randint(0, cfg["vocab_size"], (batch * dp, seq), generator=g)
    local = slice(dp_rank * batch, (dp_rank + 1) * batch)
    if hit is None:
        m = _compiled(kind, copy.deepcopy(ref), mesh, idx[local], tgt[local], backend, compile_kwargs)
        if cache:
            _PROGRAMS[key] = (m, dp, dp_rank)
            while len(_PROGRAMS) > _MAX_PROGRAMS:
                _PROGRAMS.popitem(last=False)
    else:
        m.load_full_state_dict(ref.state_dict())
        m.zero_grad(set_to_none=True)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    losses, ref_losses = [], []
    for _ in range(steps):
        opt.zero_grad()
        ref_opt.zero_grad()
        logits, loss = _call(kind, m, idx[local], tgt[local])
        loss.backward()
        r_logits, r_loss = _call(kind, ref, idx, tgt)  # the full (dp x batch) batch, unsharded
        r_loss.backward()
        losses.append(loss.detach())
        ref_losses.append(r_loss.detach())
        last = (logits.detach(), r_logits.detach()[local], m.full_grads(), {k: p.grad for k, p in ref.named_parameters()})
        opt.step()
        ref_opt.step()
    if dp > 1:  # the reference's loss is the mean over the dp ranks' losses
        ls = torch.stack(losses)
        dist.all_reduce(ls, group=m._info.dp_group)
        losses = list(ls / dp)
    full = m.full_state_dict()
    if rank != 0:
        return None
    logits, r_logits, grads, r_grads = last
    return dict(losses=torch.stack(losses), ref_losses=torch.stack(ref_losses), logits=logits, ref_logits=r_logits,
                grads=grads, ref_grads=r_grads, params=full, ref_params=ref.state_dict(), explain=m.explain(),
                plan=m.plan.to_dict(), cached=hit is not None)


def expect_error(rank, world_size, *, kind, cfg, batch, seq, mesh_names=("tp",), **compile_kwargs):
    """Compile and return the error type and message (None if it compiled)."""
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=mesh_names)
    model = build_model(kind, cfg)
    idx = torch.randint(0, cfg["vocab_size"], (batch, seq))
    try:
        if kind == "gpt":
            oases_fx.compile(model, mesh, backend="eager", verbose=False, plan="megatron", **compile_kwargs)
        else:
            oases_fx.compile(model, mesh, example_kwargs=dict(input_ids=idx, labels=idx), backend="eager",
                             verbose=False, plan="megatron", **compile_kwargs)
    except Exception as e:
        return type(e).__name__, str(e)
    return None


def rank_dependent_plan(rank, world_size, *, cfg):
    """Rank 1 asks for a different number of sub-batches: compile must refuse on every rank."""
    from oases_fx.models import GPT, GPTConfig

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    torch.manual_seed(0)
    model = GPT(GPTConfig(**cfg))
    idx = torch.randint(0, cfg["vocab_size"], (4, 8))
    try:
        oases_fx.compile(model, mesh, example_inputs=(idx, idx), backend="eager", verbose=False, plan="megatron",
                         recompute="full" if rank == 1 else "none")
    except Exception as e:
        return type(e).__name__, str(e)
    return None


class _NoConfigAttention(torch.nn.Module):
    """Attention with 6 heads and hidden 24 (divisible by 2, heads divisible by 2 too) -- used at tp=4 below
    would be natural, but with 2 ranks we use 3 heads of 8 (hidden 24 is even, 3 heads are not)."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(24, 72)
        self.proj = torch.nn.Linear(24, 24)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(24, dim=2)
        q, k, v = (t.view(B, T, 3, 8).transpose(1, 2) for t in (q, k, v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, T, C)).sum()


class _CumsumMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 16)

    def forward(self, x):
        h = torch.cumsum(self.fc1(x), dim=1)  # an op without a sharding rule, inside the region
        return self.fc2(h).sum()


def _error_of(model, x, **config):
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    try:
        oases_fx.compile(model, mesh, example_inputs=(x,), backend="eager", verbose=False, plan="megatron", **config)
    except Exception as e:
        return type(e).__name__, str(e)
    return None


def error_without_config(rank, world_size):
    torch.manual_seed(0)
    return _error_of(_NoConfigAttention(), torch.randn(2, 4, 24), strict=True)  # declined unless strict


def error_unknown_op(rank, world_size):
    torch.manual_seed(0)
    return _error_of(_CumsumMLP(), torch.randn(2, 4, 16), strict=True)  # declined unless strict


def recompute_bitwise(rank, world_size, *, k):
    """Loss and grads under recompute none/fine/full with dropout, same seed; compared here
    bitwise (exact equality is the property, not a tolerance)."""
    from oases_fx.models import GPT, GPTConfig

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    idx = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    out = {}
    for policy in ("none", "fine", "full"):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32, dropout=0.2))
        m = oases_fx.compile(model, mesh, example_inputs=(idx, idx), num_sub_batches=k, recompute=policy,
                             backend="aot_eager", verbose=False, plan="megatron")
        torch.manual_seed(7)
        _, loss = m(idx, idx)
        loss.backward()
        out[policy] = (loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()})
    base = out.pop("none")
    return {p: (torch.equal(v[0], base[0]), all(torch.equal(v[1][n], base[1][n]) for n in base[1]))
            for p, v in out.items()}


def schedule_order(rank, world_size, *, k, recompute):
    """For the compiled GPT's AOTAutograd graphs: for each all-reduce, whether some matmul runs
    between its issue and its wait (the overlap the schedule is for), in graph order."""
    from oases_fx._compat import is_all_reduce, is_wait
    from oases_fx.models import GPT, GPTConfig

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32))
    idx = torch.randint(0, 64, (4, 8))
    m = oases_fx.compile(model, mesh, example_inputs=(idx, idx), num_sub_batches=k, recompute=recompute,
                         backend="aot_eager", verbose=False, plan="megatron")
    _, loss = m(idx, idx)
    loss.backward()
    mm = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}
    out = {}
    for stage, graphs in (("forward", m.graphs.aot.forward), ("backward", m.graphs.aot.backward)):
        nodes = list(graphs[-1].graph.nodes)
        pos = {n: i for i, n in enumerate(nodes)}
        covered = []
        for n in nodes:
            if is_all_reduce(n):
                wait = next(u for u in n.users if is_wait(u))
                covered.append(any(x.target in mm for x in nodes[pos[n] + 1:pos[wait]]))
        out[stage] = covered
    if rank == 0:
        import tempfile

        png = m.timeline_png(tempfile.mktemp(suffix=".png"))
        import os

        out["png_bytes"] = os.path.getsize(png)
    return out


def full_weights_released(rank, world_size):
    """compile() frees the user's full-size copies of the sharded weights (meta, same shape, ties
    kept) while full_state_dict() still returns the unsharded values."""
    from oases_fx.models import GPT, GPTConfig

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    torch.manual_seed(0)
    ref = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=4, n_embd=32))
    model = copy.deepcopy(ref)
    idx = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    m = oases_fx.compile(model, mesh, example_inputs=(idx, idx), backend="aot_eager", verbose=False,
                         plan="megatron")
    sharded = set(m.graphs.gm.meta["oases"]["sharded_params"])
    own = dict(model.named_parameters(remove_duplicate=False))
    full = m.full_state_dict()
    want = ref.state_dict()
    return dict(
        sharded=sorted(sharded),
        released=sorted(n for n, p in own.items() if p.is_meta),
        shapes_kept=all(own[n].shape == want[n].shape for n in own),
        tied=model.transformer.wte.weight is model.lm_head.weight,
        max_err=max((full[k] - want[k]).abs().max().item() for k in want),
    )


def new_shapes_and_eval(rank, world_size):
    """A call with another batch size and a call in eval mode retrace and still match the model."""
    from oases_fx.models import GPT, GPTConfig

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    torch.manual_seed(0)
    ref = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=4, n_embd=32, dropout=0.1))
    model = copy.deepcopy(ref)
    idx = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    m = oases_fx.compile(model, mesh, example_inputs=(idx, idx), num_sub_batches=2, backend="aot_eager",
                         verbose=False, plan="megatron")
    m(idx, idx)[1].backward()
    small = idx[:2, :4].contiguous()
    m.eval()
    ref.eval()
    with torch.no_grad():
        out = m(small, small)[0]
        want = ref(small, small)[0]
    own = m._boundary.local_tensors()  # the plain shards under the DTensor parameters the optimizer holds
    bound = [own.get(n) is p for n, p in m.graphs.gm.named_parameters(remove_duplicate=False)]
    return dict(err=(out - want).abs().max().item(), programs=len(m._programs), same_params=bool(bound) and all(bound))


def schedule_memory(rank, world_size, *, link_gb_s):
    """schedule_overlap on the real pipeline's AOTAutograd graphs (k=2), from the unscheduled
    order: predicted peak of live intermediates before/after and the hidden share of comm."""
    from oases_fx.models import GPT, GPTConfig
    from oases_fx.passes.schedule_overlap import ScheduleOptions, schedule_overlap_pass
    from oases_fx.timeline import AnalyticalCostModel, DeviceConstants, peak_live_bytes

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=64))
    idx = torch.randint(0, 64, (4, 16))
    # accumulate_grads off too: the backward as schedule_overlap gets it (that pass runs after the schedule)
    m = oases_fx.compile(model, mesh, example_inputs=(idx, idx), num_sub_batches=2, backend="aot_eager",
                         verbose=False, plan="megatron", disabled_passes=("schedule_overlap", "accumulate_grads"))
    m(idx, idx)[1].backward()
    # Constants scaled so the tiny graph has H100-like ratios of compute to communication.
    cm = AnalyticalCostModel(DeviceConstants(peak_flops=800e12 / 4096, mem_bw_bytes_per_s=3e12 / 4096,
                                             comm_alpha_us=1.0, comm_bus_bw_bytes_per_s=link_gb_s * 1e9 / 4096))
    out = {}
    for stage, graphs in (("forward", m.graphs.aot.forward), ("backward", m.graphs.aot.backward)):
        gm = copy.deepcopy(graphs[-1])
        before = peak_live_bytes(list(gm.graph.nodes))
        gm = schedule_overlap_pass(gm, options=ScheduleOptions(), cost_model=cm)
        tl = gm.meta["oases_timeline"]
        out[stage] = dict(before=before, after=peak_live_bytes(list(gm.graph.nodes)),
                          hidden=tl.comm_hidden_us / max(tl.comm_hidden_us + tl.comm_exposed_us, 1e-9))
    return out


class _TimesTwo(torch.autograd.Function):
    """A custom Function whose backward is not autograd of its forward (x3 instead of x2), as a
    straight-through or clipped-gradient trick would be: capture must not drop it silently."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * 3


class _FunctionMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 16)

    def forward(self, x):
        return self.fc2(_TimesTwo.apply(torch.relu(self.fc1(x)))).sum()  # a custom Function inside the block


def error_custom_function(rank, world_size):
    """compile() of an MLP with a custom autograd.Function inside it: the error (type, message),
    and the eager gradient of fc1 against autograd of the Function's forward (what capture
    would have computed), so the test shows the error guards a real difference."""
    torch.manual_seed(0)
    model, x = _FunctionMLP(), torch.randn(2, 4, 16)
    model(x).backward()
    eager = model.fc1.weight.grad.clone()
    model.zero_grad()
    model.fc2(torch.relu(model.fc1(x)) * 2).sum().backward()  # the forward's ops only
    traced_like = model.fc1.weight.grad.clone()
    return dict(error=_error_of(model, x), grad_ratio=(eager.norm() / traced_like.norm()).item())


class _TanhGelu(torch.autograd.Function):
    """A custom Function whose backward IS autograd of its forward (a hand-written tanh-GELU
    derivative, as Bloom's GeLUFunction): capture keeps it, traced through its forward."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return 0.5 * x * (1 + torch.tanh(0.7978845608 * (x + 0.044715 * x ** 3)))

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        t = torch.tanh(0.7978845608 * (x + 0.044715 * x ** 3))
        return grad * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * 0.7978845608 * (1 + 3 * 0.044715 * x * x))


class _GeluFunctionMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 16)

    def forward(self, x):
        return self.fc2(_TanhGelu.apply(self.fc1(x))).pow(2).mean()


def custom_function_kept(rank, world_size, *, k):
    """compile() of an MLP whose activation is a custom Function with a correct backward: the
    block must be sharded, and loss and every gradient must equal the eager model's (which runs
    the Function's own backward)."""
    torch.manual_seed(0)
    ref, x = _GeluFunctionMLP(), torch.randn(4, 4, 16)
    model = copy.deepcopy(ref)
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    m = oases_fx.compile(model, mesh, example_inputs=(x,), backend="aot_eager", verbose=False, plan="megatron",
                         num_sub_batches=k)
    loss = m(x)
    loss.backward()
    r_loss = ref(x)
    r_loss.backward()
    return dict(loss=loss.detach(), ref_loss=r_loss.detach(), grads=m.full_grads(),
                ref_grads={n: p.grad for n, p in ref.named_parameters()}, explain=m.explain(),
                regions=[r.name for r in m.graphs.gm.meta.get("oases", {}).get("regions", [])])


def error_deepcopy(rank, world_size):
    """copy.deepcopy of the compiled model (the EMA idiom): the error, and that an EMA kept as
    copies of the DTensor parameters (the fix the message names) follows an update."""
    torch.manual_seed(0)
    model, x = _FloatMLP(), torch.randn(2, 4, 16)
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    m = oases_fx.compile(model, mesh, example_inputs=(x,), backend="eager", verbose=False, plan="megatron")
    try:
        copy.deepcopy(m)
        err = None
    except Exception as e:
        err = (type(e).__name__, str(e))
    ema = {n: p.detach().clone() for n, p in m.named_parameters()}
    with torch.no_grad():
        for n, p in m.named_parameters():
            ema[n].lerp_(p + 1.0, 0.5)
    moved = all(torch.allclose(ema[n].full_tensor(), p.full_tensor() + 0.5) for n, p in m.named_parameters())
    return dict(error=err, ema_ok=moved)


def error_under_autocast(rank, world_size):
    """A call of the compiled model under torch.autocast: the error, and whether the eager model
    really runs in bfloat16 there (so the error guards a real difference), and whether a call
    outside autocast afterwards still runs."""
    torch.manual_seed(0)
    model, x = _FloatMLP(), torch.randn(2, 4, 16)
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager_dtype = model.fc1(x).dtype
    m = oases_fx.compile(model, mesh, example_inputs=(x,), backend="eager", verbose=False, plan="megatron")
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m(x)
        err = None
    except Exception as e:
        err = (type(e).__name__, str(e))
    return dict(error=err, eager_dtype=str(eager_dtype), after=float(m(x)))


class _FloatMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 16)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x))).sum()


def error_bad_input(rank, world_size, *, case):
    """The error of a float64 / meta-device input, at compile() ("compile_*") or at a call of the
    compiled model ("call_*"), and whether a good call after it still runs."""
    torch.manual_seed(0)
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    x = torch.randn(2, 4, 16)
    bad = x.double() if case.endswith("float64") else x.to("meta")
    try:
        if case.startswith("compile"):
            oases_fx.compile(_FloatMLP(), mesh, example_inputs=(bad,), backend="aot_eager", verbose=False,
                             plan="megatron")
            return None
        m = oases_fx.compile(_FloatMLP(), mesh, example_inputs=(x,), backend="aot_eager", verbose=False,
                             plan="megatron")
        m(x).backward()
        m(bad)
    except Exception as e:
        err = (type(e).__name__, str(e))
    else:
        return None
    if case.startswith("call"):
        m(x).backward()  # the module is still usable
    return err


FAST_LINK = dict(peak_flops=1e9, mem_bw_bytes_per_s=1e9, comm_alpha_us=1e-3, comm_bus_bw_bytes_per_s=1e15)
"""A device model where communication is ~free next to compute (a slow chip on an ideal link):
sharding a region halves its compute and costs nothing, so plan="auto" must shard. The CPU gloo
measurements (and the default H100 constants at these toy sizes) make replication win instead."""


def auto_plan_compare(rank, world_size, *, cfg, batch, seq, device=None, **compile_kwargs):
    """compare_with_reference with plan="auto" and the analytical profile of `device`
    (DeviceConstants fields, FAST_LINK by default), for the parent to check that the automatic
    plan shards regions and stays exact. The planner's analytical profile is patched on this rank
    only for the duration of the call."""
    from unittest import mock

    import oases_fx.planner as planner
    from oases_fx.timeline import DeviceConstants

    constants = DeviceConstants(group_size=world_size, **(device or FAST_LINK))
    original = planner.analytical_profile
    with mock.patch.object(planner, "analytical_profile",
                           lambda model, **kw: original(model, **{"constants": constants, **kw})):
        return compare_with_reference(rank, world_size, kind="gpt", cfg=cfg, batch=batch, seq=seq,
                                      compile_kwargs=dict(plan="auto", profile="analytical", **compile_kwargs))


def freeze_after_compile(rank, world_size, *, case):
    """HF Llama, k=2: "freeze" sets the embedding's requires_grad=False on the compiled model's
    parameters after compile (and on the reference), then AdamW + clip_grad_norm_ for 3 steps:
    the gathered parameters and the last loss against the reference. "unfreeze" compiles with the
    embedding frozen and unfreezes it after: the error of the next call."""
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    cfg = dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32)
    ref = build_model("hf_llama", cfg)
    if case == "unfreeze":
        ref.model.embed_tokens.weight.requires_grad_(False)
    model = copy.deepcopy(ref)
    idx = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(5))
    m = oases_fx.compile(model, mesh, example_kwargs=dict(input_ids=idx, labels=idx), backend="aot_eager",
                         verbose=False, plan="megatron", num_sub_batches=2)
    for mm in (m, ref):
        dict(mm.named_parameters())["model.embed_tokens.weight"].requires_grad_(case == "unfreeze")
    if case == "unfreeze":
        try:
            m(input_ids=idx, labels=idx)
        except Exception as e:
            return dict(error=(type(e).__name__, str(e)))
        return dict(error=None)
    opts = [torch.optim.AdamW([p for p in mm.parameters() if p.requires_grad], lr=1e-2) for mm in (m, ref)]
    for step in range(3):
        ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(step))
        norms = []
        for mm, opt in zip((m, ref), opts):
            opt.zero_grad()
            mm(input_ids=ids, labels=ids).loss.backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(mm.parameters(), 0.5)))
            opt.step()
    full = m.full_state_dict()
    return dict(params=full, ref_params=ref.state_dict(), norms=norms,
                frozen_grad=dict(m.named_parameters())["model.embed_tokens.weight"].grad)
