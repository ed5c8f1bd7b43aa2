"""Rank tasks for the training-stack tests (tests/distributed/test_training_stack.py): torch's own
clipping, optimizers, DCP and the dp axis on a compiled model, against the unsharded eager model.
Each returns numbers for the parent to compare (nothing is compared here)."""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate

import oases_fx
from tests.tasks import _call, build_model


def _mesh(world_size, mesh_shape):
    shape = tuple(mesh_shape or (world_size,))
    return init_device_mesh("cpu", shape, mesh_dim_names=("dp", "tp") if len(shape) == 2 else ("tp",))


def _batch(cfg, n, seq, seed=1234):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, cfg["vocab_size"], (n, seq), generator=g)
    tgt = torch.randint(0, cfg["vocab_size"], (n, seq), generator=g)
    return idx, tgt


def _compile(kind, model, mesh, idx, tgt, degrees=None, n_layer=None, **kw):
    if degrees:  # per-region TMP degrees (tests.tasks_degree): parameters of degree d < tp are (Replicate, Shard)
        from tests.tasks_degree import degree_plan

        kw["plan"] = degree_plan(kind, n_layer, mesh["tp"].size() if mesh.ndim == 2 else mesh.size(),
                                 degrees, k=kw.pop("num_sub_batches", 1))
    kw.setdefault("plan", "megatron")
    kw.setdefault("backend", "aot_eager")
    if kind == "gpt":
        return oases_fx.compile(model, mesh, example_inputs=(idx, tgt), verbose=False, **kw)
    return oases_fx.compile(model, mesh, example_kwargs=dict(input_ids=idx, labels=tgt), verbose=False, **kw)


def _full(v) -> torch.Tensor:
    """The full tensor of a DTensor through oases_fx's own redistribute: DTensor's, or where this torch cannot
    (torch 2.11: the fused q/k/v moments' _StridedShard; v.full_tensor() raises there) oases_fx's gather."""
    from oases_fx import _compat

    return _compat.local_of(_compat.redistribute(v, v.device_mesh, (Replicate(),) * v.device_mesh.ndim)).clone()


def _full_optim_state(model, opt) -> dict:
    """{fqn: {state key: full tensor}} of an optimizer over `model`'s parameters (DTensors gathered)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for p, st in opt.state.items():
        out[names[id(p)]] = {k: (_full(v) if isinstance(v, DTensor) else v.clone()) for k, v in st.items()}
    return out


def _replica_spread(model, info) -> float:
    """Largest difference of a Replicate parameter's local tensor across the tp ranks (0.0 = identical)."""
    worst = 0.0
    for _, p in model.named_parameters():
        loc = p.to_local().detach().contiguous()
        others = [torch.empty_like(loc) for _ in range(info.tp)]
        dist.all_gather(others, loc, group=info.tp_group)
        if all(pl.is_replicate() for pl in p.placements):
            worst = max(worst, max((o - loc).abs().max().item() for o in others))
    return worst


def _dp_spread(model, info) -> float:
    """Largest difference of any parameter's local tensor across the dp ranks (0.0 = identical replicas)."""
    worst = 0.0
    for _, p in model.named_parameters():
        loc = p.to_local().detach().contiguous()
        others = [torch.empty_like(loc) for _ in range(info.dp)]
        dist.all_gather(others, loc, group=info.dp_group)
        worst = max(worst, max((o - loc).abs().max().item() for o in others))
    return worst


