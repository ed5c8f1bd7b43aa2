"""Capture: one path for every model (plain nn.Module, HF GPT-2, HF Llama): torch.export, non-strict.

Export runs the model on fake tensors and returns an aten training-IR graph that keeps linear,
SDPA and norms whole, with ``meta["val"]`` on every node and parameters as get_attr nodes under
the model's own state_dict names, which is what the sharding passes need.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.utils.checkpoint
import torch.utils._pytree as pytree

from oases_fx import _compat, moe
from oases_fx.errors import OasesError, describe


@dataclass
class Traced:
    gm: fx.GraphModule
    """The traced graph (the model's call signature, pytree in/out)."""
    flat_inputs: list
    """The example inputs, flattened in placeholder order."""
    notes: list
    """What tracing changed (shown by explain())."""


@contextlib.contextmanager
def _hf_no_cache(model):
    """HF models must be traced with use_cache=False (a KV cache is not part of training). Every
    sub-module's config, not only the model's: an encoder-decoder (T5) gives its decoder stack its
    own copy of the config, whose use_cache=True makes the trace return an EncoderDecoderCache."""
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None
               and getattr(c, "use_cache", None)}
    for c in configs.values():
        c.use_cache = False
    try:
        yield bool(configs)
    finally:
        for c in configs.values():
            c.use_cache = True


_CHECK_MAX_NUMEL = 1 << 16
"""A custom Function is checked on inputs of at most this many elements each (larger ones are
narrowed to 2 along every dim but the last, the same for every input, so broadcasting holds)."""


class _PlainCtx:
    """What a Function's forward may touch on its ctx, for running that forward outside autograd.Function."""

    def __init__(self, needs):
        self.needs_input_grad = needs
        self.saved_tensors = ()
        self.materialize_grads = True

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def mark_dirty(self, *tensors):
        raise RuntimeError("its forward modifies an input in place (ctx.mark_dirty)")

    def mark_non_differentiable(self, *tensors):
        pass

    def set_materialize_grads(self, value):
        self.materialize_grads = value


def _backward_matches_forward(cls, signature):
    """(None, what was checked) if cls's own backward equals autograd of its forward's ops on random
    float64 inputs of the recorded shapes; (reason, None) if not. What torch.export (non-strict)
    keeps of a Function is its forward's ops, so this is exactly the question "is the traced
    gradient the model's gradient"."""
    args, kwargs = signature
    metas = [a for a in list(args) + list(kwargs.values()) if isinstance(a, tuple) and a[:1] == ("tensor",)]
    if any(not m[2].is_floating_point and m[3] for m in metas):
        return "a non-floating input requires grad", None
    if not any(m[3] for m in metas):
        return None, "no input of it requires grad: its backward never runs"
    shrink = any(torch.Size(m[1]).numel() > _CHECK_MAX_NUMEL for m in metas)
    gen = torch.Generator().manual_seed(0)

    def build(a):
        if not (isinstance(a, tuple) and a[:1] == ("tensor",)):
            return a
        _, shape, dtype, rg = a
        if shrink:
            shape = tuple(min(d, 2) for d in shape[:-1]) + tuple(shape[-1:])
        if dtype.is_floating_point:
            return torch.randn(shape, generator=gen, dtype=torch.float64).requires_grad_(rg)
        return torch.zeros(shape, dtype=dtype)

    def run(use_own_backward):
        a = tuple(build(x) for x in args)
        kw = {k: build(v) for k, v in kwargs.items()}
        leaves = [t for t in list(a) + list(kw.values()) if isinstance(t, torch.Tensor) and t.requires_grad]
        with torch.enable_grad():
            if use_own_backward:
                out = cls.apply(*a, **kw)
            else:
                needs = tuple(isinstance(t, torch.Tensor) and t.requires_grad for t in a)
                if cls.setup_context is torch.autograd.Function.setup_context:  # forward(ctx, *args)
                    out = cls.forward(_PlainCtx(needs), *a, **kw)
                else:  # forward(*args) + setup_context(ctx, inputs, output)
                    out = cls.forward(*a, **kw)
        outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,))
                if isinstance(o, torch.Tensor) and o.requires_grad and o.is_floating_point()]
        if not outs:
            return leaves, []
        cot = [torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=o.dtype) for o in outs]
        return leaves, torch.autograd.grad(outs, leaves, cot, allow_unused=True)

    try:
        with torch.random.fork_rng(devices=[]):  # the check draws nothing from the user's RNG streams
            gen.manual_seed(0)
            leaves, own = run(True)
            gen.manual_seed(0)
            _, derived = run(False)
    except Exception as e:
        return f"checking it failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", None
    worst = 0.0
    for t, g1, g2 in zip(leaves, own, derived):
        g1 = torch.zeros_like(t) if g1 is None else g1
        g2 = torch.zeros_like(t) if g2 is None else g2
        scale = max(g1.abs().max().item(), g2.abs().max().item(), 1e-30)
        worst = max(worst, (g1 - g2).abs().max().item() / scale)
    shapes = ", ".join(str(tuple(t.shape)) for t in leaves)
    if worst > 1e-6:
        return (f"its backward differs from autograd of its forward by {worst:.3g} (relative to the largest "
                f"gradient entry; float64 inputs of shape {shapes})"), None
    return None, f"backward equal to autograd of its forward to {worst:.1e} (float64 inputs of shape {shapes})"


