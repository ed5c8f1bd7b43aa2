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
from oases_fx.errors import ShardingError, describe
from oases_fx.propagation import linear_parts, weight_arg

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


def _params(gm: fx.GraphModule) -> set:
    """get_attr nodes of trainable parameters."""
    names = {name for name, p in gm.named_parameters(remove_duplicate=False) if p.requires_grad}
    return {n for n in gm.graph.nodes if n.op == "get_attr" and n.target in names}


def _check_splittable(region, batch_dims: dict, params: set, n_chunks: int) -> None:
    """A region on 1/n of the batch needs an input that carries the batch, and may hand only its
    output (the row, which must carry the batch too) to the rest of the graph."""
    in_region = set(region.nodes)
    outside = {a for n in region.nodes for a in n.all_input_nodes if a not in in_region and a not in params}
    fix = "Fix: run this region at the full TMP degree (tp_degree=None in its RegionPlan)."
    if not any(batch_dims.get(a.name) is not None for a in outside):
        raise ShardingError(
            f"region '{region.name}' is planned at TMP degree {region.degree}, which splits its batch into "
            f"{n_chunks} chunks, but none of its inputs carries a batch dim. {fix}")
    for n in region.nodes:
        if n is not region.row and n.op == "call_function" and any(u not in in_region for u in n.users):
            raise ShardingError(
                f"{describe(n)} in region '{region.name}' is used outside the region, which runs at TMP "
                f"degree {region.degree} on 1/{n_chunks} of the batch. {fix}")
    if batch_dims.get(region.row.name) is None:
        raise ShardingError(f"region '{region.name}' (TMP degree {region.degree}): its output has no batch dim "
                            f"to gather. {fix}")


