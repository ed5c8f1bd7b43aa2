"""insert_collectives (ACT): Megatron's f and g around every sharded TMP region.

Kind: ACT. Precondition: annotate_sharding and shard have run. Invariant: every replicated
tensor that needs a gradient and enters a region goes through f (`copy_to_tp`: identity forward,
gradient all-reduce backward), once per region; every row linear's partial output goes through
g (`reduce_from_tp`: all-reduce forward), and a row-parallel bias is added after g so it is
counted once.

    before:  y = linear(h, W_o, b_o)
    after:   y0 = linear(h, W_o); y1 = reduce_from_tp(y0, "tp"); y = add(y1, b_o)
"""
from __future__ import annotations

import torch
import torch.fx as fx

from oases_fx import meta, runtime
from oases_fx.propagation import linear_parts

aten = torch.ops.aten


def _needs_grad(gm: fx.GraphModule, grad_inputs: set) -> set:
    params = {name for name, p in gm.named_parameters(remove_duplicate=False) if p.requires_grad}
    out = set()
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target in params:
            out.add(n)
        elif n.op == "placeholder" and n.name in grad_inputs:
            out.add(n)
        elif n.op == "call_function" and any(a in out for a in n.all_input_nodes):
            out.add(n)
    return out


def insert_collectives_pass(gm: fx.GraphModule, *, group_name: str, skip: bool = False,
                            grad_inputs: frozenset = frozenset()) -> fx.GraphModule:
    """Insert f before and g after each sharded region (ACT). `skip` inserts no-op stand-ins
    (the no-communication floor for benchmarks; values are wrong by design)."""
    f_fn = runtime.skip_copy_to_tp if skip else runtime.copy_to_tp
    g_fn = runtime.skip_reduce_from_tp if skip else runtime.reduce_from_tp
    gm_meta = gm.meta.setdefault("oases", {})
    inserted = gm_meta.setdefault("collectives", [])
    needs_grad = _needs_grad(gm, set(grad_inputs))
    graph = gm.graph
    for region in gm_meta.get("regions", []):
        st = region.state
        in_region = set(region.nodes)
        # f: replicated, grad-carrying inputs of nodes that produce sharded values.
        f_nodes = {}
        for n in region.nodes:
            p = st.placement.get(n)
            sharded_out = n is region.row or (p is not None and not isinstance(p, tuple)) or (
                isinstance(p, tuple) and any(v is not None for v in p))
            if not sharded_out or n.op != "call_function":
                continue
            parts = linear_parts(n)
            weight_like = {parts[1], parts[2]} if parts else set()
            for a in n.all_input_nodes:
                if a in weight_like or a in in_region or a not in needs_grad or st.of(a) is not None:
                    continue
                if a not in f_nodes:
                    with graph.inserting_after(a):
                        f = graph.call_function(f_fn, (a, group_name))
                    f.meta["val"] = a.meta.get("val")
                    meta.update(f, region=region.name, role="copy_to_tp", placement="R")
                    f_nodes[a] = f
                    inserted.append(f"{region.name}: copy_to_tp (f) on {a.name}")
                n.replace_input_with(a, f_nodes[a])
        # g after the row linear; its bias after g.
        row = region.row
        x, w, bias, _ = linear_parts(row)
        if row.target is aten.addmm.default:
            row.target = aten.mm.default
            row.args = (x, w)
        elif bias is not None:
            row.args = (x, w)
        users = list(row.users)
        with graph.inserting_after(row):
            g = graph.call_function(g_fn, (row, group_name))
        g.meta["val"] = row.meta.get("val")
        meta.update(g, region=region.name, role="reduce_from_tp", placement="R")
        out = g
        if isinstance(bias, fx.Node):
            with graph.inserting_after(g):
                out = graph.call_function(aten.add.Tensor, (g, bias))
            out.meta["val"] = row.meta.get("val")
            meta.update(out, region=region.name, role="row_bias", placement="R")
        for u in users:
            u.replace_input_with(row, out)
        inserted.append(f"{region.name}: reduce_from_tp (g) after {row.name}"
                        + (f", bias {bias.target} added after it" if isinstance(bias, fx.Node) else ""))
    graph.lint()
    gm.recompile()
    return gm
