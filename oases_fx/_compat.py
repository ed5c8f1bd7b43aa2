"""The only module that touches private or version-dependent torch APIs (torch 2.11 and 2.13).

A torch upgrade should be this file's work alone.
"""
from __future__ import annotations

import torch

TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


def c10d_functional():
    """The functional collective ops namespace (all_reduce, wait_tensor)."""
    return torch.ops._c10d_functional


def is_all_reduce(node) -> bool:
    """An all-reduce issue node (Inductor's post-grad passes re-inplace it to all_reduce_)."""
    ops = torch.ops._c10d_functional
    return node.op == "call_function" and node.target in (ops.all_reduce.default, ops.all_reduce_.default)


def is_wait(node) -> bool:
    return node.op == "call_function" and node.target is torch.ops._c10d_functional.wait_tensor.default


def group_name(group) -> str:
    """The registered name of a ProcessGroup, which functional collectives take as a string."""
    return group.group_name


def aot_autograd(**kwargs):
    from torch._dynamo.backends.common import aot_autograd as _aot

    return _aot(**kwargs)


def inductor_compile_fx(gm, example_inputs, *, inner_compile, config_patches=None):
    """Inductor's entry point, with our wrapper around its per-graph (fw/bw) compiler.
    ``config_patches`` reach the backward graph too: AOTAutograd compiles it lazily, at the first
    backward(), outside any ``with config.patch(...)`` around this call."""
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, inner_compile=inner_compile, config_patches=config_patches)


def inductor_choices_base():
    """Inductor's heuristics class (torch._inductor.choices.InductorChoices) if this torch lets us
    install a subclass for one compile (V.set_choices_handler), else None."""
    try:
        from torch._inductor.choices import InductorChoices
        from torch._inductor.virtualized import V
    except ImportError:
        return None
    if not hasattr(V, "set_choices_handler") or not hasattr(InductorChoices, "can_fuse"):
        return None
    return InductorChoices


def inductor_choices_handler(choices):
    """Context manager: Inductor uses ``choices`` (an InductorChoices instance) inside it."""
    from torch._inductor.virtualized import V

    return V.set_choices_handler(choices)


def is_collective_or_wait_kernel(snode) -> bool:
    """An Inductor scheduler node that issues a functional collective or waits for one."""
    from torch._inductor import ir

    node = getattr(snode, "node", None)
    kinds = tuple(k for k in (getattr(ir, "_CollectiveKernel", None), getattr(ir, "_WaitKernel", None)) if k)
    return bool(kinds) and isinstance(node, kinds)


def inductor_inner_compile():
    from torch._inductor.compile_fx import compile_fx_inner

    return compile_fx_inner


def make_boxed_func(fn):
    from torch._functorch.aot_autograd import make_boxed_func as _mbf

    return _mbf(fn)


def fake_tensor_prop(gm, *args):
    """Re-derive node.meta['val'] after a rewrite; raises where shapes no longer fit."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])


def default_partition():
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    return min_cut_rematerialization_partition


def no_autograd_cache():
    """Context manager switching AOTAutograd's compiled-graph cache off (torch._functorch.config
    .enable_autograd_cache; a no-op context where this torch has no such setting)."""
    import contextlib

    import torch._functorch.config as fcfg

    if not hasattr(fcfg, "enable_autograd_cache"):
        return contextlib.nullcontext()
    return fcfg.patch(enable_autograd_cache=False)


def fake_tensor_mode():
    """A FakeTensorMode for tracing a model whose weights are not allocated (meta-device init)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def is_fake_tensor(t) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def fake_mode_of(tensors):
    """The FakeTensorMode of the first FakeTensor among `tensors`, else None."""
    from torch._subclasses.fake_tensor import FakeTensor

    return next((t.fake_mode for t in tensors if isinstance(t, FakeTensor)), None)


# --- DTensor at the parameter boundary (oases_fx.boundary) ----------------------------------------
def strided_shard(dim: int, split_factor: int):
    """DTensor's _StridedShard(dim, split_factor): a rank holds chunk r of each of `split_factor`
    equal pieces of `dim` (the layout of a fused q/k/v weight sharded per piece). Private in 2.11 and 2.13."""
    from torch.distributed.tensor.placement_types import _StridedShard

    return _StridedShard(dim, split_factor=split_factor)


