"""Agreement before anything talks: the ranks compare what must match before the first collective.

TMP ranks run one program together: the same traced graph, the same input shapes and dtypes, the
same options, the same full-size weights (each rank slices its shard from its own copy), and in
every step the same batch. A rank that differs in any of these either deadlocks a collective
("Received data size doesn't match", or a 30-minute wait) or trains garbage without a word
(ranks seeded differently: replicated weights drift apart). So, before the planner profiles and
before the first collective of the model, compile() gathers one small record per rank (a few
digests, one ``all_gather_object``) and every rank raises the same :class:`PlanMismatchError`
naming what differs and on which ranks. The first call of each compiled program checks the
batch the same way (a checksum; every call with ``CompileConfig.check_inputs="every"``).

Weights are fingerprinted, not compared: per parameter or buffer the float64 sum, the float64
2-norm and a position-weighted sum of 16 evenly spaced elements (so a permutation is seen too);
bitwise equal weights give bitwise equal fingerprints on the same kind of device.

The check gathers over the whole world when the mesh spans it (every rank then sees every
rank's record and raises together, so no group is left waiting in a later collective); on a
mesh that is a subset of the world it gathers per axis. On torch's "fake" process group
(single-GPU benchmarks) nothing meaningful can be gathered and the check is skipped.
"""
from __future__ import annotations

import hashlib
import sys
from typing import Optional

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree

from oases_fx.errors import OasesError, PlanMismatchError





def _h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- what is compared ---------------------------------------------------------------------------

def _describe_input(t) -> str:
    if isinstance(t, torch.Tensor):
        return (f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')} on {t.device.type}"
                + (" requires_grad" if t.requires_grad else ""))
    return repr(t)


def inputs_summary(args, kwargs) -> str:
    flat, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    return "; ".join(f"input {i}: {_describe_input(t)}" for i, t in enumerate(flat)) + f" [{_h(str(spec))}]"


def model_summary(model, traced) -> str:
    """Model class, parameter dtypes and the traced graph's code (a digest)."""
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()})
    return f"{type(model).__name__}, parameters {'/'.join(dtypes) or '-'}, graph {_h(traced.gm.code)}"


def _draws_random(gm) -> bool:
    """Whether the traced graph has random ops (dropout in training, attention dropout, rand...)."""
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        name = str(getattr(n.target, "__name__", n.target))
        if "dropout" in name and not (len(n.args) > 2 and n.args[2] is False) and not (len(n.args) > 1 and n.args[1] == 0):
            return True
        if "scaled_dot_product" in name and (n.args[4] if len(n.args) > 4 else n.kwargs.get("dropout_p", 0)):
            return True
        if "rand" in name or "bernoulli" in name:
            return True
    return False


def rng_summary(device_type: str) -> str:
    """Digest of the default generator's state (CPU, and the accelerator's current device)."""
    parts = [torch.get_rng_state()]
    if device_type == "cuda" and torch.cuda.is_available():
        parts.append(torch.cuda.get_rng_state())
    return _h("".join(hashlib.sha256(t.numpy().tobytes()).hexdigest() for t in parts))


def _versions() -> str:
    try:
        from importlib.metadata import version

        ours = version("oases_fx")
    except Exception:  # a source checkout that is not installed
        ours = "?"
    return f"torch {torch.__version__}, oases_fx {ours}, python {sys.version.split()[0]}"


def _plan_arg(plan) -> str:
    from pathlib import Path

    from oases_fx.plan import Plan

    if isinstance(plan, Plan):
        return f"Plan {plan.digest()}"
    if isinstance(plan, (str, Path)) and str(plan) not in ("auto", "megatron"):
        p = Path(plan)
        return f"plan file {p.name} " + (hashlib.sha256(p.read_bytes()).hexdigest()[:16] if p.exists() else "(missing)")
    return repr(plan)


def options_summary(cfg, *, plan, num_sub_batches, recompute, tp: int, dp: int) -> str:
    import dataclasses

    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in ("verbose", "debug")}
    return (f"plan={_plan_arg(plan)}, num_sub_batches={num_sub_batches}, recompute={recompute}, mesh tp={tp} dp={dp}, "
            + ", ".join(f"{k}={v!r}" for k, v in sorted(fields.items())))


