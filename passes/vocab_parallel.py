"""vocab_parallel (TAG+ACT): Megatron's vocab-parallel embedding, LM head and cross-entropy.

Kind: TAG+ACT. Runs after insert_collectives and before split_sub_batches, only when
``plan.vocab_parallel`` is True (otherwise the graph is returned unchanged). Preconditions: the
torch-level graph from tracing (``meta["val"]`` on every node), parameters as get_attr nodes.
Invariant: on every rank the graph's outputs (loss, returned logits) and the gathered
gradients equal the unsharded model's up to the order of floating-point additions (the sum of
exp is split into T partial sums); the embedding table and the LM head hold rows
[s*V/T, (s+1)*V/T) of the vocabulary on TMP rank s (a tied table is one parameter, sharded once).

What it finds (:func:`find_vocab_parallel`, usable on the traced graph before any pass, e.g. by
the planner to cost the option):
  - the LM head: a linear whose weight [V, h] is also an ``aten.embedding`` table (tied, as in the
    plain GPT and HF GPT-2), else the last linear whose output dim V equals the rows of an
    embedding table [V, h] (untied, as in HF Llama);
  - the token embedding(s): the ``aten.embedding`` nodes over that table (tied) or over a table of
    V rows and h columns (untied);
  - the loss: from the LM head's output, through row-wise ops (views/reshapes keeping the vocab
    as the last dim, dtype casts, clone/contiguous/alias, slices on other dims, unary pointwise
    ops), ``aten.cross_entropy_loss`` or ``log_softmax`` over the vocab followed by ``nll_loss``;
    only without class weights and with label_smoothing=0 (anything else: a clear error);
  - every other consumer of the logits (the logits returned to the user, a log_softmax not
    feeding nll_loss, ...): it gets the logits all-gathered along the vocab (B*S*V elements).

For the planner: ``info = find_vocab_parallel(traced.gm, tp)`` (a ShardingError means the option
does not apply: no pair, an indivisible V, or a loss it cannot parallelise; the message says why).
With N = the logits' rows (B*S), the option costs per step: forward one all-reduce of the
embedding output per ``info.embeddings`` (N x h), two small all-reduces per ``info.losses`` (N
and 2N elements), one all-gather of N x V per ``info.gathered`` entry (``info.logits_output``: the
logits are returned); backward one all-reduce of the LM head's input gradient (N x h). It saves
(T-1)/T of the LM head's and the loss's compute and of the table's memory and gradient.

What it rewrites:

    before:  e = embedding(W, ids)                          W: (V, h)
             y = linear(x, W); l = view(y, [-1, V]); loss = cross_entropy_loss(l, t, None, 1, -100)
             output((y, loss))
    after:   e = vocab_parallel_embedding(W, ids, s*V/T, (s+1)*V/T, -1, "tp")   W: (V/T, h)
             x1 = copy_to_tp(x, "tp"); y = linear(x1, W); l = view(y, [-1, V/T])
             loss = vocab_parallel_cross_entropy(l, t, s*V/T, -100, 1, float32, "tp")
             y_full = gather_from_tp(y, s, T, "tp"); output((y_full, loss))

The inserted nodes carry a role (``vocab_embedding``, ``vocab_copy_to_tp``, ``vocab_cross_entropy``,
``gather_from_tp``) and no region, so ``region_span`` (first to last TMP region), the sub-batch
split and the checkpointed segments do not grow to include them (checked; they sit before the first
and after the last region). Sharded parameters are recorded in ``gm.meta["oases"]["sharded_params"]``
under every name that refers to them (a tied table under both of its state_dict keys), so
full_state_dict / full_grads / load_full_state_dict see full tensors.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx

from oases_fx import meta, runtime, vocab
from oases_fx.errors import ShardingError, describe
from oases_fx.meta import graph_meta
from oases_fx.passes.graph_utils import region_span
from oases_fx.propagation import linear_parts, val
from oases_fx.rules import (CE_OPS, FLATTEN_OPS, LOG_SOFTMAX_OPS, NLL_OPS, ROW_IDENTITY_OPS, SLICE_OPS, VIEW_OPS,
                            is_pointwise, localise)

aten = torch.ops.aten

# The roles (node.meta["oases"].role) this pass writes; none of its nodes gets a region.
ROLES = ("vocab_embedding", "vocab_copy_to_tp", "vocab_lm_head", "vocab_cross_entropy", "gather_from_tp")


@dataclass
class LossMatch:
    """One loss over the full vocabulary: the node whose value is the loss, and its arguments."""

    node: fx.Node  # cross_entropy_loss, or nll_loss (or getitem 0 of nll_loss_forward)
    logits: fx.Node  # the [N, V] logits it reads (the log_softmax's input for the nll form)
    target: fx.Node
    reduction: int
    ignore_index: int
    erase: list = field(default_factory=list)  # nodes replaced with it (log_softmax, nll_loss_forward)


@dataclass
class VocabInfo:
    """What :func:`find_vocab_parallel` found; sizes are the traced (full) ones."""

    embeddings: list
    """aten.embedding nodes over the token table(s)."""
    lm_head: fx.Node
    """The linear producing the logits [.., V]."""
    tied: bool
    """The LM head's weight is the embedding table (one parameter)."""
    losses: list
    """LossMatch per cross-entropy over the vocab (replaced by the parallel one)."""
    chain: list
    """Row-wise nodes between the LM head and the losses (they run on the local shard)."""
    gathered: list
    """(node, users) whose value other consumers read: all-gathered along the vocab."""
    logits_output: bool
    """The logits (or a row-wise view of them) are a graph output (an all-gather of B*S*V)."""
    vocab_size: int
    hidden: int
    lm_head_bias: Optional[fx.Node] = None


