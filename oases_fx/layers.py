"""Compile the rewritten program layer by layer: identical layers share one compiled artifact.

torch.compile of the whole program traces, differentiates and generates code for every layer,
so its first step grows with depth (FINDINGS 7: 111 s at L=32). Here the torch-level graph, after
every torch-level pass, is cut into pieces (a prologue, one piece per repeated block, an
epilogue); each piece becomes a GraphModule whose parameters are inputs, pieces with the same
structure are compiled once (our AOTAutograd backend, schedule_overlap, Inductor) and that one
artifact is called for each of them. Regional compilation, as torchtitan's per-block compile,
but of our rewritten graph, so each piece keeps both sub-batches and schedule_overlap interleaves
sub-batch A's collectives with B's compute inside it.

    before:  prog = torch.compile(gm)                      # one graph of L layers
    after:   piece_pro(idx) -> x0, x1                      # embeddings, split of the residual stream
             layer(x0, x1, W_0...) -> x0', x1'             # block i (ln_1 .. last residual add), both
             layer(x0', x1', W_1...) -> ...                #   sub-batches: compiled once, called L times
             piece_epi(...) -> loss                        # cat, ln_f, the head, the loss

Pieces: a node belongs to its block (Blocks): a node of a TMP region to its region's (the region's
name without the last part: "transformer.h.3.attn" -> "transformer.h.3"), any other node to the
block whose module path holds its own (nn_module_stack: ln_1, ln_2, the residual adds); a node of
no block goes to the latest piece among its inputs (ASAP), or to the epilogue after the last block
node. A node is never put before a piece it reads (its piece is at least its inputs'), so running
the pieces in order is a topological order of the graph.

Limits:
- A collective's wait cannot cross a piece boundary, so the last all-reduce of each block (per
  direction; at k=2 one of four) has nothing of the next block to hide behind, where the whole
  program hides all but the last of the pass. Free with collectives skipped or on the fake group;
  on a real link about one all-reduce per block and direction (h=4096, b=4, s=2048, bf16: 32 MiB,
  ~0.25 ms at 256 GB/s). Not yet done: cutting before the last sub-batch's last all-reduce so it is
  issued at the start of the next piece, behind the other sub-batch's attention (costs one more
  distinct block structure: block 0 would have no pending all-reduce).
- Distinct structures at k >= 2: three (prologue, one block, epilogue), since split_sub_batches
  splits on block 0's input (its ln_1 runs per sub-batch) and cats after the last block's last
  residual add (block_span), and its segments, which recompute_policy checkpoints, end at block
  boundaries (SegmentCounter). Where block 0's own ops before its first region, or the last
  block's after its last, mix batch rows, the split (or cat) stays inside that block (said in
  the sub-batch notes) and that block is a structure of its own. At k = 1 three as well (recompute
  checkpoints block_span there too).
- The dp all-reduce inside the graph (dp_reduce="graph") buckets across layers: such a program is
  compiled whole (logged, and said in explain()). cudagraphs=True is refused (config.py).
"""
from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn

from oases_fx import _compat, meta
from oases_fx.passes.graph_utils import module_path, region_span

log = logging.getLogger("oases_fx")

SIG_KEY = "oases_input_sig"


@dataclass
class Piece:
    """One piece of the program: its nodes (graph order), what it reads and what it returns."""

    index: int
    """Execution order (0: the prologue)."""
    name: str
    """The block it computes ("transformer.h.3"), "prologue" or "epilogue"."""
    nodes: list
    acts: list = field(default_factory=list)
    """Nodes of other pieces (or graph inputs) it reads, in order of first use."""
    attrs: list = field(default_factory=list)
    """Tensor get_attr targets (parameters, buffers) it reads, in order of first use: inputs."""
    outputs: list = field(default_factory=list)
    """Its nodes read by later pieces or the graph output, in graph order."""
    graph: Optional[fx.Graph] = None
    """Its own graph: placeholders (acts, then attrs), its nodes, a tuple output."""
    subs: dict = field(default_factory=dict)
    """Submodules the graph calls or reads (recompute's outlines), by name."""
    key: Optional[str] = None
    """Structure of the graph and of its parameter inputs: equal keys, interchangeable compiled code."""