@torch.no_grad()
def tensor_fingerprints(named) -> dict:
    """name -> short digest of (float64 sum, float64 2-norm, position-weighted sum of 16 evenly
    spaced elements). Meta tensors (no data) are skipped. One device-to-host copy in all."""
    names, rows = [], []
    for name, t in named:
        if t is None or t.is_meta or type(t).__name__ == "FakeTensor":  # no data (meta-device init)
            continue
        flat = t.detach().reshape(-1)
        n = flat.numel()
        if n == 0:
            rows.append(torch.zeros(3, dtype=torch.float64, device=t.device))
        else:
            x = flat if flat.is_floating_point() or flat.is_complex() else flat.double()
            if x.is_complex():
                x = torch.view_as_real(x).reshape(-1)
            m = min(n, 16)  # evenly spaced elements, in integer arithmetic: a float32 linspace rounds
            # n - 1 up to n past 2**24 elements and indexes out of bounds (seen at h=4096 on GPU)
            pick = torch.arange(m, dtype=torch.int64, device=t.device) * (n - 1) // max(m - 1, 1)
            w = torch.arange(1, pick.numel() + 1, dtype=torch.float64, device=t.device)
            rows.append(torch.stack([torch.sum(x, dtype=torch.float64),
                                     torch.linalg.vector_norm(x, dtype=torch.float64),
                                     (x[pick].double() * w).sum()]))
        names.append(name)
    if not rows:
        return {}
    vals = torch.stack([r.to(rows[0].device) for r in rows]).cpu().tolist()
    return {name: _h(repr(v)) for name, v in zip(names, vals)}


def weights_fingerprint(model) -> dict:
    named = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers()]
    return tensor_fingerprints(named)


def batch_fingerprint(args, kwargs) -> dict:
    flat, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    fp = tensor_fingerprints((f"input {i}", t) for i, t in enumerate(flat) if isinstance(t, torch.Tensor))
    fp["structure"] = _h(str(spec) + repr([_describe_input(t) for t in flat]))
    return fp


# --- gathering and comparing ----------------------------------------------------------------------

def _is_fake(group) -> bool:
    try:
        return dist.get_backend(group) == "fake"
    except Exception:
        return False


def _axis_groups(mesh) -> dict:
    """'tp' and 'dp' -> the tuples of global ranks of every group on that axis."""
    names = tuple(mesh.mesh_dim_names)
    ranks = mesh.mesh
    if len(names) == 1:
        tp = [tuple(int(r) for r in ranks.flatten())]
        return {"tp": tp, "dp": [(r,) for r in tp[0]]}
    if names.index("tp") == 0:
        ranks = ranks.transpose(0, 1)  # rows: dp index, columns: tp index
    tp = [tuple(int(r) for r in row) for row in ranks]
    dp = [tuple(int(r) for r in col) for col in ranks.transpose(0, 1)]
    return {"tp": tp, "dp": dp}


def _gather(mesh, info, record) -> Optional[dict]:
    """global rank -> record, over the whole mesh (None on a fake process group)."""
    if not dist.is_initialized() or _is_fake(info.tp_group):
        return None
    world = dist.get_world_size()
    if mesh.mesh.numel() == world:
        got = [None] * world
        dist.all_gather_object(got, record)
        return dict(enumerate(got))
    out = {}
    for group in (info.tp_group, info.dp_group):
        if group is not None:
            got = [None] * dist.get_world_size(group)
            dist.all_gather_object(got, record, group=group)
            out.update(zip(dist.get_process_group_ranks(group), got))
    return out


def _split(values: dict) -> str:
    """'ranks [0, 2]: a | ranks [1]: b' for the distinct values among rank -> value."""
    by = {}
    for r, v in sorted(values.items()):
        by.setdefault(v, []).append(r)
    return " | ".join(("rank " if len(rs) == 1 else "ranks ") + ", ".join(map(str, rs)) + f": {v}"
                      for v, rs in by.items())


