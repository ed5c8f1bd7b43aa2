"""The device mesh as oases_fx sees it: a "tp" axis (required) and an optional "dp" axis."""
from __future__ import annotations

from dataclasses import dataclass
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


def mesh_info(mesh) -> MeshInfo:
    """Validate the mesh and pull out what the passes need; clear errors for what they do not support."""
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