def is_strided_shard(placement) -> bool:
    from torch.distributed.tensor.placement_types import _StridedShard

    return isinstance(placement, _StridedShard)


def dtensor_with_spec(local: torch.Tensor, spec):
    """A DTensor over `local` with an existing DTensorSpec, no checks and no autograd node: DTensor's
    own internal constructor (what from_local ends in), used per step for gradients."""
    from torch.distributed.tensor import DTensor

    if _DTENSOR_NEW_IS_NATIVE:  # DTensor.__new__ is torch's C++ constructor (2.11, 2.13): skip __init__'s
        return DTensor.__new__(DTensor, local, spec, requires_grad=False)  # two no-op Python wrappers (2.6x)
    return DTensor(local, spec, requires_grad=False)


def _dtensor_new_is_native() -> bool:
    try:
        from torch.distributed.tensor import DTensor

        return DTensor.__new__ is getattr(torch.Tensor, "_dtensor__new__", None)
    except Exception:  # noqa: BLE001 - no distributed build
        return False


_DTENSOR_NEW_IS_NATIVE = _dtensor_new_is_native()


def dtensor_with_spec_fn():
    """dtensor_with_spec as one callable `make(local, spec)`, its import and branch done once: for loops
    over every parameter per step (oases_fx.boundary's gradient hand-over)."""
    from torch.distributed.tensor import DTensor

    if _DTENSOR_NEW_IS_NATIVE:
        new = DTensor.__new__
        return lambda local, spec: new(DTensor, local, spec, requires_grad=False)
    return lambda local, spec: DTensor(local, spec, requires_grad=False)


def drop_export_call_hooks(gm) -> int:
    """Remove the forward (pre-)hooks torch.export's ep.module() installs (its input-constraint check and
    nn.Module-input bookkeeping): they run eagerly on every call, outside the compiled program. oases_fx
    checks its inputs itself (oases_fx.inputs, oases_fx.agreement). Returns how many were removed."""
    n = len(gm._forward_pre_hooks) + len(gm._forward_hooks)
    gm._forward_pre_hooks.clear()
    gm._forward_hooks.clear()
    return n


def local_of(dt) -> torch.Tensor:
    """The DTensor's local tensor itself (not a view, no autograd)."""
    return dt._local_tensor


def queue_backward_callback(fn) -> None:
    """Run `fn` once when the current backward pass ends (what DDP's reducer uses)."""
    torch.autograd.Variable._execution_engine.queue_callback(fn)


def unflatten_mesh_dim(mesh, dim: int, sizes, names):
    """DeviceMesh._unflatten (private): split one mesh dim into several (for regions of TMP degree d < tp:
    (tp/d replicas, d shards))."""
    if not hasattr(mesh, "_unflatten"):
        from oases_fx.errors import OasesError

        raise OasesError(f"torch {torch.__version__} has no DeviceMesh._unflatten: parameters of regions below the "
                         "full TMP degree cannot be DTensors here. Fix: use plan='megatron' (every region at full "
                         "degree) or torch >= 2.13.")
    return mesh._unflatten(dim, tuple(sizes), tuple(names))


# --- capture: custom autograd.Functions (oases_fx.tracing) ------------------------------------------
def _call_signature(args, kwargs):
    """The arguments of one Function.apply as data: tensors (fake ones under export) become
    ("tensor", shape as ints, dtype, requires_grad), anything else stays itself."""
    def one(a):
        if isinstance(a, torch.Tensor):
            shape = []
            for d in a.shape:
                try:
                    shape.append(int(d))
                except Exception:  # a symbolic size: its example value
                    shape.append(int(getattr(getattr(d, "node", None), "hint", None) or 2))
            return ("tensor", tuple(shape), a.dtype, bool(a.requires_grad))
        return a

    return tuple(one(a) for a in args), {k: one(v) for k, v in kwargs.items()}