def _arg(node, i, name, default):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _param_key(gm, node):
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    try:
        return id(gm.get_parameter(node.target))
    except AttributeError:
        return None


def _out_dim(node) -> int:
    """The LM head's output features: weight (out, in) or (in, out)."""
    _, w, _, layout = linear_parts(node)
    return int(val(w).shape[0 if layout == "oi" else 1])


def _in_dim(node) -> int:
    _, w, _, layout = linear_parts(node)
    return int(val(w).shape[1 if layout == "oi" else 0])


def _is_row_wise(n: fx.Node, V: int) -> bool:
    """n, applied to a tensor whose last dim is the vocab, keeps it last and mixes no rows."""
    if n.op != "call_function":
        return False
    v, x = val(n), val(n.args[0]) if n.args else None
    if v is None or x is None or v.dim() == 0 or int(v.shape[-1]) != V or int(x.shape[-1]) != V:
        return False
    t = n.target
    if t in ROW_IDENTITY_OPS or t in VIEW_OPS or t in FLATTEN_OPS or t is aten.unflatten.int:
        return True  # the vocab stays last (checked above): the op keeps rows whole
    if t in SLICE_OPS:
        return int(_arg(n, 1, "dim", 0)) % x.dim() != x.dim() - 1
    if is_pointwise(t):
        return sum(isinstance(a, fx.Node) for a in n.args) + sum(isinstance(a, fx.Node) for a in n.kwargs.values()) == 1
    return False


