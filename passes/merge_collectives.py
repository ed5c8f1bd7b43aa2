"""merge_collectives (ACT): one all-reduce for a parallel-residual layer's attention + MLP.

Kind: ACT. Precondition: insert_collectives has run (one g per row linear, its bias after it, one
f per region input). Invariant: values equal the unmerged graph's up to the order of fp32
additions (the ranks' partial sums are added before the all-reduce instead of after it).

Parallel-residual layers (GPT-J, GPT-NeoX, Falcon, Phi, Cohere) compute x + attn(ln(x)) + mlp(ln(x)):
  - forward: the two row outputs meet only in a sum, so g(A) + g(M) = g(A + M): one all-reduce of
    the summed partials, the row biases added once after it. A term may pass through ops linear in
    it on the way to the sum (dropout that is the identity: p=0 or eval; alias/clone; multiplication
    or division by a Python number, replayed on the partial and on its bias); anything else (a
    dtype cast, dropout with p>0, a second user, a broadcast) keeps that term's own g;
  - backward: two f on the same tensor over the same group become one f, so autograd sums the two
    regions' input gradients before its one all-reduce. Two norms (GPT-NeoX: ln1(x), ln2(x)) keep
    two f: moving f before the norms would leave their weights' gradients partial (explained).

Regions below the full TMP degree (batch_gather after g) are left as they are. The merged g is a
region exit (role "reduce_from_tp", region of the later block), so split_sub_batches splits it per
sub-batch and recompute_policy's segments end there (one segment per layer).

    before:  a = linear(h_a, W_o); ga = reduce_from_tp(a); m = linear(h_m, W_2); gm = reduce_from_tp(m)
             y = add(add(ga, add(gm, b_2)), x)
    after:   s = add(a, m); g = reduce_from_tp(s); y = add(add(g, b_2), x)

`parallel_pairs` finds the same pairs on the traced (unsharded) graph for the planner
(oases_fx/planner/cost_model.py: ModelSpec.merged), which then prices one forward all-reduce (and
one backward, where the blocks share their input) for two blocks that are both sharded at the full
degree.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from oases_fx import meta, runtime
from oases_fx.meta import graph_meta
from oases_fx.propagation import val as _val

aten = torch.ops.aten

_G_FNS = (runtime.reduce_from_tp, runtime.skip_reduce_from_tp)
_F_FNS = (runtime.copy_to_tp, runtime.skip_copy_to_tp)
_IDENTITY_OPS = (aten.alias.default, aten.clone.default)
_SCALE_OPS = (aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar)


# --- small utilities ---------------------------------------------------------------------------------
def _same_layout(a, b) -> bool:
    va, vb = _val(a), _val(b)
    return (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.shape == vb.shape
            and va.dtype == vb.dtype)


def _is_plain_add(n: fx.Node) -> bool:
    """a + b; also Falcon's `mlp_output += attention_output` (add_) when nothing else reads the
    tensor it overwrites (its value then is the sum's and nothing sees the mutation)."""
    if n.op != "call_function" or len(n.args) != 2 or not all(isinstance(a, fx.Node) for a in n.args):
        return False
    if n.kwargs.get("alpha", 1) != 1:
        return False
    return n.target is aten.add.Tensor or (n.target is aten.add_.Tensor and len(n.args[0].users) == 1)


def _is_identity(n: fx.Node) -> bool:
    """An op whose value is its first input's: dropout with p=0 or in eval, alias, clone."""
    if n.target is aten.dropout.default:
        p = n.args[1] if len(n.args) > 1 else n.kwargs.get("p", 0.5)
        train = n.args[2] if len(n.args) > 2 else n.kwargs.get("train", True)
        return isinstance(p, numbers.Number) and (p == 0 or train is False)
    return n.target in _IDENTITY_OPS and not n.kwargs.get("memory_format")


def _is_scale(n: fx.Node, x: fx.Node) -> bool:
    """x * c or x / c with c a Python number: linear in x, so it commutes with the sum over ranks."""
    return (n.target in _SCALE_OPS and len(n.args) == 2 and n.args[0] is x
            and isinstance(n.args[1], numbers.Number) and not isinstance(n.args[1], bool))


# --- match records ----------------------------------------------------------------------------------
@dataclass
class Term:
    """One region's output on its way into a sum: start (g, or the row linear on the unsharded
    graph) -> [row bias] -> identity / scale ops -> end (a leaf of the sum)."""

    start: fx.Node
    end: fx.Node
    chain: list
    """Nodes after start up to end, in order (each with one user)."""
    bias: object = None
    """The row bias node added after g (None without one)."""
    scales: list = field(default_factory=list)
    """The scale ops after the bias (replayed on the partial and on the bias)."""


@dataclass
class SumTree:
    """A tree of plain adds (internal nodes used once, inside the tree) and its leaves."""

    root: fx.Node
    internal: list
    leaves: list


def term_from(start: fx.Node) -> Term | None:
    """Follow `start`'s single-user chain through ops linear in it; the row bias (role "row_bias",
    insert_collectives) may come first. None if start has several users."""
    if len(start.users) != 1:
        return None
    t = Term(start=start, end=start, chain=[])
    cur = start
    while len(cur.users) == 1:
        (u,) = cur.users
        if u.op != "call_function":
            break
        if not t.chain and meta.get(u).role == "row_bias" and u.args[0] is cur:
            t.bias = u.args[1]
        elif _is_identity(u) and u.args[0] is cur:
            pass
        elif _is_scale(u, cur):
            t.scales.append(u)
        else:
            break
        t.chain.append(u)
        cur = u
    t.end = cur
    return t


def sum_tree(leaf: fx.Node) -> SumTree | None:
    """The tree of plain adds `leaf` feeds (the sum of a parallel-residual layer), or None."""
    if len(leaf.users) != 1:
        return None
    (n,) = leaf.users
    if not (_is_plain_add(n) and _same_layout(n, leaf)):
        return None
    while len(n.users) == 1:
        (u,) = n.users
        if not (_is_plain_add(u) and _same_layout(u, n)):
            break
        n = u
    root, internal, leaves = n, [], []

    def expand(x):
        if _is_plain_add(x) and _same_layout(x, root) and (x is root or len(x.users) == 1):
            internal.append(x)
            for a in x.args:
                expand(a)
        else:
            leaves.append(x)

    expand(root)
    return SumTree(root=root, internal=internal, leaves=leaves)


@dataclass
class ForwardMatch:
    """Terms of one sum whose all-reduces become one."""

    tree: SumTree
    terms: list
    group: object


def _forward_matches(starts: list, *, group_of) -> list:
    """Group terms by the sum they end in; a sum with >= 2 terms of one group is a match."""
    by_root, seen = {}, set()
    for s in starts:
        t = term_from(s)
        if t is None or not _same_layout(t.end, t.start):
            continue
        tree = sum_tree(t.end)
        if tree is None or t.end not in tree.leaves:
            continue
        by_root.setdefault(tree.root, (tree, []))[1].append(t)
    out = []
    for root, (tree, terms) in by_root.items():
        groups = {}
        for t in terms:
            groups.setdefault(group_of(t.start), []).append(t)
        for grp, ts in groups.items():
            if len(ts) >= 2:
                out.append(ForwardMatch(tree=tree, terms=ts, group=grp))
    return out


# --- the planner's view: the same pairs on the unsharded graph ----------------------------------------
def parallel_pairs(regions) -> tuple:
    """On the traced (unsharded) graph: ((i, j, forward, backward), ...) for regions i < j (indices
    in `regions`, graph order) whose row outputs meet only in a sum (forward: merged into one g when
    both are sharded at the full degree: region i's g goes, j's carries the sum) and, for those,
    whether their column linears read the same tensor (backward: one f; region j's all-reduce goes)."""
    from oases_fx.propagation import linear_parts

    index = {r.row: i for i, r in enumerate(regions)}
    out = []
    for m in _forward_matches([r.row for r in regions], group_of=lambda s: None):
        idx = sorted(index[t.start] for t in m.terms)
        inputs = [{linear_parts(c)[0] for c in regions[i].columns} for i in idx]
        for (a, ia), (b, ib) in zip(zip(idx, inputs), zip(idx[1:], inputs[1:])):
            out.append((a, b, True, bool(ia & ib)))
    return tuple(sorted(out))


# --- the rewrite -------------------------------------------------------------------------------------
def _merge_forward(gm, m: ForwardMatch, batch_dims, lines) -> None:
    graph = gm.graph
    root = m.tree.root
    order = {n: i for i, n in enumerate(graph.nodes)}
    terms = sorted(m.terms, key=lambda t: order[t.start])
    region = meta.get(terms[-1].start).region
    g_fn = terms[0].start.target

    def new(target, args, like, role=None, in_region=True, dim_of=None):
        with graph.inserting_before(root):
            n = graph.call_function(target, args)
        n.meta["val"] = _val(like)
        meta.update(n, region=region if in_region else None, role=role, placement="R" if role else None)
        src = dim_of if dim_of is not None else like
        if batch_dims is not None and src.name in batch_dims:
            batch_dims[n.name] = batch_dims[src.name]
        return n

    partials, biases = [], []
    for t in terms:
        row = t.start.args[0]
        p = row
        for s in t.scales:  # x * c after the reduce == (partial * c) reduced
            p = new(s.target, (p, s.args[1]), row)
        partials.append(p)
        if t.bias is not None:
            b = t.bias
            for s in t.scales:
                b = new(s.target, (b, s.args[1]), t.bias, in_region=False)
            biases.append(b)
    s = partials[0]
    for p in partials[1:]:
        s = new(aten.add.Tensor, (s, p), p)
    out = new(g_fn, (s, m.group), root, role="reduce_from_tp", dim_of=s)
    for b in biases:
        out = new(aten.add.Tensor, (out, b), root, role="row_bias", dim_of=s)
    for leaf in m.tree.leaves:
        if not any(leaf is t.end for t in terms):
            out = new(aten.add.Tensor, (out, leaf), root, in_region=False, dim_of=root)
    rows = " + ".join(t.start.args[0].name for t in terms)
    regions = " + ".join(meta.get(t.start).region for t in terms)
    root.replace_all_uses_with(out)
    dead = list(m.tree.internal) + [n for t in terms for n in [t.start] + t.chain]
    for n in sorted(set(dead), key=lambda x: -order[x]):
        if not n.users:
            graph.erase_node(n)
    lines.append(f"{regions}: one reduce_from_tp (g) of the summed partial outputs {rows} "
                 f"(parallel residual: {len(terms)} all-reduces merged into 1"
                 + (f", {len(biases)} row bias(es) added once after it" if biases else "") + ")")


def _f_nodes(gm) -> list:
    return [n for n in gm.graph.nodes
            if n.op == "call_function" and n.target in _F_FNS and meta.get(n).role == "copy_to_tp"]


def _merge_backward(gm, fs_all, lines) -> int:
    """Two f on the same tensor over the same group: one f (its backward all-reduces the sum)."""
    by_key = {}
    for n in fs_all:
        by_key.setdefault((n.args[0], n.args[1], n.target), []).append(n)
    merged = 0
    for (x, _, _), fs in by_key.items():
        if len(fs) < 2:
            continue
        keep = fs[0]
        for f in fs[1:]:
            f.replace_all_uses_with(keep)
            gm.graph.erase_node(f)
        merged += len(fs) - 1
        names = " + ".join(dict.fromkeys(meta.get(f).region for f in fs))
        lines.append(f"{names}: one copy_to_tp (f) on {x.name} (its backward all-reduces the summed input "
                     f"gradient: {len(fs)} all-reduces merged into 1)")
    return merged


def merge_collectives_pass(gm: fx.GraphModule, *, enabled: bool = True) -> fx.GraphModule:
    """Merge the all-reduces of parallel attention + MLP blocks (ACT); see the module docstring."""
    gm_meta = graph_meta(gm)
    if not enabled or not gm_meta.regions:
        return gm
    lines = gm_meta.collectives
    batch_dims = gm_meta.batch_dims
    full = {r.row for r in gm_meta.regions}
    starts = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _G_FNS
              and meta.get(n).role == "reduce_from_tp" and n.args[0] in full and len(n.args[0].users) == 1]
    # a region below the full degree leaves through batch_gather (its term ends before the sum)
    matches = _forward_matches(starts, group_of=lambda g: g.args[1])
    fs_all = _f_nodes(gm)  # the forward merge adds and erases no f
    f_inputs = {}  # region -> the tensors its f read
    for n in fs_all:
        f_inputs.setdefault(meta.get(n).region, set()).add(n.args[0])
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    # last sum first: a later layer's sum reads an earlier one's root, which the earlier merge replaces
    said = []  # per match, last first
    for m in sorted(matches, key=lambda m: -order[m.tree.root]):
        names = [meta.get(t.start).region for t in m.terms]
        said.append([])
        _merge_forward(gm, m, batch_dims, said[-1])
        reads = [f_inputs.get(r, set()) for r in names]
        if reads and not set.intersection(*reads):  # two norms: ln1(x), ln2(x)
            said[-1].append(f"{' + '.join(names)}: backward keeps one f per block: their column inputs differ "
                         f"({', '.join(sorted(x.name for r in reads for x in r))}: one norm each); an f before "
                         "the norms would leave the norm weights' gradients partial")
    lines.extend(x for ls in reversed(said) for x in ls)
    _merge_backward(gm, fs_all, lines)
    gm.graph.lint()
    gm.recompile()
    return gm
