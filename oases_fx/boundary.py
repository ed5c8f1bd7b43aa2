"""DTensor parameters at the boundary, plain local tensors inside.

The compiled program reads and writes this rank's shards as plain tensors (what it was traced and
compiled against). What the user touches -- ``model.parameters()``, ``named_parameters()``,
``state_dict()``, the gradients the optimizer reads -- are DTensors on the mesh's "tp" axis that wrap
the *same storage*, so torch's own functions see the global tensor:

    compiled program:  plain shard  W_r            (an nn.Parameter of the traced GraphModule)
    user / optimizer:  DTensor(W_r, mesh["tp"], placement, global shape)   same storage, no copy

Placements, per parameter (``gm.meta["oases"]``: ``sharded_params``, ``param_degree``):

* not sharded                            -> Replicate()
* sharded along ``dim``                  -> Shard(dim)
* fused pieces (q/k/v) sharded per piece -> _StridedShard(dim, split_factor=#pieces): rank r holds
  chunk r of every piece, which is exactly DTensor's strided layout (equal pieces only)
* fused pieces of unequal sizes (grouped-query q/k/v) -> Shard(dim): right shapes, so norms and
  optimizers are exact, but no placement describes the layout: state_dict()/DCP raise an OasesError
  (full_state_dict() works), explain() notes it
* region of TMP degree 1                 -> Replicate()
* regions of one TMP degree 1 < d < tp   -> every parameter lives on the tp axis unflattened to (tp/d, d)
  (tp ranks [c*d, (c+1)*d) hold shards 0..d-1): degree d is (Replicate(), Shard(dim)), full degree
  (Shard(dim), Shard(dim)) -- (c, s) holds chunk c*d + s, its tp rank --, fused pieces the strided
  equivalents; one mesh for all, because clip_grad_norm_ stacks the per-parameter norms

Gradients: the DTensor's ``.grad`` is the user's gradient; the plain parameter's ``.grad`` is autograd's
(and DDP's) working buffer, set only while a backward runs, on the same storage. Two steps per backward,
none per parameter hook:

* start (a pre-hook on the grad_fn of each program output, registered per forward): each plain ``.grad``
  becomes the DTensor gradient's local tensor, or None where the user cleared it (zero_grad), so autograd
  accumulates into the user's gradient in place (micro-batches without zero_grad add up);
* end (one engine callback, queued to run after DDP's own finalize callback): each plain ``.grad`` is wrapped
  as the DTensor's ``.grad`` without copy where it is a new tensor (DTensor's internal constructor with the
  parameter's cached spec), and the plain ``.grad`` is set to None (nothing held twice between steps).

Data parallelism ("dp" axis): torch's DistributedDataParallel over the plain parameters and the dp process
group runs the compiled program (``call``), so DDP's C++ reducer buckets the gradients (25 MB, its default),
starts each bucket's all-reduce as soon as the bucket's last gradient is accumulated, averages over dp and
writes the averages back into the plain ``.grad`` (the DTensor gradients' storage) in its finalize callback;
``module.no_sync()`` is DDP's no_sync (the forward must run inside it, as with DDP): no dp traffic, and the
next synchronised backward reduces the accumulated gradient (which lives in the same buffer), once.
``register_comm_hook`` is DDP's (compression, counting). Dynamo's DDPOptimizer, which would split a graph
compiled inside DDP's forward at bucket boundaries, is switched off for the program's calls
(``_compat.no_ddp_graph_split``): the compiled program stays one graph for oases_fx's schedule. The
compiled backward is one autograd node that returns every gradient at once, so the buckets' all-reduces
start together when it ends (overlapping each other and the host's remaining work, not the backward's
compute): what DDP itself does with torch.compile when DDPOptimizer is off.

With ``dp_reduce="graph"`` there is no DDP: the compiled backward graph averages the gradients itself
(passes/dp_reduce.py), so the plain ``.grad`` autograd accumulates is already the dp average. ``no_sync()``
makes the next forwards run the program variant compiled without the dp all-reduce; the first synchronised
forward after such a backward runs the "acc" variant, which reads the accumulated gradients (pointed to by
its buffers for the call) and returns the average of accumulated + new: its backward starts with the plain
``.grad`` None, so autograd does not add the accumulated gradient a second time, and the end wraps the new
tensor as the DTensor's ``.grad``.

State dicts and DCP: DCP describes a rank's data as one rectangular chunk per tensor, which the strided
layout is not. So ``state_dict()`` returns, for a strided parameter, a Shard(dim) DTensor (a copy made
by redistribution, at checkpoint time only); ``load_state_dict`` redistributes it back. The optimizer's
moments of such a parameter are DTensors with the strided placement too: the first ``step()`` of any
optimizer holding one (also the step get_state_dict/set_state_dict take to initialise the state)
registers the same two conversions on that optimizer's ``state_dict`` / ``load_state_dict``.
"""
from __future__ import annotations

