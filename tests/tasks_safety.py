"""Rank tasks for the runtime-safety tests (agreement, per-shard RNG, retrace key, released module,
bounded waiting). Top-level functions called as fn(rank, world_size, **kw) by tests/pool.py; they
return numbers or (error type, message) for the parent to check."""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import oases_fx

GPT_CFG = dict(vocab_size=64, block_size=16, n_layer=1, n_head=4, n_embd=32)


def _gpt(seed=0, **over):
    from oases_fx.models import GPT, GPTConfig

    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**GPT_CFG, **over}))


def _mesh(world_size):
    return init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))


def _batch(b=4, t=8, seed=0, dtype=torch.long):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, GPT_CFG["vocab_size"], (b, t), generator=g).to(dtype)


def _local(t):
    """A DTensor's local shard (parameters may be DTensors at the boundary), else t."""
    return t.to_local() if hasattr(t, "to_local") else t


def _err(fn):
    try:
        fn()
    except Exception as e:
        import os
        if os.environ.get("OASES_FX_TASK_TRACEBACK"):
            import traceback
            traceback.print_exc()
        return type(e).__name__, str(e)
    return None


# --- 1. agreement -------------------------------------------------------------------------------

def disagree_at_compile(rank, world_size, *, case):
    """Rank 1 differs from rank 0 in one way (`case`); compile's error (type, message) or None."""
    mesh = _mesh(world_size)
    seed, seq, k, dtype, plan = 0, 8, None, torch.float32, "megatron"
    if case == "seed":
        seed = rank
    elif case == "seq_auto":
        seq, plan = (8 if rank == 0 else 16), "auto"
    elif case == "k_auto":
        k, plan = (1 if rank == 0 else 2), "auto"
    elif case == "dtype_auto":
        dtype, plan = (torch.float32 if rank == 0 else torch.bfloat16), "auto"
    elif case == "rng":  # same weights, but the generator re-seeded per rank before compile
        model = _gpt(0, dropout=0.1)
        torch.manual_seed(rank)
        idx = _batch()
        return _err(lambda: oases_fx.compile(model, mesh, example_inputs=(idx, idx), backend="eager", verbose=False,
                                             plan="megatron"))
    elif case != "same":
        raise ValueError(case)
    model = _gpt(seed).to(dtype)
    idx = _batch(t=seq)
    return _err(lambda: oases_fx.compile(model, mesh, example_inputs=(idx, idx), backend="eager", verbose=False,
                                         plan=plan, num_sub_batches=k, profile="analytical"))


def disagree_on_batch(rank, world_size, *, check_inputs="first", second_differs=False):
    """Same model on both ranks; the first call's batch differs by rank (or only the second call's):
    the error of the failing call (type, message, which call) or None."""
    mesh = _mesh(world_size)
    idx = _batch()
    m = oases_fx.compile(_gpt(), mesh, example_inputs=(idx, idx), backend="eager", verbose=False,
                         plan="megatron", check_inputs=check_inputs)
    calls = [_batch(seed=0), _batch(seed=rank if second_differs else 0)] if second_differs else [_batch(seed=rank)]
    for i, x in enumerate(calls):
        got = _err(lambda: m(x, x))
        if got is not None:
            return got + (i,)
    return None


# --- 2. per-shard RNG ---------------------------------------------------------------------------

class DropMLP(torch.nn.Module):
    """x -> fc1 -> dropout (sharded: between the column and the row linear) -> fc2 -> dropout
    (replicated: after the all-reduce). With `probe=True`, fc1 = 0 with bias 1 and fc2 = identity,
    so the first output is exactly the sharded dropout's mask (scaled by 1/(1-p)) as the row
    linear's all-reduce assembles it from every shard's columns."""

    def __init__(self, c=16, p=0.5, probe=False):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(c, c), torch.nn.Linear(c, c)
        self.drop_mid, self.drop_out = torch.nn.Dropout(p), torch.nn.Dropout(p)
        if probe:
            with torch.no_grad():
                self.fc1.weight.zero_(), self.fc1.bias.fill_(1.0)
                self.fc2.weight.copy_(torch.eye(c)), self.fc2.bias.zero_()

    def forward(self, x):
        mid = self.fc2(self.drop_mid(self.fc1(x)))
        return mid, self.drop_out(mid)


