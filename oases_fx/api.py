"""oases_fx.compile and OasesModule: the user's entry point.

compile() traces the unmodified model, makes (or loads) the plan, checks that every rank holds
the same plan, runs the torch-level passes (annotate_sharding, shard, insert_collectives, ...)
and wraps the result in torch.compile with our AOTAutograd backend. The returned OasesModule has
the model's call signature and this rank's shards as its parameters.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.utils._pytree as pytree

from oases_fx import _compat, agreement
from oases_fx import analysis as _analysis
from oases_fx import released as _released
from oases_fx import backend as _backend
from oases_fx import boundary as _boundary_mod
from oases_fx import generation as _generation
from oases_fx import inputs as _inputs
from oases_fx import loading as _loading
from oases_fx import watchdog as _watchdog
from oases_fx.config import CompileConfig
from oases_fx.errors import InputError, OasesError, ShardingError
from oases_fx.mesh import MeshInfo, check_same_on_all_ranks, group_timeout, mesh_info, with_region_groups
from oases_fx.meta import graph_meta
from oases_fx.plan import Plan, RegionPlan
from oases_fx.tracing import capture
from oases_fx.passes.annotate_sharding import annotate_sharding_pass
from oases_fx.passes.insert_collectives import insert_collectives_pass
from oases_fx.passes.merge_collectives import merge_collectives_pass
from oases_fx.passes.shard import shard_pass, shard_tensor, unshard_tensors
from oases_fx.passes.split_sub_batches import check_batch_splits, split_sub_batches_pass
from oases_fx.passes.recompute_policy import recompute_policy_pass
from oases_fx.passes.rng_streams import rng_streams_pass
from oases_fx.passes.vocab_parallel import vocab_parallel_pass

log = logging.getLogger("oases_fx")


def _say(cfg: CompileConfig, msg: str) -> None:
    if cfg.verbose and (not dist.is_initialized() or dist.get_rank() == 0):
        print(f"[oases_fx] {msg}", flush=True)


def _check_divisible(model: nn.Module, tp: int) -> None:
    """Named errors for the sizes a TMP degree must divide, read from the model's config if it has one."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return
    names = [
        ("num_attention_heads", "attention heads"), ("n_head", "attention heads"),
        ("num_key_value_heads", "key/value heads"), ("hidden_size", "hidden size"),
        ("n_embd", "hidden size"), ("intermediate_size", "MLP intermediate size"),
    ]
    for attr, what in names:
        v = getattr(cfg, attr, None)
        if attr == "num_key_value_heads" and isinstance(v, int) and v % tp and tp % v == 0:
            continue  # fewer kv heads than tp, dividing it: the kv projection is replicated (Megatron)
        if attr == "num_key_value_heads" and isinstance(v, int) and v % tp:
            raise ShardingError(
                f"{type(model).__name__}: key/value heads ({attr}={v}) neither divisible by nor dividing the TMP "
                f"degree {tp}: each rank's query heads would need parts of several key/value heads. Fix: use a "
                f"'tp' mesh axis whose size divides {v} or is a multiple of it.")
        if isinstance(v, int) and v % tp:
            raise ShardingError(
                f"{type(model).__name__}: {what} ({attr}={v}) is not divisible by the TMP degree {tp}. "
                f"Fix: use a 'tp' mesh axis whose size divides {v}."
            )


def _batch_size(flat_inputs) -> Optional[int]:
    sizes = {t.shape[0] for t in flat_inputs if isinstance(t, torch.Tensor) and t.dim() > 0}
    if len(sizes) > 1:
        raise InputError(
            f"example_inputs disagree on the batch size (leading dims {sorted(sizes)}). Fix: pass one "
            "batch exactly as the training loop will call the model, every tensor with the same batch dim."
        )
    return sizes.pop() if sizes else None


def megatron_plan(regions, *, tp: int, num_sub_batches: Optional[int], recompute: Optional[str]) -> Plan:
    """plan="megatron": Megatron sharding of every attention and MLP block found, no search."""
    return Plan(
        tp_degree=tp,
        num_sub_batches=num_sub_batches or 1,
        recompute=recompute or "none",
        regions=tuple(RegionPlan(name=r.name, kind=r.kind, shard=True) for r in regions),
    )


def _is_search(plan) -> bool:
    """plan="megatron" or "auto": the plan is made from the regions found at the full TMP degree."""
    return isinstance(plan, str) and plan in ("megatron", "auto")