import contextlib
import functools
import weakref

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from oases_fx import _compat
from oases_fx import direct_call as _direct_call
from oases_fx.errors import OasesError

class _Shell(nn.Module):
    """One submodule path of the original model; holds its DTensor parameters and plain buffers.
    Indexable as the container it stands for (``model.model.layers[0]``, ``[-1]``, ``len()``, iteration
    over the children), as an nn.ModuleList / ModuleDict is."""

    def __getitem__(self, key):
        mods = self._modules
        if isinstance(key, slice):
            return list(mods.values())[key]
        name = str(key)
        if isinstance(key, int) and not isinstance(key, bool) and key < 0:
            name = str(len(mods) + key)
        if name in mods:
            return mods[name]
        raise (IndexError if isinstance(key, int) else KeyError)(
            f"{key!r}: this submodule of the compiled model has the children {list(mods)[:8]}"
            + (" ..." if len(mods) > 8 else ""))

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def __bool__(self):  # a module is true, as nn.Module is (not "no children")
        return True


class _Entry:
    __slots__ = ("names", "plain", "param", "strided", "contiguous", "unequal", "__weakref__")

    def __init__(self, names, plain, param, strided, contiguous):
        self.names, self.plain, self.param, self.unequal = names, plain, param, False
        self.strided = strided  # the placements are strided (needs a conversion for DCP)
        self.contiguous = contiguous  # the DCP-compatible placements of the same tensor (== param's if not strided)


def tp_mesh(mesh):
    """The 1-D "tp" DeviceMesh of this rank (the mesh itself when it is 1-D)."""
    names = tuple(mesh.mesh_dim_names or ())
    return mesh if len(names) == 1 else mesh["tp"]


def _contiguous_stride(shape):
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= s
    return tuple(reversed(stride))