def _run_drop(model, mesh, x, *, backend, recompute="none", k=1, seed=7, steps=1):
    m = oases_fx.compile(model, mesh, example_inputs=(x,), backend=backend, verbose=False, plan="megatron",
                         recompute=recompute, num_sub_batches=k)
    outs = []
    torch.manual_seed(seed)
    for _ in range(steps):
        mid, out = m(x)
        (mid.square().sum() + out.sum()).backward()
        outs.append((mid.detach(), out.detach()))
    return m, outs


def dropout_masks(rank, world_size, *, backend="aot_eager", k=1):
    """The probe model's sharded-dropout mask as each rank's output carries it (tp shards' columns
    side by side), the replicated dropout's output, and the unsharded eager model's mask drawn from
    the same seed."""
    mesh = _mesh(world_size)
    torch.manual_seed(0)
    x = torch.randn(4, 8, 16)
    ref = DropMLP(probe=True)
    m, outs = _run_drop(copy.deepcopy(ref), mesh, x, backend=backend, k=k)
    torch.manual_seed(7)
    r_mid, r_out = ref(x)
    mid, out = outs[0]
    return dict(mid=mid, out=out, ref_mid=r_mid.detach(), ref_out=r_out.detach(), explain=m.explain())


def dropout_runs(rank, world_size, *, backend="aot_eager", k=1):
    """DropMLP's outputs and every gradient after 2 steps under recompute none / fine / full, twice
    with the same seed (a fresh compile each), for the parent to compare bitwise."""
    mesh = _mesh(world_size)
    torch.manual_seed(0)
    x = torch.randn(4, 8, 16)
    res = {}
    for run in (0, 1):
        for policy in ("none", "fine", "full"):
            torch.manual_seed(0)
            m, outs = _run_drop(DropMLP(p=0.3), mesh, x, backend=backend, recompute=policy, k=k, steps=2)
            res[(run, policy)] = dict(outs=outs, grads={n: _local(p.grad).clone() for n, p in m.named_parameters()})
    return res


def gpt_dropout_vs_unsharded(rank, world_size):
    """GPT with dropout 0.2 (attention dropout on sharded heads, replicated residual dropout),
    backend "eager" (the rewritten graph runs op by op on the CPU kernels the unsharded model uses):
    loss and gathered gradients, and the unsharded eager model's, from the same seed."""
    mesh = _mesh(world_size)
    idx = _batch()
    ref = _gpt(dropout=0.2, n_layer=2)
    m = oases_fx.compile(copy.deepcopy(ref), mesh, example_inputs=(idx, idx), backend="eager", verbose=False,
                         plan="megatron")
    torch.manual_seed(7)
    _, loss = m(idx, idx)
    loss.backward()
    torch.manual_seed(7)
    _, r_loss = ref(idx, idx)
    r_loss.backward()
    grads = m.full_grads()
    return dict(loss=loss.detach(), ref_loss=r_loss.detach(), grads=grads,
                ref_grads={n: p.grad for n, p in ref.named_parameters()})


# --- 3. retrace key -----------------------------------------------------------------------------

def input_grad_after_compile(rank, world_size, *, backend="aot_eager"):
    """Compiled with an input that does not require grad, called with one that does: the input's
    gradient (it enters the column linear, so it needs f's backward all-reduce) and the unsharded
    model's; and how many programs the module holds."""
    mesh = _mesh(world_size)
    torch.manual_seed(0)
    ref = DropMLP(p=0.0)
    x = torch.randn(4, 8, 16)
    m = oases_fx.compile(copy.deepcopy(ref), mesh, example_inputs=(x,), backend=backend, verbose=False,
                         plan="megatron")
    xg = x.clone().requires_grad_(True)
    mid, out = m(xg)
    (mid.square().sum() + out.sum()).backward()
    xr = x.clone().requires_grad_(True)
    r_mid, r_out = ref(xr)
    (r_mid.square().sum() + r_out.sum()).backward()
    return dict(grad=xg.grad, ref_grad=xr.grad, programs=len(m._programs))