def _degree_splits(plan: Plan) -> list:
    """(region name, d, n = tp/d) for every sharded region below the plan's TMP degree."""
    out = []
    for r in plan.regions:
        d = plan.region_degree(r.name)
        if d is not None and d < plan.tp_degree:
            out.append((r.name, d, plan.tp_degree // d))
    return out


def _resolve_plan(plan, find_regions, *, tp, num_sub_batches, recompute, planner=None) -> Plan:
    """`find_regions()`: the regions found at the full TMP degree (called only for "megatron")."""
    if isinstance(plan, str) and plan == "megatron":
        return megatron_plan(find_regions(), tp=tp, num_sub_batches=num_sub_batches, recompute=recompute)
    if isinstance(plan, str) and plan == "auto":
        return planner()
    if isinstance(plan, (str, Path)):
        path = Path(plan)
        if not path.exists():
            raise OasesError(f"plan={plan!r}: expected 'auto', a Plan, or the path of a saved plan; no such file.")
        plan = Plan.load(path)
    if not isinstance(plan, Plan):
        raise OasesError(f"plan must be 'auto', a Plan or a path, not {type(plan).__name__}")
    if plan.tp_degree != tp:
        raise OasesError(
            f"the plan was made for TMP degree {plan.tp_degree} but the mesh's 'tp' axis has {tp}. "
            "Fix: make a plan for this mesh (plan='auto')."
        )
    if num_sub_batches is not None and num_sub_batches != plan.num_sub_batches:
        raise OasesError(f"num_sub_batches={num_sub_batches} contradicts the plan's {plan.num_sub_batches}")
    if recompute is not None and recompute != plan.recompute:
        raise OasesError(f"recompute={recompute!r} contradicts the plan's {plan.recompute!r}")
    return plan


_INIT_AFTER_COMPILE = ("init_weights", "_init_weights", "reset_parameters", "post_init")


def _init_after_compile_message(what: str) -> str:
    """torchtitan's order (meta model -> parallelize -> to_empty -> init_weights) does not apply here."""
    return (f"{what} on a compiled OasesModule: compile() already allocated this rank's shards, and the "
            "model's own initialisation cannot run on them. Fix: initialise the unsharded model before "
            "oases_fx.compile (on meta: to_empty(device=...) then init_weights() / reset_parameters() on the "
            "model itself, then compile), or fill the shards after compile with model.load_full_state_dict(sd), "
            "oases_fx.load_pretrained(model, folder) or a DCP checkpoint (README: Loading weights / meta-device init).")


class OasesModule(nn.Module):
    """The compiled, sharded model. Call it like the original; its parameters are this rank's shards."""

    def __init__(self, model, mesh, info: MeshInfo, plan: Plan, cfg: CompileConfig, example_key, program):
        super().__init__()
        self.__dict__["_model"] = model  # the user's model, kept for retracing new input shapes
        self.__dict__["_mesh"] = mesh
        self.__dict__["_info"] = info
        self.__dict__["_cfg"] = cfg
        self.__dict__["_programs"] = {example_key: program}
        # where this rank's failures go and its timeouts are explained (oases_fx.watchdog)
        self.__dict__["_faults"] = _watchdog.current() or _watchdog.FaultChannel(
            prefix="oases_fx/faults/unscoped", peers=tuple(int(r) for r in mesh.mesh.flatten()),
            collective_timeout_s=cfg.collective_timeout_s)
        self.__dict__["_calls"] = 0
        self.__dict__["_steps"] = _watchdog.StepTracker(self._faults)  # whose backward ran (oases_fx.watchdog)
        program.aot.on_backward_failure = self._backward_failure  # a backward's timeout named (backend.py)
        self.plan = plan
        # parameters: DTensors on the "tp" axis sharing the compiled program's plain shards (oases_fx.boundary)
        # and, on a "dp" axis, torch's DDP over those shards (its reducer averages the gradients over "dp")
        self.__dict__["_boundary"] = _boundary_mod.Boundary(self, program.gm, mesh, info, dp_reduce=cfg.dp_reduce,
                                                            dp_bucket_mb=cfg.dp_bucket_mb)
        self._hooks = []
        _released.refuse_hooks(self, "the compiled module (its submodules only hold this rank's parameters; the "
                                     "compiled program runs instead of them)", keep_root=True)

    # --- calling ---------------------------------------------------------------------------
    # torch.compile(compiled_model) by the user: dynamo would trace into this Python (the boundary, the
    # process groups: an InternalTorchDynamoError on torch 2.13). The program here is already compiled, so
    # this frame is skipped and runs as it does without the outer compile (exact; nested torch.compile calls
    # set their own frame callback, so the program itself still compiles and runs compiled).
    @torch.compiler.disable
    def forward(self, *args, **kwargs):
        if torch.is_autocast_enabled(self._mesh.device_type):
            _refuse_autocast(self._mesh.device_type)
        self.__dict__["_calls"] += 1
        self._steps.before_forward(self._calls)  # this rank's last backward raised: its peers may wait in it
        self._boundary.sync_handed_out()  # a dcp.load into state_dict() without load_state_dict (boundary.py)
        if self.__dict__.get("_load_guard") is not None:  # compiled from the meta device (oases_fx.loading)
            _loading.check_loaded(self)
        key = _input_key(args, kwargs, self.training)
        if self.__dict__.get("_conversion_epoch"):  # converted by .to(dtype)/.half(): compiled again (generation.py)
            key = (key, self.__dict__["_conversion_epoch"])
        prog = self._programs.get(key)
        if prog is None:
            # dtype and device are part of the key: a program found was built for inputs already checked
            _inputs.check_inputs(self._param_signature(), args, kwargs, what=f"{type(self._model).__name__} call")
            _say(self._cfg, f"new input shapes or train/eval mode {key}: tracing and compiling again")
            plan = _generation.plan_for_batch(  # a batch k does not divide: the largest k that does
                self.plan, _generation.batch_size_of(args, kwargs), _degree_splits(self.plan),
                say=lambda msg: _say(self._cfg, msg))
            with _released.retracing(), _materialised(self._model, next(self.parameters()).device):
                prog = _build_program(self._model, self._info, plan, self._cfg, args, kwargs, self.training,
                                      bind_to=self)
            self._programs[key] = prog
            prog.aot.on_backward_failure = self._backward_failure
        if not prog.called and self._cfg.backend != "eager":
            _say(self._cfg, f"compiling with {self._cfg.backend} on this first call (forward now, backward at "
                            "the first backward())")
        if self._cfg.check_inputs == "every" or (self._cfg.check_inputs == "first" and not prog.called):
            agreement.check_batch(self._mesh, self._info, args, kwargs,
                                  call="first call of this program" if not prog.called else "call")
        prog.called = True
        try:
            out = self._boundary.call(prog, args, kwargs)  # through DDP, or a dp variant, on a "dp" axis
        except Exception as e:  # the step's own error, not torch.compile's wrapper around it
            inner = agreement.innermost_cause(e)
            where = f"forward of call {self._calls} ({'train' if self.training else 'eval'} mode)"
            failed = _watchdog.collective_failure_in(inner)
            if failed is not None:  # waited for a peer: name it, say the bound
                raise self._faults.timed_out(failed, where) from failed
            self._faults.report(inner, where)  # a peer waiting in this step's collectives reads it
            if inner is e:
                raise
            raise inner from None
        return self._steps.mark(out, self._calls)  # a pre-hook on the outputs' node: when their backward runs

    def _backward_failure(self, e):
        """A compiled backward raised `e`: the OasesError naming the peer it waited for, if it is a
        collective that timed out or lost its peer (oases_fx.watchdog), else None (raised as itself)."""
        failed = _watchdog.collective_failure_in(e)
        if failed is None:
            return None
        return self._faults.timed_out(failed, f"backward of call {self._calls}")

    def _param_signature(self):  # dtype/device of the parameters, again after .to(): oases_fx.inputs
        epoch = self.__dict__.get("_conversion_epoch")
        cached = self.__dict__.get("_param_sig")
        if cached is None or cached[0] != epoch:
            cached = self.__dict__["_param_sig"] = (epoch, _inputs.ParamSignature.of(self))
        return cached[1]

    def __deepcopy__(self, memo):
        raise OasesError(
            "copy.deepcopy of a compiled OasesModule is not supported: it holds process groups, compiled "
            "programs and this rank's shards (torch raised 'cannot pickle ProcessGroup'). Fix: for an EMA or "
            "a frozen teacher, copy the parameters instead (ema = {n: p.detach().clone() for n, p in "
            "model.named_parameters()}: DTensors on the same mesh, updated with torch._foreach_lerp_ or "
            "p.lerp_), or deepcopy the model before oases_fx.compile and compile the copy too."
        )

    def generate(self, *args, **kwargs):  # Hugging Face generate(), bucketed, no KV cache: oases_fx.generation
        return _generation.generate(self, *args, **kwargs)

    def __getattr__(self, name):  # HF attributes generate() and users read (config, generation_config, ...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in _generation.DELEGATED and "_model" in self.__dict__:
                return getattr(self.__dict__["_model"], name)
            if name in _INIT_AFTER_COMPILE:
                raise OasesError(_init_after_compile_message(f"{name}()")) from None
            raise

    def to_empty(self, *, device=None, recurse=True):
        raise OasesError(_init_after_compile_message("to_empty()"))

    def _apply(self, fn, recurse=True):  # .to(dtype), .half(), .bfloat16(), .to(device): oases_fx.generation
        return _generation.convert_compiled(self, fn, lambda f: self._boundary.apply(f, self))  # DTensors re-wrapped

    # --- introspection ----------------------------------------------------------------------
    @property
    def graphs(self):
        """The last compiled program: .gm (torch-level, rewritten) and .aot (AOTAutograd graphs)."""
        return next(reversed(self._programs.values()))

    def explain(self) -> str:
        prog = self.graphs
        m = graph_meta(prog.gm)
        lines = [f"oases_fx plan (digest {self.plan.digest()}): TMP degree {self.plan.tp_degree}, "
                 f"dp {self._info.dp}, sub-batches {self.plan.num_sub_batches}, recompute {self.plan.recompute}, "
                 f"backend {self._cfg.backend}" + (" [collectives SKIPPED: floor benchmark]" if self._cfg.skip_collectives else "")]
        if self.plan.predicted:
            from oases_fx.planner import explain_plan

            lines.append(explain_plan(self.plan, use_rich=False))
        lines.append("Sharded regions (Megatron column -> row):")
        for r in m.regions:
            d = r.degree or self.plan.tp_degree
            deg = f"TMP degree {d}" + (f" x {self.plan.tp_degree // d} batch chunks" if d < self.plan.tp_degree else "")
            lines.append(f"  {r.name} [{r.kind}, {deg}]: {r.summary}")
        if not m.regions:
            lines.append("  (none)")
        if m.vocab_parallel:
            lines.append(f"Vocab-parallel (Megatron embedding, LM head, cross-entropy): {m.vocab_parallel}")
        lines.append("Replicated: everything else (" + ("norms, position tables)." if m.vocab_parallel
                                                       else "embeddings, norms, LM head, loss)."))
        lines.append("Declined (not sharded):")
        lines.extend(f"  {name}: {why}" for name, why in m.declined) if m.declined else lines.append("  (none)")
        an = m.analysis
        if an is not None:  # oases_fx.analysis: once per trace, read by the planner and the passes
            lines.append(f"Analysis ({len(an.regions)} TMP regions found at degree {an.tp}; batch dims "
                         f"{an.batch_dims_method}):")
            lines.extend(f"  {d}" for d in an.decisions if not d.decision.endswith("region found"))
        lines.append("Collectives inserted:")
        lines.extend(f"  {c}" for c in m.collectives)
        lines.append("Shape constants rewritten:")
        lines.extend(f"  {c}" for c in m.rewrites)
        for key in ("notes", "vocab_notes", "sub_batch_notes", "recompute_notes"):
            if getattr(m, key):
                lines.append(key.replace("_", " ").capitalize() + ":")
                lines.extend(f"  {c}" for c in getattr(m, key))
        aot = prog.aot
        if aot.forward or aot.backward:
            from oases_fx._compat import is_all_reduce

            nf = sum(is_all_reduce(n) for g in aot.forward[-1:] for n in g.graph.nodes)
            nb = sum(is_all_reduce(n) for g in aot.backward[-1:] for n in g.graph.nodes)
            lines.append(f"AOTAutograd graphs: {nf} all-reduces in forward, {nb} in backward")
            c = schedule_constants(self.plan, self.plan.tp_degree)
            comm_src = (f"all-reduce {c.comm_alpha_us:.1f} us + bytes / {c.comm_bus_bw_bytes_per_s / 1e9:.1f} GB/s bus"
                        + (" (defaults)" if c == _defaults(self.plan.tp_degree) else " measured by the planner"))
            for g, stage in ((aot.forward[-1:], "forward"), (aot.backward[-1:], "backward")):
                tl = g[0].meta.get("oases_timeline") if g else None
                if tl is not None:
                    lines.append(f"Schedule ({stage}, analytical compute, {comm_src}): {tl.summary()}")
            acc = aot.backward[-1].meta.get("oases_accumulate_grads") if aot.backward else None
            if acc is not None:
                lines.append(f"Weight-gradient accumulation (backward): {acc.summary()}")
        else:
            lines.append("AOTAutograd graphs: not compiled yet (call the module once)")
        if self._info.dp_group is not None:
            lines.extend(_explain_dp(prog, self._info, self._cfg))
        if self._cfg.inductor_options:
            lines.append(f"Inductor options (inductor_options): {self._cfg.inductor_options}")
        if self._cfg.cudagraphs:
            got = "; ".join(f"{r.stage} {'applied' if r.applied else 'NOT applied: ' + r.reason}" for r in aot.cudagraphs)
            lines.append(f"CUDA graphs (cudagraphs=True): {got or 'not compiled yet'}")
        return "\n".join(lines)

    def timeline_png(self, path, *, stage: str = "forward") -> str:
        """Draw the schedule's predicted timeline of both streams (compute, communication) for the
        forward or backward graph of the last compile, coloured by sub-batch; returns the path."""
        graphs = self.graphs.aot.forward if stage == "forward" else self.graphs.aot.backward
        tl = graphs[-1].meta.get("oases_timeline") if graphs else None
        if tl is None:
            raise OasesError(f"no {stage} schedule yet: call the module once (and keep schedule_overlap enabled)")
        tl.to_png(path, title=f"oases_fx {stage}: k={self.plan.num_sub_batches}, recompute={self.plan.recompute}")
        return str(path)

    # --- checkpoints ------------------------------------------------------------------------
    def full_state_dict(self) -> dict:
        """Unsharded tensors under the original model's state_dict keys (collective: call on all ranks)."""
        self._boundary.sync_handed_out()
        return self._gather_full({k: t.detach() for k, t in self._boundary.local_state_dict().items()})

    def full_grads(self) -> dict:
        """Unsharded gradients under the original parameter names (collective: call on all ranks).
        Parameters without a gradient map to None."""
        return self._gather_full(self._boundary.local_grads())

    def _gather_full(self, named: dict) -> dict:
        info = self._info
        m = graph_meta(self.graphs.gm)
        sharded, degree = m.sharded_params, m.param_degree
        out = {}
        for key, t in named.items():
            if t is not None and key in sharded:
                dim, pieces, _ = sharded[key]
                shards = [torch.empty_like(t) for _ in range(info.tp)]
                dist.all_gather(shards, t.contiguous(), group=info.tp_group)
                d = degree.get(key, info.tp)  # d-way shard: tp ranks 0..d-1 hold shards 0..d-1
                out[key] = unshard_tensors(shards[:d], dim, pieces)
            else:
                out[key] = None if t is None else t.detach().clone()
        return out

    @torch.no_grad()
    def load_full_state_dict(self, state_dict: dict) -> None:
        """Load unsharded tensors (original keys); each rank keeps its shard."""
        info = self._info
        m = graph_meta(self.graphs.gm)
        sharded, degree = m.sharded_params, m.param_degree
        own = self._boundary.local_state_dict()
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        if missing or unexpected:
            raise OasesError(f"load_full_state_dict: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
        for key, t in own.items():
            src = state_dict[key]
            if key in sharded:
                dim, pieces, full_shape = sharded[key]
                if tuple(src.shape) != tuple(full_shape):
                    raise OasesError(f"load_full_state_dict: {key} has shape {tuple(src.shape)}, expected {full_shape}")
                d = degree.get(key, info.tp)
                src = shard_tensor(src, dim, info.tp_rank % d, d, pieces)
            t.copy_(src)

    # --- data parallel ----------------------------------------------------------------------
    def no_sync(self):
        """DDP's no_sync (oases_fx.boundary): backward passes whose forward runs inside accumulate gradients
        without the dp all-reduce; the first backward outside reduces the accumulated gradient."""
        return self._boundary.no_sync()

    def register_comm_hook(self, state, hook) -> None:
        """DDP's register_comm_hook for the dp all-reduce (e.g. ddp_comm_hooks.default_hooks.bf16_compress_hook)."""
        self._boundary.register_comm_hook(state, hook)



def _refuse_autocast(device_type: str) -> None:
    dtype = _compat.autocast_dtype(device_type)
    raise InputError(
        f"the compiled model was called under torch.autocast({device_type!r}, dtype={dtype}). oases_fx compiles "
        "the model's own dtypes and does not apply autocast inside the compiled program, so this step would "
        "silently run in the parameters' dtype instead of mixed precision. Fix: cast the model before "
        f"compile (model.to({dtype}) then oases_fx.compile(...)), and call it outside torch.autocast; or keep "
        "float32 and call it outside torch.autocast."
    )


def _input_key(args, kwargs, training):
    """What the program is traced for: shapes, and dtype, device and requires_grad (an input that needs a
    gradient gets Megatron f's backward all-reduce where it enters a region), the train/eval mode and the
    structure of the call. Per call: positional tensors only (the usual training call) skip pytree."""
    if not kwargs and all(isinstance(t, torch.Tensor) for t in args):
        return (bool(training), len(args), tuple((t.shape, t.dtype, t.device, t.requires_grad) for t in args))
    flat, spec = pytree.tree_flatten((args, kwargs))
    shapes = tuple((t.shape, t.dtype, t.device, t.requires_grad) if isinstance(t, torch.Tensor)
                   else repr(t) for t in flat)
    return (bool(training), str(spec), shapes)


class _Program:
    def __init__(self, gm, compiled, aot):
        self.gm, self.compiled, self.aot = gm, compiled, aot
        self.layers = None  # oases_fx.layers.LayerReport where compiled per block (compile_layers)
        self.called = False
        self.variants: dict = {}  # dp_reduce="graph": "no_sync" / "acc" -> _Program (compiled at first use)
        self.make_variant = None  # mode -> _Program

    def variant(self, mode: str) -> "_Program":
        """The dp variant `mode` of this program (dp_reduce="graph"): "no_sync" (no dp all-reduce) or "acc"
        (the gradients accumulated under no_sync are inputs, reduced with the new ones). Built once."""
        v = self.variants.get(mode)
        if v is None:
            v = self.variants[mode] = self.make_variant(mode)
            v.aot.on_backward_failure = self.aot.on_backward_failure
        return v


def _explain_dp(prog, info, cfg) -> list:
    """explain()'s lines on the dp axis: which mode, and for "graph" the buckets of the last backward."""
    if cfg.dp_reduce == "ddp":
        return [f"Data parallelism (dp={info.dp}, dp_reduce='ddp'): torch's DistributedDataParallel over the local "
                f"shards, buckets of {cfg.dp_bucket_mb:g} MiB; each bucket's all-reduce starts when the compiled "
                "backward returns (no overlap with backward compute); no_sync and comm hooks are DDP's"]
    from oases_fx.passes.dp_reduce import RECORD_KEY

    lines = [f"Data parallelism (dp={info.dp}, dp_reduce='graph'): gradients averaged inside the compiled backward "
             "graph, each bucket's all-reduce issued as soon as its last gradient is produced, waited at the graph's "
             "end" + (" [all-reduces SKIPPED: floor benchmark]" if cfg.skip_collectives else "")]
    for name, p in (("synchronised", prog), *((f"{m} variant", v) for m, v in prog.variants.items())):
        rec = p.aot.backward[-1].meta.get(RECORD_KEY) if p.aot.backward else None
        if name == "no_sync variant":
            lines.append("  no_sync variant: the same program compiled without the dp all-reduce (accumulation "
                         "sends nothing)")
        elif rec is None:
            lines.append(f"  {name}: backward not compiled yet")
        else:
            what = " (accumulated gradients are inputs: reduced with the new ones, once)" if name == "acc variant" else ""
            lines.append(f"  {name}{what}: {rec.summary()}")
            lines.extend(f"    {ln}" for ln in rec.lines())
    return lines


def batch_dims(model, args, kwargs, gm) -> dict:
    """Node name -> the dim that carries the batch, found by tracing again at batch B+1 and
    comparing shapes node by node (so masks and position ids built from the input's shape are
    found too, without pattern matching)."""
    b = _batch_size(pytree.tree_flatten((args, kwargs))[0])

    def grow(t):
        return torch.cat([t, t[:1]]) if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == b else t

    args2, kwargs2 = pytree.tree_map(grow, (tuple(args), dict(kwargs)))
    other = capture(model, args2, kwargs2).gm
    theirs = {n.name: n for n in other.graph.nodes}
    out = {}
    for n in gm.graph.nodes:
        m = theirs.get(n.name)
        if m is None or n.op == "output":
            continue
        a, c = n.meta.get("val"), m.meta.get("val")
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            a, c = a[0], c[0]
        if isinstance(a, torch.Tensor) and isinstance(c, torch.Tensor) and a.dim() == c.dim():
            moved = [d for d in range(a.dim()) if a.shape[d] != c.shape[d]]
            if moved:
                out[n.name] = moved[0]
    return out


def _retrace_batch_dims(model, args, kwargs, gm, training) -> dict:
    """The fallback of oases_fx.analysis when propagation cannot decide: trace again at B+1."""
    with _mode(model, training):
        return batch_dims(model, args, kwargs, gm)


def torch_passes(info: MeshInfo, plan: Plan, cfg: CompileConfig, grad_inputs, batch_size=None):
    """The torch-level pass list, options bound here (and only here)."""
    G = _backend.GraphPass
    return [
        G("annotate_sharding", functools.partial(annotate_sharding_pass, plan=plan, tp=info.tp)),
        G("shard", functools.partial(shard_pass, rank=info.tp_rank, tp=info.tp)),
        G("insert_collectives", functools.partial(insert_collectives_pass, group_name=info.tp_group_name,
                                                  skip=cfg.skip_collectives, grad_inputs=grad_inputs,
                                                  subgroups=info.subgroups)),
        G("merge_collectives", merge_collectives_pass),  # parallel residual: one g, one f per layer
        G("vocab_parallel", functools.partial(vocab_parallel_pass, enabled=plan.vocab_parallel, rank=info.tp_rank,
                                              tp=info.tp, group_name=info.tp_group_name, skip=cfg.skip_collectives)),
        G("split_sub_batches", functools.partial(split_sub_batches_pass, num_sub_batches=plan.num_sub_batches,
                                                 batch_size=batch_size)),
        G("rng_streams", functools.partial(rng_streams_pass, rank=info.tp_rank, tp=info.tp)),
        G("recompute_policy", functools.partial(recompute_policy_pass, policy=plan.recompute)),
    ]


def _defaults(tp: int):
    from oases_fx.timeline import DeviceConstants

    return DeviceConstants(group_size=tp)


def schedule_constants(plan: Plan, tp: int):
    """Cost constants for schedule_overlap: the interconnect the planner measured when it made
    the plan (all-reduce latency and bandwidth, interference; kept in ``plan.predicted``), else the
    analytical defaults (H100 NVLink). Which collective is still in flight when a sub-batch's next
    op is due depends on the link: with NVLink constants on a PCIe-class path the scheduler
    believes every all-reduce is done early and places its consumers too soon."""
    from oases_fx.timeline import DeviceConstants

    pred = plan.predicted or {}
    ar = pred.get("all_reduce") or {}
    if not str(pred.get("profile", "")).startswith("measured") or not ar.get("gb_per_s"):
        return _defaults(tp)
    share = 2.0 * (tp - 1) / tp  # all-reduce bus bandwidth = algorithm bandwidth x 2(n-1)/n
    inter = pred.get("interference") or {}
    return DeviceConstants(group_size=tp, comm_alpha_us=float(ar["alpha_us"]),
                           comm_bus_bw_bytes_per_s=float(ar["gb_per_s"]) * 1e9 * share,
                           compute_interference=max(1.0, float(inter.get("compute", 1.0))),
                           comm_interference=max(1.0, float(inter.get("comm", 1.0))))


def aot_passes(info: MeshInfo, plan: Plan, cfg: CompileConfig, *, dp_reduce: bool = False):
    """Pass lists for AOTAutograd's forward and backward graphs (the same schedule pass on both; in the
    backward, accumulate_grads after it where cfg.accumulate_grads says (default: with cudagraphs), and
    with `dp_reduce` the dp gradient all-reduce last, reading the parameter positions that the backend
    puts in each graph's meta)."""
    from oases_fx.passes.accumulate_grads import accumulate_grads_pass
    from oases_fx.passes.schedule_overlap import ScheduleOptions, schedule_overlap_pass
    from oases_fx.timeline import AnalyticalCostModel

    cost = AnalyticalCostModel(schedule_constants(plan, info.tp))
    sched = _backend.GraphPass("schedule_overlap", functools.partial(
        schedule_overlap_pass, options=ScheduleOptions(**cfg.schedule), cost_model=cost))
    # after the schedule (its order decides where each sum runs), before dp_reduce (reads the gradients)
    bw = [sched]
    if cfg.accumulate_grads or (cfg.accumulate_grads is None and cfg.cudagraphs):
        bw.append(_backend.GraphPass("accumulate_grads", functools.partial(accumulate_grads_pass, cost_model=cost)))
    if dp_reduce:  # after the schedule: the TMP order stays as schedule_overlap made it
        from oases_fx.passes.dp_reduce import bucket_bytes_of, dp_reduce_pass

        bw.append(_backend.GraphPass("dp_reduce", functools.partial(
            dp_reduce_pass, group_name=_compat.group_name(info.dp_group), dp=info.dp,
            bucket_bytes=bucket_bytes_of(cfg.dp_bucket_mb),
            skip=cfg.skip_collectives)))
    return [sched], bw


@contextlib.contextmanager
def _mode(model, training: bool):
    """Trace in the mode the module will run in (dropout is baked into the graph); restore after."""
    was = model.training
    model.train(training)
    try:
        yield
    finally:
        model.train(was)


def _build_program(model, info, plan, cfg, args, kwargs, training, bind_to=None, traced=None):
    if traced is None:
        with _mode(model, training):
            traced = capture(model, args, kwargs)
    gm = traced.gm
    graph_meta(gm).notes = traced.notes
    an = _analysis.analysis_of(traced, tp=info.tp, model=model, retrace=functools.partial(
        _retrace_batch_dims, model, args, kwargs, gm, training))
    batch_size = _batch_size(traced.flat_inputs)
    splits = _degree_splits(plan)
    if plan.num_sub_batches > 1 or splits:
        # before tracing again for the batch dims
        check_batch_splits(batch_size, plan.num_sub_batches, splits)
        missing = sorted({d for _, d, _ in splits} - set(info.subgroups))
        if missing:
            raise AssertionError(f"no subgroups for region degrees {missing}: call mesh.with_region_groups first")
        graph_meta(gm).batch_dims = dict(an.require_batch_dims())  # a copy: passes add the nodes they make
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    grad_inputs = frozenset(n.name for n, t in zip(placeholders, traced.flat_inputs)
                            if isinstance(t, torch.Tensor) and t.requires_grad)
    gm = _backend.run_passes(gm, torch_passes(info, plan, cfg, grad_inputs, batch_size), disabled=cfg.disabled_passes,
                             debug=cfg.debug, stage="torch")
    if bind_to is not None:  # a new variant shares the existing shards (the optimizer holds them)
        for name, p in bind_to._boundary.local_tensors().items():  # plain shards, tied names too
            _rebind(gm, name, p)
        for name, b in bind_to.named_buffers():
            _rebind(gm, name, b)
    if cfg.backend == "eager":
        return _Program(gm, gm, _backend.CompiledGraphs())
    dp_graph = _dp_in_graph(info, cfg)
    prog = _compile_program(gm, info, plan, cfg, dp_reduce=dp_graph)
    if dp_graph:
        prog.make_variant = functools.partial(_dp_variant, gm, info, plan, cfg)
    return prog


def _dp_in_graph(info: MeshInfo, cfg: CompileConfig) -> bool:
    return info.dp_group is not None and cfg.dp_reduce == "graph"


def _compile_program(gm, info, plan, cfg, *, dp_reduce: bool):
    keep = _backend.CompiledGraphs()
    fw, bw = aot_passes(info, plan, cfg, dp_reduce=dp_reduce)
    fn = _backend.make_backend(backend=cfg.backend, fw_passes=fw, bw_passes=bw,
                               disabled=cfg.disabled_passes, debug=cfg.debug, keep=keep, cudagraphs=cfg.cudagraphs,
                               inductor_options=cfg.inductor_options)
    layers = "whole" if _dp_in_graph(info, cfg) else cfg.compile_layers  # dp buckets span layers (oases_fx.layers)
    if layers != cfg.compile_layers:
        why = f"compile_layers={cfg.compile_layers!r} with dp_reduce='graph': compiled whole (dp buckets span layers)"
        log.warning("oases_fx: %s", why)
        graph_meta(gm).notes.append(why)
    compiled, report = _backend.compile_program(gm, fn, layers=layers)
    if report is not None:
        graph_meta(gm).notes.append(report.summary())
    prog = _Program(gm, compiled, keep)
    prog.layers = report
    return prog


def _dp_variant(gm, info, plan, cfg, mode: str):
    """A dp variant of the program `gm` (dp_reduce="graph"; passes/dp_reduce.py), on a copy of its graph that
    shares its parameters and buffers (its own code object, so dynamo compiles it on its own): "no_sync"
    compiles it without the dp all-reduce; "acc" adds the accumulated gradients as inputs of the reduction."""
    import copy

    import torch.fx as fx
    from oases_fx.passes.dp_reduce import dp_accumulated_inputs_pass

    assert mode in ("no_sync", "acc"), mode
    v = fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
    v.meta.update(gm.meta)
    v.meta["oases"] = copy.copy(graph_meta(gm))
    if mode == "acc":
        v = _backend.run_passes(v, [_backend.GraphPass("dp_accumulated_inputs", dp_accumulated_inputs_pass)],
                                disabled=(), debug=cfg.debug, stage="torch (dp variant)")
    return _compile_program(v, info, plan, cfg, dp_reduce=mode == "acc")


@torch.no_grad()
def _release_full_parameters(model: nn.Module, sharded: dict) -> None:
    """compile() takes ownership of the model, as FSDP's fully_shard does: each parameter that was
    sharded is replaced in the user's module by a meta tensor of the full shape (tied parameters
    stay tied), so the full-size weights are freed; the module keeps its structure and shapes for
    retracing new input shapes. The trained weights live in the OasesModule
    (full_state_dict() gathers them)."""
    metas = {}
    for fqn in sharded:
        mod_path, _, leaf = fqn.rpartition(".")
        try:
            mod = model.get_submodule(mod_path) if mod_path else model
        except AttributeError:
            continue
        old = mod._parameters.get(leaf)
        if old is None:
            continue
        if id(old) not in metas:
            metas[id(old)] = _released.ReleasedParameter(torch.empty_like(old, device="meta"),
                                                         requires_grad=old.requires_grad)  # refuses writes
        mod._parameters[leaf] = metas[id(old)]


@contextlib.contextmanager
def _materialised(model: nn.Module, device):
    """Released (meta) parameters become FakeTensors on `device` while the model is traced again for
    new input shapes (tracing needs one device; the values are never read: the new program is bound
    to the existing shards), so a retrace allocates nothing full-size; meta again afterwards."""
    with _loading.fake_parameters(model, device):
        yield


def _rebind(gm, fqn, value):
    mod_path, _, leaf = fqn.rpartition(".")
    mod = gm.get_submodule(mod_path) if mod_path else gm
    if isinstance(value, nn.Parameter):
        setattr(mod, leaf, value)
    else:
        mod.register_buffer(leaf, value)


def _check_not_parallelized(model) -> None:
    """compile() shards the full model itself: a model torch already wraps or distributes would be traced
    through the wrapper (DDP: "torch.compiler.disable is not supported with torch.export") or with
    DTensor weights (an export error about DTensorSpec), neither naming the mistake."""
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    fix = ("Fix: pass the plain model (built full size, identically seeded on every rank) to oases_fx.compile; for "
           "data parallelism give it a ('dp', 'tp') mesh (gradients averaged over 'dp' by DDP, or inside the "
           "backward with dp_reduce='graph').")
    if isinstance(model, OasesModule):
        raise InputError("oases_fx.compile was given a module oases_fx.compile already returned. Fix: compile the "
                         "original model once and train the module it returns.")
    if isinstance(model, (DistributedDataParallel, DataParallel)):
        raise InputError(f"oases_fx.compile was given a {type(model).__name__}: oases_fx shards and wraps the model "
                         f"itself, so pass model.module, not the wrapper. {fix}")
    for name, p in model.named_parameters():
        if isinstance(p, DTensor):
            raise InputError(
                f"parameter {name!r} is already a DTensor (placements {tuple(p.placements)}): the model was "
                "parallelized before oases_fx.compile (torch's parallelize_module, fully_shard or distribute_tensor), "
                f"and oases_fx shards the full model itself from the plan. {fix}")


@agreement.errors_shared  # a rank that fails in compile() stops the others at once
def compile(
    model: nn.Module,
    mesh,
    *,
    example_inputs=None,
    example_kwargs: Optional[dict] = None,
    plan="auto",
    num_sub_batches: Optional[int] = None,
    recompute: Optional[str] = None,
    backend: str = "inductor",
    device=None,
    **config,
) -> OasesModule:
    """Shard `model` for tensor-model parallelism over `mesh` and compile it.

    Args:
        model: an unmodified nn.Module (plain PyTorch, Hugging Face GPT-2, Llama, ...), full size,
            on the device it will train on, identically initialised on every rank.
        mesh: a DeviceMesh with a "tp" axis (1-D ("tp",) or 2-D ("dp", "tp")).
        example_inputs: one batch as positional args, exactly as the training loop calls the model.
        example_kwargs: keyword args of that call (Hugging Face: dict(input_ids=..., labels=...)).
        plan: "auto" (the planner: measure the device, search k, recompute and shard/replicate per
            region), "megatron" (shard every region, no search), a Plan, or the path of a saved plan.
        num_sub_batches: k sub-batches (None: the plan's choice).
        recompute: "none", "fine" or "full" (None: the plan's choice).
        backend: "inductor", "aot_eager" or "eager".
        device: for a model built under torch.device("meta"): where its shards are allocated (default and
            only choice: the example inputs' device); weights then come from model.load_full_state_dict(sd),
            oases_fx.load_pretrained(model, hf_folder) or DCP (oases_fx.loading).
        **config: further CompileConfig fields (skip_collectives, disabled_passes, debug, verbose).
    """
    cfg = CompileConfig(backend=backend, **config)
    _check_not_parallelized(model)
    if example_inputs is None and not example_kwargs:
        raise InputError(
            "oases_fx.compile needs example_inputs: one batch exactly as the training loop calls the model, "
            "e.g. example_inputs=(idx, targets), or example_kwargs=dict(input_ids=ids, labels=ids) for "
            "Hugging Face models. Shapes (batch, sequence) are planned and compiled for it."
        )
    if example_inputs is not None and not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    args, kwargs = tuple(example_inputs or ()), dict(example_kwargs or {})
    flat, _ = pytree.tree_flatten((args, kwargs))
    _batch_size(flat)
    meta_init = _loading.prepare_meta_model(model, args, kwargs, device)  # built under torch.device("meta")
    _inputs.check_inputs(_inputs.ParamSignature.of(model), args, kwargs, what="compile(example_inputs=...)")
    info = mesh_info(mesh, collective_timeout_s=cfg.collective_timeout_s)  # own TMP groups if a bound is set
    if _dp_in_graph(info, cfg) and cfg.backend == "eager":
        raise OasesError("dp_reduce='graph' puts the dp all-reduce into AOTAutograd's backward graph, which "
                         "backend='eager' does not make. Fix: backend='aot_eager' or 'inductor', or dp_reduce='ddp'.")
    if _is_search(plan):
        _check_divisible(model, info.tp)

    _released.check_no_module_hooks(model)  # they would run at trace time only (oases_fx.released)
    _say(cfg, f"tracing {type(model).__name__} with torch.export")
    traced = capture(model, args, kwargs)
    # before the planner profiles and before any other collective (oases_fx.agreement)
    agreement.check_compile(mesh, info, model=model, traced=traced, args=args, kwargs=kwargs, cfg=cfg, plan=plan,
                            num_sub_batches=num_sub_batches, recompute=recompute)
    found = []

    def find_regions():
        if not found:  # the one analysis of this trace (oases_fx.analysis), read by the planner and the passes
            found.append(_analysis.analysis_of(traced, tp=info.tp, model=model, retrace=functools.partial(
                _retrace_batch_dims, model, args, kwargs, traced.gm, model.training)).require_regions())
        return found[0]

    def planner():
        regions = find_regions()
        from oases_fx.planner import plan_model

        batch = _batch_size(flat)
        seq = next((t.shape[1] for t in flat if isinstance(t, torch.Tensor) and t.dim() > 1), 1)
        ks = (num_sub_batches,) if num_sub_batches else tuple(k for k in (1, 2, 4) if batch and batch % k == 0)
        check_batch_splits(batch, num_sub_batches or 1)
        rcs = (recompute,) if recompute else ("none", "fine", "full")
        _say(cfg, f"planning: {'measuring the device' if cfg.profile == 'measure' else 'analytical cost model'} "
                  f"for k in {ks}, recompute in {rcs}, {len(regions)} regions")
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        channel = _watchdog.current()
        if channel is not None:  # a collective timing out in here is explained as the planner's
            channel.phase = "planner's collectives (plan='auto': profiling and search)"
        with group_timeout(cfg.collective_timeout_s):  # the profile's subgroups get the bound too
            got = plan_model(traced.gm, regions, tp=info.tp, batch=batch, seq_len=int(seq), group=info.tp_group,
                             measure=cfg.profile == "measure", progress=cfg.verbose and rank0,
                             k_choices=ks, recompute_choices=rcs,
                             degrees={"full": (info.tp,), "all": None}.get(cfg.planner_degrees, cfg.planner_degrees),
                             vocab_parallel_choices=cfg.planner_vocab_parallel,
                             merge_collectives="merge_collectives" not in cfg.disabled_passes)
        if channel is not None:
            channel.phase = "oases_fx.compile() collectives (agreement checks, plan)"
        return got

    explicit = not _is_search(plan)
    plan = _resolve_plan(plan, find_regions, tp=info.tp, num_sub_batches=num_sub_batches, recompute=recompute,
                         planner=planner)
    if explicit:  # sizes must divide the largest degree the plan shards any region at
        degrees = [plan.region_degree(r.name) for r in plan.regions if plan.region_degree(r.name)]
        _check_divisible(model, max(degrees) if degrees else plan.tp_degree)
    check_same_on_all_ranks(info, "plan", plan.digest(),
                            detail="The plan depends on the model, the example input shapes and the options. ")
    splits = _degree_splits(plan)
    check_batch_splits(_batch_size(flat), plan.num_sub_batches, splits)
    with group_timeout(cfg.collective_timeout_s):
        info = with_region_groups(info, mesh, [d for _, d, _ in splits])
    _say(cfg, f"plan {plan.digest()}: {sum(r.shard for r in plan.regions)} regions sharded "
              f"over tp={info.tp}" + (f" ({len(splits)} of them at a lower degree: "
                                      + ", ".join(f"{name} d={d}" for name, d, _ in splits) + ")" if splits else "")
              + f", {len(plan.regions) - sum(r.shard for r in plan.regions)} replicated"
              + f", k={plan.num_sub_batches}, recompute={plan.recompute}"
              + (", vocab-parallel embedding/LM head/loss" if plan.vocab_parallel else ""))
    program = _build_program(model, info, plan, cfg, args, kwargs, model.training, traced=traced)
    from oases_fx.passes.annotate_sharding import check_strict, coverage_message  # declined blocks said

    if cfg.strict:
        check_strict(graph_meta(program.gm))
    coverage = coverage_message(graph_meta(program.gm))
    if coverage:
        _say(cfg, coverage)
    _loading.allocate_fake_tensors(program.gm)  # meta-device init: only now this rank's shards exist
    del traced  # holds the full-size parameters
    before = list(model.parameters())
    _release_full_parameters(model, graph_meta(program.gm).sharded_params)
    _released.guard(model, before)  # the original now raises on use (oases_fx.released)
    key = _input_key(args, kwargs, model.training)
    return _loading.guard_if_meta(OasesModule(model, mesh, info, plan, cfg, key, program), meta_init)
