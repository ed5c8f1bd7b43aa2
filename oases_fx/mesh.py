"""The device mesh as oases_fx sees it: a "tp" axis (required) and an optional "dp" axis."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch.distributed as dist

from oases_fx._compat import group_name
from oases_fx.errors import OasesError, PlanMismatchError


@dataclass(frozen=True)
class MeshInfo:
    tp: int
    """TMP degree (size of the "tp" axis)."""
    tp_rank: int
    """This rank's index on the "tp" axis."""
    tp_group: object
    """ProcessGroup of the "tp" axis."""
    tp_group_name: str
    """Its registered name (what functional collectives take)."""
    dp: int
    """Data-parallel degree (size of the "dp" axis; 1 on a 1-D mesh)."""
    dp_group: Optional[object]
    """ProcessGroup of the "dp" axis, or None."""
    device_type: str
    """"cpu" or "cuda"."""
    subgroups: dict = field(default_factory=dict)
    """Region degree d (< tp) -> :class:`DegreeGroups` of this rank (:func:`with_region_groups`)."""


@dataclass(frozen=True)
class DegreeGroups:
    """This rank's groups for regions of TMP degree d: the TMP group's ranks form n = tp/d inner
    groups of d consecutive tp ranks; inner group c = tp ranks [c*d, (c+1)*d). The cross group of
    shard index s = tp ranks {s, s+d, s+2d, ...} (the n data-parallel replicas of one shard)."""

    d: int
    n: int
    """tp // d: the number of batch chunks."""
    chunk: int
    """c = tp_rank // d: which 1/n of the batch this rank runs."""
    shard: int
    """s = tp_rank % d: which 1/d of the region's weights this rank holds."""
    inner_group_name: Optional[str]
    """Registered name of the inner group (Megatron f/g); None for d=1."""
    cross_group_name: str
    """Registered name of the cross group (batch gather, weight-gradient sum)."""


def mesh_info(mesh, *, collective_timeout_s: Optional[float] = None) -> MeshInfo:
    """Validate the mesh and pull out what the passes need; clear errors for what they do not support.

    With `collective_timeout_s`, the TMP group is oases_fx's own (:func:`own_tmp_group`: the same
    ranks, that timeout), so the compiled program's and the planner's collectives wait at most that
    long (oases_fx.watchdog); else the mesh's own "tp" group (and its timeout)."""
    names = tuple(mesh.mesh_dim_names or ())
    if "tp" not in names:
        raise OasesError(
            f"the mesh has axes {names or '(unnamed)'} but no 'tp' axis. Fix: "
            "init_device_mesh(device, (n,), mesh_dim_names=('tp',)) or, with data parallelism, "
            "init_device_mesh(device, (dp, tp), mesh_dim_names=('dp', 'tp'))."
        )
    extra = [n for n in names if n not in ("tp", "dp")]
    if extra:
        raise OasesError(
            f"mesh axes {extra} are not supported (only 'tp' and 'dp'). Fix: flatten other parallelism "
            "into 'dp' or build the mesh with mesh_dim_names=('dp', 'tp')."
        )
    tp_group = mesh.get_group("tp")
    if collective_timeout_s is not None and _is_real(tp_group):
        tp_group = own_tmp_group(mesh, collective_timeout_s)
    dp_group = mesh.get_group("dp") if "dp" in names else None
    return MeshInfo(
        tp=mesh.size(names.index("tp")),
        tp_rank=mesh.get_local_rank("tp"),
        tp_group=tp_group,
        tp_group_name=group_name(tp_group),
        dp=mesh.size(names.index("dp")) if dp_group is not None else 1,
        dp_group=dp_group,
        device_type=mesh.device_type,
    )


_GROUP_CACHE: dict = {}  # (default group, tuple of global ranks, timeout s) -> ProcessGroup
_GROUP_TIMEOUT_S: list = [None]  # the timeout of the groups cached_new_group makes now (group_timeout)


def cached_new_group(ranks: tuple, timeout_s: Optional[float] = None):
    """dist.new_group, once per rank set, timeout and default process group (every rank calls this
    in the same order, so the cache stays consistent across ranks). Shared by the planner's profile
    and the compiled program, so a rank set gets one communicator. `timeout_s` None: the one
    :func:`group_timeout` sets (oases_fx.compile's collective_timeout_s), else the default group's."""
    import datetime

    timeout_s = _GROUP_TIMEOUT_S[-1] if timeout_s is None else timeout_s
    key = (id(dist.group.WORLD), ranks, timeout_s)
    if key not in _GROUP_CACHE:
        _GROUP_CACHE[key] = dist.new_group(
            list(ranks), timeout=None if timeout_s is None else datetime.timedelta(seconds=float(timeout_s)))
    return _GROUP_CACHE[key]