def _check_custom_functions(model, calls) -> list:
    """torch.export (non-strict) traces a custom autograd.Function's forward only: its backward is
    replaced by autograd of the forward's ops. That is exact when the two agree (a Function
    written for memory or speed, as Bloom's GeLUFunction), and a silently wrong gradient when they
    do not (a straight-through estimator, a gradient clip or reversal). Each Function is checked
    numerically at its traced shapes: one that agrees is kept (returned as explain() notes), one
    that does not is refused with the difference."""
    seen, notes, bad, bad_checkpoint = {}, [], [], []
    for cls, where, signature in calls:
        # torch.library.custom_op + register_autograd runs through a generated Function that export keeps
        # whole (the custom op is one node, AOTAutograd applies its registered backward): not dropped
        if cls.__module__.startswith(("oases_fx.", "torch._library.")):
            continue
        key = (cls, where)
        if key in seen:
            continue
        seen[key] = True
        name = f"{cls.__module__}.{cls.__qualname__}"
        if cls is getattr(torch.utils.checkpoint, "CheckpointFunction", None):
            bad_checkpoint.append(_reentrant_checkpoint(model, where, signature))
            continue
        reason, checked = _backward_matches_forward(cls, signature)
        if reason is None:
            notes.append(f"custom autograd.Function {name} (applied at {where}) traced through its forward: {checked}")
        else:
            bad.append(f"{name} (applied at {where}): {reason}")
    if bad_checkpoint:
        raise OasesError(
            f"{type(model).__name__} calls torch.utils.checkpoint with use_reentrant=True on "
            f"{'; '.join(bad_checkpoint)}. That checkpoint runs the function under torch.no_grad() inside an "
            "autograd.Function whose backward torch.export (non-strict) does not keep, so the traced program "
            "would compute no gradient through it. Fix: torch.utils.checkpoint.checkpoint(fn, *args, "
            "use_reentrant=False) (traced exactly; HF: model.gradient_checkpointing_enable("
            "gradient_checkpointing_kwargs={'use_reentrant': False})), or no checkpoint and "
            "oases_fx.compile(..., recompute='full' or 'fine'), which recomputes inside the compiled program."
        )
    if bad:
        raise OasesError(
            f"{type(model).__name__} applies a custom torch.autograd.Function whose backward is not autograd of "
            f"its forward: {'; '.join(bad)}. torch.export (non-strict) traces only its forward, so its backward "
            "would be silently replaced by autograd of the forward's ops and the gradients would be wrong. Fix: "
            "write the op with differentiable torch ops (its backward is then derived exactly), or register it "
            "as a custom op with its own backward (torch.library.custom_op + register_autograd), which "
            "torch.export keeps whole."
        )
    return notes


