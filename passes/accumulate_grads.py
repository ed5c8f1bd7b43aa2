"""accumulate_grads: a sum of matmuls in an AOTAutograd backward graph (a weight's gradient summed
over the k sub-batches, dW = dY_0^T X_0 + dY_1^T X_1 + ...) becomes one in-place accumulation.

Kind: ACT (replaces nodes; values equal Inductor's code for the original graph, see Numerics).

Why: Inductor turns ``mm_0 + mm_1`` into ``addmm(mm_0, a_1, b_1)``, and aten's out-of-place addmm
copies its ``self`` into the new output before the beta=1 GEMM: one copy of the whole gradient per
sub-batch after the first (benchmarks/RESULTS.md 7.10: nine 50 MB copies per step at h=4096, +210 us).
``oases_fx::mm_accumulate`` (oases_fx/runtime.py) runs the same GEMMs into one buffer: ``mm`` for the
first term, ``addmm_`` in place for the others. Inductor runs it as an extern (fallback) kernel.

Contract
  Preconditions: an aten-level backward graph (after schedule_overlap; before dp_reduce, which reads
  the gradient outputs this pass rewires).
  Match: a left-leaning chain of ``aten.add.Tensor`` (alpha 1, no broadcast, one dtype)
  ``add(...add(add(t_0, t_1), t_2)..., t_{k-1})`` (either operand of each add may be the chain), each
  term ``t_i`` an ``aten.mm`` reached through transposes (t, transpose(0, 1), permute([1, 0])) and
  same-shape views, with an even number of transposes, so ``t_i`` is the mm's value itself. Every
  node of the match but the root add has one user (the match), so nothing else reads what is removed.
  Terms are taken in the order Inductor's addmm fusion takes them: the chain first, then the term
  the add adds to it; of two plain terms, the first operand is the accumulator.
  Rewrite: ``mm_accumulate([a_0, ...], [b_0, ...])`` placed just after the last of the terms' mms in
  the schedule (every operand exists there), meta from that mm (schedule_overlap's stream and times,
  re-simulated when the graph carries a timeline); the root add's users read it; the adds, views and
  mms of the match are erased.
  Not matched (left to Inductor as before): an odd number of transposes (Inductor's addmm fusion
  matches an add of an mm itself, not of its transpose, so these have no copy to remove), balanced
  trees (add(add(a, b), add(c, d)): each inner sum is matched), a term added to itself, terms that
  are not mms (a tied embedding's gradient plus the LM head's mm: the one copy left at k=1 too), and
  the fp32 bias-gradient sums (per-sub-batch reductions of disjoint buffers: joining them needs a cat,
  itself a copy).
  Records ``gm.meta["oases_accumulate_grads"]``: an :class:`AccumulateRecord`.

Numerics
  Inductor: the same values, bitwise: its addmm chain and mm_accumulate make the same GEMM calls
  (the first term by mm into a contiguous buffer, each later one by a beta=1 GEMM into that buffer;
  tests/unit/test_accumulate_grads.py checks it on CPU, and on cuBLAS where a GPU runs it).
  aot_eager: the original graph rounds each mm's result and then adds (round(round(m_0) + round(m_1))),
  the op adds each later term inside its GEMM (round(round(m_0) + m_1), m_1 not rounded on its own),
  so a rewritten gradient may differ from the pass-off aot_eager run by one rounding per term; in bf16
  the op keeps each term in the GEMM's fp32 accumulator, as Inductor's addmm does.

Before / after (k=2, one weight)
    before                                      after
    mm_7 = mm(t_13, view_23)    # sub-batch 0   (erased)
    ...                                         ...
    mm_11 = mm(t_21, view_19)   # sub-batch 1   acc = mm_accumulate([t_13, t_21], [view_23, view_19])
    t_24 = t(t(mm_11))                          (erased, as t_16 = t(t(mm_7)))
    add_11 = add(t_16, t_24)                    (erased; its users read acc)
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from oases_fx import _compat
from oases_fx import meta as oases_meta
from oases_fx import runtime  # noqa: F401  (registers oases_fx::mm_accumulate)

aten = torch.ops.aten
log = logging.getLogger(__name__)

__all__ = ["AccumulateRecord", "Accumulation", "accumulate_grads_pass", "find_accumulations", "RECORD_KEY"]

RECORD_KEY = "oases_accumulate_grads"
MM_ACCUMULATE = torch.ops.oases_fx.mm_accumulate.default


@dataclass(frozen=True)
class Accumulation:
    """One matched sum: ``root`` = sum of ``mms`` (in accumulation order); ``erase`` holds every node
    of the match (root included) that the rewrite removes."""

    root: fx.Node
    mms: tuple
    erase: tuple


@dataclass
class AccumulateRecord:
    """What accumulate_grads did to one backward graph (explain(), tests)."""

    rewritten: list = field(default_factory=list)
    """(new node name, root add name, mm names, shape) per rewrite, in graph order."""

    def summary(self) -> str:
        terms = sorted({len(r[2]) for r in self.rewritten})
        return f"{len(self.rewritten)} sum(s) of matmuls accumulated in place (terms per sum: {terms})"


# --- small graph utilities ---------------------------------------------------------------------

def _val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def _shape(n):
    v = _val(n)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _is_transpose(n: fx.Node) -> bool:
    if n.target is aten.t.default:
        return True
    if n.target is aten.transpose.int and len(n.args) == 3 and _shape(n.args[0]) is not None:
        rank = len(_shape(n.args[0]))
        return rank == 2 and {d % 2 for d in n.args[1:]} == {0, 1}
    if n.target is aten.permute.default:
        return [d % 2 for d in n.args[1]] == [1, 0] and len(n.args[1]) == 2
    return False


_SAME_SHAPE_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.alias.default)


def _is_noop_view(n: fx.Node) -> bool:
    return n.target in _SAME_SHAPE_VIEWS and _shape(n) is not None and _shape(n) == _shape(n.args[0])


def _is_plain_add(n) -> bool:
    """aten.add.Tensor of two tensors of one shape and dtype, alpha 1 (no broadcast, no scaling)."""
    if not (isinstance(n, fx.Node) and n.op == "call_function" and n.target is aten.add.Tensor):
        return False
    if len(n.args) != 2 or n.kwargs.get("alpha", 1) != 1:
        return False
    x, y, out = (_val(a) for a in (n.args[0], n.args[1], n))
    return (all(isinstance(v, torch.Tensor) for v in (x, y, out))
            and x.shape == y.shape == out.shape and x.dtype == y.dtype == out.dtype)


# --- finding the sums --------------------------------------------------------------------------

def _term(n: fx.Node):
    """(mm node, nodes passed on the way) if ``n`` is an mm's value through an even number of
    transposes and same-shape views, each used only on this path; else None."""
    path, flips = [], 0
    while n.op == "call_function" and (_is_transpose(n) or _is_noop_view(n)):
        if len(n.users) != 1:
            return None
        flips += _is_transpose(n)
        path.append(n)
        n = n.args[0]
    if not (n.op == "call_function" and n.target is aten.mm.default and len(n.users) == 1) or flips % 2:
        return None
    return n, path


def _chain(n: fx.Node, root: bool):
    """(mms in accumulation order, nodes of the match) for the add chain rooted at ``n``, or None."""
    if not _is_plain_add(n) or (not root and len(n.users) != 1):
        return None
    x, y = n.args
    inner = [a for a in (x, y) if _is_plain_add(a) and len(a.users) == 1]
    if len(inner) == 2:
        return None  # a balanced tree: Inductor does not chain it into addmms either
    if inner:
        sub = _chain(inner[0], False)
        other = y if inner[0] is x else x
        term = _term(other) if sub is not None else None
        if term is None:
            return None
        return sub[0] + [term[0]], sub[1] + [n, term[0], *term[1]]
    tx, ty = _term(x), _term(y)
    if tx is None or ty is None:
        return None
    return [tx[0], ty[0]], [n, tx[0], *tx[1], ty[0], *ty[1]]


def find_accumulations(graph: fx.Graph) -> list[Accumulation]:
    """Every maximal sum of matmuls in ``graph`` (see the contract), roots in graph order."""
    found, taken = [], set()
    for n in reversed(list(graph.nodes)):  # the root of a chain comes after its inner adds
        if n in taken or not _is_plain_add(n):
            continue
        got = _chain(n, True)
        if got is None:
            continue
        mms, nodes = got
        if len(set(nodes)) != len(nodes):
            continue  # a term added to itself (add(m, m)): left to Inductor
        vals = [_val(m) for m in mms]
        if any(not isinstance(v, torch.Tensor) for v in vals) or len({(v.dtype, v.device) for v in vals}) != 1:
            continue
        found.append(Accumulation(root=n, mms=tuple(mms), erase=tuple(nodes)))
        taken.update(nodes)
    return found[::-1]


# --- the rewrite -------------------------------------------------------------------------------

def _rewrite(graph: fx.Graph, acc: Accumulation, pos: dict, mode) -> fx.Node:
    last = max(acc.mms, key=pos.__getitem__)
    a = [m.args[0] for m in acc.mms]
    b = [m.args[1] for m in acc.mms]
    with graph.inserting_after(last):
        new = graph.call_function(MM_ACCUMULATE, ([*a], [*b]))
    new.meta.update({k: v for k, v in last.meta.items() if k not in ("val", "tensor_meta")})
    if oases_meta.get(last).sub_batch is not None:
        oases_meta.update(new, sub_batch=None)  # it computes every sub-batch's term
    with mode if mode is not None else contextlib.nullcontext():
        new.meta["val"] = MM_ACCUMULATE([_val(x) for x in a], [_val(y) for y in b])
    want = _val(acc.root)
    assert tuple(new.meta["val"].shape) == tuple(want.shape) and new.meta["val"].dtype == want.dtype, (
        f"accumulate_grads: {new.format_node()} gives {new.meta['val'].shape} {new.meta['val'].dtype}, "
        f"the sum {acc.root.format_node()} {want.shape} {want.dtype}")
    acc.root.replace_all_uses_with(new)
    for n in sorted(acc.erase, key=pos.__getitem__, reverse=True):  # users before their inputs
        graph.erase_node(n)
    return new


def _retime(gm: fx.GraphModule, cost_model) -> None:
    """The graph's predicted timeline again (the rewrite moved the earlier terms' GEMMs to the last
    one's place), recorded on the nodes as schedule_overlap records it."""
    from oases_fx.passes.schedule_overlap import _record
    from oases_fx.timeline import simulate

    _record(gm, simulate(list(gm.graph.nodes), cost_model))


def accumulate_grads_pass(gm: fx.GraphModule, *, cost_model=None) -> fx.GraphModule:
    """Replace every sum of matmuls in the backward graph ``gm`` by one ``oases_fx::mm_accumulate``
    (see the module docstring); returns ``gm``. With ``cost_model`` and a timeline left by
    schedule_overlap, the timeline is simulated again on the new graph."""
    graph = gm.graph
    rec = AccumulateRecord()
    gm.meta[RECORD_KEY] = rec
    found = find_accumulations(graph)
    if not found:
        return gm
    mode = _compat.fake_mode_of([_val(m.args[0]) for acc in found for m in acc.mms])
    pos = {n: i for i, n in enumerate(graph.nodes)}
    for acc in found:
        new = _rewrite(graph, acc, pos, mode)
        rec.rewritten.append((new.name, acc.root.name, tuple(m.name for m in acc.mms), tuple(new.meta["val"].shape)))
    graph.lint()
    gm.recompile()
    if cost_model is not None and "oases_timeline" in gm.meta:
        _retime(gm, cost_model)
    log.info("accumulate_grads: %s", rec.summary())
    return gm