def recording_autograd_functions(calls: list):
    """Context manager: every torch.autograd.Function subclass applied inside it is appended to
    `calls` as (class, caller's "file:line", (args, kwargs) with tensors as
    ("tensor", shape, dtype, requires_grad)) and then runs as usual. torch.export non-strict (2.11,
    2.13) traces only such a Function's forward and keeps no trace of its backward, so capture
    must know one ran. Patches the public classmethod Function.apply for the duration."""
    import contextlib
    import sys

    Function = torch.autograd.Function
    original = Function.__dict__.get("apply")
    if not isinstance(original, classmethod):  # not this torch's layout: record nothing rather than break capture
        return contextlib.nullcontext(calls)

    def apply(cls, *args, **kwargs):
        f = sys._getframe(1)
        calls.append((cls, f"{f.f_code.co_filename}:{f.f_lineno}", _call_signature(args, kwargs)))
        return original.__func__(cls, *args, **kwargs)

    @contextlib.contextmanager
    def patched():
        Function.apply = classmethod(apply)
        try:
            yield calls
        finally:
            Function.apply = original

    return patched()


FORCE_REDISTRIBUTE_FALLBACK = False
"""Tests set this to exercise :func:`redistribute`'s fallback on a torch whose DTensor has no gap."""


def redistribute(dt, mesh, placements):
    """dt.redistribute(mesh, placements); where this torch cannot redistribute between the two layouts
    (_StridedShard <-> Shard: older releases raise NotImplementedError, torch 2.11 a ValueError
    "unable to be interpreted into a corresponding shard_order"), gather the full tensor ourselves
    and slice this rank's part locally (distribute_tensor with src_data_rank=None: no scatter).
    Checkpoint time only."""
    if not FORCE_REDISTRIBUTE_FALLBACK:
        try:
            return dt.redistribute(mesh, placements)
        except (NotImplementedError, RuntimeError, AssertionError, ValueError):
            pass
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(_full_tensor(dt), mesh, placements, src_data_rank=None)