class Boundary:
    """Registers DTensor parameters (and the plain buffers) on `module`, mirroring the traced
    GraphModule's names; owns the gradient hand-over and (on a "dp" axis) torch's DDP over the plain shards."""

    def __init__(self, module: nn.Module, gm, mesh, info, *, dp_reduce: str = "ddp", dp_bucket_mb: float = 25.0):
        self.info = info
        self.mesh = tp_mesh(mesh)
        self._armed = None  # id of the backward (graph task) whose start was handled; None between backwards
        self._handed_out: list = []  # (weakref to a Shard(dim) copy state_dict() returned, its version, entry)
        m = gm.meta["oases"]
        sharded, degree = m.get("sharded_params", {}), m.get("param_degree", {})
        self._sub_meshes = {}
        self.notes = m.setdefault("notes", [])
        self._layout([degree.get(n, info.tp) for n in sharded])
        self.entries: dict = {}  # id(plain parameter) -> _Entry
        self.by_name: dict = {}  # every parameter name (tied aliases too) -> _Entry
        for name, plain in gm.named_parameters(remove_duplicate=False):
            e = self.entries.get(id(plain))
            if e is None:
                e = self._make(name, plain, sharded.get(name), degree.get(name, info.tp))
                self.entries[id(plain)] = e
            e.names.append(name)
            self.by_name[name] = e
            _shell(module, name).register_parameter(name.rpartition(".")[2], e.param)
        # (the shell's parameter dict, leaf name, the registered Parameter, full name): read every call
        self._registered = tuple((_shell(module, n)._parameters, n.rpartition(".")[2], e.param, n)
                                 for n, e in self.by_name.items())
        self.buffers = dict(gm.named_buffers(remove_duplicate=False))
        persistent = _persistent_buffer_names(gm)
        for name, b in self.buffers.items():
            _shell(module, name).register_buffer(name.rpartition(".")[2], b, persistent=name in persistent)
        self.keys = list(module.state_dict(keep_vars=True))
        self._pairs = [(e.plain, e.param) for e in self.entries.values() if e.plain.requires_grad]
        # frozen at compile time: the program computes no gradient for them (and may have left out the
        # collectives such a gradient needs), so unfreezing one after compile is an error, not a no-op
        self._frozen = [(name, e.param) for name, e in self.by_name.items() if not e.plain.requires_grad]
        self._grads_on = True
        self._hooks = [_GradHandover(self)]  # .remove() switches the gradient hand-over off (benchmarks)
        # on a "dp" axis: "ddp" (torch's DDP runs the program) or "graph" (the program's backward reduces; dp variants)
        self.dp_mode = dp_reduce if info.dp_group is not None and self._pairs else None
        self._dp_bucket_mb = dp_bucket_mb
        self._ddp = self._make_ddp() if self.dp_mode == "ddp" else None
        self._sync = True  # dp_reduce="graph": False inside no_sync()
        self._unsynced = False  # dp_reduce="graph": gradients were accumulated by a no_sync backward since the last sync
        self._armed_mode = None  # the dp variant of the backward now running ("sync", "no_sync", "acc")
        _compat.install_found_inf_reduce()  # GradScaler: an inf on one rank's shard skips the step on every rank
        # full (unsharded) tensors given to load_state_dict become this rank's DTensor layout (HF-style loading)
        module.register_load_state_dict_pre_hook(lambda *a: self._load_state_dict_pre_hook(*a))  # a function
        if any(e.strided or e.unequal for e in self.entries.values()):
            module.register_state_dict_post_hook(lambda *a: self._state_dict_post_hook(*a))  # functions, not methods
            for e in self.entries.values():
                if e.strided or e.unequal:
                    _STRIDED[id(e.param)] = weakref.ref(e)
            _install_optimizer_hook()

    # --- construction -------------------------------------------------------------------------
    def _layout(self, degrees):
        """One mesh for every parameter (so torch's clip_grad_norm_ can stack their norms): the 1-D tp
        axis, or with regions of one TMP degree 1 < d < tp the tp axis unflattened to (tp/d, d). Degree 1
        is Replicate on either. Two or more such degrees: a (tp/d, d) mesh per degree (noted)."""
        tp = self.info.tp
        mids = sorted({d for d in degrees if 1 < d < tp})
        self.common = None
        if len(mids) == 1:
            self.common = self._sub_mesh(mids[0])
        elif len(mids) > 1:
            self.notes.append(f"parameters of regions at TMP degrees {mids} live on different DTensor meshes: "
                              "torch.nn.utils.clip_grad_norm_ over all of them raises (mixed meshes); use one "
                              "degree below the full TMP degree to clip with torch's function")

    def _placements(self, spec, d):
        """(mesh, placements, DCP-compatible placements) of one parameter."""
        tp = self.info.tp
        mesh = self.common if self.common is not None else (self.mesh if d in (1, tp) else self._sub_mesh(d))
        two_d = mesh.ndim == 2
        if spec is None or d == 1:
            rep = (Replicate(),) * mesh.ndim
            return mesh, rep, rep
        dim, pieces, _ = spec
        k = len(pieces) if pieces and len(pieces) > 1 else 0
        if not two_d:
            return mesh, ((_compat.strided_shard(dim, k) if k else Shard(dim)),), (Shard(dim),)
        n = mesh.size(0)
        if d == tp:  # (c, s) holds chunk c*d + s = its tp rank
            pl = (_compat.strided_shard(dim, k), _compat.strided_shard(dim, k * n)) if k else (Shard(dim), Shard(dim))
            return mesh, pl, (Shard(dim), Shard(dim))
        return mesh, (Replicate(), _compat.strided_shard(dim, k) if k else Shard(dim)), (Replicate(), Shard(dim))

    def _make(self, name, plain, spec, d):
        if spec is not None:
            dim, pieces, full_shape = spec
            full_shape = tuple(full_shape)
            unequal = bool(pieces) and len(set(pieces)) > 1
        else:
            full_shape, unequal = tuple(plain.shape), False
        if unequal:  # no DTensor placement is this layout: Shard(dim) has the right shapes (norms, optimizers are exact)
            spec = (dim, None, full_shape)
        mesh, placements, contiguous = self._placements(spec, d)
        strided = any(_compat.is_strided_shard(p) for p in placements)
        local = plain.detach()  # shares storage and version counter with the compiled program's tensor
        dt = DTensor.from_local(local, mesh, placements, run_check=False, shape=torch.Size(full_shape),
                                stride=_contiguous_stride(full_shape))
        expect = _local_shape(dt)
        if tuple(expect) != tuple(plain.shape):
            raise OasesError(f"{name}: this rank's shard has shape {tuple(plain.shape)} but the DTensor layout "
                             f"{placements} of {full_shape} gives {tuple(expect)} (uneven split?).")
        param = nn.Parameter(dt, requires_grad=plain.requires_grad)
        if _compat.local_of(param).data_ptr() != plain.data_ptr():
            raise AssertionError(f"{name}: the DTensor parameter does not share the compiled program's storage")
        e = _Entry([], plain, param, strided, contiguous)
        e.unequal = unequal and (pieces, dim)
        if unequal:
            self.notes.append(f"{name}: fused weight of unequal pieces {list(pieces)}: a Shard({dim}) DTensor for "
                              "clipping and optimizers; state_dict()/DCP raise (use full_state_dict())")
        return e

    def _sub_mesh(self, d):
        if d not in self._sub_meshes:
            n = self.info.tp // d
            self._sub_meshes[d] = _compat.unflatten_mesh_dim(self.mesh, 0, (n, d), (f"tp_rep{d}", f"tp_shard{d}"))
        return self._sub_meshes[d]

    # --- calling the program; gradients -------------------------------------------------------
    def _make_ddp(self):
        return _compat.data_parallel(_PlainParams([p for p, _ in self._pairs]), self.info.dp_group,
                                     bucket_cap_mb=self._dp_bucket_mb)

    def call(self, program, args, kwargs):
        """Run the compiled program (`program.compiled`; through DDP, or the dp variant the no_sync state asks
        for, on a "dp" axis) and arm the start of its backward."""
        for params, leaf, p, name in self._registered:
            if params.get(leaf) is not p:
                self._replaced(name, params.get(leaf))
        if self._frozen:
            unfrozen = [name for name, p in self._frozen if p.requires_grad]
            if unfrozen:
                from oases_fx.errors import InputError

                raise InputError(
                    f"{len(unfrozen)} parameter(s) were frozen (requires_grad=False) when the model was compiled "
                    f"and require grad now: {', '.join(unfrozen[:5])}{' ...' if len(unfrozen) > 5 else ''}. The "
                    "compiled program computes no gradient for them, so they would silently never train. Fix: "
                    "set requires_grad on the model before oases_fx.compile (freezing after compile works: their "
                    "gradients are dropped)."
                )
        mode = "sync"
        if self._ddp is not None:
            with _compat.no_ddp_graph_split():
                out = self._ddp(_direct_call.of(program), args, kwargs)
        elif self.dp_mode == "graph":
            mode = self._graph_mode()
            out = self._call_variant(program, mode, args, kwargs)
        else:
            out = _direct_call.of(program)(*args, **kwargs)  # torch.compile's call less its wrapping
        if self._grads_on and torch.is_grad_enabled():
            start = self._backward_start if mode == "sync" else functools.partial(self._backward_start, mode=mode)
            nodes = []  # the outputs share the program's backward node: one hook per node, not per output
            for t in _tensors(out):
                fn = t.grad_fn
                if fn is not None and fn not in nodes:
                    nodes.append(fn)
                    fn.register_prehook(start)
        return out

    # --- dp_reduce="graph": which variant of the program runs (passes/dp_reduce.py) -------------------
    def _graph_mode(self) -> str:
        """"no_sync" inside no_sync(); "acc" for the first synchronised call after no_sync backwards left
        unreduced gradients (they become inputs of its reduction); else "sync". Decided at the forward, as DDP."""
        if not torch.is_grad_enabled():
            return "sync"
        if not self._sync:
            return "no_sync"
        if self._unsynced:
            if any(param.grad is not None for _, param in self._pairs):
                return "acc"
            self._unsynced = False  # cleared by zero_grad(set_to_none=True): nothing to reduce
        return "sync"

    def _call_variant(self, program, mode, args, kwargs):
        if mode == "sync":
            return _direct_call.of(program)(*args, **kwargs)
        variant = program.variant(mode)
        if mode == "no_sync":
            return _direct_call.of(variant)(*args, **kwargs)
        from oases_fx.meta import graph_meta

        buffers, names = variant.gm._buffers, graph_meta(variant.gm).dp_acc
        for name, buf in names.items():  # the accumulated gradients, read as inputs (saved for the backward)
            e = self.by_name[name]
            cur = e.param.grad
            buffers[buf] = _compat.local_of(cur) if cur is not None else torch.zeros_like(e.plain)
        try:
            return variant.compiled(*args, **kwargs)
        finally:
            for buf in names.values():  # held by the autograd graph until its backward, not by the module
                buffers[buf] = None

    @staticmethod
    def _replaced(name, now):
        """A registered parameter is no longer the one the compiled program's shard stands behind: FSDP's
        fully_shard (around this module or a parent) swaps every parameter for its own, an assignment
        `module.weight = nn.Parameter(...)` one. The program would keep reading and training its own shard,
        the optimizer the new parameter: training would silently do nothing."""
        from oases_fx.errors import InputError

        what = "removed" if now is None else f"replaced by another {type(now).__name__}"
        raise InputError(
            f"parameter {name!r} of the compiled model was {what} after oases_fx.compile: the compiled program "
            "reads and trains the shards it registered, so the new parameter would silently never be read, and "
            "an optimizer over it would train nothing. This is what FSDP's fully_shard (on this module or a "
            "parent) or assigning a new nn.Parameter does. Fix: keep the parameters compile() registered; load "
            "weights with model.load_state_dict(...) or torch.distributed.checkpoint; for data parallelism pass a "
            "('dp', 'tp') mesh to oases_fx.compile (gradients averaged over 'dp' by DDP, or inside the backward "
            "with dp_reduce='graph') instead of wrapping the compiled module in fully_shard.")

    def _backward_start(self, grad_outputs, mode="sync"):
        """Before any gradient of this backward is accumulated: the plain .grad is the user's gradient (for
        the "acc" variant None: the backward returns the reduced sum of the accumulated and the new gradient)."""
        task = _compat.current_backward_id()
        if task == self._armed:
            return None
        self._armed = task
        self._armed_mode = mode
        local_of = _compat.local_of
        if mode == "acc":
            for plain, _ in self._pairs:
                if plain.grad is not None:  # (setting .grad costs more than reading it)
                    plain.grad = None
        else:
            for plain, param in self._pairs:
                cur = param.grad
                if cur is not None:
                    plain.grad = local_of(cur)
                elif plain.grad is not None:
                    plain.grad = None
        # DDP queues its finalize (the averages written back) when its last bucket is ready, later in this
        # backward: callbacks run in order, so the hand-over queues itself again from the engine's callback
        _compat.queue_backward_callback(self._after_ddp if self._ddp is not None else self._backward_end)
        return None

    def _after_ddp(self):
        _compat.queue_backward_callback(self._backward_end)

    def _backward_end(self):
        """After the backward (and DDP's finalize): the DTensors' .grad read the plain gradients, no copy."""
        self._armed = None
        if self.dp_mode == "graph":
            self._unsynced = self._armed_mode == "no_sync"  # left for the next synchronised backward to reduce
        local_of, wrap = _compat.local_of, _make_dtensor()
        for plain, param in self._pairs:
            g = plain.grad
            if g is None:
                continue
            plain.grad = None
            if not param.requires_grad:  # frozen after compile: no gradient, as for the eager model
                continue
            cur = param.grad
            if cur is None or local_of(cur) is not g:  # new, or accumulated out of place (create_graph=True)
                param.grad = wrap(g, param._spec)

    def no_sync(self):
        """No dp all-reduce in backward passes whose forward runs inside (DDP's no_sync; with
        dp_reduce="graph" the program variant compiled without it); nothing to skip without a "dp" axis."""
        if self._ddp is not None:
            return self._ddp.no_sync()
        return self._no_sync_graph() if self.dp_mode == "graph" else contextlib.nullcontext()

    @contextlib.contextmanager
    def _no_sync_graph(self):
        old, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = old

    def register_comm_hook(self, state, hook) -> None:
        """DDP's register_comm_hook (torch.distributed.algorithms.ddp_comm_hooks): how each dp bucket is
        reduced. Only with a "dp" axis and dp_reduce="ddp"; call before the first backward."""
        if self.dp_mode == "graph":
            raise OasesError("register_comm_hook: with dp_reduce='graph' the dp all-reduce is inside the compiled "
                             "backward graph, where DDP's comm hooks do not run. Fix: compile with dp_reduce='ddp' "
                             "to reduce through a comm hook (compression, custom reductions).")
        if self._ddp is None:
            raise OasesError("register_comm_hook: this model has no 'dp' mesh axis (no data-parallel reduction)")
        self._ddp.register_comm_hook(state, hook)

    # --- .to(dtype) / .half() after compile (OasesModule._apply) -----------------------------------
    @torch.no_grad()
    def apply(self, fn, module) -> None:
        """Convert the plain shards in place (the compiled program's Parameter objects stay), re-wrap each
        DTensor parameter around its converted shard (the same Parameter object, so an optimizer built
        before keeps it: torch.utils.swap_tensors) and convert the buffers."""
        for e in self.entries.values():
            new = fn(e.plain)
            if new is e.plain:
                continue
            e.plain.data = new
            dt = DTensor.from_local(e.plain.detach(), e.param.device_mesh, e.param.placements, run_check=False,
                                    shape=e.param.shape, stride=e.param.stride())
            torch.utils.swap_tensors(e.param, nn.Parameter(dt, requires_grad=e.plain.requires_grad))
        for name, b in list(self.buffers.items()):
            nb = fn(b)
            if nb is not b:
                self.buffers[name] = nb
                _shell(module, name)._buffers[name.rpartition(".")[2]] = nb
        if self._ddp is not None:  # DDP's buckets are built for the old dtype / device
            self._ddp = self._make_ddp()

    # --- plain views for oases_fx's own code -----------------------------------------------------
    def local_state_dict(self) -> dict:
        """state_dict() with the plain local tensors (the compiled program's own) in place of the DTensors:
        same keys, same order (tied names and persistent buffers included)."""
        return {k: (self.by_name[k].plain if k in self.by_name else self.buffers[k]) for k in self.keys}

    def local_tensors(self) -> dict:
        """{name: plain tensor} of every parameter name (tied aliases too) and every buffer (for rebinding)."""
        out = {name: e.plain for name, e in self.by_name.items()}
        out.update(self.buffers)
        return out

    def local_grads(self) -> dict:
        """{parameter name: local gradient or None} (deduplicated as named_parameters())."""
        out, seen = {}, set()
        for name, e in self.by_name.items():
            if id(e) in seen:
                continue
            seen.add(id(e))
            g = e.param.grad
            out[name] = None if g is None else _compat.local_of(g)
        return out

    # --- state dicts: strided placements <-> Shard for DCP --------------------------------------
    def _state_dict_post_hook(self, module, state_dict, prefix, local_metadata):
        for name, e in self.by_name.items():
            key = prefix + name
            v = state_dict.get(key)
            if e.unequal and isinstance(v, DTensor) and not isinstance(v, nn.Parameter):
                raise _unequal_error(key, e)
            if e.strided and isinstance(v, DTensor) and not isinstance(v, nn.Parameter):  # keep_vars=False
                c = _compat.redistribute(v, v.device_mesh, e.contiguous)
                state_dict[key] = c
                self._handed_out = [r for r in self._handed_out if r[0]() is not None]
                self._handed_out.append((weakref.ref(c), _compat.local_of(c)._version, e))

    def sync_handed_out(self) -> None:
        """Write back what was loaded *in place* into the Shard(dim) copies state_dict() handed out.

        For a plain module, ``dcp.load(model.state_dict())`` without a load_state_dict afterwards works:
        the state dict shares the parameters' storage. A strided parameter's entry is a copy, so without
        this the load would be silently lost for the fused q/k/v weights. Called by OasesModule.forward
        (one empty-list test per step when nothing was handed out); ranks agree on what changed because
        DCP loads on every rank."""
        if self._handed_out:  # (no_grad only then: entering it costs more than the test)
            with torch.no_grad():
                self._sync_handed_out()

    def _sync_handed_out(self) -> None:
        keep = []
        for ref, version, e in self._handed_out:
            c = ref()
            if c is None:
                continue
            local = _compat.local_of(c)
            if local._version != version:  # written in place since it was handed out (dcp.load)
                back = _compat.redistribute(c, e.param.device_mesh, e.param.placements)
                e.plain.copy_(_compat.local_of(back))
                version = local._version
            keep.append((ref, version, e))
        self._handed_out = keep

    def _load_state_dict_pre_hook(self, module, state_dict, prefix, *args):
        self._handed_out = []  # an explicit load_state_dict (set_state_dict) decides the values
        for name, e in self.by_name.items():
            v = state_dict.get(prefix + name)
            if (isinstance(v, torch.Tensor) and not isinstance(v, DTensor)
                    and tuple(v.shape) == tuple(e.param.shape)):
                # a full tensor (an unsharded model's state_dict, safetensors): DTensor's copy_ refuses a plain
                # tensor ("mixed torch.Tensor and DTensor"); slice this rank's part as load_full_state_dict does
                if e.unequal:
                    raise _unequal_error(prefix + name, e)
                mesh = e.param.device_mesh
                full = DTensor.from_local(v.detach().to(e.plain.device), mesh, (Replicate(),) * mesh.ndim,
                                          run_check=False)
                state_dict[prefix + name] = _compat.redistribute(full, mesh, e.param.placements)
                continue
            if e.strided and isinstance(v, DTensor) and tuple(v.placements) != tuple(e.param.placements):
                state_dict[prefix + name] = _compat.redistribute(v, e.param.device_mesh, e.param.placements)