def train_adamw_clip(rank, world_size, *, kind, cfg, batch, seq, steps=3, mesh_shape=None, accum=1,
                     max_norm=0.05, set_to_none=True, foreach=True, fused=False, k=1, degrees=None, **compile_kw):
    """AdamW + torch.nn.utils.clip_grad_norm_ on model.parameters() for `steps` steps, `accum`
    micro-batches per step (no_sync on all but the last when there is a dp axis), on the compiled
    model and on the unsharded eager model (which sees every dp rank's micro-batches at once).
    `compile_kw`: further oases_fx.compile options (dp_reduce, dp_bucket_mb)."""
    mesh = _mesh(world_size, mesh_shape)
    dp = mesh.size(0) if mesh.ndim == 2 else 1
    dp_rank = mesh.get_local_rank("dp") if mesh.ndim == 2 else 0
    ref = build_model(kind, cfg)
    idx, tgt = _batch(cfg, batch * dp * accum * steps, seq)
    idx, tgt = idx.view(steps, accum, dp, batch, seq), tgt.view(steps, accum, dp, batch, seq)
    m = _compile(kind, copy.deepcopy(ref), mesh, idx[0, 0, dp_rank], tgt[0, 0, dp_rank], num_sub_batches=k,
                 degrees=degrees, n_layer=cfg["n_layer"], **compile_kw)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, foreach=foreach, fused=fused)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=foreach, fused=fused)
    norms, ref_norms = [], []
    for s in range(steps):
        for a in range(accum):
            ctx = m.no_sync() if (dp > 1 and a < accum - 1) else _null()
            with ctx:
                _, loss = _call(kind, m, idx[s, a, dp_rank], tgt[s, a, dp_rank])
                (loss / accum).backward()
            _, r_loss = _call(kind, ref, idx[s, a].reshape(dp * batch, seq), tgt[s, a].reshape(dp * batch, seq))
            (r_loss / accum).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm))
        ref_norms.append(torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm))
        opt.step()
        ref_opt.step()
        opt.zero_grad(set_to_none=set_to_none)
        ref_opt.zero_grad(set_to_none=set_to_none)
    # a new input shape (half the sequence) traces and compiles again: the program must read the trained shards
    half = idx[0, 0, dp_rank][:, : seq // 2].contiguous(), tgt[0, 0, dp_rank][:, : seq // 2].contiguous()
    retrace = (_call(kind, m, *half)[1].detach(), _call(kind, ref, *half)[1].detach(), len(m._programs))
    norms = torch.stack([n.full_tensor() if isinstance(n, DTensor) else n for n in norms])
    all_norms = [torch.empty_like(norms) for _ in range(world_size)]
    dist.all_gather(all_norms, norms)
    info = m._info
    spread = _replica_spread(m, info)
    dp_spread = _dp_spread(m, info) if info.dp_group is not None else None
    full = m.full_state_dict()
    moments = _full_optim_state(m, opt)
    kinds = sorted({type(p).__name__ for p in m.parameters()})
    dp_buckets = _dp_bucket_counts(m)
    if rank != 0:
        return None
    return dict(dp_buckets=dp_buckets, norms=torch.stack(all_norms), ref_norms=torch.stack(ref_norms), params=full,
                ref_params=ref.state_dict(), moments=moments, ref_moments=_full_optim_state(ref, ref_opt),
                spread=spread, dp_spread=dp_spread, param_types=kinds, retrace=retrace, ref_grads_none=all(p.grad is None for p in ref.parameters()),
                grads_none=all(p.grad is None for p in m.parameters()))


def dp_traffic(rank, world_size, *, cfg, batch, seq, accum=3, steps=2, split_guard=True):
    """dp2 x tp2: count the dp all-reduces (DDP buckets, through a counting comm hook that then does DDP's
    own all-reduce) per micro-batch, `accum` micro-batches per step, all but the last under no_sync; and
    how far the gradients differ across the dp ranks after each micro-batch (different data: only an
    averaged gradient is identical). DDP's bucket cap is lowered so that Dynamo's DDPOptimizer, were it
    on, would split the program into several graphs (`split_guard=False` leaves it on: the test's
    check of one graph must then fail)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from oases_fx import _compat

    mesh = _mesh(world_size, (2, 2))
    dp_rank = mesh.get_local_rank("dp")
    ref = build_model("gpt", cfg)
    idx, tgt = _batch(cfg, batch * 2 * accum * steps, seq)
    idx, tgt = idx.view(steps, accum, 2, batch, seq), tgt.view(steps, accum, 2, batch, seq)
    m = _compile("gpt", ref, mesh, idx[0, 0, dp_rank], tgt[0, 0, dp_rank])
    calls = []

    def counting(state, bucket):
        calls.append(bucket.buffer().numel())
        return allreduce_hook(state, bucket)

    m.register_comm_hook(m._info.dp_group, counting)
    m._boundary._ddp.bucket_bytes_cap = 1024  # DDPOptimizer's split size (the reducer's buckets are built already)
    if not split_guard:
        saved, _compat.no_ddp_graph_split = _compat.no_ddp_graph_split, _null
    try:
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        counts, spreads = [], []
        for s in range(steps):
            for a in range(accum):
                before = len(calls)
                with (m.no_sync() if a < accum - 1 else _null()):
                    _, loss = m(idx[s, a, dp_rank], tgt[s, a, dp_rank])
                    (loss / accum).backward()
                counts.append(len(calls) - before)
                spreads.append(_dp_grad_spread(m))
            opt.step()
            opt.zero_grad()
    finally:
        if not split_guard:
            _compat.no_ddp_graph_split = saved
    out = dict(counts=counts, spreads=spreads, forward_graphs=len(m.graphs.aot.forward),
               backward_graphs=len(m.graphs.aot.backward), num_params=sum(1 for _ in m.parameters()),
               bucket_numels=calls)
    return out if rank == 0 else None


def _dp_bucket_counts(model) -> dict:
    """dp_reduce="graph": {variant: number of dp buckets in its last backward graph} of the first program
    compiled (the training shape; None for "ddp")."""
    from oases_fx.passes.dp_reduce import RECORD_KEY

    prog = next(iter(model._programs.values()))
    out = {}
    for name, p in (("sync", prog), *prog.variants.items()):
        rec = p.aot.backward[-1].meta.get(RECORD_KEY) if p.aot.backward else None
        out[name] = None if rec is None else len(rec.buckets)
    return out


class _CountCollectives:
    """A TorchDispatchMode counting functional all-reduces per process group name (what the compiled graphs
    issue when they run under aot_eager: every aten op of the graph goes through the dispatcher)."""

    def __new__(cls):
        from torch.utils._python_dispatch import TorchDispatchMode

        class Mode(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.counts = {}

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                ops = torch.ops._c10d_functional
                if func in (ops.all_reduce.default, ops.all_reduce_.default):
                    self.counts[args[2]] = self.counts.get(args[2], 0) + 1
                return func(*args, **(kwargs or {}))

        return Mode()


def dp_traffic_graph(rank, world_size, *, cfg, batch, seq, accum=3, steps=2, dp_bucket_mb=None, backend="aot_eager"):
    """dp2 x tp2, dp_reduce="graph": count the dp all-reduces the compiled backward graphs issue per micro-batch
    (under a counting dispatch mode; the forward graphs are checked to hold none), `accum` micro-batches per step, all but the last
    under no_sync (from step 1 on: step 0 compiles); how far the gradients differ across the dp ranks after each micro-batch; the number of
    dp buckets of each variant's backward graph; and the full gradients after the last micro-batch of
    step 0 next to the unsharded model's (which sees every rank's micro-batches)."""
    from oases_fx.passes.dp_reduce import RECORD_KEY

    mesh = _mesh(world_size, (2, 2))
    dp_rank = mesh.get_local_rank("dp")
    ref = build_model("gpt", cfg)
    idx, tgt = _batch(cfg, batch * 2 * accum * steps, seq)
    idx, tgt = idx.view(steps, accum, 2, batch, seq), tgt.view(steps, accum, 2, batch, seq)
    kw = dict(dp_reduce="graph") if dp_bucket_mb is None else dict(dp_reduce="graph", dp_bucket_mb=dp_bucket_mb)
    m = _compile("gpt", copy.deepcopy(ref), mesh, idx[0, 0, dp_rank], tgt[0, 0, dp_rank], backend=backend, **kw)
    dp_name = m._info.dp_group.group_name
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    counts, spreads, grads, ref_grads = [], [], None, None
    for s in range(steps):
        for a in range(accum):
            mode = _CountCollectives() if s > 0 else None  # step 0 compiles every variant: not counted
            with (m.no_sync() if a < accum - 1 else _null()):
                _, loss = m(idx[s, a, dp_rank], tgt[s, a, dp_rank])
            with (mode if mode is not None else _null()):  # around the backward: dynamo refuses to run under a mode
                (loss / accum).backward()
            counts.append(None if mode is None else mode.counts.get(dp_name, 0))
            spreads.append(_dp_grad_spread(m))
            _, r_loss = ref(idx[s, a].reshape(2 * batch, seq), tgt[s, a].reshape(2 * batch, seq))
            (r_loss / accum).backward()
        if s == 0:
            grads = m.full_grads()
            ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    prog = m.graphs
    buckets = {}
    for name, p in (("sync", prog), *prog.variants.items()):
        rec = p.aot.backward[-1].meta.get(RECORD_KEY) if p.aot.backward else None
        dp_ars = sum(1 for g in p.aot.backward[-1:] for n in g.graph.nodes
                     if n.op == "call_function" and "all_reduce" in str(n.target) and n.args[2] == dp_name)
        buckets[name] = (None if rec is None else len(rec.buckets), dp_ars)
        fw_dp = sum(1 for g in p.aot.forward for n in g.graph.nodes
                    if n.op == "call_function" and "all_reduce" in str(n.target) and n.args[2] == dp_name)
        assert fw_dp == 0, f"{name}: {fw_dp} dp all-reduces in a forward graph"
    # overlap, structurally: where each dp all-reduce of the backward that reduced (the "acc" variant's: every
    # step's last micro-batch) is issued, against the position of the backward's last compute node (its own
    # nodes, not the dp bucket copies)
    from oases_fx.passes.dp_reduce import is_backward_compute

    nodes = list(prog.variants["acc"].aot.backward[-1].graph.nodes)
    issue_at = [i for i, n in enumerate(nodes) if n.op == "call_function" and "all_reduce" in str(n.target)
                and n.args[2] == dp_name]
    last_compute = max(i for i, n in enumerate(nodes) if is_backward_compute(n))
    first_wait = min(i for i, n in enumerate(nodes) if n.op == "call_function" and "wait_tensor" in str(n.target)
                     and n.args[0].op == "call_function" and n.args[0].args[2:3] == (dp_name,))
    errors = []
    try:
        m.register_comm_hook(None, None)
    except oases_fx.OasesError as e:
        errors.append(str(e))
    try:
        _compile("gpt", build_model("gpt", cfg), mesh, idx[0, 0, dp_rank], tgt[0, 0, dp_rank], backend="eager", **kw)
    except oases_fx.OasesError as e:
        errors.append(str(e))
    out = dict(errors=errors, issue_at=issue_at, last_compute=last_compute, first_dp_wait=first_wait,
               counts=counts, spreads=spreads, buckets=buckets, grads=grads, ref_grads=ref_grads,
               params=m.full_state_dict(), ref_params=ref.state_dict(), explain=m.explain(),
               forward_graphs=len(prog.aot.forward), backward_graphs=len(prog.aot.backward))
    return out if rank == 0 else None


def _dp_grad_spread(model) -> float:
    info = model._info
    worst = 0.0
    for p in model.parameters():
        loc = p.grad.to_local().contiguous()
        others = [torch.empty_like(loc) for _ in range(info.dp)]
        dist.all_gather(others, loc, group=info.dp_group)
        worst = max(worst, max((o - loc).abs().max().item() for o in others))
    return worst


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _train(kind, model, opt, idx, tgt, steps):
    for s in range(steps):
        _, loss = _call(kind, model, idx[s], tgt[s])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()


def dcp_save(rank, world_size, *, kind, cfg, batch, seq, path, tp=None, steps=2, sharded=True, degrees=None):
    """Train `steps` AdamW steps (compiled at TP=`tp` with dp = world/tp, or the unsharded model on every
    rank when sharded=False), then get_state_dict + dcp.save to `path`. Returns the full params and moments."""
    ref = build_model(kind, cfg)
    idx, tgt = _batch(cfg, steps * batch, seq)
    idx, tgt = idx.view(steps, batch, seq), tgt.view(steps, batch, seq)
    if sharded:
        tp = tp or world_size
        mesh = _mesh(world_size, (world_size // tp, tp) if tp < world_size else None)
        model = _compile(kind, ref, mesh, idx[0], tgt[0], degrees=degrees, n_layer=cfg["n_layer"])  # every dp rank the same batch: replicas agree
    else:
        model = ref
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(kind, model, opt, idx, tgt, steps)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    full = model.full_state_dict() if sharded else {k: v.detach().clone() for k, v in model.state_dict().items()}
    moments = _full_optim_state(model, opt)
    return dict(params=full, moments=moments) if rank == 0 else None


def dcp_load(rank, world_size, *, kind, cfg, batch, seq, path, tp=None, sharded=True, degrees=None, in_place=False):
    """A fresh model (compiled at TP=`tp`, or unsharded on every rank) and a fresh AdamW: get_state_dict,
    dcp.load, set_state_dict; returns the full params and moments loaded.
    """
    ref = build_model(kind, dict(cfg, seed=cfg.get("seed", 0) + 7))  # other initial values: the load must overwrite them
    idx, tgt = _batch(cfg, batch, seq, seed=99)
    if sharded:
        tp = tp or world_size
        mesh = _mesh(world_size, (world_size // tp, tp) if tp < world_size else None)
        model = _compile(kind, ref, mesh, idx, tgt, degrees=degrees, n_layer=cfg["n_layer"])
    else:
        model = ref
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if in_place:  # the plain-module idiom: load into the state dicts in place, no load_state_dict after
        state = {"model": model.state_dict(), "optim": get_state_dict(model, opt)[1]}  # moments initialised
        dcp.load(state, checkpoint_id=path)
        opt.zero_grad(set_to_none=True)
        opt.step()  # no gradients: changes nothing, but the step is where the moments are written back
    else:
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    full = model.full_state_dict() if sharded else {k: v.detach().clone() for k, v in model.state_dict().items()}
    moments = _full_optim_state(model, opt)
    placements = {n: str(p.placements) for n, p in model.named_parameters()} if sharded else {}
    return dict(params=full, moments=moments, placements=placements) if rank == 0 else None



def unequal_pieces(rank, world_size, *, batch=2, seq=8):
    """HF Phi-3 with grouped-query attention: its fused qkv_proj has unequal pieces (q > k = v). One AdamW
    step with clipping next to the unsharded model, then state_dict() (must be a clear error)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    ref = Phi3ForCausalLM(Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                                     pad_token_id=0, bos_token_id=0, eos_token_id=0))
    mesh = _mesh(world_size, None)
    idx, tgt = _batch(dict(vocab_size=64), batch, seq)
    m = _compile("hf", copy.deepcopy(ref), mesh, idx, tgt)
    out = {}
    for model in (m, ref):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model(input_ids=idx, labels=tgt).loss.backward()
        n = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        opt.step()
        out["norm" if model is m else "ref_norm"] = n.full_tensor() if isinstance(n, DTensor) else n
    try:
        m.state_dict()
        out["error"] = None
    except oases_fx.OasesError as e:
        out["error"] = str(e)
    out.update(params=m.full_state_dict(), ref_params=ref.state_dict(), explain=m.explain())
    return out if rank == 0 else None