def _full_tensor(dt) -> torch.Tensor:
    """The unsharded tensor of a DTensor laid out as oases_fx lays out parameters (boundary.py),
    without DTensor's redistribute (which is what failed). Every sharded mesh dim splits the same
    tensor dim; with coordinates (c, s, ...) over the sharded mesh dims a rank holds global chunk
    g = c*d + s ... of each of k equal pieces, concatenated (k = the first placement's
    split_factor for _StridedShard, else 1: plain Shard). All-gathers innermost first put the
    ranks' blocks in g order; the pieces are then put back together."""
    import torch.distributed as dist
    from torch.distributed.tensor import Replicate, Shard

    mesh = dt.device_mesh
    sharded = [(m, p) for m, p in enumerate(dt.placements) if not isinstance(p, Replicate)]
    if any(not (isinstance(p, Shard) or is_strided_shard(p)) for _, p in sharded) or len({p.dim for _, p in sharded}) > 1:
        raise NotImplementedError(f"cannot gather a DTensor placed {tuple(dt.placements)}")
    local = local_of(dt)
    t = local.contiguous()
    if not sharded:
        return t
    dim = sharded[0][1].dim
    k = int(getattr(sharded[0][1], "split_factor", 1)) if is_strided_shard(sharded[0][1]) else 1
    for m, _ in reversed(sharded):
        group = mesh.get_group(m)
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, t, group=group)
        t = torch.cat(parts, dim=dim)
    if k == 1:
        return t
    blocks = torch.chunk(t, t.shape[dim] // local.shape[dim], dim=dim)  # L_0 .. L_{N-1}
    pieces = [torch.chunk(blk, k, dim=dim) for blk in blocks]
    return torch.cat([pieces[g][j] for j in range(k) for g in range(len(blocks))], dim=dim)


def dynamo_wrapper_exceptions() -> tuple:
    """The exception types torch.compile wraps a backend's or a traced op's own exception in
    (the original is their __cause__)."""
    import torch._dynamo.exc as exc

    names = ("BackendCompilerFailed", "TorchRuntimeError", "InternalTorchDynamoError")
    return tuple(getattr(exc, n) for n in names if hasattr(exc, n))


def autocast_dtype(device_type: str):
    """The dtype torch.autocast uses on this device type now (torch.get_autocast_dtype, 2.4+)."""
    try:
        return torch.get_autocast_dtype(device_type)
    except Exception:
        return torch.bfloat16 if device_type == "cpu" else torch.float16


# --- data parallelism through torch's DDP (oases_fx.boundary) ----------------------------------------
def data_parallel(module, group, *, bucket_cap_mb: float = 25.0):
    """torch's DistributedDataParallel over `module`'s parameters and the dp process group, with the
    options oases_fx needs on torch 2.11 and 2.13: gradients copied into DDP's buckets and the averages
    copied back (gradient_as_bucket_view=False: the plain .grad is the user's DTensor gradient's
    storage, which a bucket view would overwrite at the next backward), every parameter used
    (find_unused_parameters=False), and no collective at construction where this torch allows it
    (init_sync=False: compile() already checked that every rank holds the same plan and shards)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    kwargs = dict(process_group=group, gradient_as_bucket_view=False, find_unused_parameters=False,
                  bucket_cap_mb=bucket_cap_mb)
    if "init_sync" in inspect.signature(DistributedDataParallel.__init__).parameters:
        kwargs["init_sync"] = False
    return DistributedDataParallel(module, **kwargs)


class no_ddp_graph_split:
    """Context manager: torch._dynamo.config.optimize_ddp=False while the compiled program runs inside
    DDP's forward. With it on (torch's default), Dynamo's DDPOptimizer splits a graph it compiles inside
    DDP.forward at DDP's bucket boundaries, one AOTAutograd graph per bucket: oases_fx's sub-batch
    schedule needs the whole program as one graph. Read only when Dynamo compiles (first call, a
    recompile), but set on every call: a recompile must not split either. A plain attribute swap
    (~10 us) rather than config.patch (~40 us)."""

    __slots__ = ("_old",)

    def __enter__(self):
        import torch._dynamo.config as dcfg

        self._old = dcfg.optimize_ddp
        dcfg.optimize_ddp = False
        return self

    def __exit__(self, *exc):
        import torch._dynamo.config as dcfg

        dcfg.optimize_ddp = self._old
        return False


def current_backward_id() -> int:
    """An id of the backward pass (autograd graph task) now running, -1 outside one (private in 2.11, 2.13)."""
    return torch._C._current_graph_task_id()


# --- bounded waiting: the failure channel (oases_fx.watchdog) ---------------------------------------
def default_store():
    """The default process group's c10d store (private: distributed_c10d._get_default_store, in
    2.11 and 2.13), or None where there is none (no process group, a fake one)."""
    import torch.distributed as dist

    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:
        return None


def dist_backend_error() -> tuple:
    """torch.distributed.DistBackendError (what NCCL and some gloo paths raise), as a tuple for isinstance."""
    import torch.distributed as dist

    cls = getattr(dist, "DistBackendError", None)
    return (cls,) if cls is not None else ()


# --- DTensor's view rules: the oracle the sharding rules are checked against (oases_fx.rules) -----
def _dtensor_view_ops():
    """(module _view_ops, Shard) of this torch, or raise NotImplementedError (private module:
    torch/distributed/tensor/_ops/_view_ops.py, the same names in 2.11 and 2.13)."""
    try:
        from torch.distributed.tensor import Shard
        from torch.distributed.tensor._ops import _view_ops
    except ImportError as e:
        raise NotImplementedError(f"DTensor's view rules are not importable in torch {torch.__version__}: {e}") from None
    for name in ("view_groups", "dim_maps", "propagate_shape_and_sharding"):
        if not hasattr(_view_ops, name):
            raise NotImplementedError(f"torch {torch.__version__} has no _view_ops.{name}")
    return _view_ops, Shard


def _dtensor_shard_through(rule, in_shape, dim: int, tp: int, strict: bool = True):
    """strict: DTensor's rule for aten.view (strict_view: never redistribute; an input it would
    have to redistribute is an error there, None here), as a TMP region needs."""
    v, Shard = _dtensor_view_ops()
    kw = {"strict_view": True} if strict else {}
    try:
        _, out = v.propagate_shape_and_sharding([Shard(dim)], tuple(int(s) for s in in_shape), rule, (tp,), **kw)
    except TypeError as e:
        if strict and "strict_view" in str(e):
            raise NotImplementedError(f"torch {torch.__version__}'s DTensor view rule has no strict_view") from None
        raise
    except RuntimeError:  # strict: "requires redistribution" / "Cannot (un)flatten unevenly sharded tensor"
        return None
    p = out[0]
    return p.dim if type(p) is Shard else None  # Replicate (a redistribute) or _StridedShard: no plain dim


def dtensor_view_shard(in_shape, out_shape, dim: int, tp: int, strict: bool = True):
    """The output dim on which DTensor's own view rule (view_groups, propagate_shape_and_sharding)
    keeps a Shard(dim) of a tensor of `in_shape` over `tp` ranks through a view to `out_shape`;
    None where it does not keep a plain Shard. strict=False: its rule for aten.reshape (which may
    redistribute). NotImplementedError where this torch lacks it."""
    v, _ = _dtensor_view_ops()
    return _dtensor_shard_through(v.view_groups(list(in_shape), list(out_shape)), in_shape, dim, tp, strict)


def dtensor_op_shard(op, x: torch.Tensor, args: tuple, dim: int, tp: int, strict: bool = True):
    """As dtensor_view_shard, for the aten view-like op `op` applied as op(x, *args) (x: a tensor
    of the global shape, meta is fine), through DTensor's dim map for it (_view_ops.dim_maps)."""
    v, _ = _dtensor_view_ops()
    aten = torch.ops.aten
    local_op = {
        aten.view.default: torch.Tensor.view, aten._unsafe_view.default: torch.Tensor.view,
        aten.reshape.default: torch.reshape, aten.expand.default: torch.Tensor.expand,
        aten.permute.default: torch.permute, aten.transpose.int: torch.transpose,
        aten.unsqueeze.default: torch.unsqueeze, aten.squeeze.dim: torch.squeeze, aten.squeeze.dims: torch.squeeze,
    }.get(op)
    if local_op is None or local_op not in v.dim_maps:
        raise NotImplementedError(f"DTensor has no dim map for {op} in torch {torch.__version__}")
    try:
        rule = v.dim_maps[local_op](x, *args)
    except TypeError as e:  # 2.11's squeeze map takes one dim, not a list (aten.squeeze.dims)
        raise NotImplementedError(f"DTensor's dim map for {op} in torch {torch.__version__}: {e}") from None
    return _dtensor_shard_through(rule, x.shape, dim, tp, strict)