@functools.cache
def _make_dtensor():
    """_compat.dtensor_with_spec_fn(), made once per process."""
    return _compat.dtensor_with_spec_fn()


class _PlainParams(nn.Module):
    """What DDP wraps: the compiled program's plain shards (deduplicated), and a forward that runs the
    program it is given (DDP's forward prepares its reducer around it)."""

    def __init__(self, params):
        super().__init__()
        self.params = nn.ParameterList(params)

    def forward(self, program, args, kwargs):
        return program(*args, **kwargs)


class _GradHandover:
    """Stands where the per-parameter hook handles were (``Boundary._hooks``): ``remove()`` switches the
    gradient hand-over off, so gradients stay on the plain parameters (benchmarks/rank_bench.py,
    boundary=False)."""

    def __init__(self, boundary):
        self._boundary = weakref.ref(boundary)

    def remove(self):
        b = self._boundary()
        if b is not None:
            b._grads_on = False


def _tensors(out):
    """The tensors of a program's output (a tensor, tuple/list/dict, or a Hugging Face ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return (out,)
    vals = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else ()
    return [t for v in vals for t in _tensors(v)]


def _unequal_error(key, e, what=""):
    pieces, dim = e.unequal
    return OasesError(
        f"state_dict: {what}{key} is a fused weight of unequal pieces {list(pieces)} along dim {dim} (grouped-query "
        "q/k/v?), held per piece; no DTensor placement describes that layout, so it cannot go into a DCP checkpoint "
        "or a sharded state_dict (training, clipping and optimizers are exact). Fix: checkpoint with "
        "model.full_state_dict() / load_full_state_dict(), or keep q, k and v as separate nn.Linear layers.")


def _local_shape(dt):
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    return compute_local_shape_and_global_offset(dt.shape, dt.device_mesh, dt.placements)[0]


def _persistent_buffer_names(gm) -> set:
    out = set()
    for mod_name, mod in gm.named_modules(remove_duplicate=False):
        for leaf in mod._buffers:
            if leaf not in mod._non_persistent_buffers_set:
                out.add(f"{mod_name}.{leaf}" if mod_name else leaf)
    return out


def _shell(module: nn.Module, fqn: str) -> nn.Module:
    """The (created on demand) container module at `fqn`'s parent path."""
    mod = module
    path = fqn.rpartition(".")[0]
    for part in path.split(".") if path else ():
        child = mod._modules.get(part)
        if child is None:
            child = _Shell()
            mod.add_module(part, child)
        mod = child
    return mod


