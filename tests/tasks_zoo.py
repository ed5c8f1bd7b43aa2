"""Rank tasks for the model zoo (tests/zoo.py): compile a family with plan="megatron" and return
what was sharded, what was declined, and the numbers to compare with the unsharded eager model.
Nothing is compared here (the parent compares)."""
from __future__ import annotations

import copy

import torch
from torch.distributed.device_mesh import init_device_mesh

import oases_fx
from tests import zoo


def _regions(m):
    gm_meta = m.graphs.gm.meta.get("oases", {})
    regions = [(r.name, r.kind) for r in gm_meta.get("regions", [])]
    declined = [tuple(d) if not hasattr(d, "reason") else (d.name, d.reason) for d in gm_meta.get("declined", [])]
    return regions, declined


def _blocks(m) -> dict:
    """Blocks sharded and found, an MoE layer counting one per expert (annotate_sharding.coverage)."""
    from oases_fx.passes.annotate_sharding import coverage

    sharded, found, _ = coverage(m.graphs.gm.meta.get("oases", {}))
    return dict(sharded_blocks=sharded, found_blocks=found)


def survey(rank, world_size, *, name, batch=4, seq=8):
    """Compile only (aot_eager, no step): regions sharded and declined, or the error."""
    fam = zoo.BY_NAME[name]
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    model = zoo.build(name)
    g = torch.Generator().manual_seed(1234)
    idx = torch.randint(0, zoo.VOCAB, (batch, seq), generator=g)
    try:
        m = oases_fx.compile(model, mesh, plan="megatron", backend="eager", verbose=False,
                             **zoo.compile_inputs(fam, idx, idx))
    except Exception as e:
        return dict(error=f"{type(e).__name__}: {str(e)[:400]}")
    regions, declined = _regions(m)
    return dict(regions=regions, declined=declined, num_blocks=fam.num_blocks, **_blocks(m))


def compare(rank, world_size, *, name, batch=4, seq=8, k=1, backend="aot_eager", steps=1, compile_kwargs=None):
    """Loss, logits, every gradient (gathered) of the compiled sharded family vs the unsharded
    eager reference, plus the regions sharded and declined."""
    fam = zoo.BY_NAME[name]
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    ref = zoo.build(name)
    model = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(1234)
    idx = torch.randint(0, zoo.VOCAB, (batch, seq), generator=g)
    tgt = torch.randint(0, zoo.VOCAB, (batch, seq), generator=g)
    kw = dict(plan="megatron", num_sub_batches=k)
    kw.update(compile_kwargs or {})
    m = oases_fx.compile(model, mesh, backend=backend, verbose=False, **zoo.compile_inputs(fam, idx, tgt), **kw)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    losses, ref_losses = [], []
    for _ in range(steps):
        opt.zero_grad()
        ref_opt.zero_grad()
        logits, loss = zoo.call(fam, m, idx, tgt)
        loss.backward()
        r_logits, r_loss = zoo.call(fam, ref, idx, tgt)
        r_loss.backward()
        losses.append(loss.detach())
        ref_losses.append(r_loss.detach())
        last = (logits.detach(), r_logits.detach(), m.full_grads(),
                {k_: p.grad for k_, p in ref.named_parameters()})
        opt.step()
        ref_opt.step()
    full = m.full_state_dict()
    regions, declined = _regions(m)
    if rank != 0:
        return None
    logits, r_logits, grads, r_grads = last
    return dict(losses=torch.stack(losses), ref_losses=torch.stack(ref_losses), logits=logits, ref_logits=r_logits,
                grads=grads, ref_grads=r_grads, params=full, ref_params=ref.state_dict(), explain=m.explain(),
                regions=regions, declined=declined, num_blocks=fam.num_blocks, **_blocks(m))