def graph_codegen(graph):
    """An fx Graph's code generator (its pytree signature for an exported module: how the forward's
    args and kwargs map to placeholders and the output is unflattened). Private attribute
    ``Graph._codegen``, present in torch 2.11 and 2.13; oases_fx.layers copies it onto the graph
    that stitches the per-block pieces so the stitched program keeps the model's signature."""
    return graph._codegen


# --- calling a torch.compile'd GraphModule's compiled function directly (oases_fx.direct_call) ---------
def dynamo_frame_entries(code) -> list:
    """[(guard manager, compiled function's global name)] of dynamo's cache entries of `code` (the
    GraphModule forward's code object), newest first; [] where this torch lacks the API or an entry does
    not call exactly one compiled function. Private in 2.11 and 2.13: eval_frame's
    _debug_get_cache_entry_list, the entry's guard_manager, the transformed code calling a global named
    __compiled_fn_*."""
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        entries = _debug_get_cache_entry_list(code)
    except Exception:  # noqa: BLE001 - a torch without this debug API: no direct call
        return []
    out = []
    for entry in entries:
        names = [n for n in entry.code.co_names if n.startswith("__compiled_fn")]
        manager = getattr(entry, "guard_manager", None)
        if len(names) != 1 or manager is None or not hasattr(manager, "check"):
            return []
        out.append((manager, names[0]))
    return out