def set_redistribute_fallback(rank, world_size, *, on: bool):
    """Force (or stop forcing) oases_fx._compat.redistribute's own gather: the path torch 2.11 takes,
    where DTensor cannot redistribute _StridedShard to Shard (ValueError in its shard-order check)."""
    from oases_fx import _compat

    _compat.FORCE_REDISTRIBUTE_FALLBACK = on
    return on


def zoo_loop(rank, world_size, *, name, path, steps=3, accum=2, batch=4, seq=8, k=2, plan="megatron"):
    """A user's loop on a zoo family (tests/zoo.py): AdamW, clip_grad_norm_, a LambdaLR schedule, `accum`
    micro-batches per step whose attention_mask pads (left in row 0, right in row 1) and whose labels are
    -100 at the padding and the first two positions, and a DCP save after step 1 resumed into a model compiled
    from other weights (model, optimizer and scheduler state), against the unsharded eager model: every
    micro-batch's loss, the full gradients and the clipped norm of every step, the parameters at the end."""
    from tests import zoo

    mesh = _mesh(world_size, None)
    g = torch.Generator().manual_seed(4321)
    idx = torch.randint(0, zoo.VOCAB, (steps, accum, batch, seq), generator=g)
    mask = torch.ones_like(idx)
    mask[:, :, 0, :3] = 0
    mask[:, :, 1, -2:] = 0
    tgt = torch.where(mask > 0, idx, -100)
    tgt[..., :2] = -100

    def kw(s, a):
        return dict(input_ids=idx[s, a], attention_mask=mask[s, a], labels=tgt[s, a])

    def make(seed):
        m = oases_fx.compile(zoo.build(name, seed=seed), mesh, example_kwargs=kw(0, 0), plan=plan, num_sub_batches=k,
                             backend="aot_eager", verbose=False)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        return m, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))

    ref = zoo.build(name)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda s: 1.0 / (1 + s))
    m, opt, sched = make(0)
    losses, ref_losses, grads, ref_grads, norms, ref_norms = [], [], [], [], [], []
    for s in range(steps):
        for a in range(accum):
            loss = m(**kw(s, a)).loss
            (loss / accum).backward()
            r_loss = ref(**kw(s, a)).loss
            (r_loss / accum).backward()
            losses.append(loss.detach())
            ref_losses.append(r_loss.detach())
        grads.append(m.full_grads())
        ref_grads.append({n: p.grad.clone() for n, p in ref.named_parameters()})
        n = torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
        norms.append(n.full_tensor() if isinstance(n, DTensor) else n)
        ref_norms.append(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5))
        for o, sc in ((opt, sched), (ref_opt, ref_sched)):
            o.step()
            sc.step()
            o.zero_grad()
        if s == 1:  # checkpoint, then resume into a model compiled from other weights
            msd, osd = get_state_dict(m, opt)
            dcp.save({"model": msd, "optim": osd, "sched": sched.state_dict()}, checkpoint_id=path)
            m, opt, sched = make(5)
            msd, osd = get_state_dict(m, opt)
            state = {"model": msd, "optim": osd, "sched": sched.state_dict()}
            dcp.load(state, checkpoint_id=path)
            set_state_dict(m, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
            sched.load_state_dict(state["sched"])
    full = m.full_state_dict()
    out = dict(losses=torch.stack(losses), ref_losses=torch.stack(ref_losses), grads=grads, ref_grads=ref_grads,
               norms=torch.stack(norms), ref_norms=torch.stack(ref_norms), params=full, ref_params=ref.state_dict(),
               lr=(opt.param_groups[0]["lr"], ref_opt.param_groups[0]["lr"]))
    return out
