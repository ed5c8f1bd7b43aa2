"""Meta-device init and shard-on-read: compile a model built under torch.device("meta"), allocate
only this rank's shards, and fill them from a full state dict or a Hugging Face checkpoint folder.

How (torchtitan's meta-init, adapted to a traced graph): the meta parameters are swapped for
FakeTensors on the target device while the model is traced, so the graph records the real device
and the shard pass cuts fake tensors; only then does each rank allocate its local shards (and the
replicated tensors) with ``torch.empty``. Non-persistent buffers (rotary ``inv_freq``, masks) are
not in any checkpoint: they are rebuilt on the device as the model's own init would, before tracing.
The allocated tensors are uninitialised; a forward before any of them was written is an error.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from oases_fx import _compat, moe
from oases_fx.errors import OasesError
from oases_fx.meta import graph_meta

log = logging.getLogger("oases_fx")


class WeightsNotLoadedError(OasesError):
    """A model compiled from the meta device was called before its weights were loaded."""


# --- the model side: meta tensors, fake tensors, non-persistent buffers ---------------------------

def has_meta_tensors(model: nn.Module) -> bool:
    return any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))


def default_device(mesh) -> torch.device:
    """The mesh's device type; on CUDA this process's current device."""
    kind = getattr(mesh, "device_type", "cpu")
    if kind == "cuda" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(kind)


def _non_persistent_buffers(model: nn.Module):
    for mod_name, mod in model.named_modules():
        for leaf in mod._non_persistent_buffers_set:
            b = mod._buffers.get(leaf)
            if b is not None:
                yield mod_name, mod, leaf, b


@torch.no_grad()
def rebuild_non_persistent_buffers(model: nn.Module, device) -> list:
    """Meta non-persistent buffers become real tensors on `device`, computed as the model's own init
    computes them: Hugging Face models through their ``_init_weights`` (which recomputes rotary
    ``inv_freq`` with the module's ``rope_init_fn``), other modules through their
    ``reset_parameters()`` / ``_init_buffers()``. Returns the names rebuilt; raises naming any buffer
    no init wrote (it is filled with NaN first, so an init that skips it is caught)."""
    todo = {}
    for mod_name, mod, leaf, b in _non_persistent_buffers(model):
        if b.is_meta:
            mod._buffers[leaf] = torch.full(b.shape, float("nan"), dtype=b.dtype, device=device) \
                if b.dtype.is_floating_point else torch.zeros(b.shape, dtype=b.dtype, device=device)
            todo.setdefault(id(mod), (mod_name, mod, []))[2].append(leaf)
    hf_init = getattr(model, "_init_weights", None)
    for mod_name, mod, leaves in todo.values():
        if hf_init is not None:
            hf_init(mod)  # HF: rotary embeddings recompute inv_freq / original_inv_freq here
        for name in ("_init_buffers", "reset_buffers"):
            if hasattr(mod, name) and _unwritten(mod, leaves):
                with torch.device(device):
                    getattr(mod, name)()
        if _unwritten(mod, leaves) and hasattr(mod, "reset_parameters") and not any(
                p.is_meta for p in mod.parameters(recurse=False)):
            with torch.device(device):
                mod.reset_parameters()
        bad = _unwritten(mod, leaves)
        if bad:
            names = ", ".join(f"{mod_name}.{leaf}" if mod_name else leaf for leaf in bad)
            raise OasesError(
                f"non-persistent buffer(s) {names} ({type(mod).__name__}) were built on the meta device and are in no "
                "checkpoint, and oases_fx does not know how this module computes them. Fix: build these buffers on the "
                "real device (e.g. create them under `with torch.device('cpu'):` in the module's __init__), or give "
                f"{type(mod).__name__} a `_init_buffers()` method that recomputes them.")
    return [f"{n}.{leaf}" if n else leaf for n, _, leaves in todo.values() for leaf in leaves]


def _unwritten(mod, leaves):
    out = []
    for leaf in leaves:
        b = mod._buffers[leaf]
        if b is None or b.is_meta or (b.dtype.is_floating_point and torch.isnan(b).any()):
            out.append(leaf)
    return out


@contextlib.contextmanager
def fake_parameters(model: nn.Module, device):
    """Inside: every meta parameter and buffer of `model` is a FakeTensor on `device` (tied ones stay
    tied), so the model can be traced on its real device without allocating it; restored after.
    tracing.capture puts the example inputs into the same fake mode."""
    swapped, made = [], {}
    mode = None
    for mod in model.modules():
        for store in (mod._parameters, mod._buffers):
            for leaf, t in list(store.items()):
                if t is None or not t.is_meta:
                    continue
                if mode is None:
                    mode = _compat.fake_tensor_mode()
                if id(t) not in made:
                    with mode:
                        fake = torch.empty(t.shape, dtype=t.dtype, device=device)
                    made[id(t)] = nn.Parameter(fake, requires_grad=t.requires_grad) \
                        if isinstance(t, nn.Parameter) else fake
                store[leaf] = made[id(t)]
                swapped.append((store, leaf, t))
    try:
        yield mode
    finally:
        for store, leaf, t in swapped:
            store[leaf] = t


def input_device(args, kwargs) -> torch.device:
    """The device of the first tensor input (where the model will run), else CPU."""
    import torch.utils._pytree as pytree

    flat = pytree.tree_leaves((tuple(args), dict(kwargs)))
    return next((t.device for t in flat if isinstance(t, torch.Tensor)), torch.device("cpu"))


def fake_mode_of_model(model: nn.Module):
    return _compat.fake_mode_of(list(model.parameters()) + list(model.buffers()))


def is_fake(t) -> bool:
    return _compat.is_fake_tensor(t)


@torch.no_grad()
def allocate_fake_tensors(gm: nn.Module) -> dict:
    """Replace every FakeTensor parameter/buffer of the sharded graph module by an uninitialised real
    tensor of the same (local) shape on its device; tied names stay tied. The names allocated are
    kept in gm.meta["oases"]["allocated"] (the LoadGuard's list). No fakes (a real model): no-op."""
    real, out = {}, {}
    for mod_name, mod in gm.named_modules(remove_duplicate=False):
        for store in (mod._parameters, mod._buffers):
            for leaf, t in list(store.items()):
                if t is None or not is_fake(t):
                    continue
                if id(t) not in real:
                    empty = torch.zeros(t.shape, dtype=t.dtype, device=t.device)  # resident now, not at load
                    real[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) \
                        if isinstance(t, nn.Parameter) else empty
                store[leaf] = real[id(t)]
                out[f"{mod_name}.{leaf}" if mod_name else leaf] = real[id(t)]
    if out:
        graph_meta(gm).allocated = sorted(out)
    return out


def prepare_meta_model(model: nn.Module, args, kwargs, device) -> bool:
    """compile()'s first step for a model with meta tensors: check the device, rebuild the
    non-persistent buffers there. Returns whether the model is meta-initialised."""
    if not has_meta_tensors(model):
        return False
    where = input_device(args, kwargs)
    if device is not None and torch.device(device) != where:
        raise OasesError(f"compile(device={device}) but the example inputs are on {where}: a meta-device model is "
                         "allocated where its inputs are. Fix: move the example inputs to the device it will run on.")
    rebuilt = rebuild_non_persistent_buffers(model, where)
    log.info("meta-device init on %s: rebuilt non-persistent buffers %s", where, rebuilt)
    return True


def guard_if_meta(module, meta_init: bool):
    """Attach the LoadGuard to a module compiled from the meta device (returns the module)."""
    if meta_init:
        names = graph_meta(module.graphs.gm).allocated
        own = module._boundary.local_tensors()  # the plain shards (the DTensor parameters wrap them; oases_fx.boundary)
        guard = LoadGuard({n: own[n] for n in names if n in own})
        module.__dict__["_load_guard"] = guard
        module.register_load_state_dict_post_hook(guard.on_load_state_dict)
    return module


class LoadGuard:
    """Remembers the tensors allocated uninitialised: a forward while any of them was never written is
    an error naming them, instead of a step on garbage. Written means: its version counter moved (an
    in-place write to the plain shard: load_full_state_dict, load_pretrained, copy_), or a
    load_state_dict of the module loaded its key (DCP's set_state_dict writes through the DTensor
    state dict, whose copies do not move the plain shard's counter)."""

    def __init__(self, tensors: dict):
        self.versions = {name: (t, t._version) for name, t in tensors.items()}
        self.loaded = set()

    def on_load_state_dict(self, module, incompatible_keys) -> None:
        """load_state_dict post-hook: every key but the missing ones was loaded."""
        self.loaded |= set(self.versions) - set(incompatible_keys.missing_keys)

    def check(self) -> bool:
        """True once every tensor was written; raises WeightsNotLoadedError otherwise."""
        stale = sorted(name for name, (t, v) in self.versions.items() if t._version == v and name not in self.loaded)
        if stale:
            raise WeightsNotLoadedError(
                f"this model was compiled from the meta device and {len(stale)} of its {len(self.versions)} "
                f"parameters/buffers were never loaded (uninitialised memory), e.g. {stale[:4]}. Fix: load the weights "
                "before the first call: model.load_full_state_dict(state_dict), "
                "oases_fx.load_pretrained(model, hf_folder), or dcp.load(...).")
        return True


def check_loaded(module) -> None:
    """Called by OasesModule.forward: raise if weights are still missing; drop the guard once loaded."""
    guard = module.__dict__.get("_load_guard")
    if guard is not None and guard.check():
        module.__dict__["_load_guard"] = None


# --- the checkpoint side: safetensors folders read slice by slice --------------------------------
#
# Read with positioned reads into a buffer of this rank's slice, not through safetensors' mmap:
# pages of a mapped file that a slice touches count in the process's resident memory until the file
# is closed (measured: reading half of each tensor of a 16.8 MB checkpoint through get_slice raised
# peak RSS by 16.8 MB), while a read() into the slice's buffer holds only the slice.

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


@dataclass
class LoadReport:
    """What load_pretrained read on this rank."""
    bytes_read: int = 0
    """Bytes of tensor data read from the checkpoint on this rank (its slices only)."""
    largest_read: int = 0
    """The largest single slice read, in bytes (the transient buffer)."""
    checkpoint_bytes: int = 0
    """Bytes of all tensors in the checkpoint (one full copy of the model)."""
    aliases: dict = field(default_factory=dict)
    """Keys the checkpoint omits, filled from a tied key: {missing key: key read}."""


class _SafetensorsFile:
    """The safetensors layout (8-byte header length, JSON header, raw little-endian data), read by
    byte range: https://github.com/huggingface/safetensors#format."""

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "rb", buffering=0)
        (n,) = struct.unpack("<Q", self.f.read(8))
        self.header = json.loads(self.f.read(n))
        self.header.pop("__metadata__", None)
        self.base = 8 + n

    def close(self):
        self.f.close()

    def shape(self, name) -> tuple:
        return tuple(self.header[name]["shape"])

    def dtype(self, name) -> torch.dtype:
        code = self.header[name]["dtype"]
        if code not in _DTYPES:
            raise OasesError(f"{self.path}: tensor {name} has dtype {code}, which load_pretrained does not read.")
        return _DTYPES[code]

    def nbytes(self, name) -> int:
        lo, hi = self.header[name]["data_offsets"]
        return hi - lo

    def read(self, name, dim: Optional[int] = None, lo: int = 0, hi: Optional[int] = None) -> torch.Tensor:
        """The block [lo, hi) of `name` along `dim` (the whole tensor when dim is None), as a new CPU tensor."""
        shape = self.shape(name)
        dtype = self.dtype(name)
        start = self.base + self.header[name]["data_offsets"][0]
        if dim is None or not shape:
            dim, lo, hi = (0, 0, shape[0]) if shape else (None, 0, 0)
        out_shape = list(shape)
        if dim is not None:
            out_shape[dim] = hi - lo
        out = torch.empty(out_shape, dtype=dtype)
        buf = memoryview(out.view(torch.uint8).numpy() if out.dim() else out.reshape(1).view(torch.uint8).numpy())
        buf = buf.cast("B")
        if dim is None:
            self._read_at(start, buf)
            return out
        item = out.element_size()
        inner = math.prod(shape[dim + 1:]) * item
        outer = math.prod(shape[:dim])
        chunk, row = (hi - lo) * inner, shape[dim] * inner
        if chunk:
            for o in range(outer):
                self._read_at(start + o * row + lo * inner, buf[o * chunk:(o + 1) * chunk])
        return out

    def _read_at(self, offset, view):
        self.f.seek(offset)
        got = 0
        while got < len(view):
            n = self.f.readinto(view[got:])
            if not n:
                raise OasesError(f"{self.path}: file ends early (truncated checkpoint?)")
            got += n


def _checkpoint_files(folder: Path) -> dict:
    """{tensor name: file} for a save_pretrained folder (one model.safetensors, or shards + index)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: folder / v for k, v in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.exists():
        found = sorted(p.name for p in folder.glob("*.safetensors"))
        if len(found) != 1:
            raise OasesError(f"{folder}: no model.safetensors or model.safetensors.index.json (found {found}). Fix: "
                             "pass a folder written by save_pretrained(..., safe_serialization=True).")
        single = folder / found[0]
    f = _SafetensorsFile(single)
    try:
        return {k: single for k in f.header}
    finally:
        f.close()


def _blocks(dim, rank, d, pieces, size):
    """(source lo, hi, destination offset) of rank's block along `dim`, per piece for fused weights
    (shard_tensor's layout: rank's block of each piece, concatenated)."""
    sizes = list(pieces) if pieces else [size]
    out, start, dst = [], 0, 0
    for s in sizes:
        step = s // d
        out.append((start + rank * step, start + (rank + 1) * step, dst))
        start += s
        dst += step
    return out


@torch.no_grad()
def load_pretrained(module, folder, *, strict: bool = True) -> LoadReport:
    """Fill the compiled model's shards from a Hugging Face checkpoint folder (save_pretrained output:
    safetensors, one file or sharded with an index json). Each rank reads only its slices of sharded
    tensors and the replicated tensors whole, by byte range: no rank materialises the full model. Tied
    keys HF omits (lm_head.weight) are filled from the key they alias. Call on every rank."""
    folder = Path(folder)
    files = _checkpoint_files(folder)
    layout = shard_layout(module)
    own = module._boundary.local_state_dict()  # plain shards under the state_dict keys (oases_fx.boundary)
    by_id = {}
    for key, t in own.items():
        by_id.setdefault(id(t), []).append(key)
    report = LoadReport()
    missing, done, handles = [], set(), {}

    def handle(path):
        if path not in handles:
            handles[path] = _SafetensorsFile(path)
        return handles[path]

    try:
        for path in sorted(set(files.values())):
            f = handle(path)
            report.checkpoint_bytes += sum(f.nbytes(k) for k in f.header)
        for key, t in own.items():
            src = key if key in files else next((a for a in by_id[id(t)] if a in files), None)
            if src is None:
                missing.append(key)
                continue
            if src != key:
                report.aliases[key] = src
            if id(t) in done:
                continue
            f = handle(files[src])
            full_shape = f.shape(src)
            spec = layout.get(key)
            want = tuple(spec[2]) if spec else tuple(t.shape)
            if full_shape != want:
                raise OasesError(f"load_pretrained: {src} has shape {full_shape} in {folder}, the model expects "
                                 f"{want}. Fix: load the checkpoint of this model's config.")
            if spec is None:
                parts = [(f.read(src), None, 0)]
            else:
                dim, pieces, _, rank, d = spec
                parts = [(f.read(src, dim, lo, hi), dim, dst) for lo, hi, dst in _blocks(dim, rank, d, pieces,
                                                                                       full_shape[dim])]
            for block, dim, dst in parts:
                n = block.numel() * block.element_size()
                report.bytes_read += n
                report.largest_read = max(report.largest_read, n)
                (t if dim is None else t.narrow(dim, dst, block.shape[dim])).copy_(block)
            del parts
            done.add(id(t))
    finally:
        for f in handles.values():
            f.close()
    if missing and strict:
        raise OasesError(f"load_pretrained: {len(missing)} tensors of the model are not in {folder} (nor any key tied "
                         f"to them): {missing[:6]}. Fix: pass the save_pretrained folder of this model, or "
                         "strict=False to leave them as they are." + moe.checkpoint_hint(missing, files, own))
    return report


def shard_layout(module) -> dict:
    """{state-dict key: (dim, pieces, full shape, shard index, degree)} for this rank's sharded tensors."""
    m = graph_meta(module.graphs.gm)
    tp, tp_rank = module._info.tp, module._info.tp_rank
    out = {}
    for key, (dim, pieces, full_shape) in m.sharded_params.items():
        d = m.param_degree.get(key, tp)
        out[key] = (dim, pieces, full_shape, tp_rank % d, d)
    return out