@dataclass
class LayerReport:
    """What compile_layers did: shown by explain() (as a note) and read by tests."""

    mode: str
    num_pieces: int = 0
    num_structures: int = 0
    """Distinct piece structures found at the cut ("each": one per piece)."""
    blocks: list = field(default_factory=list)
    """The blocks that became pieces, in order."""
    pieces: list = field(default_factory=list)
    """(piece name, index of the compiled artifact it runs), filled at each piece's first call."""
    num_compiled: int = 0
    """Distinct compiled artifacts (torch.compile calls) so far."""

    def summary(self) -> str:
        return (f"compiled per block (compile_layers={self.mode!r}): {self.num_pieces} pieces ({len(self.blocks)} "
                f"blocks, prologue, epilogue) of {self.num_structures} distinct structures, each structure compiled "
                "once at its first call (again only if its input shapes differ); a collective's wait does not "
                "cross a piece boundary; the AOTAutograd and Schedule lines below are the last compiled piece's")


# ---------------------------------------------------------------------------------------------
# Cutting the graph
# ---------------------------------------------------------------------------------------------

def block_of_region(region: str) -> str:
    """The repeated block a TMP region is part of: its name without the last part
    ("transformer.h.3.attn" -> "transformer.h.3")."""
    return region.rpartition(".")[0] or region


class Blocks:
    """The repeated blocks of a graph (those of its TMP regions, in graph order) and the block a
    node belongs to: its region's, else the innermost block whose module path holds the node's
    (nn_module_stack: a block's layer norms and residual adds lie outside its TMP regions), else
    None. split_sub_batches' chunks and cats belong to no block (they join sub-batches, though a
    cat carries the module record of the node it joins)."""

    def __init__(self, nodes):
        self.index: dict = {}
        for n in nodes:
            r = meta.get(n).region if n.op == "call_function" else None
            if r is not None:
                self.index.setdefault(block_of_region(r), len(self.index))

    def of(self, n: fx.Node) -> Optional[str]:
        if n.op != "call_function":
            return None
        m = meta.get(n)
        if m.role in ("chunk", "cat"):
            return None
        if m.region is not None:
            return block_of_region(m.region)
        p = module_path(n)
        while p:
            if p in self.index:
                return p
            p = p.rpartition(".")[0]
        return None


def block_span(graph: fx.Graph) -> list:
    """region_span widened to the whole first and last block: the call_function nodes of the first
    region's block just before it (GPT: block 0's ln_1) and of the last region's block just after
    it (the last residual add), in graph order. Where a block starts or ends with ops of its own
    outside its regions, the span then starts and ends at block boundaries."""
    span = region_span(graph)
    if not span:
        return span
    blocks = Blocks(span)
    nodes = list(graph.nodes)
    lo, hi = nodes.index(span[0]), nodes.index(span[-1])
    first, last = blocks.of(span[0]), blocks.of(span[-1])
    # a region at the root (no enclosing block: block_of_region gives "" or None) widens nothing: None
    # would match every op outside any block (the embedding, the head, the loss)
    while first and lo > 0 and nodes[lo - 1].op == "call_function" and blocks.of(nodes[lo - 1]) == first:
        lo -= 1
    while last and hi + 1 < len(nodes) and nodes[hi + 1].op == "call_function" and blocks.of(nodes[hi + 1]) == last:
        hi += 1
    return nodes[lo:hi + 1]


def _inner(n: fx.Node, gm: fx.GraphModule) -> list:
    """n, and the nodes of each submodule it calls (recompute's outlines)."""
    out = [n]
    for a in n.args:
        if isinstance(a, fx.Node) and a.op == "get_attr":
            sub = _attr(gm, a.target)
            if isinstance(sub, fx.GraphModule):
                out += [m for m in sub.graph.nodes if m.op == "call_function"]
    return out


