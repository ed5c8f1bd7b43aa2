"""Small fx utilities shared by the passes."""
from __future__ import annotations

import heapq
from typing import Optional

import torch.fx as fx


def module_path(node: fx.Node) -> Optional[str]:
    """The path of the innermost module whose forward made `node` ("transformer.h.3.mlp"; torch.export's
    nn_module_stack), or None for a node of the root module or one without the record (a node a pass
    added). Which block or experts module a node belongs to (layers.Blocks, moe.token_local_units)."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [v[0] for v in stack.values() if isinstance(v, tuple) and v and v[0]]
    return paths[-1] if paths else None


def is_segment_end(n: fx.Node) -> bool:
    """The post-all-reduce output of a TMP region (g, or the row bias added after it, or the
    batch_gather after those in a region of degree d < tp): where one segment of the
    batch-parallel span ends (split_sub_batches orders copies by segment, recompute_policy
    checkpoints each segment)."""
    from oases_fx import meta

    if n.op != "call_function" or meta.get(n).role not in _EXIT_ROLES:  # not the bias get_attr itself
        return False
    return not any(meta.get(u).role in _EXIT_ROLES and meta.get(u).region == meta.get(n).region for u in n.users)


_EXIT_ROLES = ("reduce_from_tp", "row_bias", "batch_gather")


def region_span(graph: fx.Graph) -> list:
    """All nodes from the first to the last node of any TMP region, in graph order ([] if none):
    the batch-parallel span that split_sub_batches splits and recompute_policy checkpoints."""
    from oases_fx import meta

    nodes = list(graph.nodes)
    marked = [i for i, n in enumerate(nodes) if n.op == "call_function" and meta.get(n).region is not None]
    return nodes[marked[0]: marked[-1] + 1] if marked else []


def stable_topo_sort(graph: fx.Graph, key=None, after: Optional[dict] = None) -> None:
    """Reorder nodes topologically, keeping the current order (or the order of `key(node)`)
    wherever dependencies allow. ``after``: {node: nodes that must precede it} beyond the data
    edges (an in-place write and the other readers of the storage it writes: no data edge orders them)."""
    nodes = list(graph.nodes)
    pos = {n: (key(n) if key else i) for i, n in enumerate(nodes)}
    preds = {n: set(n.all_input_nodes) | set((after or {}).get(n, ())) for n in nodes}
    succs = {n: [] for n in nodes}
    for n, ps in preds.items():
        for p in ps:
            succs[p].append(n)
    indeg = {n: len(ps) for n, ps in preds.items()}
    ready = [(pos[n], n.name) for n in nodes if indeg[n] == 0]
    by_name = {n.name: n for n in nodes}
    heapq.heapify(ready)
    out = []
    while ready:
        _, name = heapq.heappop(ready)
        n = by_name[name]
        out.append(n)
        for u in succs[n]:
            indeg[u] -= 1
            if indeg[u] == 0:
                heapq.heappush(ready, (pos[u], u.name))
    assert len(out) == len(nodes), "graph has a cycle"
    out_node = [n for n in out if n.op == "output"]
    prev = None
    for n in [n for n in out if n.op != "output"] + out_node:
        if prev is not None and prev.next is not n:
            prev.append(n)
        prev = n


def outline(gm: fx.GraphModule, group: list, name: str, wrapper, extra_args=()) -> list:
    """Move `group` (nodes of gm, in order) into a submodule `name` called as
    wrapper(submodule, *inputs); returns the getitem nodes that replace the group's outputs."""
    graph = gm.graph
    members = set(group)
    inputs = []
    for n in group:
        for a in n.all_input_nodes:
            if a not in members and a not in inputs:
                inputs.append(a)
    outputs = [n for n in group if any(u not in members for u in n.users)]
    sub = fx.Graph()
    env = {}
    for a in inputs:
        env[a] = sub.placeholder(a.name)
        env[a].meta = dict(a.meta)
    for n in group:
        env[n] = sub.node_copy(n, lambda x: env[x])
    sub.output(tuple(env[o] for o in outputs))
    sub_gm = fx.GraphModule(gm, sub)
    gm.add_submodule(name, sub_gm)
    last = max(list(group) + inputs, key=lambda x: _position(graph, x))
    with graph.inserting_after(last):
        mod = graph.get_attr(name)
    with graph.inserting_after(mod):
        call = graph.call_function(wrapper, (mod, *inputs))
    outs = []
    prev = call
    for i, o in enumerate(outputs):
        with graph.inserting_after(prev):
            g = graph.call_function(__import__("operator").getitem, (call, i))
        g.meta = dict(o.meta)
        o.replace_all_uses_with(g)
        outs.append(g)
        prev = g
    for n in reversed(group):
        graph.erase_node(n)
    return outs


def _position(graph, node):
    for i, n in enumerate(graph.nodes):
        if n is node:
            return i
    raise AssertionError(node)