def _dict_diff(values: dict, limit: int = 5) -> str:
    """For rank -> {name: digest}: the names whose digest differs between ranks (or is missing)."""
    names = sorted(set().union(*[set(d) for d in values.values()]))
    bad = [n for n in names if len({d.get(n) for d in values.values()}) > 1]
    more = f" and {len(bad) - limit} more" if len(bad) > limit else ""
    return ", ".join(bad[:limit]) + more


def _compare(records: dict, groups, key: str) -> list:
    """(group, rank -> value) for every group whose ranks hold different values of records[r][key]."""
    out = []
    for g in groups:
        vals = {r: records[r][key] for r in g if r in records}
        if len({repr(v) for v in vals.values()}) > 1:
            out.append((g, vals))
    return out


_FIX = {
    "versions": "install the same torch and oases_fx on every rank.",
    "graph": "build the same model (same class, config and code) on every rank. If every rank did, the "
             "model's forward runs its ops in an order that depends on Python's per-process hash seed (it "
             "iterates a set of strings, as ModernBERT's rotary embeddings per layer type do): set the same "
             "PYTHONHASHSEED (e.g. PYTHONHASHSEED=0) in every rank's environment before Python starts.",
    "inputs": "pass example_inputs of the same shapes, dtypes, devices and requires_grad on every rank "
              "(the same batch size, sequence length and dtype).",
    "options": "call oases_fx.compile with the same plan, num_sub_batches, recompute and config on every rank.",
    "weights": "initialise the model identically on every rank (torch.manual_seed(same seed) before building "
               "it, or load the same checkpoint) before oases_fx.compile.",
    "rng": "seed every TMP rank's default generator identically (torch.manual_seed(same seed) on every rank, "
           "as Megatron requires): replicated dropout must draw the same mask on every TMP rank, and sharded "
           "dropout draws each shard's slice of one full mask (oases_fx.rng).",
    "batch": "feed every TMP rank of a group the same batch (split data by the 'dp' rank only, seed the "
             "sampler identically on the TMP ranks).",
}


def _raise(problems: list, *, when: str) -> None:
    lines = []
    for key, axis, g, vals in problems:
        if isinstance(next(iter(vals.values())), dict):
            detail = f"{_dict_diff(vals)} differ: " + _split({r: _h(repr(v)) for r, v in vals.items()})
        else:
            detail = _split(vals)
        lines.append(f"  - {key} (must match on the '{axis}' axis, ranks {', '.join(map(str, g))}): {detail}. Fix: {_FIX[key]}")
    raise PlanMismatchError(f"ranks disagree {when}:\n" + "\n".join(lines))


def check_compile(mesh, info, *, model, traced, args, kwargs, cfg, plan, num_sub_batches, recompute) -> None:
    """Raise PlanMismatchError on every rank if the ranks' graphs, example inputs, options, versions
    or weights differ. Collective (one all_gather_object); call before any other collective."""
    record = dict(
        versions=_versions(),
        graph=model_summary(model, traced),
        inputs=inputs_summary(args, kwargs),
        options=options_summary(cfg, plan=plan, num_sub_batches=num_sub_batches, recompute=recompute,
                                tp=info.tp, dp=info.dp),
        weights=weights_fingerprint(model),
        rng=rng_summary(info.device_type) if _draws_random(traced.gm) else "no random ops",
    )
    records = _gather(mesh, info, record)
    if records is None:
        return
    _raise_if_peer_failed(records, where="before the agreement check")
    groups = _axis_groups(mesh)
    everyone = [tuple(sorted(records))]
    problems = []
    for key in ("versions", "graph", "inputs", "options", "weights"):
        if key == "weights" and any(p[0] == "graph" for p in problems):
            continue  # a different model or dtype: its weights differ as a consequence
        for g, vals in _compare(records, everyone, key):
            problems.append((key, "tp' and 'dp" if info.dp > 1 else "tp", g, vals))
    for g, vals in _compare(records, groups["tp"], "rng"):  # dp replicas may draw different masks
        problems.append(("rng", "tp", g, vals))
    if problems:
        _raise(problems, when="before compiling (nothing was communicated but this check)")