# --- 4. the released original module ------------------------------------------------------------

def released_original(rank, world_size):
    """After compile: what using the user's original model does (forward, state_dict,
    load_state_dict, an optimizer built from it before compile), and that the compiled module
    still retraces (another batch shape) and trains with an optimizer built from it."""
    mesh = _mesh(world_size)
    model = _gpt()
    early_opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    idx = _batch()
    m = oases_fx.compile(model, mesh, example_inputs=(idx, idx), backend="eager", verbose=False, plan="megatron")
    out = {}
    out["forward"] = _err(lambda: model(idx, idx))
    out["state_dict"] = _err(lambda: model.state_dict())
    out["load_state_dict"] = _err(lambda: model.load_state_dict(sd))

    def early_step():
        _, loss = m(idx, idx)
        loss.backward()
        early_opt.step()
    out["early_optimizer"] = _err(early_step)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    small = _batch(b=2, t=4)
    before = {k: v.clone() for k, v in m.full_state_dict().items()}

    def train():
        opt.zero_grad()
        _, loss = m(small, small)  # another shape: a retrace of the released original
        loss.backward()
        opt.step()
    out["compiled_optimizer"] = _err(train)
    after = m.full_state_dict()
    out["trained"] = any(not torch.equal(before[k], after[k]) for k in before)
    out["programs"] = len(m._programs)
    return out


# --- 5. bounded waiting (run in a fresh pool: tests/distributed/test_faults.py) -------------------

def fault_in_compile(rank, world_size, *, failing_rank=1):
    """`failing_rank` raises inside compile() after the agreement check (program build); what each
    rank's compile() raises. Without the shared status step the other rank returns a module and
    blocks in the first all-reduce until the process group's timeout."""
    import oases_fx.api as api

    real = api._build_program

    def broken(*a, **kw):
        raise RuntimeError(f"injected fault on rank {rank}")

    if rank == failing_rank:
        api._build_program = broken
    try:
        idx = _batch()
        return _err(lambda: oases_fx.compile(_gpt(), _mesh(world_size), example_inputs=(idx, idx), backend="eager",
                                             verbose=False, plan="megatron"))
    finally:
        api._build_program = real


def fault_in_backend_pass(rank, world_size):
    """A forward-graph pass raises an OasesError inside torch.compile (at the first call): the type
    and message the caller sees (torch.compile wraps it in BackendCompilerFailed)."""
    import oases_fx.api as api
    from oases_fx.backend import GraphPass
    from oases_fx.errors import OasesError

    real = api.aot_passes

    def fail(gm):
        raise OasesError("injected pass failure")

    api.aot_passes = lambda *a, **kw: ([GraphPass("injected", fail)], [])
    try:
        idx = _batch()
        m = oases_fx.compile(_gpt(), _mesh(world_size), example_inputs=(idx, idx), backend="aot_eager", verbose=False,
                             plan="megatron")
        return _err(lambda: m(idx, idx))
    finally:
        api.aot_passes = real


def skip_backward(rank, world_size, *, skipping_rank=1):
    """Step 1 on every rank; in step 2 `skipping_rank` runs the forward and skips backward() (as a rank
    whose loop raised after the forward and went on). What the other rank's backward() raises, and
    after how long (reported, not asserted): bounded by the process group's timeout."""
    import time

    idx = _batch()
    model = oases_fx.compile(_gpt(), _mesh(world_size), example_inputs=(idx, idx), backend="aot_eager",
                             verbose=False, plan="megatron")
    _, loss = model(idx, idx)
    loss.backward()
    _, loss = model(idx, idx)
    if rank == skipping_rank:
        return None
    t0 = time.perf_counter()
    out = _err(lambda: loss.backward())
    return out + (time.perf_counter() - t0,) if out else None


# --- 6. bounded waiting in steps and in the planner (CompileConfig.collective_timeout_s) ----------

def _timed(fn):
    """(error type, message, seconds until it raised) or None."""
    import time

    t0 = time.perf_counter()
    got = _err(fn)
    return got + (time.perf_counter() - t0,) if got else None