# --- optimizers holding strided parameters ------------------------------------------------------
_STRIDED: dict = {}  # id(DTensor parameter) -> weakref to its _Entry
_CHECKED = weakref.WeakKeyDictionary()  # optimizers already looked at
_HOOK = []


def _install_optimizer_hook():
    if not _HOOK:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        _HOOK.append(register_optimizer_step_pre_hook(_on_optimizer_step))


def _entries_by_index(opt):
    """{state index: _Entry} as Optimizer.state_dict numbers the parameters."""
    out, start, seen = {}, 0, set()
    for group in opt.param_groups:
        for i, p in enumerate(group["params"], start):
            if id(p) not in seen:
                seen.add(id(p))
                ref = _STRIDED.get(id(p))
                e = ref() if ref is not None else None
                if e is not None and e.param is p:
                    out[i] = e
        start += len(group["params"])
    return out


_MOMENTS_OUT = weakref.WeakKeyDictionary()  # optimizer -> [(weakref to a Shard(dim) copy of a moment, version, entry, key)]


@torch.no_grad()
def _sync_moments(opt) -> None:
    """As Boundary.sync_handed_out, for the optimizer state copies its state_dict() handed out (a
    ``dcp.load`` into ``opt.state_dict()`` without ``opt.load_state_dict``): written back before the step."""
    keep = []
    for ref, version, e, k in _MOMENTS_OUT.get(opt, ()):
        c = ref()
        if c is None:
            continue
        local = _compat.local_of(c)
        target = opt.state.get(e.param, {}).get(k)
        if local._version != version and isinstance(target, DTensor):
            back = _compat.redistribute(c, target.device_mesh, target.placements)
            _compat.local_of(target).copy_(_compat.local_of(back))
            version = local._version
        keep.append((ref, version, e, k))
    _MOMENTS_OUT[opt] = keep