def check_batch(mesh, info, args, kwargs, *, call: str) -> None:
    """Raise PlanMismatchError on every rank if the TMP ranks of some group were given different
    batches (values, shapes or dtypes). Collective over the mesh (one all_gather_object)."""
    records = _gather(mesh, info, dict(batch=batch_fingerprint(args, kwargs)))
    if records is None:
        return
    problems = [("batch", "tp", g, vals) for g, vals in _compare(records, _axis_groups(mesh)["tp"], "batch")]
    if problems:
        _raise(problems, when=f"on the {call}")


# --- bounded waiting: a rank that fails in compile() stops the others -------------------------------

def _raise_if_peer_failed(records: dict, *, where: str) -> None:
    failed = {r: rec["failed"] for r, rec in records.items() if isinstance(rec, dict) and "failed" in rec}
    if failed:
        text = "; ".join(f"rank {r}: {msg}" for r, msg in sorted(failed.items()))
        err = OasesError(f"oases_fx.compile failed on {'rank' if len(failed) == 1 else 'ranks'} "
                         f"{', '.join(map(str, sorted(failed)))} {where} ({text}). This rank stops too instead of "
                         "waiting for it in the next collective. Fix: see that rank's error.")
        err._oases_shared = True
        raise err


def _world_gather(mesh, record) -> Optional[dict]:
    """rank -> record over the whole world (None if the mesh does not span it or the group is fake)."""
    try:
        group = mesh.get_group(mesh.mesh_dim_names.index("tp") if "tp" in (mesh.mesh_dim_names or ()) else 0)
    except Exception:
        return None
    if not dist.is_initialized() or _is_fake(group) or mesh.mesh.numel() != dist.get_world_size():
        return None
    got = [None] * dist.get_world_size()
    dist.all_gather_object(got, record)
    return dict(enumerate(got))


def errors_shared(compile_fn):
    """Decorate compile(): every rank ends it with one small all_gather_object of its status
    (ok, or its error), so a rank that raises inside compile() makes the others raise an OasesError
    naming it at once, instead of leaving them blocked in the first collective of the model until
    the process group's timeout (gloo's and NCCL's default: 30 minutes). A rank failing before the
    agreement check is seen by the others in that check's gather. A rank failing while the others
    are inside the planner's own collectives also leaves its error in the c10d store
    (oases_fx.watchdog): they wait at most the bound (CompileConfig.collective_timeout_s, else the
    groups' timeout), then raise an OasesError naming it and its error."""
    import functools

    from oases_fx import watchdog

    @functools.wraps(compile_fn)
    def wrapper(model, mesh, *args, **kwargs):
        try:
            ranks = [int(r) for r in mesh.mesh.flatten()]
        except Exception:
            ranks = []
        channel = watchdog.FaultChannel.for_ranks(ranks, kwargs.get("collective_timeout_s"))
        watchdog._CURRENT.append(channel)
        try:
            out = compile_fn(model, mesh, *args, **kwargs)
        except Exception as e:
            inner = innermost_cause(e)
            failed = watchdog.collective_failure_in(inner)
            if failed is not None:  # waited for a peer: name it if it said why
                err = channel.timed_out(failed)
                if channel.peer_failures():  # that peer is in (or on its way to) its own gather below: meet it
                    _world_gather(mesh, dict(failed=f"OasesError: {str(err)[:500]}"))
                raise err from failed
            if not getattr(e, "_oases_shared", False):
                channel.report(inner)  # for peers waiting in a planner collective (read when theirs times out)
                _world_gather(mesh, dict(failed=f"{type(e).__name__}: {str(e)[:500]}"))
            raise
        finally:
            watchdog._CURRENT.remove(channel)
        records = _world_gather(mesh, dict(ok=True))
        if records is not None:
            _raise_if_peer_failed(records, where="after this rank finished compiling")
        return out

    return wrapper


def innermost_cause(e: BaseException) -> BaseException:
    """The exception torch.compile's wrappers (BackendCompilerFailed, TorchRuntimeError, ...) carry
    as their cause, followed to the innermost one; `e` itself if it is not such a wrapper."""
    from oases_fx._compat import dynamo_wrapper_exceptions

    wrappers = dynamo_wrapper_exceptions()
    seen = set()
    while isinstance(e, wrappers) and id(e) not in seen:
        seen.add(id(e))
        inner = e.__cause__ or getattr(e, "inner_exception", None)
        if inner is None:
            break
        e = inner
    return e