class group_timeout:
    """Context manager: groups made by cached_new_group inside it (region subgroups, the planner's
    profiling subgroups) get `timeout_s` (None: the default group's)."""

    def __init__(self, timeout_s: Optional[float]):
        self.timeout_s = timeout_s

    def __enter__(self):
        _GROUP_TIMEOUT_S.append(self.timeout_s)

    def __exit__(self, *exc):
        _GROUP_TIMEOUT_S.pop()


def _is_real(group) -> bool:
    try:
        return dist.is_initialized() and dist.get_backend(group) != "fake"
    except Exception:
        return False


def own_tmp_group(mesh, timeout_s: float):
    """oases_fx's own group of this rank's TMP ranks with timeout `timeout_s`. Collective over the
    world: every rank creates the group of every TMP group of the mesh, in mesh order."""
    me, mine = dist.get_rank(), None
    for ranks in _tmp_groups(mesh):
        if list(ranks) != sorted(ranks):
            raise OasesError(f"the mesh's TMP group {ranks} is not in increasing rank order; oases_fx's own groups "
                             "(collective_timeout_s) need it. Fix: build the mesh with init_device_mesh, or leave "
                             "collective_timeout_s=None and set the timeout in init_process_group.")
        g = cached_new_group(tuple(ranks), timeout_s)
        if me in ranks:
            mine = g
    assert mine is not None, f"rank {me} is in no TMP group of the mesh {mesh}"
    return mine


def _tmp_groups(mesh) -> list:
    """Global ranks of every TMP group of the mesh (one per "dp" index), each in tp-rank order."""
    names = tuple(mesh.mesh_dim_names)
    ranks = mesh.mesh
    if len(names) == 2:
        ranks = ranks.transpose(0, 1) if names.index("tp") == 0 else ranks
        return [tuple(int(r) for r in row) for row in ranks]
    return [tuple(int(r) for r in ranks.flatten())]


def with_region_groups(info: MeshInfo, mesh, degrees) -> MeshInfo:
    """`info` with the inner and cross subgroups of every degree d in `degrees` (d < tp) added.

    Collective over the whole world: every rank creates every subgroup of every TMP group of the
    mesh, in the same deterministic order (sorted degrees, TMP groups in mesh order, inner groups
    then cross groups), as dist.new_group requires. Call only once the ranks agree on the plan."""
    degrees = sorted({int(d) for d in degrees if d is not None and d < info.tp})
    if not degrees:
        return info
    me = dist.get_rank()
    out = dict(info.subgroups)
    for d in degrees:
        if info.tp % d:
            raise OasesError(f"region TMP degree {d} does not divide the mesh's 'tp' axis ({info.tp}).")
        n = info.tp // d
        for tmp in _tmp_groups(mesh):
            if list(tmp) != sorted(tmp):
                raise OasesError(f"the mesh's TMP group {tmp} is not in increasing rank order; per-region "
                                 "TMP degrees need it. Fix: build the mesh with init_device_mesh.")
            inner = [cached_new_group(tuple(tmp[c * d:(c + 1) * d])) if d > 1 else None for c in range(n)]
            cross = [cached_new_group(tuple(tmp[s::d])) for s in range(d)]
            if me in tmp:
                t = tmp.index(me)
                c, s = t // d, t % d
                out[d] = DegreeGroups(d=d, n=n, chunk=c, shard=s,
                                      inner_group_name=group_name(inner[c]) if d > 1 else None,
                                      cross_group_name=group_name(cross[s]))
    return dataclasses.replace(info, subgroups=out)


def check_same_on_all_ranks(info: MeshInfo, what: str, digest: str, detail: str = "") -> None:
    """Raise on every rank if any rank of the mesh holds a different `digest` (before any collective
    of the model runs, so a mismatch cannot deadlock or silently corrupt training)."""
    for axis, group in (("tp", info.tp_group), ("dp", info.dp_group)):
        if group is None:
            continue
        got = [None] * dist.get_world_size(group)
        dist.all_gather_object(got, digest, group=group)
        if len(set(got)) > 1:
            ranks = dist.get_process_group_ranks(group)
            table = ", ".join(f"rank {r}: {d}" for r, d in zip(ranks, got))
            raise PlanMismatchError(
                f"ranks on the '{axis}' axis disagree on the {what} ({table}). {detail}Fix: give every rank "
                "the same model config, example_inputs shapes and plan (e.g. save the plan once and pass "
                "plan=path on all ranks), and the same oases_fx and torch versions."
            )
