"""Fewer tensors saved for backward: a view's base saved once instead of each view (issue 14: host time).

Every tensor the forward saves for the backward costs host time per step, whatever its size: AOTAutograd's
save (a detach for a view) and unpack, autograd's SavedVariable, and with cudagraphs=True cudagraph trees'
per-output work, which for an output aliasing another output's storage rebuilds the tensor from its metadata
in Python on every replay. The partitioner saves q, k and v of one fused qkv matmul as three views of one
buffer; k sub-batches save k such triples. Here each saved view (a chain of view ops: view, transpose,
permute, slice, select, (un)squeeze, expand, detach, alias, getitem of split/chunk/unbind) is replaced by its
base, saved once, and the chain is replayed at the top of the backward graph (views are metadata only: under
CUDA graphs the replay runs no kernel and no Python per step).

Values are bitwise the same (the same ops on the same storage). Memory is the same where the compiled forward
returns the views as aliases of their base's buffer (Inductor's ReinterpretView; the storage held is the
base's either way). Graphs that also save symbolic ints, opaque objects or tensors without a version-counter
check are left unchanged (``stats`` says so).

Wiring (not done here; the backend's, oases_fx/backend.py): ``wrap_partition(fn)`` around the partitioner,
for aot_eager as AOTAutograd's ``partition_fn``, for Inductor as ``torch._inductor.config
.custom_partitioner_fn = Partitioner()`` (Inductor's own joint-graph passes still run before it).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

aten = torch.ops.aten

VIEW_OPS = frozenset({
    aten.view.default, aten._unsafe_view.default, aten.transpose.int, aten.t.default, aten.permute.default,
    aten.slice.Tensor, aten.select.int, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
    aten.expand.default, aten.detach.default, aten.alias.default,
})
SPLIT_OPS = frozenset({aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int})


def view_chain(n):
    """(base, [nodes from the base outward]) following `n` back through view ops; ([], n) if `n` is no view."""
    chain = []
    while isinstance(n, fx.Node) and n.op == "call_function":
        if n.target in VIEW_OPS and n.args and isinstance(n.args[0], fx.Node):
            chain.append(n)
            n = n.args[0]
        elif (n.target is operator.getitem and isinstance(n.args[0], fx.Node) and n.args[0].op == "call_function"
              and n.args[0].target in SPLIT_OPS):
            chain.append(n)
            n = n.args[0].args[0]
        else:
            break
    return n, chain[::-1]


def _is_tensor(n) -> bool:
    return isinstance(n, fx.Node) and isinstance(n.meta.get("val"), torch.Tensor)


def dedupe_saved_views(fw: fx.GraphModule, bw: fx.GraphModule, num_fwd_outputs: int) -> tuple:
    """Rewrite a partitioned (fw, bw) pair in place: saved views become their bases, saved once. Returns
    (fw, bw, how many fewer saved tensors, or a string saying why the pair was left unchanged)."""
    out_node = next(iter(fw.graph.find_nodes(op="output")))
    outs = list(out_node.args[0])
    saved = outs[num_fwd_outputs:]
    bw_ph = list(bw.graph.find_nodes(op="placeholder"))
    if not all(_is_tensor(s) and not s.meta.get("saved_tensor_with_no_vc_check") for s in saved):
        return fw, bw, "saves more than tensors with a version-counter check"
    if len(bw_ph) < len(saved) or any(p.name != s.name for p, s in zip(bw_ph, saved)):
        return fw, bw, "the backward's first inputs are not the saved values by name"
    new_saved, at, plan = [], {}, []  # plan: (backward placeholder, index of its base in new_saved, view chain)
    for s, ph in zip(saved, bw_ph):
        base, chain = view_chain(s)
        if chain and not _is_tensor(base):
            base, chain = s, []
        if base not in at:
            at[base] = len(new_saved)
            new_saved.append(base)
        plan.append((ph, at[base], chain))
    removed = len(saved) - len(new_saved)
    if removed == 0:
        return fw, bw, 0
    g = bw.graph
    first_op = next(n for n in g.nodes if n.op != "placeholder")
    new_ph = []
    with g.inserting_before(bw_ph[0]):
        for i, b in enumerate(new_saved):
            p = g.placeholder(f"saved_{b.name}")
            p.meta = dict(b.meta)
            new_ph.append(p)
    with g.inserting_before(first_op):
        for ph, i, chain in plan:
            cur = new_ph[i]
            for c in chain:
                if c.target is operator.getitem:
                    split = c.args[0]
                    parts = g.call_function(split.target, (cur, *split.args[1:]), dict(split.kwargs))
                    parts.meta = dict(split.meta)
                    cur = g.call_function(operator.getitem, (parts, c.args[1]))
                else:
                    cur = g.call_function(c.target, (cur, *c.args[1:]), dict(c.kwargs))
                cur.meta = dict(c.meta)
            ph.replace_all_uses_with(cur)
            g.erase_node(ph)
    g.lint()
    bw.recompile()
    out_node.args = (tuple(outs[:num_fwd_outputs] + new_saved),)  # views no longer saved stay (dead) for the compiler
    fw.graph.lint()
    fw.recompile()
    return fw, bw, removed


def wrap_partition(partition):
    """`partition` (AOTAutograd's partition_fn signature) followed by dedupe_saved_views; ``.stats`` lists
    each partition's result (fewer saved tensors, or why unchanged)."""
    stats = []

    def fn(joint, joint_inputs, *, num_fwd_outputs, **kwargs):
        fw, bw = partition(joint, joint_inputs, num_fwd_outputs=num_fwd_outputs, **kwargs)
        fw, bw, got = dedupe_saved_views(fw, bw, num_fwd_outputs)
        stats.append(got)
        return fw, bw

    fn.stats = stats
    return fn


try:  # Inductor's partitioner hook (torch._inductor.config.custom_partitioner_fn)
    from torch._inductor.custom_graph_pass import CustomPartitionerFn as _PartitionerBase
except ImportError:  # a torch without it
    _PartitionerBase = None

if _PartitionerBase is not None:
    class Partitioner(_PartitionerBase):
        """Inductor's default (min-cut) partition, then dedupe_saved_views (module level: Inductor's cache
        key pickles its config, this object included)."""

        def __init__(self):
            from torch._functorch.partitioners import min_cut_rematerialization_partition

            self.fn = wrap_partition(min_cut_rematerialization_partition)
            self.stats = self.fn.stats

        def __call__(self, gm, joint_inputs, **kwargs):
            return self.fn(gm, joint_inputs, **kwargs)

        def uuid(self):  # part of Inductor's FX-graph cache key: this file's code
            from torch._inductor.custom_graph_pass import get_hash_for_files

            return get_hash_for_files((__file__,))

        def __getstate__(self):  # the cache key pickles the config: the code identifies it, not the stats
            return {}

        def __setstate__(self, state):
            self.__init__()


def inductor_partitioner():
    """A torch._inductor.config.custom_partitioner_fn: Inductor's default (min-cut) partition, then
    dedupe_saved_views. None where this torch has no such hook."""
    return Partitioner() if _PartitionerBase is not None else None