def _compiled(world_size, timeout_s, **kw):
    idx = _batch()
    opts = dict(backend="aot_eager", verbose=False, plan="megatron", collective_timeout_s=timeout_s)
    opts.update(kw)
    return oases_fx.compile(_gpt(), _mesh(world_size), example_inputs=(idx, idx), **opts), idx


def fault_in_forward(rank, world_size, *, failing_rank=1, timeout_s=10.0):
    """Step 1 on every rank; in step 2's forward `failing_rank` raises a user error inside the
    compiled call (wrapped as torch.compile wraps a traced op's error: TorchRuntimeError from
    ValueError). What each rank's forward raises (type, message, seconds)."""
    import torch._dynamo.exc as exc

    model, idx = _compiled(world_size, timeout_s)
    _, loss = model(idx, idx)
    loss.backward()
    if rank == failing_rank:
        prog = next(iter(model._programs.values()))

        def broken(*a, **kw):
            try:
                raise ValueError(f"injected user error on rank {rank}")
            except ValueError as e:
                raise exc.TorchRuntimeError("dynamo's wrapper") from e
        prog.compiled = broken
    return _timed(lambda: model(idx, idx))


class _Logged:
    """Context manager collecting the "oases_fx" logger's records (the watchdog thread's lines)."""

    def __enter__(self):
        import logging

        self.lines, self.logger = [], logging.getLogger("oases_fx")
        self.handler = logging.Handler()
        self.handler.emit = lambda rec: self.lines.append(rec.getMessage())
        self.logger.addHandler(self.handler)
        return self.lines

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)


def fault_in_backward(rank, world_size, *, failing_rank=1, timeout_s=10.0, keep_running=True):
    """Step 1 on every rank; in step 2's backward `failing_rank` raises (a tensor hook: a user error
    inside backward on that rank only), and with `keep_running` goes on to step 3's forward as a
    loop that caught the error would. Per rank: (what backward raised, what step 3's forward raised
    or None, the oases_fx log lines)."""
    import time

    model, idx = _compiled(world_size, timeout_s)
    _, loss = model(idx, idx)
    loss.backward()
    _, loss = model(idx, idx)
    if rank == failing_rank:  # on the final norm's shard: early in backward, before the blocks' all-reduces
        def hook(grad):
            raise ValueError(f"injected backward error on rank {rank}")
        shards = model._boundary.local_tensors()
        shards[next(n for n in shards if "ln_f" in n)].register_hook(hook)
    with _Logged() as lines:
        got = _timed(lambda: loss.backward())
        nxt = _timed(lambda: model(idx, idx)) if rank == failing_rank and keep_running else None
        if rank != failing_rank:
            time.sleep(1.5)  # past the watchdog thread's next poll
    return got, nxt, list(lines)


def skip_backward_bounded(rank, world_size, *, skipping_rank=1, timeout_s=10.0):
    """skip_backward with collective_timeout_s: `skipping_rank` runs step 2's forward and skips its
    backward(); what the other rank's backward raises, when, and the oases_fx log lines."""
    import time

    model, idx = _compiled(world_size, timeout_s)
    _, loss = model(idx, idx)
    loss.backward()
    _, loss = model(idx, idx)
    if rank == skipping_rank:
        return None
    with _Logged() as lines:
        got = _timed(lambda: loss.backward())
        time.sleep(1.5)  # past the watchdog thread's next poll
    return got + (list(lines),) if got else None


def fault_in_planner(rank, world_size, *, failing_rank=1, timeout_s=10.0):
    """plan="auto" with a measured profile: `failing_rank` raises inside the planner before its first
    collective while the other waits in it. What each rank's compile() raises (type, message, seconds)."""
    import oases_fx.planner.profile as profile

    real = profile.profile_key

    def broken(*a, **kw):
        raise RuntimeError(f"injected planner fault on rank {rank}")

    if rank == failing_rank:
        profile.profile_key = broken
    try:
        idx = _batch()
        return _timed(lambda: oases_fx.compile(_gpt(), _mesh(world_size), example_inputs=(idx, idx), backend="aot_eager",
                                               verbose=False, plan="auto", profile="measure",
                                               collective_timeout_s=timeout_s))
    finally:
        profile.profile_key = real