def direct_call_blocked() -> bool:
    """Whether torch.compile's own call must run (oases_fx.direct_call): global nn.Module hooks are
    registered (its module call runs them), the caller is being traced (dynamo, export, fx, jit: torch.compile
    inlines or refuses there), or a torch.compiler.set_stance other than "default" is active (e.g.
    "force_eager"). About 1 us. Private in 2.11 and 2.13: nn.modules.module's hook dicts, eval_frame._stance."""
    if not _BLOCKED:
        _blocked_init()
    m, is_fx, frame = _BLOCKED
    if (m._global_forward_pre_hooks or m._global_forward_hooks or m._global_backward_pre_hooks
            or m._global_backward_hooks):
        return True
    if torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch._C._get_tracing_state() is not None:
        return True
    if is_fx():
        return True
    stance = getattr(frame, "_stance", None)
    return stance is not None and getattr(stance, "stance", "default") != "default"


_BLOCKED: list = []


def _blocked_init() -> None:
    import torch.nn.modules.module as m
    from torch._dynamo import eval_frame
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing

    _BLOCKED[:] = [m, is_fx_symbolic_tracing, eval_frame]


def dynamo_disabled() -> bool:
    """torch._dynamo.config.disable: torch.compile'd callables run the eager code (read at capture only:
    the config module's attribute read costs ~5 us)."""
    return bool(torch._dynamo.config.disable)


def new_compile_generation() -> None:
    """What each call of a torch.compile'd function does on entry (dynamo's OptimizeContext on_enter):
    a new GenerationTracker generation, from which cudagraph trees tell a new invocation (and so a new
    iteration: the previous one's outputs may be overwritten). Private in 2.11 and 2.13."""
    from torch._dynamo.mutation_guard import GenerationTracker

    GenerationTracker.generation += 1


def has_compile_generation() -> bool:
    try:
        from torch._dynamo.mutation_guard import GenerationTracker

        return isinstance(GenerationTracker.generation, int)
    except (ImportError, AttributeError):
        return False


def install_found_inf_reduce() -> None:
    """GradScaler.unscale_ on DTensor gradients: every rank must see an inf/nan found on any rank.

    DTensor's handler of ``aten._amp_foreach_non_finite_check_and_unscale_`` reduces ``found_inf`` over
    the mesh dims the *first* gradient of the list is sharded on (torch/distributed/tensor/_dispatch.py,
    found_inf_reduce_handler, written for FSDP2 where every gradient has one placement). GradScaler
    passes all gradients of a device and dtype in one list, and a TP model mixes Replicate (norms,
    embeddings) and Shard gradients: with a Replicate one first nothing was reduced, so the rank whose
    shard held the inf skipped the step and the others took it (measured: parameters diverged across
    ranks). Installed once; reduces (max) over every mesh dim any gradient of the list is sharded on."""
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor.placement_types import Partial

    dispatcher = DTensor._op_dispatcher
    op = torch.ops.aten._amp_foreach_non_finite_check_and_unscale_.default
    handlers = getattr(dispatcher, "_custom_op_handlers", None)
    if not isinstance(handlers, dict):  # another torch layout: say so, do not fail every compile for it
        import logging

        logging.getLogger("oases_fx").warning(
            "oases_fx: this torch's DTensor dispatcher has no _custom_op_handlers: GradScaler.unscale_ over "
            "DTensor gradients may miss an inf/nan found on another rank (ranks could step differently)")
        return
    if getattr(handlers.get(op), "_oases", False):
        return

    def handler(op_call, args, kwargs):
        grads, found_inf, inv_scale = args[0], args[1], args[2]
        op_call([g._local_tensor if isinstance(g, DTensor) else g for g in grads], found_inf, inv_scale)
        by_mesh = {}
        for g in grads:
            if isinstance(g, DTensor):
                dims = by_mesh.setdefault(g.device_mesh, set())
                dims.update(i for i, p in enumerate(g.placements) if not isinstance(p, Replicate))
        for mesh, dims in by_mesh.items():
            if dims:
                placements = tuple(Partial("max") if i in dims else Replicate() for i in range(mesh.ndim))
                full = DTensor.from_local(found_inf, mesh, placements, run_check=False).full_tensor()
                found_inf.copy_(full)

    handler._oases = True
    handlers[op] = handler