def _match_loss(n: fx.Node, src: fx.Node, V: int):
    """A LossMatch if `n` (a user of logits-carrying `src`) starts a cross-entropy over the vocab;
    None if it is another consumer; a ShardingError for a cross-entropy it cannot parallelise."""
    if n.op != "call_function":
        return None
    if n.target in CE_OPS and n.args[0] is src:
        node, erase = n, []
        weight = _arg(n, 2, "weight", None)
        reduction = int(_arg(n, 3, "reduction", 1))
        ignore = int(_arg(n, 4, "ignore_index", -100))
        smoothing = float(_arg(n, 5, "label_smoothing", 0.0))
        logits_nd, what = val(src).dim(), "cross_entropy"
    elif n.target in LOG_SOFTMAX_OPS and int(n.args[1]) % val(src).dim() == val(src).dim() - 1:
        nll = [u for u in n.users]
        if not nll or not all(u.op == "call_function" and u.target in NLL_OPS and u.args[0] is n for u in nll):
            return None  # log_softmax used otherwise: another consumer (gathered)
        if len(nll) > 1:
            raise ShardingError(f"{describe(n)}: a log_softmax over the vocabulary feeding {len(nll)} nll_loss "
                                "ops cannot be made vocab-parallel. Fix: plan without vocab_parallel.")
        u = nll[0]
        weight = _arg(u, 2, "weight", None)
        reduction = int(_arg(u, 3, "reduction", 1))
        ignore = int(_arg(u, 4, "ignore_index", -100))
        smoothing, logits_nd, what = 0.0, val(src).dim(), "log_softmax + nll_loss"
        node, erase = u, [u, n]
        if u.target is aten.nll_loss_forward.default:  # (output, total_weight)
            gets = list(u.users)
            first = [g for g in gets if g.target is operator.getitem and g.args[1] == 0]
            if len(first) != 1 or any(g.users for g in gets if g not in first):
                raise ShardingError(f"{describe(u)}: nll_loss_forward whose total_weight is used cannot be made "
                                    "vocab-parallel. Fix: plan without vocab_parallel.")
            node, erase = first[0], gets + [u, n]
    else:
        return None
    problems = []
    if weight is not None:
        problems.append("class weights")
    if smoothing != 0.0:
        problems.append(f"label_smoothing={smoothing}")
    if logits_nd != 2:
        problems.append(f"logits of {logits_nd} dims (only [N, V] with the vocab last is supported)")
    if reduction not in vocab.REDUCTIONS:
        problems.append(f"reduction {reduction}")
    if problems:
        raise ShardingError(
            f"{describe(n)}: a {what} over the vocabulary with {', '.join(problems)} cannot be made "
            "vocab-parallel (supported: no class weights, label_smoothing=0, [N, V] logits, reduction "
            "none/mean/sum, any ignore_index). Fix: plan without vocab_parallel (Plan(vocab_parallel=False)).")
    target = n.args[1] if n.target in CE_OPS else next(e for e in erase if e.target in NLL_OPS).args[1]
    return LossMatch(node=node, logits=src, target=target, reduction=reduction, ignore_index=ignore, erase=erase)


def _find_lm_head(gm: fx.GraphModule):
    embeddings = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is aten.embedding.default
                  and _param_key(gm, n.args[0]) is not None and val(n.args[0]) is not None
                  and val(n.args[0]).dim() == 2]
    linears = [n for n in gm.graph.nodes if linear_parts(n) is not None and _param_key(gm, linear_parts(n)[1])]
    searched = (f"searched {len(embeddings)} aten.embedding node(s) over a parameter table "
                f"({', '.join(f'{e.args[0].target} {tuple(val(e.args[0]).shape)}' for e in embeddings) or 'none'}) "
                f"and {len(linears)} linear(s) for one whose weight is such a table (tied) or whose output dim "
                "equals its rows (untied)")
    by_table = {}
    for e in embeddings:
        by_table.setdefault(_param_key(gm, e.args[0]), []).append(e)
    tied = [n for n in linears if _param_key(gm, linear_parts(n)[1]) in by_table]
    if tied:
        head = tied[-1]
        embs = by_table[_param_key(gm, linear_parts(head)[1])]
        if linear_parts(head)[3] != "oi":
            raise ShardingError(f"{describe(head)}: a tied LM head with an (in, out) weight; vocab_parallel "
                                "supports nn.Linear's (out, in). Fix: plan without vocab_parallel.")
        return head, embs, True, searched
    for head in reversed(linears):
        V, h = _out_dim(head), _in_dim(head)
        embs = [e for e in embeddings if tuple(val(e.args[0]).shape) == (V, h)]
        if embs:
            return head, embs, False, searched
    raise ShardingError(
        f"plan.vocab_parallel=True but no token embedding / LM head pair was found: {searched}. "
        "Fix: plan without vocab_parallel (Plan(vocab_parallel=False)), or report the model's pattern.")


