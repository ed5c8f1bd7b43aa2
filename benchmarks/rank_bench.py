"""Per-rank benchmark on torch's fake process group: what one rank of a TP=N world computes, on one GPU.

One process is rank 0 of a TP=N world (`dist.init_process_group("fake")`, FINDINGS 7): collectives
return at once, compute and memory are real. For each case it reports the step time (forward +
backward, CUDA events, median of back-to-back steps), the host time to issue one step (wall clock
from the step's call to its return, GPU idle before it), peak memory, and the compile time
(oases_fx.compile's trace + passes, then the first forward + backward, which compiles both graphs).
Beside oases_fx it runs torch.compile of a plain GPT doing the same per-rank work (`RankGPT`:
attention heads and MLP width divided by tp, everything else full size, as a Megatron rank has).

    python -m benchmarks.rank_bench --grid baseline --out OUT --workers 3 --budget-s 420
    python -m benchmarks.rank_bench --case '{"system": "oases", "tp": 2, "hidden": 2048, "k": 2}'

Every case runs in its own process with a fresh TORCHINDUCTOR_CACHE_DIR (a cold compile); with
--workers > 1 several cases compile at once and a file lock lets one at a time use the GPU for its
timed steps (compile times then include CPU contention: compare them only within one run).
CPU: `--device cpu --tiny` runs the same code path on gloo-free fake ranks (tests use it).
"""
from __future__ import annotations

import os

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")


def _import_code_tree():
    """Case.code: this case process imports that tree's oases_fx before anything else does (an
    editable install's import hook would otherwise win over PYTHONPATH)."""
    import importlib.util
    import sys as _sys

    pkg = os.path.join(os.environ["RANK_BENCH_CODE"], "oases_fx")
    spec = importlib.util.spec_from_file_location("oases_fx", os.path.join(pkg, "__init__.py"),
                                                  submodule_search_locations=[pkg])
    mod = importlib.util.module_from_spec(spec)
    _sys.modules["oases_fx"] = mod
    spec.loader.exec_module(mod)


if os.environ.get("RANK_BENCH_CODE"):
    _import_code_tree()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, field, replace  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from oases_fx.models.gpt import GPT, GPTConfig  # noqa: E402

GiB = 2**30


# --------------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Case:
    system: str = "oases"
    """"oases" (oases_fx.compile, plan="megatron") or "torch_compile" (RankGPT under torch.compile)."""
    tp: int = 2
    hidden: int = 2048
    layers: int = 2
    batch: int = 8
    seq: int = 2048
    vocab: int = 1024
    head_dim: int = 64
    k: int = 1
    recompute: str = "none"
    collectives: str = "skip"
    """"skip" (skip_collectives=True: no collective in the graph) or "fake" (kept; the fake group
    returns at once, the fences and the issue cost stay)."""
    options: dict = field(default_factory=dict)
    """Further oases_fx.compile config (e.g. {"cudagraphs": True}); for torch_compile: {"mode": ...}
    or {"regional": True} (each block compiled)."""
    label: str = ""
    """Free text telling variants apart in the table."""
    trace: bool = False
    """After timing, profile 3 steps and summarise the GPU kernels by family."""
    steps: int = 20
    warmup: int = 5
    dtype: str = "bf16"
    backend: str = "inductor"
    dp: int = 1
    """oases only: a ("dp", "tp") mesh of dp x tp fake ranks (this process is rank 0); the dp
    all-reduce mode is options["dp_reduce"] ("ddp" or "graph")."""
    boundary: bool = True
    """oases only. False: the DTensor boundary's per-parameter gradient hooks are removed after
    compile, so gradients stay on the compiled program's plain shards; the step-time difference
    to boundary=True is what the boundary (oases_fx/boundary.py) costs per step."""
    code: str = ""
    """A source tree whose oases_fx this case imports (the case process loads it first, through
    RANK_BENCH_CODE: a folder holding an `oases_fx/` package in the installed layout, passes inside),
    so one run measures two versions side by side (say which in `label`). Empty: the checkout's own."""

    def key(self) -> str:
        opt = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return (f"{self.system} " + (f"dp={self.dp} " if self.dp > 1 else "") + f"tp={self.tp} h={self.hidden} L={self.layers} b={self.batch} s={self.seq} "
                f"k={self.k} rc={self.recompute} coll={self.collectives} {opt}"
                + ("" if self.boundary else " no-boundary") + f" {self.label}").strip()