def _reentrant_checkpoint(model, where, signature) -> str:
    """The function a reentrant torch.utils.checkpoint ran (CheckpointFunction.apply(fn, preserve, *args)):
    its module name in `model` and the source line of its forward, else the function and `where`."""
    import functools
    import inspect

    args = signature[0]
    fn = args[0] if args else None
    target = None
    while isinstance(fn, functools.partial):  # HF's GradientCheckpointingLayer: partial(forward, layer, ...)
        if fn.args and isinstance(fn.args[0], torch.nn.Module):
            target = fn.args[0]
        fn = fn.func
    target = target if target is not None else getattr(fn, "__self__", fn)  # a bound forward: its module
    names = {id(m): n for n, m in model.named_modules()}
    label = (f"module '{names[id(target)]}' ({type(target).__name__})" if id(target) in names
             else f"{getattr(fn, '__qualname__', type(fn).__name__)}")
    code = type(target).forward if isinstance(target, torch.nn.Module) else fn
    code = inspect.unwrap(code)  # through functools.wraps decorators to the model's own def
    try:
        line = f"{inspect.getsourcefile(code)}:{inspect.getsourcelines(code)[1]}"
    except (TypeError, OSError):
        line = where
    return f"{label}, forward at {line}"


def _check_static_shapes(model, gm: fx.GraphModule) -> None:
    """Refuse a trace with data-dependent sizes (unbacked symbols: .item()/.tolist() feeding a shape,
    as JetMoE's per-expert token counts split the tokens): the analysis, the shard pass and the
    sub-batch split read every size as a number, and would fail deep inside torch without a word
    about where the size came from."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    for n in gm.graph.nodes:
        v = n.meta.get("val")
        if any(isinstance(t, (torch.Tensor, torch.SymInt)) and free_unbacked_symbols(t)
               for t in (v if isinstance(v, (list, tuple)) else [v])):
            raise OasesError(
                f"{type(model).__name__} has a data-dependent size: {describe(n)} gives a value known only at "
                "run time, and a shape depends on it (e.g. tokens per expert turned into a Python int by "
                ".item()/.tolist() to split the tokens). oases_fx plans, shards and splits sub-batches on "
                "static shapes. Fix: compute that part with fixed shapes (for mixture-of-experts: Hugging "
                "Face's experts_implementation='grouped_mm' where the model has one, or a dense / "
                "capacity-padded dispatch), or keep the model out of oases_fx.")


def capture(model: torch.nn.Module, args: tuple, kwargs: dict) -> Traced:
    from oases_fx import loading

    if loading.has_meta_tensors(model) and loading.input_device(args, kwargs).type != "meta":
        # meta-device init or released weights: trace on fake ones (meta inputs: on meta, as the planner CLI)
        with loading.fake_parameters(model, loading.input_device(args, kwargs)):
            return capture(model, args, kwargs)
    notes = []
    mode = loading.fake_mode_of_model(model)
    if mode is not None:  # fake weights: the inputs join their fake mode
        args, kwargs = pytree.tree_map(lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t,
                                       (tuple(args), dict(kwargs)))
    with _hf_no_cache(model) as changed:
        if changed:
            notes.append("traced with config.use_cache=False (no KV cache in training)")
        functions = []
        try:
            with _compat.recording_autograd_functions(functions):
                ep = torch.export.export(model, tuple(args), dict(kwargs), strict=False)
        except Exception as e:  # export's own message says which line; add what to do
            raise OasesError(
                f"could not trace {type(model).__name__} with torch.export (non-strict): "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Fix: make the model's "
                "forward traceable for the given example_inputs (no data-dependent Python control flow "
                "on tensor values), see the full error above." + moe.trace_hint(model)
            ) from e
    notes.extend(_check_custom_functions(model, functions))
    gm = ep.module()
    _check_static_shapes(model, gm)
    _compat.drop_export_call_hooks(gm)  # per-call input checks in Python, outside the compiled program
    graph = gm.graph
    removed = 0
    for n in list(graph.nodes):
        if n.op == "call_module" and str(n.target).startswith("_guards"):
            graph.erase_node(n)
            removed += 1
        elif n.op == "call_function" and n.target is torch.ops.aten._assert_tensor_metadata.default:
            graph.erase_node(n)
            removed += 1
    for name in [k for k, _ in gm.named_children() if k.startswith("_guards")]:
        delattr(gm, name)
    if removed:
        notes.append(f"removed {removed} export guard/metadata assertion nodes (oases_fx checks inputs itself)")
    graph.lint()
    gm.recompile()
    flat, _ = pytree.tree_flatten((tuple(args), dict(kwargs)))
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(flat):
        flat = [x for x in flat if isinstance(x, torch.Tensor)]
    return Traced(gm=gm, flat_inputs=flat, notes=notes)