def find_vocab_parallel(gm: fx.GraphModule, tp: Optional[int] = None) -> VocabInfo:
    """Embedding, LM head, losses and other logits consumers of a traced graph (before any pass).

    Raises ShardingError naming what was searched when there is no embedding / LM head pair, naming
    the node for a cross-entropy it cannot parallelise, and (with `tp`) when V is not divisible by tp.
    """
    head, embs, tied, _ = _find_lm_head(gm)
    V, h = _out_dim(head), _in_dim(head)
    # The tables are sharded: nothing but the embeddings and the LM head may read them.
    bias = linear_parts(head)[2]
    keys = {_param_key(gm, e.args[0]) for e in embs} | {_param_key(gm, linear_parts(head)[1]), _param_key(gm, bias)}
    keys.discard(None)
    for n in gm.graph.nodes:
        if n.op == "get_attr" and _param_key(gm, n) in keys:
            other = [u for u in n.users if u not in embs and u is not head]
            if other:
                raise ShardingError(
                    f"{describe(other[0])} reads {n.target}, which vocab_parallel would shard over the vocabulary "
                    "(only the embedding and the LM head may use it). Fix: plan without vocab_parallel.")
    if tp is not None and V % tp:
        raise ShardingError(
            f"vocab_parallel: the vocabulary V={V} ({linear_parts(head)[1].target} {tuple(val(linear_parts(head)[1]).shape)}) "
            f"is not divisible by the TMP degree {tp}. Fix: pad the vocabulary to a multiple of {tp}, or plan "
            "without vocab_parallel.")
    # Forward cone of row-wise ops from the LM head; losses at its edge.
    losses, cone, stack = [], [], [head]
    seen = {head}
    while stack:
        c = stack.pop()
        for u in list(c.users):
            lm = _match_loss(u, c, V)
            if lm is not None:
                if all(x.node is not lm.node for x in losses):
                    losses.append(lm)
            elif _is_row_wise(u, V) and u.args[0] is c and u not in seen:
                seen.add(u)
                cone.append(u)
                stack.append(u)
    # Keep local only the row-wise nodes that lead to a loss; everything else reads gathered logits.
    loss_in = {lm.logits for lm in losses}
    useful = set(loss_in)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for n in sorted(cone, key=order.__getitem__, reverse=True):
        if any(u in useful for u in n.users):
            useful.add(n)
    chain = sorted((n for n in cone if n in useful), key=order.__getitem__)
    local = [head] + chain
    loss_nodes = {e for lm in losses for e in lm.erase} | {lm.node for lm in losses}
    gathered = []
    for n in local:
        users = [u for u in n.users if u not in useful and u not in loss_nodes and u not in chain]
        if users:
            gathered.append((n, users))
    logits_output = any(u.op == "output" for _, us in gathered for u in us)
    return VocabInfo(embeddings=embs, lm_head=head, tied=tied, losses=losses, chain=chain, gathered=gathered,
                     logits_output=logits_output, vocab_size=V, hidden=h,
                     lm_head_bias=bias if isinstance(bias, fx.Node) else None)


def _local_val(node, dim, tp):
    v = val(node)
    if v is None:
        return
    shape = list(v.shape)
    shape[dim] = shape[dim] // tp
    node.meta["val"] = v.new_empty(shape)


def _aliases(gm: fx.GraphModule, param) -> list:
    """Every (module, leaf, fqn) under which gm holds `param` (a tied table has several)."""
    out = []
    for path, mod in gm.named_modules(remove_duplicate=False):
        for leaf, p in mod._parameters.items():
            if p is param:
                out.append((mod, leaf, f"{path}.{leaf}" if path else leaf))
    return out


