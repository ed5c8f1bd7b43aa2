"""Mixture-of-experts with 3-D expert parameters (Hugging Face's ``@use_experts_implementation``
experts: Mixtral, OLMoE, Qwen-MoE, ...): every expert's FFN sharded Megatron-style, the routing replicated.

HF keeps all experts of a layer in two parameters, ``gate_up_proj`` (E, 2*I, H) and ``down_proj``
(E, H, I) (``is_transposed=True`` families: (E, H, 2*I) and (E, I, H)), and its default
``experts_implementation="grouped_mm"`` sorts the routed (token, expert) pairs by expert and runs

    h_S2I = grouped_mm(x_SH, gate_up_proj.transpose(-2, -1), offs)     # column: out dim sharded
    a_SI  = act(h.chunk(2, -1)[0]) * h.chunk(2, -1)[1]                 # gate and up: 2 pieces
    y_SH  = grouped_mm(a_SI, down_proj.transpose(-2, -1), offs)        # row: contracted dim sharded

(S: routed pairs, E experts, offs: the cumulative count of pairs per expert). The grouped matmul is
``torch.ops.transformers.grouped_mm_fallback`` (any device when traced in a dtype other than bf16,
which is what torch.export does for fp32) or ``aten._grouped_mm`` (``torch.nn.functional.grouped_mm``:
bf16 under compile, CUDA SM80+ or CPU with torch > 2.8); both take (input (S, K), weight (E, K, N),
offs) and return (S, N). This module makes both linear-like for the analysis
(``propagation.LINEAR_LIKE``) with a sharding rule (``propagation.register_rule``): a weight sharded on
its out dim is a column (output sharded on its last dim, per piece: gate and up each split, like a
fused q/k/v), one sharded on its in dim is a row (input sharded on its last dim, output a partial sum
made whole by insert_collectives' g). Everything else of the layer (the router linear, softmax/top-k,
the sort, histc/cumsum offsets, the gathers and the un-permute) sees only replicated tensors and is
replicated.

The other implementations: ``"batched_mm"`` gathers ``weight[expert_ids]`` per routed pair (an
index of the parameter: no rule, the block is declined and said) and ``"eager"`` loops over the experts
hit (data-dependent, not traceable by torch.export). Select the default with
``config._experts_implementation = "grouped_mm"`` (or ``from_config(..., experts_implementation=...)``).

Sub-batches: the dropless routing is per token (a token's output is the weighted sum of its top-k
experts applied to it alone), so the experts module as a whole is row-wise along the tokens even
though its sort and offsets are not; :func:`token_local_units` names its nodes for split_sub_batches.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from oases_fx import propagation
from oases_fx import rules as _rules
from oases_fx.passes.graph_utils import module_path
from oases_fx.propagation import Incompatible, ndim, register_rule
from oases_fx.rules import WEIGHT_VIEW_OPS

aten = torch.ops.aten

# Layout of a 3-D expert parameter: "eoi" is (E, out, in), used transposed by HF's grouped_linear
# (is_transposed=False); "eio" is (E, in, out), used as it is. -> (column dim, row dim) of the parameter.
EXPERT_LAYOUTS = {"eoi": (1, 2), "eio": (2, 1)}

_TRANSPOSES = (aten.transpose.int, aten.permute.default)


def grouped_mm_ops() -> tuple:
    """The grouped matmul overloads present in this process (transformers' op exists once
    transformers.integrations.moe is imported)."""
    ops = [aten._grouped_mm.default]
    try:
        ops.append(torch.ops.transformers.grouped_mm_fallback.default)
    except (AttributeError, RuntimeError):
        pass
    return tuple(ops)


def _swaps_last_two(node) -> bool:
    if node.target is aten.transpose.int:
        return sorted(int(d) % 3 for d in node.args[1:3]) == [1, 2]
    return [int(d) % 3 for d in node.args[1]] == [0, 2, 1]


def _offs(node):
    if len(node.args) > 2:
        return node.args[2]
    return node.kwargs.get("offs")


def expert_matmul_parts(node) -> Optional[tuple]:
    """(activation, 3-D weight get_attr, None, layout, weight as passed) of a grouped matmul whose
    weight is an expert parameter (directly or transposed on its last two dims), else None."""
    if node.op != "call_function" or node.target not in grouped_mm_ops() or len(node.args) < 2:
        return None
    if node.target is aten._grouped_mm.default and (node.kwargs.get("bias") is not None or len(node.args) > 3):
        return None  # a bias inside the op: not HF's pattern (it adds the bias after), no rule
    x, w = node.args[:2]
    if not isinstance(x, fx.Node) or ndim(x) != 2 or not isinstance(w, fx.Node) or ndim(w) != 3:
        return None
    base, layout = w, "eio"
    if base.op == "call_function" and base.target in _TRANSPOSES and _swaps_last_two(base):
        base, layout = base.args[0], "eoi"
    if not (isinstance(base, fx.Node) and base.op == "get_attr"):
        return None
    return x, base, None, layout, w


def _expert_matmul_rule(node: fx.Node, st) -> None:
    """Column: weight sharded on its out dim, replicated input -> output sharded on its last dim.
    Row: weight sharded on its in dim, input sharded on its last dim -> partial sum (st.rows).
    The offsets (routing) must be replicated; a replicated weight keeps the input's placement
    unless that is the contracted dim."""
    parts = expert_matmul_parts(node)
    offs = _offs(node)
    if isinstance(offs, fx.Node) and st.of(offs) is not None:
        raise Incompatible(f"grouped matmul {node.name} with sharded offsets")
    if parts is None:
        if any(st.of(a) is not None for a in node.all_input_nodes):
            raise Incompatible(f"grouped matmul {node.name} whose weight is no expert parameter gets a sharded "
                               "input")
        st.placement[node] = None
        return
    x, w, _, layout, _ = parts
    if _rules.parallel_weight_rule(node, st, x, w, *EXPERT_LAYOUTS[layout], f"expert matmul {node.name}"):
        return
    if st.of(x) is not None:
        raise Incompatible(f"grouped matmul {node.name} with a replicated expert weight gets a sharded input")
    st.placement[node] = None


def _topk_rule(node: fx.Node, st) -> None:
    """topk over a dim that is not the sharded one (the router's top-k over the experts): values and
    indices keep the input's placement."""
    x = node.args[0]
    d = st.of(x)
    dim = int(node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", -1)) % ndim(x)
    if d is not None and d == dim:
        raise Incompatible(f"topk {node.name} over the sharded dim")
    st.placement[node] = (d, d)


def register() -> None:
    """Make the grouped matmuls known to the analysis (idempotent; called where regions are found,
    since transformers' op is registered only once transformers' MoE code is imported)."""
    ops = grouped_mm_ops()
    register_rule(*ops)(_expert_matmul_rule)
    if propagation.RULES.get(aten.topk.default, _topk_rule) is _topk_rule:  # unless a general rule exists
        register_rule(aten.topk.default)(_topk_rule)
    for op in ops:
        propagation.LINEAR_LIKE[op] = expert_matmul_parts


FIX = ("Fix: use Hugging Face's default experts implementation, which oases_fx shards "
       "(model.set_experts_implementation('grouped_mm'), or from_config(..., experts_implementation='grouped_mm')).")


def decline_fix(weight: fx.Node) -> str:
    """What to do about a declined block whose weight is a 3-D expert parameter gathered per routed
    pair (HF's 'batched_mm' experts implementation: weight[expert_ids]), else "". Only there: a
    3-D weight read whole (Llama4TextExperts' bmm over every expert) has no experts_implementation
    to switch, and the fix would send its user after a setting the model ignores."""
    v = weight.meta.get("val")
    if not (isinstance(v, torch.Tensor) and v.dim() == 3):
        return ""
    seen, stack = set(), [weight]
    while stack:  # through a few view-like ops, as annotate_sharding._weight_param walks
        n = stack.pop()
        if n in seen or len(seen) > 8:
            continue
        seen.add(n)
        for u in n.users:
            if u.op == "call_function" and u.target is torch.ops.aten.index.Tensor and u.args[0] is n:
                return f". {FIX}"
            if u.op == "call_function" and u.target in WEIGHT_VIEW_OPS:
                stack.append(u)
    return ""


def trace_hint(model) -> str:
    """A sentence for a failed trace of a model whose experts run HF's 'eager' loop (data-dependent).
    Only for a model with such experts (modules HF's @use_experts_implementation set up): every HF
    config says 'eager', a T5 or BERT too, and the hint would send its user after experts it has not."""
    impl = getattr(getattr(model, "config", None), "_experts_implementation", None)
    experts = any(hasattr(m, "has_gate") and hasattr(m, "is_concatenated") for m in model.modules())
    return (f" The model's experts_implementation is '{impl}' (a data-dependent loop over the experts hit). {FIX}"
            if impl == "eager" and experts else "")


def checkpoint_hint(missing: list, keys, model_keys=()) -> str:
    """Why load_pretrained finds a model tensor in no file of the folder: save_pretrained wrote it under
    other keys that transformers converts while loading (its checkpoint conversion for the architecture:
    the per-expert layout experts.0.w1.weight, ...; GraniteMoe's input_linear / router.layer); say what
    to do instead, else "". `keys`: the checkpoint's keys; `model_keys`: the model's."""
    fix = ("load_pretrained reads only tensors stored under the model's keys. Fix: model.load_full_state_dict("
           "AutoModelForCausalLM.from_pretrained(folder).state_dict()), or a DCP checkpoint of the compiled model.")
    if (any(k.endswith(("experts.gate_up_proj", "experts.down_proj", "experts.up_proj")) for k in missing)
            and any(".experts.0." in k for k in keys)):
        return (" The checkpoint stores the experts one by one (Hugging Face's per-expert layout, converted to the "
                "3-D gate_up_proj / down_proj by transformers while loading); " + fix)
    owners = {k.rsplit(".", 2)[0] for k in missing if k.count(".") >= 2}  # the module above each missing tensor's
    own = set(model_keys) | set(missing)
    other = sorted(k for k in keys if k not in own and any(k.startswith(o + ".") for o in owners))
    if not other:
        return ""
    return (f" The checkpoint holds other tensors under the same modules ({', '.join(other[:4])}"
            f"{', ...' if len(other) > 4 else ''}): transformers renames or converts this architecture's "
            "checkpoint keys while loading (its checkpoint conversion mapping); " + fix)


def num_experts(node) -> int:
    """Blocks an MoE region counts (one per expert, the README's convention): E of its 3-D weight."""
    parts = expert_matmul_parts(node)
    return int(parts[1].meta["val"].shape[0]) if parts else 1


def token_local_units(gm: fx.GraphModule) -> list:
    """The nodes of every experts module that runs a grouped expert matmul, one set per module:
    inside it the sort by expert, the offsets and the gathers mix the tokens, but its output for each
    token depends on that token's inputs alone (dropless top-k routing), so split_sub_batches may run
    it per sub-batch, as a whole (never cut inside). Found by the module owning the 3-D expert
    parameters (nn_module_stack)."""
    register()
    owners = {}
    for n in gm.graph.nodes:
        parts = expert_matmul_parts(n)
        if parts is not None:
            owners.setdefault(str(parts[1].target).rsplit(".", 1)[0], set())
    for n in gm.graph.nodes:
        p = module_path(n) if n.op == "call_function" else None
        for o, nodes in owners.items():
            if p is not None and (p == o or p.startswith(o + ".")):
                nodes.add(n)
    return [nodes for nodes in owners.values() if nodes]