class RankAttention(nn.Module):
    """The attention block one TP rank computes: n_head/tp heads, qkv h -> 3h/tp, proj h/tp -> h."""

    def __init__(self, cfg: GPTConfig, tp: int):
        super().__init__()
        self.inner = cfg.n_embd // tp
        self.n_head = cfg.n_head // tp
        self.c_attn = nn.Linear(cfg.n_embd, 3 * self.inner, bias=cfg.bias)
        self.c_proj = nn.Linear(self.inner, cfg.n_embd, bias=cfg.bias)

    def forward(self, x):
        B, T, _ = x.size()
        q, k, v = self.c_attn(x).split(self.inner, dim=2)
        q = q.view(B, T, self.n_head, -1).transpose(1, 2)  # (B, nh/tp, T, hs)
        k = k.view(B, T, self.n_head, -1).transpose(1, 2)
        v = v.view(B, T, self.n_head, -1).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, self.inner))


class RankBlock(nn.Module):
    def __init__(self, cfg: GPTConfig, tp: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = RankAttention(cfg, tp)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd // tp, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd // tp, cfg.n_embd, bias=cfg.bias)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x))))


class RankGPT(nn.Module):
    """The plain GPT's per-rank work under Megatron TP=tp without communication: the same as
    oases_fx's rank program with skip_collectives=True (embeddings, norms, LM head replicated)."""

    def __init__(self, cfg: GPTConfig, tp: int):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.h = nn.ModuleList([RankBlock(cfg, tp) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx, targets):
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def gpt_config(case: Case) -> GPTConfig:
    return GPTConfig(vocab_size=case.vocab, block_size=case.seq, n_layer=case.layers,
                     n_head=case.hidden // case.head_dim, n_embd=case.hidden)


_FAKE_PG = {}


def fake_mesh(tp: int, device: torch.device, dp: int = 1):
    """This process as rank 0 of a TP=tp world (a dp x tp world with a ("dp", "tp") mesh when
    dp > 1) on torch's fake process group (collectives return at once). One world per process: a
    second call with another size is an error."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=dp * tp)
    if dist.get_world_size() != dp * tp:
        raise RuntimeError(f"this process is a fake world of {dist.get_world_size()} ranks, not {dp * tp}")
    if (dp, tp) not in _FAKE_PG:
        _FAKE_PG[(dp, tp)] = (init_device_mesh(device.type, (dp, tp), mesh_dim_names=("dp", "tp")) if dp > 1
                              else init_device_mesh(device.type, (tp,), mesh_dim_names=("tp",)))
    return _FAKE_PG[(dp, tp)]


def _no_cross_rank_checks():
    """The plan-digest and agreement checks all-gather over the group; on the fake group they
    gather nothing meaningful (FINDINGS 7), so the benchmark, and only it, switches them off for
    this process (one case per process)."""
    import oases_fx.api as api

    noop = lambda *a, **k: None  # noqa: E731
    api.check_same_on_all_ranks = noop
    agreement = getattr(api, "agreement", None)  # oases_fx.agreement: compile-time record, first-call batch
    for name in ("check_compile", "check_batch"):
        if agreement is not None and hasattr(agreement, name):
            setattr(agreement, name, noop)


def build(case: Case, device: torch.device):
    """(step function, module, seconds spent in oases_fx.compile / torch.compile wrapping)."""
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[case.dtype]
    if case.dp > 1 and case.system != "oases":
        raise ValueError(f"dp > 1 is an oases_fx case: {case.key()}")
    if not case.boundary and case.system != "oases":
        raise ValueError(f"boundary=False is an oases_fx case: {case.key()}")
    cfg = gpt_config(case)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    if case.system == "oases":
        import oases_fx

        mesh = fake_mesh(case.tp, device, case.dp)
        model = GPT(cfg).to(device=device, dtype=dtype)
        idx, targets = make_batch(case, device)
        _no_cross_rank_checks()
        module = oases_fx.compile(model, mesh, example_inputs=(idx, targets), plan="megatron",
                                  num_sub_batches=case.k, recompute=case.recompute, backend=case.backend,
                                  skip_collectives=case.collectives == "skip", verbose=False, **case.options)
    elif case.system == "torch_compile":
        if case.k != 1 or case.recompute != "none" or case.collectives != "skip":
            raise ValueError(f"torch_compile has no k, recompute or collectives: {case.key()}")
        model = RankGPT(cfg, case.tp).to(device=device, dtype=dtype)
        opts = dict(case.options)
        backend = case.backend
        if opts.pop("regional", False):
            for block in model.h:
                block.compile(backend=backend, **opts)
            module = model
        else:
            module = torch.compile(model, backend=backend, **opts)
    else:
        raise ValueError(f"unknown system {case.system!r}")
    wrap_s = time.perf_counter() - t0
    params = [p for p in module.parameters() if p.requires_grad]
    if case.system == "oases" and not case.boundary:
        for h in module._boundary._hooks:
            h.remove()
        params = [e.plain for e in module._boundary.entries.values() if e.plain.requires_grad]

    def step(idx, targets):
        for p in params:  # as optimizer.zero_grad() does: the backward's grads are new tensors
            p.grad = None
        _, loss = module(idx, targets)
        loss.backward()
        return loss

    return step, module, wrap_s


def make_batch(case: Case, device: torch.device):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, case.vocab, (case.batch, case.seq + 1), generator=g)
    return tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def gpu_lock():
    """One case at a time on the GPU for its timed steps (env RANK_BENCH_LOCK: a lock file)."""
    path = os.environ.get("RANK_BENCH_LOCK")
    if not path:
        yield
        return
    import fcntl

    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def device_step_times(step, batch, n: int, device) -> list:
    """Milliseconds of n back-to-back steps (CUDA events; the host may run ahead as in training)."""
    if device.type != "cuda":
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            step(*batch)
            out.append((time.perf_counter() - t0) * 1e3)
        return out
    events = []
    for _ in range(n):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        step(*batch)
        e.record()
        events.append((s, e))
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in events]


def host_issue_times(step, batch, n: int, device) -> list:
    """Milliseconds from calling a step to its return with the GPU idle before it: the host cost
    of issuing the step (a step whose host time exceeds its device time is host-bound)."""
    out = []
    for _ in range(n):
        _sync(device)
        t0 = time.perf_counter()
        step(*batch)
        out.append((time.perf_counter() - t0) * 1e3)
    _sync(device)
    return out


def kernel_family(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("flash", "fmha", "attention", "sdpa")):
        return "attention"
    if any(s in n for s in ("gemm", "nvjet", "cutlass", "cublas", "sm90_xmma", "matmul", "splitk")):
        return "gemm"
    if "memcpy" in n or "memset" in n or "copy" in n or "cat" in n.split("_"):
        return "copy"
    if n.startswith("triton"):
        return "triton"
    return "other"


def profile_summary(step, batch, device, steps: int = 3) -> dict:
    """GPU kernels of `steps` profiled steps, per step: count and microseconds by family, top kernels."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step(*batch)
        _sync(device)
    fam, top = {}, []
    for ev in prof.key_averages():
        if getattr(ev, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue  # a CPU op's self device time repeats its kernels' time
        dev_us = getattr(ev, "self_device_time_total", None)
        if dev_us is None:
            dev_us = getattr(ev, "self_cuda_time_total", 0)
        if not dev_us:
            continue
        f = kernel_family(ev.key)
        c, t = fam.get(f, (0, 0.0))
        fam[f] = (c + ev.count / steps, t + dev_us / steps)
        top.append((dev_us / steps, ev.count / steps, ev.key[:90]))
    top.sort(reverse=True)
    # Who launched each kernel (the CPU op and two of its ancestors): tells an eager ATen kernel
    # launched by autograd outside the compiled graphs from one inside them.
    launched = {}
    for ev in prof.events():
        for kern in getattr(ev, "kernels", ()) or ():
            chain, e = [], ev
            while e is not None and len(chain) < 3:
                chain.append(e.name[:60])
                e = getattr(e, "cpu_parent", None)
            launched.setdefault(kern.name[:90], {}).setdefault(" <- ".join(chain), 0)
            launched[kern.name[:90]][" <- ".join(chain)] += 1
    return {"families": {f: {"kernels": round(c, 1), "us": round(t, 1)} for f, (c, t) in sorted(fam.items())},
            "kernels_per_step": round(sum(c for c, _ in fam.values()), 1),
            "busy_us_per_step": round(sum(t for _, t in fam.values()), 1),
            "top": [{"us": round(t, 1), "count": round(c, 1), "name": n,
                     "from": max(launched.get(n, {"?": 0}).items(), key=lambda kv: kv[1])[0]} for t, c, n in top[:30]]}


def run_case(case: Case, device: torch.device) -> dict:
    """Build, compile (first step), warm up, time; one dict of results."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    batch = make_batch(case, device)
    step, module, wrap_s = build(case, device)
    t0 = time.perf_counter()
    step(*batch)
    _sync(device)
    first_s = time.perf_counter() - t0
    row = dict(case=asdict(case), key=case.key(), wrap_s=round(wrap_s, 2), first_step_s=round(first_s, 2),
               compile_s=round(wrap_s + first_s, 2))
    if case.system == "oases":  # which version ran (Case.code): checked, not assumed
        import oases_fx

        row["oases_fx"] = str(Path(oases_fx.__file__).resolve().parent)
    with gpu_lock():
        for _ in range(case.warmup):
            step(*batch)
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        dev = device_step_times(step, batch, case.steps, device)
        host = host_issue_times(step, batch, max(5, case.steps // 2), device)
        loss = float(step(*batch).detach().float().cpu())
        if device.type == "cuda":
            row["peak_gib"] = round(torch.cuda.max_memory_allocated() / GiB, 3)
        if case.trace:
            row["profile"] = profile_summary(step, batch, device)
    row.update(step_ms=round(statistics.median(dev), 3), step_ms_min=round(min(dev), 3),
               step_ms_max=round(max(dev), 3), host_ms=round(statistics.median(host), 3), loss=loss)
    if case.system == "oases":  # the host path each program took (oases_fx.direct_call; absent in older code)
        row["direct_call"] = sorted({str(getattr(p.__dict__.get("direct"), "state", "-"))
                                     for p in module.__dict__.get("_programs", {}).values()})
    if case.options.get("cudagraphs") and hasattr(module, "explain"):
        row["cudagraphs"] = [ln for ln in module.explain().splitlines() if ln.startswith("CUDA graphs")]
    return row


def check_cudagraphs(case: Case, device: torch.device) -> dict:
    """One process, one fake world: the same model and batch compiled three times, cudagraphs
    off, off again and on; the loss and every gradient after three steps (the third replays the
    captured graphs), compared bit for bit. off-vs-off is the floor: kernels that are not
    run-to-run deterministic (flash-attention backward's atomics) differ there too."""
    got = []
    for on in (False, False, True):
        c = replace(case, options=dict(case.options, cudagraphs=on))
        step, module, _ = build(c, device)
        batch = make_batch(c, device)
        step(*batch)  # compiles
        with gpu_lock():
            for _ in range(2):
                loss = step(*batch)
            grads = [p.grad.detach().float().clone() for p in module.parameters() if p.grad is not None]
            got.append((loss.detach().float().clone(), grads))
        del step, module

    def compare(a, b):
        (l0, g0), (l1, g1) = a, b
        diffs = [float((x - y).abs().max()) for x, y in zip(g0, g1)]
        return dict(loss_equal=bool(torch.equal(l0, l1)), grads=len(g0),
                    grads_equal=sum(bool(torch.equal(x, y)) for x, y in zip(g0, g1)),
                    max_grad_diff=max(diffs) if diffs else None)

    return dict(key=case.key(), off_vs_off=compare(got[0], got[1]), off_vs_on=compare(got[0], got[2]))


# --------------------------------------------------------------------------------------------
# Grids (cases in priority order: a time budget drops the tail)
# --------------------------------------------------------------------------------------------


def _oases_and_ref(tps, hiddens, ks, rcs, colls, layers, **kw):
    out = []
    for tp in tps:
        for h in hiddens:
            L = layers(h)
            out.append(Case(system="torch_compile", tp=tp, hidden=h, layers=L, **kw))
            for coll in colls:
                for rc in rcs:
                    for k in ks:
                        out.append(Case(system="oases", tp=tp, hidden=h, layers=L, k=k, recompute=rc,
                                        collectives=coll, **kw))
    return out


def _layers(h: int) -> int:
    return 2


GRIDS = {}


def grid_baseline():
    """Today's numbers, most important first (TP=2, the k sweep, then recompute, fake
    collectives, TP=4, h=8192), then profiler summaries of k=1 and k=2 at h=2048."""
    cases = []
    cases += [Case(system="oases", tp=2, hidden=2048, layers=2, k=k, trace=True, label="trace", steps=10)
              for k in (1, 2)]
    cases += _oases_and_ref((2,), (2048, 4096, 1024), (1, 2, 4), ("none",), ("skip",), _layers)
    cases += [Case(system="oases", tp=2, hidden=h, layers=2, k=k, collectives="fake")
              for h in (2048, 1024) for k in (1, 2, 4)]
    cases += [Case(system="oases", tp=2, hidden=h, layers=2, k=k, recompute=rc)
              for h in (2048, 4096, 1024) for rc in ("fine", "full") for k in (1, 2, 4)]
    cases += _oases_and_ref((4,), (2048, 4096, 1024), (1, 2, 4), ("none",), ("skip",), _layers)
    cases += _oases_and_ref((2,), (8192,), (1, 2, 4), ("none",), ("skip",), _layers)
    return cases


GRIDS["baseline"] = grid_baseline


def grid_run2():
    """CUDA graphs before/after (same run), the baseline cases the first run lost, profiles."""
    cases = [Case(system="oases", tp=2, hidden=2048, layers=2, k=k, trace=True, label="trace", steps=10,
                  options=dict(cudagraphs=cg)) for k in (1, 2) for cg in (False, True)]
    for h in (1024, 2048):
        cases.append(Case(system="torch_compile", tp=2, hidden=h, layers=2))
        cases.append(Case(system="torch_compile", tp=2, hidden=h, layers=2, options=dict(mode="reduce-overhead")))
        cases += [Case(system="oases", tp=2, hidden=h, layers=2, k=k, options=dict(cudagraphs=cg))
                  for k in (1, 2, 4) for cg in (False, True)]
    cases += [Case(system="oases", tp=2, hidden=2048, layers=2, k=k, collectives="fake", options=dict(cudagraphs=True))
              for k in (2, 4)]
    cases += _oases_and_ref((2,), (4096,), (1, 2, 4), ("none",), ("skip",), _layers)
    cases += [Case(system="oases", tp=4, hidden=h, layers=2, k=k) for h in (4096, 1024) for k in (1, 2, 4)]
    cases += [Case(system="oases", tp=2, hidden=4096, layers=2, k=k, recompute=rc)
              for rc in ("fine", "full") for k in (1, 2, 4)]
    cases += _oases_and_ref((2,), (8192,), (1, 2, 4), ("none",), ("skip",), _layers)
    return cases


GRIDS["run2"] = grid_run2


def grid_final():
    """Before/after on the then-current main, one run: cudagraphs off/on for the host-time targets,
    k sweep at h=1024/2048/4096 (the split targets), TP=4, beside torch.compile (plain and
    reduce-overhead)."""
    cases = []
    for tp, hs in ((2, (1024, 2048, 4096)), (4, (2048,))):
        for h in hs:
            cases.append(Case(system="torch_compile", tp=tp, hidden=h, layers=2))
            cases.append(Case(system="torch_compile", tp=tp, hidden=h, layers=2, options=dict(mode="reduce-overhead")))
            cases += [Case(system="oases", tp=tp, hidden=h, layers=2, k=k, options=dict(cudagraphs=cg))
                      for k in (1, 2, 4) for cg in (False, True)]
    cases += [Case(system="oases", tp=2, hidden=h, layers=2, k=k, collectives="fake", options=dict(cudagraphs=cg))
              for h in (1024, 2048) for k in (2, 4) for cg in (False, True)]
    return cases


GRIDS["final"] = grid_final


def grid_boundary():
    """The DTensor boundary's per-step cost (issue 12): the same compiled program with and without
    the boundary's gradient hooks, side by side, beside torch.compile of the same per-rank work."""
    cases = []
    for h in (1024, 2048):
        cases.append(Case(system="torch_compile", tp=2, hidden=h, layers=4))
        cases += [Case(system="oases", tp=2, hidden=h, layers=4, k=k, collectives="fake", boundary=b)
                  for k in (1, 2) for b in (True, False)]
    return cases


GRIDS["boundary"] = grid_boundary


def grid_tiny():
    """CPU smoke test: tiny shapes, aot_eager, both systems, k=1/2, fake and skipped collectives."""
    kw = dict(hidden=64, layers=1, batch=4, seq=16, vocab=64, head_dim=16, steps=2, warmup=1,
              dtype="fp32", backend="aot_eager")
    return [Case(system="torch_compile", **kw)] + [
        Case(system="oases", k=k, collectives=c, **kw) for k in (1, 2) for c in ("skip", "fake")]


GRIDS["tiny"] = grid_tiny


def grid_dp():
    """The dp all-reduce modes' per-step cost (issue 12): rank 0 of dp=2 x tp=2 on the fake group
    (the dp collectives take no time, so this is what the mode adds on the host and device, not its
    overlap), beside tp=2 alone. dp_reduce="ddp" cannot run there: DDP's reducer asserts on the
    fake group's empty all-reduce result."""
    cases = []
    for h in (1024, 2048):
        cases.append(Case(system="oases", tp=2, hidden=h, layers=4, k=2, collectives="fake"))
        cases.append(Case(system="oases", dp=2, tp=2, hidden=h, layers=4, k=2, collectives="fake",
                          options=dict(dp_reduce="graph")))
    return cases


GRIDS["dp"] = grid_dp

BEFORE = ".bench_before"
"""Where grid_issue14 finds the code to compare against (Case.code): a folder holding the older
version's `oases_fx/` in the installed layout (passes/ inside it), e.g.
`git archive REV oases_fx passes | tar -x -C .bench_before && mv .bench_before/passes .bench_before/oases_fx/`."""


def grid_issue14():
    """Issue 14's targets, each measured before (Case.code=BEFORE) and after in one run, in
    priority order: compile time of the 32-layer model, the host-issue targets under CUDA graphs,
    the split's cost. Run with --workers 2 or 1: the lock serialises timed steps only."""
    cases = []

    def both(**kw):
        return [Case(code=BEFORE, label="before", **kw), Case(label="after", **kw)]

    deep = dict(tp=2, hidden=4096, layers=32, batch=4, steps=10, warmup=3)
    cases.append(Case(system="torch_compile", options=dict(regional=True), **deep))
    cases.append(Case(code=BEFORE, label="before", k=2, **deep))
    cases.append(Case(label="after", k=2, options=dict(compile_layers="reuse"), **deep))
    cases.append(Case(system="torch_compile", **deep))
    for h, k, coll in ((1024, 2, "fake"), (1024, 2, "skip"), (2048, 4, "skip")):
        cases += both(tp=2, hidden=h, layers=2, k=k, collectives=coll, options=dict(cudagraphs=True))
    cases.append(Case(system="torch_compile", tp=2, hidden=1024, layers=2, options=dict(mode="reduce-overhead")))
    for h in (2048, 4096):
        for k in (1, 2):
            cases.append(Case(label="after", tp=2, hidden=h, layers=2, k=k))
    return cases


GRIDS["issue14"] = grid_issue14


def _compiletime_cases(*, big_layers: int, small_layers: int, **kw) -> list:
    cases = []
    for L in (small_layers, big_layers):  # the short pairs first: their step times compare per-step cost
        cases += [Case(system="oases", layers=L, k=2, collectives="skip", options=dict(compile_layers=m), **kw)
                  for m in ("reuse", "whole")]
        cases += [Case(system="torch_compile", layers=L, options=o, **kw) for o in (dict(regional=True), {})]
    return cases


def grid_compiletime():
    """Issue 14, compile time flat in depth: the first forward + backward (compile_s = wrap_s, model
    construction + oases_fx.compile's trace and passes, + first_step_s, dynamo/AOTAutograd/Inductor)
    of oases_fx with compile_layers "reuse" (identical blocks compiled once) and "whole", beside
    torch.compile of the same per-rank work, regional (each block compiled, one artifact reused) and
    whole; L=4 first (per-step time), then L=32. TP=2 rank on the fake group, collectives skipped."""
    return _compiletime_cases(big_layers=32, small_layers=4, tp=2, hidden=4096, batch=4)


GRIDS["compiletime"] = grid_compiletime


def grid_compiletime_tiny():
    """The compiletime grid's code path on CPU at tiny shapes (aot_eager): L=2 and L=8."""
    return _compiletime_cases(big_layers=8, small_layers=2, hidden=64, batch=4, seq=16, vocab=64, head_dim=16, steps=2,
                              warmup=1, dtype="fp32", backend="aot_eager")


GRIDS["compiletime_tiny"] = grid_compiletime_tiny


def load_grid(spec: str) -> list:
    if spec in GRIDS:
        return GRIDS[spec]()
    path = Path(spec)
    if path.exists():  # a JSON list of Case dicts
        return [Case(**d) for d in json.loads(path.read_text())]
    raise SystemExit(f"unknown grid {spec!r}: one of {sorted(GRIDS)} or a JSON file of cases")


# --------------------------------------------------------------------------------------------
# Driver: one process per case, several compiling at once, one at a time on the GPU
# --------------------------------------------------------------------------------------------


def run_all(cases, *, workers: int, budget_s: float, out: Path, device: str, case_timeout_s: float, log,
            save=None):
    """Run the cases (subprocesses, `workers` at once); `save(rows)` after each finished case, so a
    run killed from outside (the device's wall limit) keeps what it measured."""
    out.mkdir(parents=True, exist_ok=True)
    lock = out / "gpu.lock"
    lock.touch()
    rows, pending, running = [], list(enumerate(cases)), []
    start = time.time()
    logf = open(out / "cases.log", "w")
    while pending or running:
        while pending and len(running) < workers and time.time() - start < budget_s:
            i, case = pending.pop(0)
            cache = tempfile.mkdtemp(prefix="inductor_")
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, RANK_BENCH_LOCK=str(lock),
                       PYTHONUNBUFFERED="1")
            env.pop("RANK_BENCH_CODE", None)
            if case.code:
                env["RANK_BENCH_CODE"] = str(Path(case.code).resolve())
            env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(max(1, (os.cpu_count() or 4) // max(1, workers))))
            cmd = [sys.executable, "-m", "benchmarks.rank_bench", "--case", json.dumps(asdict(case)),
                   "--device", device]
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            running.append((i, case, p, time.time()))
        if not running:
            break
        time.sleep(0.5)
        for item in list(running):
            i, case, p, t0 = item
            timed_out = time.time() - t0 > case_timeout_s
            if p.poll() is None and not timed_out:
                continue
            if timed_out and p.poll() is None:
                p.kill()
            text = p.communicate()[0] or ""
            running.remove(item)
            logf.write(f"==== {case.key()} (rc {p.returncode}, {time.time() - t0:.0f} s)\n{text[-4000:]}\n")
            logf.flush()
            got = [json.loads(line[len("RESULT "):]) for line in text.splitlines() if line.startswith("RESULT ")]
            if got:
                row = got[-1]
            else:
                tail = [ln for ln in text.strip().splitlines() if ln.strip()][-1:] or ["(no output)"]
                row = dict(case=asdict(case), key=case.key(),
                           error=("timed out" if timed_out else f"rc {p.returncode}") + ": " + tail[0][:200])
            row["order"] = i
            rows.append(row)
            log(_row_line(row))
            if save is not None:
                save(sorted(rows, key=lambda r: r["order"]))
        if pending and time.time() - start >= budget_s and not running:
            break
    for i, case in pending:
        rows.append(dict(case=asdict(case), key=case.key(), order=i, error="not run: time budget"))
    rows.sort(key=lambda r: r["order"])
    logf.close()
    return rows


def _row_line(r: dict) -> str:
    if "error" in r:
        return f"{r['key']}: {r['error']}"
    return (f"{r['key']}: step {r['step_ms']:.2f} ms, host {r['host_ms']:.2f} ms, "
            f"peak {r.get('peak_gib', 0):.2f} GiB, compile {r['compile_s']:.1f} s")


def table(rows) -> str:
    """Markdown: one line per case, with the step time relative to k=1 (same everything else) and
    to torch.compile of the same per-rank work."""
    def base_key(c, **over):
        d = dict(c, **over)
        return (d["system"], d["tp"], d["hidden"], d["layers"], d["batch"], d["seq"], d["k"], d["recompute"],
                d["collectives"], json.dumps(d["options"], sort_keys=True), d["label"] if d["trace"] else "",
                d.get("boundary", True))

    by = {base_key(r["case"]): r for r in rows if "step_ms" in r}
    lines = ["| system | tp | h | L | k | recompute | collectives | options | step ms | vs k=1 | vs torch.compile "
             "| host ms | host/step | peak GiB | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["case"]
        opts = (",".join(f"{k}={v}" for k, v in sorted(c["options"].items())) + (f" {c['label']}" if c["label"] else "")
                + ("" if c.get("boundary", True) else " no-boundary"))
        head = (f"| {c['system']} | {c['tp']} | {c['hidden']} | {c['layers']} | {c['k']} | {c['recompute']} | "
                f"{c['collectives']} | {opts.strip() or '-'} |")
        if "error" in r:
            lines.append(head + f" {r['error']} | | | | | | |")
            continue
        k1 = by.get(base_key(c, k=1))
        ref = by.get(base_key(c, system="torch_compile", k=1, recompute="none", collectives="skip", options={},
                              label="", trace=False, boundary=True))
        rel = lambda b: f"{100 * (r['step_ms'] / b['step_ms'] - 1):+.1f} %" if b and b is not r else "-"  # noqa: E731
        lines.append(head + f" {r['step_ms']:.2f} | {rel(k1)} | {rel(ref)} | {r['host_ms']:.2f} | "
                            f"{r['host_ms'] / r['step_ms']:.2f} | {r.get('peak_gib', float('nan')):.2f} | "
                            f"{r['compile_s']:.1f} |")
    return "\n".join(lines)


def profile_table(rows) -> str:
    lines = []
    for r in rows:
        prof = r.get("profile")
        if not prof:
            continue
        fam = ", ".join(f"{f} {v['kernels']:.0f} kernels {v['us'] / 1e3:.2f} ms" for f, v in prof["families"].items())
        lines.append(f"- {r['key']}: {prof['kernels_per_step']:.0f} kernels, busy {prof['busy_us_per_step'] / 1e3:.2f} "
                     f"ms per step ({fam})")
    return "\n".join(lines)


def meta(args) -> dict:
    m = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             torch=torch.__version__, command="python -m benchmarks.rank_bench " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    if torch.cuda.is_available():
        m["card"] = torch.cuda.get_device_name(0)
    try:
        m["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                     timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        m["commit"] = None
    return m


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.rank_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", default="baseline", help=f"one of {sorted(GRIDS)} or a JSON file of Case dicts")
    p.add_argument("--case", default=None, help="run one case (JSON Case fields) in this process; prints RESULT {json}")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--workers", type=int, default=1, help="cases compiling at once (one at a time times)")
    p.add_argument("--budget-s", type=float, default=1e9, help="launch no new case after this many seconds")
    p.add_argument("--case-timeout-s", type=float, default=300)
    p.add_argument("--out", default=None, help="results folder: results.json, table.md, cases.log")
    p.add_argument("--check-cudagraphs", default=None,
                   help="JSON Case fields: compare loss and gradients with cudagraphs off and on (one process)")
    p.add_argument("--only", default="", help="comma-separated substrings: keep cases whose key has all of them")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.check_cudagraphs is not None:
        print("CHECK " + json.dumps(check_cudagraphs(Case(**json.loads(args.check_cudagraphs)), device)), flush=True)
        return 0
    if args.case is not None:
        case = Case(**json.loads(args.case))
        try:
            row = run_case(case, device)
        except Exception as e:  # one failed case must not stop the grid
            import traceback

            traceback.print_exc()
            row = dict(case=asdict(case), key=case.key(), error=f"{type(e).__name__}: {str(e)[:300]}")
        print("RESULT " + json.dumps(row), flush=True)
        return 0
    cases = load_grid(args.grid)
    for s in [s for s in args.only.split(",") if s]:
        cases = [c for c in cases if s in c.key()]
    out = Path(args.out or tempfile.mkdtemp(prefix="rank_bench_"))
    m = meta(args)
    print(f"[rank_bench] {len(cases)} cases, {m}", flush=True)

    def save(rows):
        (out / "results.json").write_text(json.dumps(dict(meta=m, rows=rows), indent=1))
        (out / "table.md").write_text(table(rows) + "\n\n" + profile_table(rows) + "\n")

    rows = run_all(cases, workers=args.workers, budget_s=args.budget_s, out=out, device=device.type,
                   case_timeout_s=args.case_timeout_s, log=lambda s: print("[rank_bench] " + s, flush=True), save=save)
    save(rows)
    md = table(rows)
    prof = profile_table(rows)
    print(md)
    print(prof)
    return 0 if all("error" not in r or r["error"].startswith("not run") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