def _shard_param(gm, fqn, dim, rank, tp, sharded, notes):
    from oases_fx.passes.shard import shard_tensor

    full = gm.get_parameter(fqn)
    new = torch.nn.Parameter(shard_tensor(full.detach(), dim, rank, tp), requires_grad=full.requires_grad)
    names = []
    for mod, leaf, name in _aliases(gm, full):
        setattr(mod, leaf, new)
        sharded[name] = (dim, None, tuple(full.shape))
        names.append(name)
    notes.append(f"{' = '.join(names)}: {tuple(full.shape)} -> {tuple(new.shape)} (S({dim}), vocabulary rows "
                 f"[{rank * (full.shape[dim] // tp)}, {(rank + 1) * (full.shape[dim] // tp)}) on this rank)")


def vocab_parallel_pass(gm: fx.GraphModule, *, enabled: bool, rank: int, tp: int, group_name: str,
                        skip: bool = False) -> fx.GraphModule:
    """Shard the embedding table(s) and the LM head over the vocabulary, replace the cross-entropy
    by the vocab-parallel one, gather logits for other consumers (TAG+ACT). `skip` inserts the
    no-communication stand-ins (floor benchmark; values wrong by design)."""
    gm_meta = graph_meta(gm)
    if not enabled:
        return gm
    info = find_vocab_parallel(gm, tp)
    V, Vl = info.vocab_size, info.vocab_size // tp
    start, end = rank * Vl, (rank + 1) * Vl
    sharded, rewrites, inserted = gm_meta.sharded_params, gm_meta.rewrites, gm_meta.collectives
    notes = gm_meta.vocab_notes
    batch_dims = gm_meta.batch_dims
    graph = gm.graph
    span_before = region_span(graph)
    summary = (f"{len(info.embeddings)} embedding(s) {', '.join(str(e.args[0].target) for e in info.embeddings)}, "
               f"LM head {linear_parts(info.lm_head)[1].target}{' (tied)' if info.tied else ''}, "
               f"{len(info.losses)} parallel cross-entropy, {len(info.gathered)} all-gather(s) of logits")
    new_nodes = []

    def same_batch_dim(new, old):
        if batch_dims is not None and old.name in batch_dims:
            batch_dims[new.name] = batch_dims[old.name]

    # Parameters: the LM head's weight (and bias) and the embedding tables, each sharded once.
    x, w, bias, layout = linear_parts(info.lm_head)
    _shard_param(gm, w.target, 0 if layout == "oi" else 1, rank, tp, sharded, notes)
    if info.lm_head_bias is not None:
        _shard_param(gm, info.lm_head_bias.target, 0, rank, tp, sharded, notes)
    for e in info.embeddings:
        if e.args[0].target not in sharded:
            _shard_param(gm, e.args[0].target, 0, rank, tp, sharded, notes)

    # Embeddings: masked local lookup, then all-reduce (g; ids carry no gradient, so no f).
    emb_fn = vocab.skip_vocab_parallel_embedding if skip else vocab.vocab_parallel_embedding
    for e in info.embeddings:
        if _arg(e, 3, "scale_grad_by_freq", False) or _arg(e, 4, "sparse", False):
            raise ShardingError(f"{describe(e)}: an embedding with scale_grad_by_freq or sparse gradients cannot be "
                                "made vocab-parallel. Fix: plan without vocab_parallel.")
        with graph.inserting_after(e):
            ne = graph.call_function(emb_fn, (e.args[0], e.args[1], start, end, int(_arg(e, 2, "padding_idx", -1)),
                                              group_name))
        ne.meta = dict(e.meta)
        meta.update(ne, role="vocab_embedding", placement="R")
        same_batch_dim(ne, e)
        e.replace_all_uses_with(ne)
        graph.erase_node(e)
        new_nodes.append(ne)
        inserted.append(f"vocab: embedding {ne.args[0].target} masked to rows [{start}, {end}) + all-reduce "
                        f"(reduce_from_tp) on {ne.name}")

    # LM head: column-parallel over the vocabulary, its input through f.
    head = info.lm_head
    x = linear_parts(head)[0]  # again: the embedding's output may have been replaced above
    f_fn = runtime.skip_copy_to_tp if skip else runtime.copy_to_tp
    with graph.inserting_before(head):
        f = graph.call_function(f_fn, (x, group_name))
    f.meta["val"] = x.meta.get("val")
    meta.update(f, role="vocab_copy_to_tp", placement="R")
    same_batch_dim(f, x)
    head.replace_input_with(x, f)
    new_nodes.append(f)
    inserted.append(f"vocab: copy_to_tp (f) on {x.name} before the LM head {head.name}")
    _local_val(head, -1, tp)
    meta.update(head, role="vocab_lm_head", placement=f"S({val(head).dim() - 1})")

    # Row-wise ops on the local logits: the vocab in their shape constants becomes V/T.
    for n in info.chain:
        if n.target in VIEW_OPS:
            shape = list(n.args[1])
            if shape[-1] == V:
                n.args, note = localise(n, {len(shape) - 1: tp})  # V -> V/T
                rewrites.append(f"{n.name}: {note} (vocab-parallel)")
            elif shape[-1] != -1:
                raise ShardingError(f"{describe(n)}: a view of the logits whose last size {shape[-1]} is not the "
                                    f"vocabulary {V}. Fix: plan without vocab_parallel.")
        _local_val(n, -1, tp)
        meta.update(n, placement=f"S({val(n).dim() - 1})")

    # Losses: the vocab-parallel cross-entropy.
    ce_fn = vocab.skip_vocab_parallel_cross_entropy if skip else vocab.vocab_parallel_cross_entropy
    for lm in info.losses:
        with graph.inserting_before(lm.node):
            ce = graph.call_function(ce_fn, (lm.logits, lm.target, start, lm.ignore_index, lm.reduction,
                                             val(lm.node).dtype, group_name))
        ce.meta = dict(lm.node.meta)
        meta.update(ce, role="vocab_cross_entropy", placement="R")
        lm.node.replace_all_uses_with(ce)
        for e in lm.erase or [lm.node]:
            if not e.users:
                graph.erase_node(e)
        new_nodes.append(ce)
        inserted.append(f"vocab: parallel cross-entropy on {lm.logits.name} (all-reduce max, all-reduce sum of "
                        f"exp and target logit; reduction {vocab.REDUCTIONS[lm.reduction]}, ignore_index "
                        f"{lm.ignore_index})")

    # Other consumers: all-gather along the vocab.
    g_fn = vocab.skip_gather_from_tp if skip else vocab.gather_from_tp
    for n, users in info.gathered:
        with graph.inserting_after(n):
            g = graph.call_function(g_fn, (n, rank, tp, group_name))
        v = val(n)
        if v is not None:
            shape = list(v.shape)
            shape[-1] = V
            g.meta["val"] = v.new_empty(shape)
        meta.update(g, role="gather_from_tp", placement="R")
        same_batch_dim(g, n)
        for u in users:
            u.replace_input_with(n, g)
        new_nodes.append(g)
        what = "the graph output" if any(u.op == "output" for u in users) else ", ".join(u.name for u in users)
        inserted.append(f"vocab: gather_from_tp (all-gather of {n.name} along the vocab) for {what}")
        notes.append(f"{n.name} (logits) is read by {what}: all-gathered along the vocabulary, "
                     f"{int(torch.Size(v.shape[:-1]).numel()) if v is not None else '?'} x {V} elements per step "
                     "(drop the logits from the outputs to save it)")
    if not info.losses:
        notes.append("no cross-entropy over the vocabulary found after the LM head: logits all-gathered for every "
                     "consumer (the LM head is still column-parallel)")

    span_after = set(region_span(graph))
    inside = [n.name for n in new_nodes if n in span_after]
    if inside or not set(span_before) <= span_after:
        raise ShardingError(f"vocab_parallel: nodes {inside} landed inside the TMP span (between the first and the "
                            "last sharded region), where the sub-batch split would copy them. Fix: plan without "
                            "vocab_parallel, or report the model.")
    gm_meta.vocab_parallel = (
        f"vocabulary V={V} over {tp} ranks ({Vl} rows each, this rank [{start}, {end})): {summary}")
    graph.lint()
    gm.recompile()
    return gm