def insert_collectives_pass(gm: fx.GraphModule, *, group_name: str, skip: bool = False,
                            grad_inputs: frozenset = frozenset(), subgroups: dict = None) -> fx.GraphModule:
    """Insert f before and g after each sharded region (ACT). `skip` inserts no-op stand-ins
    (the no-communication floor for benchmarks; values are wrong by design).

    A region of degree d < tp (RegionMatch.degree, with its groups in `subgroups[d]`, a
    mesh.DegreeGroups) runs on chunk c of n = tp/d of the batch: every input that carries the batch
    (gm.meta["oases"]["batch_dims"]) enters through batch_scatter (batch_slice without gradient),
    f and g run over the inner group (none for d=1), the output after g and the row bias leaves
    through batch_gather over the cross group, and every trainable parameter of the region goes
    through f over the cross group (copy_to_tp on the cross group: its gradient, from 1/n of the
    batch, is summed over the n replicas in the backward graph)."""
    f_fn = runtime.skip_copy_to_tp if skip else runtime.copy_to_tp
    g_fn = runtime.skip_reduce_from_tp if skip else runtime.reduce_from_tp
    scatter_fn = runtime.skip_batch_scatter if skip else runtime.batch_scatter
    gather_fn = runtime.skip_batch_gather if skip else runtime.batch_gather
    subgroups = subgroups or {}
    gm_meta = gm.meta.setdefault("oases", {})
    inserted = gm_meta.setdefault("collectives", [])
    batch_dims = gm_meta.get("batch_dims", {})
    needs_grad = _needs_grad(gm, set(grad_inputs))
    params = _params(gm)
    graph = gm.graph

    def add(fn, args, where, region, role, src, before=True):
        with (graph.inserting_before(where) if before else graph.inserting_after(where)):
            node = graph.call_function(fn, args)
        node.meta["val"] = src.meta.get("val")
        meta.update(node, region=region.name, role=role, placement="R")
        return node

    for region in gm_meta.get("regions", []):
        st = region.state
        grp = subgroups.get(region.degree)
        inner = group_name if grp is None else grp.inner_group_name
        if grp is not None:
            _check_splittable(region, batch_dims, params, grp.n)
        in_region = set(region.nodes)
        entered, f_nodes = {}, {}  # outside node -> its scattered / cross-f'd stand-in; -> its f
        for n in region.nodes:
            if n.op != "call_function":
                continue
            p = st.placement.get(n)
            sharded_out = n is region.row or (p is not None and not isinstance(p, tuple)) or (
                isinstance(p, tuple) and any(v is not None for v in p))
            parts = linear_parts(n)
            weight_like = {parts[1], parts[2], weight_arg(n)} if parts else set()  # weight_arg: w.T
            weight_like |= set(st.param_inputs) | set(st.param_inputs.values())  # sharded norm weights
            if n in st.replicated_path:
                # a replicated key/value projection (kv heads < tp) and what follows it up to the slice
                # for this rank's heads: each rank's gradient there is partial (its own q heads only), so
                # every gradient-carrying input -- x, the kv weight and bias, a k-norm weight -- enters
                # through f and its gradient is summed over TMP
                sharded_out, weight_like = True, set()
            for a in n.all_input_nodes:
                if a in in_region:
                    continue
                b = a
                if grp is not None:
                    if a not in entered:
                        entered[a] = _enter(a, n, grp, batch_dims, needs_grad, params, add, region, scatter_fn,
                                            f_fn, inserted)
                    b = entered[a]
                # f over the inner group: replicated, grad-carrying inputs of nodes producing sharded values.
                if (inner is not None and sharded_out and a not in weight_like and a in needs_grad
                        and st.of(a) is None):
                    if a not in f_nodes:
                        f_nodes[a] = add(f_fn, (b, inner), b, region, "copy_to_tp", a, before=False)
                        inserted.append(f"{region.name}: copy_to_tp (f) on {a.name}")
                    b = f_nodes[a]
                if b is not a:
                    n.replace_input_with(a, b)
        # a mean/sum over the sharded dim (a norm's statistics): local value all-reduced (g), mean / d
        for n in st.partial_reductions if inner is not None else ():
            users_n = list(n.users)
            # forward: sum of the ranks' partial statistics (g); backward: the statistic's gradient is
            # itself partial (each rank's shard uses it), so it is summed too (f)
            out_n = add(g_fn, (n, inner), n, region, "reduce_from_tp", n, before=False)
            out_n = add(f_fn, (out_n, inner), out_n, region, "copy_to_tp", n, before=False)
            if n.target is aten.mean.dim:
                out_n = add(aten.div.Tensor, (out_n, region.degree or 1), out_n, region, "reduce_from_tp", n,
                            before=False)
            for u in users_n:
                u.replace_input_with(n, out_n)
            inserted.append(f"{region.name}: reduce_from_tp (g) of the statistics {n.name} over the sharded width")
        # g after the row linear (over the inner group; none for d=1); its bias after g.
        row = region.row
        x, w, bias, _ = linear_parts(row)
        users = list(row.users)
        out = row
        if inner is not None:
            if row.target is aten.addmm.default:
                row.target = aten.mm.default
                row.args = (x, w)
            elif bias is not None:
                row.args = (x, w)
            out = add(g_fn, (row, inner), row, region, "reduce_from_tp", row, before=False)
            if isinstance(bias, fx.Node):
                out = add(aten.add.Tensor, (out, bias), out, region, "row_bias", row, before=False)
            inserted.append(f"{region.name}: reduce_from_tp (g) after {row.name}"
                            + (f", bias {bias.target} added after it" if isinstance(bias, fx.Node) else ""))
        if grp is not None:
            dim = batch_dims[row.name]
            out = add(gather_fn, (out, grp.n, grp.chunk, dim, grp.cross_group_name), out, region,
                      "batch_gather", row, before=False)
            inserted.append(f"{region.name}: batch_gather of its {grp.n} batch chunks (dim {dim}) after {row.name}")
        for u in users:
            u.replace_input_with(row, out)
    graph.lint()
    gm.recompile()
    return gm


def _enter(a, first_user, grp, batch_dims, needs_grad, params, add, region, scatter_fn, f_fn, inserted):
    """The stand-in for outside node `a` inside a region of degree d < tp: a parameter through f
    over the cross group, a batch-carrying input through batch_scatter (batch_slice without a
    gradient), anything else (tables, constants) unchanged."""
    if a in params:
        inserted.append(f"{region.name}: copy_to_tp (f) over the cross group of {grp.n} on {a.target} "
                        "(weight gradient summed over the batch chunks)")
        return add(f_fn, (a, grp.cross_group_name), first_user, region, "copy_to_cross", a)
    dim = batch_dims.get(a.name)
    if dim is None:
        return a
    if a in needs_grad:
        inserted.append(f"{region.name}: batch_scatter (chunk {grp.chunk} of {grp.n}, dim {dim}) on {a.name}")
        return add(scatter_fn, (a, grp.n, grp.chunk, dim, grp.cross_group_name), first_user, region,
                   "batch_scatter", a)
    return add(runtime.batch_slice, (a, grp.n, grp.chunk, dim), first_user, region, "batch_slice", a)