def state_round_trip(rank, world_size, *, name, path, batch=4, seq=8):
    """The boundary of a family's sharded parameters: named_parameters() DTensors (placements of the
    3-D experts, full_tensor() vs the reference), a DCP save -> load into a model compiled from other
    weights (get/set_model_state_dict), and load_full_state_dict of the reference's state dict; the
    losses of both reloaded models and their full_state_dict() for the parent to compare."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    fam = zoo.BY_NAME[name]
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    idx = torch.randint(0, zoo.VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1234))
    ref = zoo.build(name)

    def make(seed):
        return oases_fx.compile(zoo.build(name, seed=seed), mesh, plan="megatron", backend="eager", verbose=False,
                                **zoo.compile_inputs(fam, idx, idx))

    m = make(0)
    params = dict(m.named_parameters())
    placements = {k: str(tuple(p.placements)) for k, p in params.items() if ".experts." in k}
    from_dtensors = {k: p.detach().full_tensor() for k, p in params.items()}
    dcp.save(get_model_state_dict(m), checkpoint_id=path)
    other = make(1)
    sd = get_model_state_dict(other)
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(other, sd)
    third = make(2)
    third.load_full_state_dict(ref.state_dict())
    with torch.no_grad():
        losses = [zoo.call(fam, x, idx, idx)[1] for x in (ref, other, third)]
    other_full, third_full = other.full_state_dict(), third.full_state_dict()
    if rank != 0:
        return None
    return dict(placements=placements, from_dtensors=from_dtensors, ref_params=ref.state_dict(), losses=losses,
                dcp_params=other_full, loaded_params=third_full)


def load_pretrained_error(rank, world_size, *, name, folder, batch=4, seq=8):
    """Compile the family and load_pretrained(folder); (error type, message), or None if it loaded."""
    fam = zoo.BY_NAME[name]
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    idx = torch.randint(0, zoo.VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1234))
    m = oases_fx.compile(zoo.build(name), mesh, plan="megatron", backend="eager", verbose=False,
                         **zoo.compile_inputs(fam, idx, idx))
    try:
        oases_fx.load_pretrained(m, folder)
    except Exception as e:
        return type(e).__name__, str(e)
    return None


def compile_error(rank, world_size, *, name, batch=4, seq=8, **config):
    """Compile (eager backend) and return (error type, message), or None if it compiled."""
    fam = zoo.BY_NAME[name]
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    idx = torch.randint(0, zoo.VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1234))
    try:
        oases_fx.compile(zoo.build(name), mesh, plan="megatron", backend="eager", verbose=False,
                         **zoo.compile_inputs(fam, idx, idx), **config)
    except Exception as e:
        return type(e).__name__, str(e)
    return None


def _cell(r) -> str:
    if "error" in r:
        return "compile error"
    return f"{r['sharded_blocks']}/{r['num_blocks']}"


def _why(r) -> str:
    if "error" in r:
        return r["error"].split(". Fix")[0].replace("|", "/")[:160]
    from oases_fx.passes.annotate_sharding import PLAN_DECISIONS

    reasons = sorted({why.split(" at node ")[0].split(" from File")[0].split(". Fix")[0] for _, why in r["declined"]
                      if why not in PLAN_DECISIONS})
    return "; ".join(reasons).replace("|", "/")[:200]


def markdown_table(by_tp: dict) -> str:
    """The README's family table from survey() results: {tp: {family: result}}."""
    tps = sorted(by_tp)
    lines = ["| family | construct | " + " | ".join(f"TP={tp} blocks sharded" for tp in tps)
             + " | declined / error and why |", "|---" * (3 + len(tps)) + "|"]
    for fam in zoo.FAMILIES:
        rs = [by_tp[tp][fam.name] for tp in tps]
        why = " / ".join(f"TP={tp}: {_why(r)}" for tp, r in zip(tps, rs) if _why(r))
        lines.append(f"| {fam.name} | {fam.construct.replace('|', '/')} | " + " | ".join(_cell(r) for r in rs) + f" | {why or '-'} |")
    return "\n".join(lines)


def main():  # python -m tests.tasks_zoo: print the README table (compiles every family at TP=2 and TP=4)
    from tests.pool import RankPool

    by_tp = {}
    for tp in (2, 4):
        pool = RankPool(tp)
        try:
            by_tp[tp] = {}
            for fam in zoo.FAMILIES:
                try:
                    by_tp[tp][fam.name] = pool.run(survey, name=fam.name)[0]
                except Exception as e:
                    by_tp[tp][fam.name] = dict(error=str(e).splitlines()[-1][:300])
        finally:
            pool.close()
    print(markdown_table(by_tp))


if __name__ == "__main__":
    main()