def _on_optimizer_step(opt, args, kwargs):
    """Once per optimizer (one dict lookup per step after that): an optimizer holding a strided DTensor
    parameter converts that parameter's state to/from Shard(dim) in state_dict / load_state_dict."""
    if _MOMENTS_OUT.get(opt):
        _sync_moments(opt)
    if opt in _CHECKED:
        return
    _CHECKED[opt] = True
    if _entries_by_index(opt):
        opt.register_state_dict_post_hook(_optim_state_dict_post_hook)
        opt.register_load_state_dict_pre_hook(_optim_load_state_dict_pre_hook)


def _optim_state_dict_post_hook(opt, state_dict):
    state = state_dict["state"]
    for i, e in _entries_by_index(opt).items():
        if e.unequal and i in state:
            raise _unequal_error(e.names[0], e, "optimizer state of ")
        if i in state:
            state[i] = {k: _compat.redistribute(v, v.device_mesh, e.contiguous)
                        if isinstance(v, DTensor) and tuple(v.placements) == tuple(e.param.placements) else v
                        for k, v in state[i].items()}
            out = [r for r in _MOMENTS_OUT.get(opt, ()) if r[0]() is not None]
            for k, v in state[i].items():
                if isinstance(v, DTensor) and v is not opt.state[e.param].get(k):  # a copy was handed out
                    out.append((weakref.ref(v), _compat.local_of(v)._version, e, k))
            _MOMENTS_OUT[opt] = out
    return state_dict


def _optim_load_state_dict_pre_hook(opt, state_dict):
    _MOMENTS_OUT.pop(opt, None)  # an explicit load_state_dict decides the values
    state = state_dict["state"]
    for i, e in _entries_by_index(opt).items():
        if i in state:
            state[i] = {k: _compat.redistribute(v, e.param.device_mesh, e.param.placements)
                        if isinstance(v, DTensor) and v.dim() > 0 and tuple(v.placements) != tuple(e.param.placements)
                        else v for k, v in state[i].items()}
    return state_dict
