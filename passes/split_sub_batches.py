"""split_sub_batches (ACT): run the batch-parallel region as k sub-batch copies joined by split/cat.

Kind: ACT. Preconditions: the sharding passes have run (TMP regions tagged); gm.meta["oases"]
["batch_dims"] maps each traced node name to the dim that carries the batch (oases_fx.analysis:
propagated from the inputs on the one trace; tracing again at batch B+1 only where that fails). Invariant: values are those
of the unsplit graph up to the order of floating-point additions inside batch rows (none: every
op in the region is row-wise), so only ops that mix batch rows (the loss, batch norm) see the
whole batch, and the loss semantics are exact.

The region runs from the first TMP region's first node to the last TMP region's last node,
widened to block boundaries (oases_fx.layers.block_span): over the first region's block's own ops
before it (GPT: block 0's ln_1, so the split is on the block's input, the residual stream) and the
last region's block's ops after it (its dropout and residual add, so the cat is on the block's
output). Every repeated block is then split alike, one structure for compile_layers. An op inside
that mixes batch rows (a sum or mean over the batch dim too) ends the region early (logged, and
listed by explain()); one in the widening before the first region keeps the split where it was,
at that region (logged too). Region inputs that carry the batch are split into k pieces; nodes
that do not depend on the batch (weights, rotary tables) are computed once and shared; region
values used later are joined by cat. Copies are emitted interleaved node by node (A0 B0 A1 B1
...), then ordered segment by segment (SegmentCounter: a segment ends at a TMP region's
all-reduce output, or at its block's end); schedule_overlap then orders them for overlap.

    before:  h = layer_norm(x); y = block(h); z = loss(y)
    after:   x0, x1 = split(x, B/2); h0 = layer_norm(x0); h1 = layer_norm(x1); y0 = block(h0);
             y1 = block(h1); y = cat([y0, y1]); z = loss(y)
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from oases_fx import meta, moe
from oases_fx.errors import InputError, describe
from oases_fx.meta import graph_meta
from oases_fx.layers import Blocks, block_of_region, block_span
from oases_fx.passes.graph_utils import is_segment_end, region_span, stable_topo_sort
from oases_fx.propagation import Incompatible, ShardState, UnknownOp, propagate_node
from oases_fx.rules import SPLIT_OPS, family_of, localise, split_dim

aten = torch.ops.aten

# Nodes insert_collectives adds: row-wise along the batch, their output keeps their input's batch dim
# (batch_scatter/batch_slice/batch_gather change its size, not its position).
INSERTED_ROLES = ("copy_to_tp", "reduce_from_tp", "row_bias", "copy_to_cross", "batch_scatter", "batch_slice",
                  "batch_gather")


def check_batch_splits(batch_size, k: int, degrees=()) -> None:
    """The batch must split into k equal sub-batches, and for each region of TMP degree d < tp
    (`degrees`: (region name, d, n = tp/d) triples) into k*n equal pieces (each sub-batch is cut
    into n chunks, one per inner group): a clear error otherwise (the one place this rule lives;
    compile() calls it before planning and tracing for the split)."""
    if k > 1 and (batch_size is None or batch_size % k):
        raise InputError(
            f"the batch of {batch_size} does not split into num_sub_batches={k} equal sub-batches. "
            f"Fix: use a batch divisible by {k}, or a num_sub_batches that divides {batch_size}."
        )
    for name, d, n in degrees:
        if n > 1 and (batch_size is None or batch_size % (k * n)):
            raise InputError(
                f"region '{name}' runs at TMP degree {d}, so each of the k={k} sub-batches is cut into "
                f"n={n} chunks (tp/d), but the batch of {batch_size} does not split into k*n={k * n} equal "
                f"pieces. Fix: use a batch divisible by {k * n}, a smaller num_sub_batches, or a larger "
                f"degree for '{name}' (RegionPlan tp_degree)."
            )


def split_sub_batches_pass(gm: fx.GraphModule, *, num_sub_batches: int, batch_size: int) -> fx.GraphModule:
    """Split the batch-parallel region into k interleaved sub-batch copies (ACT); k=1: unchanged."""
    k = num_sub_batches
    gm_meta = graph_meta(gm)
    notes = gm_meta.sub_batch_notes
    if k == 1:
        return gm
    check_batch_splits(batch_size, k)
    span = region_span(gm.graph)
    if not span:
        notes.append("no TMP region: nothing to split")
        return gm
    nodes = list(gm.graph.nodes)
    at = {n: i for i, n in enumerate(nodes)}
    lo, hi = at[span[0]], at[span[-1]]
    # widened to block boundaries (the first block's ops before its first region, the last block's
    # after its last), so every repeated block is split alike (oases_fx/layers.py)
    wide = block_span(gm.graph)
    wide_lo, wide_hi = at[wide[0]], at[wide[-1]]
    # an MoE experts module is split whole or not at all (its sort and offsets are per sub-batch)
    unit_sets = moe.token_local_units(gm)
    units = [(min(at[n] for n in u), max(at[n] for n in u)) for u in unit_sets]
    for a, b in units:
        lo = a if a < lo <= b else lo
        hi = b if a <= hi < b else hi
    wide_lo, wide_hi = min(lo, wide_lo), max(hi, wide_hi)
    batch_dims = gm_meta.batch_dims or {}
    # Inputs of the region that carry the batch are split where they enter it (piece() below).
    bd = {}
    for n in nodes:
        d = batch_dims.get(n.name)
        if d is None and n.op == "call_function" and meta.get(n).role in INSERTED_ROLES:
            d = bd.get(n.args[0])  # inserted nodes keep their input's layout
        bd[n] = d
    token_local = set().union(*unit_sets)  # MoE experts: per token as a whole, not op by op
    end, why = _row_wise_until(nodes, wide_lo, wide_hi, bd, token_local, k)
    if end < lo:  # the first block's own ops before its first region mix batch rows: split after them
        notes.append(f"{describe(nodes[end + 1])} of block {Blocks(span).of(span[0])} stays before the split "
                     f"({why}): the split starts at the block's first TMP region, so compile_layers compiles that "
                     "block apart from the others")
        end, why = _row_wise_until(nodes, lo, wide_hi, bd, token_local, k)
    else:
        lo = wide_lo
    first = nodes[lo]
    if why is not None:
        notes.append(f"region ends before {describe(nodes[end + 1])}: {why}")
    for a, b in units:
        if a <= end < b:
            notes.append(f"region ends before {describe(nodes[a])}: the MoE experts module it starts is split "
                         "whole or not at all")
            end = a - 1
    end = _before_written_aliases(nodes, at, lo, end, notes)
    region = [n for n in nodes[lo:end + 1] if n.op == "call_function"]
    if not region:
        return gm
    in_region = set(region)
    graph = gm.graph
    copies = {n: [None] * k for n in region}
    pieces = {}  # outside node -> its k pieces

    def piece(a, i):
        if a not in pieces:
            d = bd[a]
            size = int(a.meta["val"].shape[d])
            with graph.inserting_before(first):
                sp = graph.call_function(aten.split.Tensor, (a, size // k, d))
                meta.update(sp, role="chunk")
                got = []
                for j in range(k):
                    g = graph.call_function(operator.getitem, (sp, j))
                    meta.update(g, role="chunk", sub_batch=j)
                    got.append(g)
            pieces[a] = got
        return pieces[a][i]

    # shared: computed once, depending on no batch-carrying value (transitively: an MoE layer's
    # offsets are counts of its sub-batch's tokens though they have no batch dim themselves)
    shared, batch_dep = [], set()
    for n in region:
        if bd[n] is None and not any(bd.get(a) is not None or a in batch_dep for a in n.all_input_nodes):
            shared.append(n)
        else:
            batch_dep.add(n)
    batch_nodes = [n for n in region if n not in shared]
    for n in batch_nodes:
        for i in range(k):
            def remap(a, i=i):
                if a in copies and copies[a][i] is not None:
                    return copies[a][i]
                if a in in_region:  # shared node
                    return a
                return piece(a, i) if bd.get(a) is not None else a

            with graph.inserting_before(n):
                c = graph.node_copy(n, remap)
            c.meta = dict(n.meta)
            meta.update(c, sub_batch=i)
            _rewrite_shape_args(c, bd[n], k)
            copies[n][i] = c
    # Values used after the region: join the copies.
    copy_nodes = {c for cs in copies.values() for c in cs}
    for n in batch_nodes:
        outside = [u for u in n.users if u not in in_region and u not in copy_nodes]
        if not outside or isinstance(n.meta.get("val"), (list, tuple)):
            continue
        with graph.inserting_after(n):
            cat = graph.call_function(aten.cat.default, (list(copies[n]), bd[n]))
        cat.meta = dict(n.meta)
        meta.update(cat, role="cat", sub_batch=None)
        for u in outside:
            u.replace_input_with(n, cat)
    for n in reversed(batch_nodes):
        if not n.users:
            graph.erase_node(n)
    # Order the copies segment by segment (all of sub-batch 0's segment, then sub-batch 1's, ...):
    # the order Oases runs them in, and the order recompute_policy's checkpoints impose, so random
    # ops draw the same numbers with recomputation on or off.
    seg_of, seg = {}, 0
    segments = SegmentCounter(graph)
    for n in graph.nodes:
        sb = meta.get(n).sub_batch
        if sb is not None and meta.get(n).role != "chunk":
            seg_of[n] = segments.at(n, sb)
        else:
            seg_of[n] = seg  # outside the copies: after the last sub-batch's latest segment end
        if sb == k - 1 and is_segment_end(n):
            seg += 1
    pos = {n: i for i, n in enumerate(graph.nodes)}
    stable_topo_sort(graph, after=_write_order(graph, pos), key=lambda n: (seg_of[n], meta.get(n).sub_batch or 0, pos[n])
                     if meta.get(n).sub_batch is not None and meta.get(n).role != "chunk" else (seg_of[n], -1, pos[n]))
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    notes.append(f"split {len(batch_nodes)} nodes into {k} sub-batches of {batch_size // k} "
                 f"({len(shared)} batch-independent nodes shared, {len(pieces)} inputs split)")
    return gm


def _alias_root(n):
    """The node whose storage `n` views (through view ops and getitem of split/chunk/unbind), or `n`."""
    while isinstance(n, fx.Node) and n.op == "call_function" and n.args and isinstance(n.args[0], fx.Node):
        t = n.target
        if t is operator.getitem:
            n = n.args[0]
            continue
        schema = getattr(t, "_schema", None)
        if schema is None or not schema.returns or schema.returns[0].alias_info is None \
                or schema.returns[0].alias_info.is_write:
            break
        n = n.args[0]  # a view of its first argument
    return n


def _write_order(graph: fx.Graph, pos: dict) -> dict:
    """{node: nodes it must follow}: each in-place write keeps its place among the other readers and
    writers of the storage it writes, as in `pos` (the order before the sub-batch sort). No data edge
    orders them: reordered by segment, a write outside the copies (MLA's key_states[..., n:].copy_(k_pe)
    after the split region) moved after the attention that reads the buffer, silently."""
    after = {}
    for m in graph.nodes:
        for w in _written_args(m):
            for u in _alias_users(_alias_root(w)):
                if u is m or u not in pos:
                    continue
                if pos[u] > pos[m]:
                    after.setdefault(u, set()).add(m)
                else:
                    after.setdefault(m, set()).add(u)
    return after


def _alias_users(r) -> list:
    """Every node reading `r` or a view of it (views followed transitively)."""
    seen, todo, users = {r}, [r], []
    while todo:
        n = todo.pop()
        for u in n.users:
            users.append(u)
            if u not in seen and _alias_root(u) is not u and u.args and u.args[0] is n:
                seen.add(u)
                todo.append(u)
    return users


def _written_args(n) -> list:
    """The tensor arguments an in-place op of `n` writes (copy_'s self, index_put_'s self, ...)."""
    schema = getattr(n.target, "_schema", None) if n.op == "call_function" else None
    if schema is None or not schema.is_mutable:
        return []
    out = []
    for i, a in enumerate(schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            v = n.args[i] if i < len(n.args) else n.kwargs.get(a.name)
            if isinstance(v, fx.Node):
                out.append(v)
    return out


def _before_written_aliases(nodes, at, lo, end, notes) -> int:
    """End the region before any tensor that an op after it writes in place (through a view): the
    copies' values leave the region through a cat, a new tensor, so a write after the region into a
    view of the region's tensor would land on the cat while the region's readers of the original
    (sub-batch copies) never see it: a silent wrong value (seen: zeros_like, then key[..., :n].copy_(...)
    in an attention the sharding declined, the split ending at the copy_)."""
    while end >= lo:
        hit = None
        for m in nodes[lo:]:
            for w in _written_args(m):
                r = _alias_root(w)
                if not (r in at and lo <= at[r] <= end):
                    continue
                # written after the region, or inside it while something after it reads the tensor
                # (the cat joining the copies is placed with them, before the copies' writes)
                if at[m] > end or any(at[u] > end for u in _alias_users(r) if u in at):
                    hit = (m, r)
                    break
            if hit:
                break
        if hit is None:
            return end
        m, r = hit
        notes.append(f"region ends before {describe(r)}: {describe(m)} writes in place into it after the split "
                     "region (a write into a sub-batch copy's joined result would not reach its readers)")
        end = at[r] - 1
    return end


def _row_wise_until(nodes, lo, hi, bd, token_local, k) -> tuple:
    """(end, why): nodes[lo..end] are row-wise along their batch dims; why: what stops the region at
    nodes[end + 1] (None if nothing: end = hi)."""
    st = ShardState(tp=k)
    for n in nodes[:lo]:
        st.placement[n] = bd[n]
    for i in range(lo, hi + 1):
        n = nodes[i]
        if n.op != "call_function":
            continue
        if meta.get(n).role in INSERTED_ROLES:
            st.placement[n] = st.of(n.args[0])
            continue
        if n in token_local and bd[n] in (None, 0) and all(
                a in token_local or st.placement.get(a) in (None, 0) for a in n.all_input_nodes):
            st.placement[n] = bd[n]  # tokens (or routed pairs) on dim 0, entering on dim 0
            continue
        try:
            propagate_node(n, st)
        except (Incompatible, UnknownOp) as e:
            return i - 1, f"it mixes batch rows ({e})"
        if st.partial_reductions:  # a sum or mean over the batch dim: TMP's partial sum, not row-wise here
            return i - 1, f"it mixes batch rows ({n.target} over the batch dim)"
        got = st.placement.get(n)
        want = bd[n]
        if isinstance(got, tuple):
            got = next((g for g in got if g is not None), None)
        if got != want:
            return i - 1, f"batch dim {got} by propagation, {want} by tracing"
    return hi, None


class SegmentCounter:
    """Segment numbers of the copies of one sub-batch (a stream), in graph order: the order
    split_sub_batches runs the copies in and the checkpoints of recompute_policy (one per segment
    and stream; both count with this, so random ops draw alike with recomputation on or off).

    A segment ends at a TMP region's post-all-reduce output (is_segment_end), except that the ops
    after the last region of a block that still belong to it (GPT: the MLP's dropout and the
    residual add) join that last segment: segments never span two blocks, and every block's hold
    the same ops (block 0's from its ln_1, the last block's through its residual add), so each
    block is one structure for compile_layers."""

    def __init__(self, graph: fx.Graph):
        self.blocks = Blocks(graph.nodes)
        self.last_region = {}  # block -> its last TMP region in graph order
        for n in graph.nodes:
            r = meta.get(n).region if n.op == "call_function" else None
            if r is not None:
                self.last_region[block_of_region(r)] = r
        self.count, self.ended, self.trailing = {}, {}, {}

    def at(self, n: fx.Node, stream) -> int:
        """The segment of `n`, the next node of `stream` (a sub-batch, or -1 for the unsplit rest)."""
        b = self.blocks.of(n)
        ended = self.ended.pop(stream, None)  # the region whose output ended the stream's last segment
        if ended is not None:
            if b is not None and self.last_region.get(b) == ended and block_of_region(ended) == b:
                self.trailing[stream] = b  # the block's own ops after its last region: same segment
            else:
                self.count[stream] = self.count.get(stream, 0) + 1
        elif stream in self.trailing and b != self.trailing[stream]:
            del self.trailing[stream]
            self.count[stream] = self.count.get(stream, 0) + 1
        if is_segment_end(n):
            self.trailing.pop(stream, None)
            self.ended[stream] = meta.get(n).region
        return self.count.get(stream, 0)


def _rewrite_shape_args(c, d, k):
    """One sub-batch's copy `c` of a node whose output carries the batch on dim d: its shape
    arguments (view/expand sizes: the op family's localise) for a batch of 1/k."""
    if d is None:
        return
    if c.target in SPLIT_OPS and split_dim(c) == d:
        raise AssertionError(f"split along the batch dim inside the region: {c}")
    if c.target is aten.arange.default and d == 0:  # a size-B range (an MoE layer's inverse permutation)
        c.args = (int(c.args[0]) // k,) + tuple(c.args[1:])
        return
    fam = family_of(c.target)
    if fam is not None and fam.batch_sized:
        got = localise(c, {d: k})
        if got is not None:
            c.args = got[0]