def _attr(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _is_tensor_attr(gm, n: fx.Node) -> bool:
    return n.op == "get_attr" and isinstance(_attr(gm, n.target), torch.Tensor)


def cut(gm: fx.GraphModule) -> list:
    """The pieces of `gm` (see the module docstring), in execution order."""
    nodes = list(gm.graph.nodes)
    work = [n for n in nodes if n.op in ("call_function", "call_method", "call_module")]
    inner = {n: _inner(n, gm) for n in work}
    blocks = Blocks(m for n in work for m in inner[n])
    own_block = {}  # node -> index of the block it belongs to (its regions', else its module path's)
    for n in work:
        got = [blocks.index[b] for b in map(blocks.of, inner[n]) if b is not None]
        if got:
            own_block[n] = max(got)
    block_index = blocks.index
    last_block = max((i for i, n in enumerate(nodes) if n in own_block), default=-1)
    epilogue = len(block_index)
    at = {n: i for i, n in enumerate(nodes)}
    piece_of: dict = {}
    for n in work:
        before = [piece_of[a] for a in n.all_input_nodes if a in piece_of]
        p = max(before, default=-1)
        if n.target is not operator.getitem and n in own_block:
            p = max(p, own_block[n])  # a multi-output node's getitems stay with it
        elif n not in own_block and at[n] > last_block >= 0:
            p = epilogue
        piece_of[n] = p
    names = {i: b for b, i in block_index.items()}
    groups: dict = {}
    for n in work:
        groups.setdefault(piece_of[n], []).append(n)
    pieces = []
    for i, p in enumerate(sorted(groups)):
        name = "prologue" if p < 0 else "epilogue" if p == epilogue else names[p]
        pieces.append(Piece(index=i, name=name, nodes=groups[p]))
    owner = {n: pc for pc in pieces for n in pc.nodes}
    for pc in pieces:
        members = set(pc.nodes)
        for n in pc.nodes:
            for a in n.all_input_nodes:
                if a in members:
                    continue
                if _is_tensor_attr(gm, a):
                    if a.target not in pc.attrs:
                        pc.attrs.append(a.target)
                elif a.op == "get_attr":
                    continue  # a submodule (recompute's outline): copied into the piece
                elif a not in pc.acts:
                    assert a.op == "placeholder" or owner[a].index < pc.index, (
                        f"piece {pc.name} reads {a.name} of a later piece: the cut is not topological")
                    pc.acts.append(a)
    for n in nodes:
        for a in n.all_input_nodes:
            if a in owner and (n.op == "output" or owner.get(n) is not owner[a]):
                if a not in owner[a].outputs:
                    owner[a].outputs.append(a)
    for pc in pieces:  # graph order
        pos = {n: i for i, n in enumerate(pc.nodes)}
        pc.outputs.sort(key=pos.__getitem__)
    return pieces


def build_piece_graph(gm: fx.GraphModule, pc: Piece):
    """(pc's graph, the submodules it calls by name): a GraphModule is made only for the pieces
    that are compiled (its code generation is most of the cost of a piece)."""
    g = fx.Graph()
    env = {}
    for i, a in enumerate(pc.acts):
        env[a] = g.placeholder(f"act_{i}")
        env[a].meta = {k: v for k, v in a.meta.items() if k in ("val", "tensor_meta", meta.KEY)}
    attr_nodes = {}
    for i, target in enumerate(pc.attrs):
        ph = g.placeholder(f"param_{i}")
        ph.meta[SIG_KEY] = _tensor_sig(_attr(gm, target))  # not the tensor: the piece must not hold it
        attr_nodes[target] = ph
    subs = {}
    for n in pc.nodes:
        for a in n.all_input_nodes:
            if a.op == "get_attr" and a not in env:
                if a.target in attr_nodes:
                    env[a] = attr_nodes[a.target]
                else:
                    name = f"sub_{len(subs)}"
                    subs[name] = _attr(gm, a.target)
                    env[a] = g.get_attr(name)
        if n.op == "call_module":
            subs[n.target] = gm.get_submodule(n.target)
        env[n] = g.node_copy(n, lambda x: env[x])
    g.output(tuple(env[o] for o in pc.outputs))
    return g, subs


# ---------------------------------------------------------------------------------------------
# Structure keys: equal keys, the same compiled code for both
# ---------------------------------------------------------------------------------------------

def _target_name(t) -> str:
    if isinstance(t, str):
        return t
    mod, qual = getattr(t, "__module__", None), getattr(t, "__qualname__", None)
    if mod and qual:
        return f"{mod}.{qual}"
    return str(t)


def _tensor_sig(t) -> str:
    if not isinstance(t, torch.Tensor):
        return repr(type(t).__name__)
    return (f"T{tuple(t.shape)}{tuple(t.stride())}{t.dtype}{t.device.type}"
            f"{'g' if t.requires_grad else ''}{'P' if isinstance(t, nn.Parameter) else ''}")


def _val_sig(v) -> str:
    if isinstance(v, torch.Tensor):
        return _tensor_sig(v)
    if isinstance(v, (list, tuple)):
        return "(" + ",".join(_val_sig(x) for x in v) + ")"
    return "" if v is None else type(v).__name__


def _meta_sig(n: fx.Node) -> str:
    # what of our record may change the compiled code (the region name differs per block by design)
    m = meta.get(n)
    return f"{m.role}|{m.sub_batch}|{m.placement}|{m.pieces}|{m.recompute}"


def structure_key(g, subs=None) -> str:
    """(A GraphModule, or a Graph and the submodules it calls by name.) A string equal for two
    GraphModules that compute the same thing from same-shaped inputs:
    ops, targets, constants, wiring by position (not names), our node records, the parameter
    inputs' shapes/strides/dtypes/requires_grad, and the same for each submodule it calls.
    Activation shapes are not in it (node.meta["val"] is stale after some passes): the runner adds
    the actual ones at the first call."""
    index = {}
    parts = []

    def arg(a):
        if isinstance(a, fx.Node):
            return f"%{index[a]}"
        if isinstance(a, (list, tuple)):
            return ("[" if isinstance(a, list) else "(") + ",".join(arg(x) for x in a) + ")"
        if isinstance(a, dict):
            return "{" + ",".join(f"{k}:{arg(v)}" for k, v in sorted(a.items())) + "}"
        if isinstance(a, torch.Tensor):
            return _tensor_sig(a)
        if callable(a) and not isinstance(a, (torch.dtype, torch.device)):
            return _target_name(a)
        return repr(a)

    graph, owner = (g.graph, g) if isinstance(g, fx.GraphModule) else (g, None)
    for i, n in enumerate(graph.nodes):
        index[n] = i
        if n.op == "placeholder":
            parts.append(f"ph {n.meta.get(SIG_KEY, 'act')}")  # activations: their actual shapes at the first call
        elif n.op == "get_attr":
            sub = subs[n.target] if owner is None else _attr(owner, n.target)
            parts.append("sub{" + (structure_key(sub) if isinstance(sub, fx.GraphModule) else _val_sig(sub)) + "}")
        else:
            if n.op == "call_module":  # the module's own code (its class) and its parameters are not compared
                parts.append(f"module {type(subs[n.target] if owner is None else owner.get_submodule(n.target)).__qualname__}")
            parts.append(f"{n.op} {_target_name(n.target)} {arg(n.args)} {arg(n.kwargs)} {_meta_sig(n)}")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# Running the pieces
# ---------------------------------------------------------------------------------------------

class _PieceCall(nn.Module):
    """Calls a compiled piece with the activations it is given and its own parameters, read from
    the program's GraphModule at every call (a rebind or a meta-device allocation after compile
    replaces them there). Which artifact it runs is decided at its first call, from its structure
    key and the activations' actual shapes (the traced shapes in node.meta are not kept exact by
    every pass)."""

    def __init__(self, registry: "_Artifacts", pc: Piece, owner: fx.GraphModule):
        super().__init__()
        self.__dict__["_registry"] = registry  # not submodules: one artifact serves several pieces
        self.__dict__["_piece"] = pc
        self.__dict__["_fn"] = None
        self.__dict__["_where"] = [(owner.get_submodule(t.rpartition(".")[0]) if "." in t else owner,
                                    t.rpartition(".")[2]) for t in pc.attrs]
        self.piece_name = pc.name

    def forward(self, *acts):
        fn = self._fn
        if fn is None:
            fn = self.__dict__["_fn"] = self._registry.artifact(self._piece, acts)
        return fn(*acts, *[getattr(m, leaf) for m, leaf in self._where])


class _Artifacts:
    """The compiled artifacts of one program, by (structure key, activation signature)."""

    def __init__(self, compile_fn, report: "LayerReport"):
        self.compile_fn, self.report, self.by_key = compile_fn, report, {}

    def artifact(self, pc: Piece, acts):
        key = (pc.key, tuple(_val_sig(a) for a in acts))
        got = self.by_key.get(key)
        if got is None:
            piece = fx.GraphModule(pc.subs, pc.graph, class_name="OasesPiece")
            got = self.by_key[key] = (len(self.by_key), self.compile_fn(piece))
            self.report.num_compiled = len(self.by_key)
        self.report.pieces.append((pc.name, got[0]))
        return got[1]


def stitch(gm: fx.GraphModule, pieces: list, calls: list) -> fx.GraphModule:
    """A GraphModule with gm's signature (its pytree codegen) that runs calls[i] for pieces[i] in order."""
    import copy

    g = fx.Graph()
    g.set_codegen(copy.deepcopy(_compat.graph_codegen(gm.graph)))
    env = {}
    root = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            env[n] = g.node_copy(n)
    for pc, call in zip(pieces, calls):
        name = f"oases_piece_{pc.index}"
        root[name] = call
        node = g.call_module(name, tuple(env[a] for a in pc.acts))
        for j, o in enumerate(pc.outputs):
            env[o] = g.call_function(operator.getitem, (node, j))
            env[o].meta = {k: v for k, v in o.meta.items() if k in ("val", "tensor_meta")}
    out = next(n for n in gm.graph.nodes if n.op == "output")

    def get(a):
        if a not in env:  # a parameter returned as it is (no piece reads it)
            assert a.op == "get_attr", a
            root[a.target] = _attr(gm, a.target)
            env[a] = g.get_attr(a.target)
        return env[a]

    g.node_copy(out, get)
    return fx.GraphModule(root, g, class_name="OasesLayered")


def compile_layers(gm: fx.GraphModule, compile_fn, *, mode: str):
    """(a callable with gm's signature, LayerReport). `compile_fn(piece_gm)` makes the compiled
    callable of one piece (torch.compile with our backend); "reuse" calls it once per distinct
    structure and input signature, "each" once per piece (at each piece's first call)."""
    assert mode in ("reuse", "each"), mode
    pieces = cut(gm)
    report = LayerReport(mode=mode)
    registry = _Artifacts(compile_fn, report)
    calls = []
    for pc in pieces:
        pc.graph, pc.subs = build_piece_graph(gm, pc)
        pc.key = structure_key(pc.graph, pc.subs) if mode == "reuse" else f"#{pc.index}"
        calls.append(_PieceCall(registry, pc, gm))
    report.num_pieces = len(pieces)
    report.num_structures = len({pc.key for pc in pieces})
    report.blocks = [pc.name for pc in pieces if pc.name not in ("prologue", "epilogue")]
    return stitch(gm, pieces, calls), report
