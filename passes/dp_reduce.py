"""dp_reduce: the data-parallel gradient all-reduce inside the compiled backward graph, bucket by
bucket, issued as soon as a bucket's last gradient is produced (compile(..., dp_reduce="graph")).

Kind: ACT (adds nodes; values change from this rank's gradient to the dp average).

Contract
  Preconditions: an AOTAutograd backward graph (aten, functional collectives) whose output tuple
  holds one entry per forward input, in the order of the forward's inputs (AOTAutograd's calling
  convention; checked), and the positions of the forward inputs that are trainable parameters: the
  backend reads them from this graph's dynamo example inputs and puts them in
  ``gm.meta["oases_param_inputs"]`` (per compiled graph, so a recompile before this graph's lazy
  backward compile cannot hand it another graph's positions); ``param_inputs`` overrides (tests). Run after schedule_overlap: the
  TMP schedule is left exactly as that pass made it, and the dp collectives are placed into it.
  Invariant: every trainable parameter's gradient output becomes its average over the dp group
  (divided by dp, then summed: what DDP's reducer does); every other output is unchanged. Each
  gradient is in exactly one bucket; a bucket holds gradients of one dtype, in the order the
  backward produces them, closed when it reaches ``bucket_bytes`` (DDP's rule); one all_reduce
  per bucket over a flat buffer, issued right after the bucket's last gradient, its wait placed
  just before the output (as late as possible). The gradients returned are views of the bucket
  buffer (what DDP's gradient_as_bucket_view gives), so no copy back.
  ``skip``: the all-reduces are left out (the no-communication floor, skip_collectives=True);
  the bucket copies stay, so the floor keeps their compute.
  Records ``gm.meta["oases_dp_reduce"]``: a :class:`DPReduceRecord` (buckets, sizes, positions).

Pseudocode
  grads   = [(position of producer, output index) for each trainable parameter's gradient]
  buckets = greedy over grads sorted by position, one open bucket per dtype, closed at the cap
  for bucket: after its last producer: flat = cat([g.view(-1) ...]) / dp; ar = all_reduce(flat, sum)
  before output: for bucket: w = wait(ar); pieces = split(w, numels); outputs[i] = pieces[j].view(shape)

Before / after (dp=2, one bucket of two gradients; "c" = contiguous)
    mm_5 = mm(t_3, x)          # grad of W1                mm_5 = mm(t_3, x)
    ...                                                    ...
    sum_2 = sum(g, [0])        # grad of b1 (last)         sum_2 = sum(g, [0])
                                                           cat = cat([view(mm_5, [-1]), view(sum_2, [-1])])
                                                           div = div(cat, 2)
                                                           ar = all_reduce(div, "sum", dp)   # issued here
    mm_6 = mm(...)             # remaining backward        mm_6 = mm(...)   # overlaps the all-reduce
                                                           w = wait_tensor(ar)
                                                           s = split_with_sizes(w, [n1, n2])
    return (mm_5, sum_2, ...)                              return (view(s[0], W1.shape), view(s[1], [n2]), ...)
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx

from oases_fx import _compat
from oases_fx import meta as oases_meta
from oases_fx import runtime
from oases_fx.meta import graph_meta

aten = torch.ops.aten

__all__ = ["DPBucket", "DPReduceRecord", "dp_reduce_pass", "dp_accumulated_inputs_pass", "RECORD_KEY",
           "DEFAULT_BUCKET_MB"]

RECORD_KEY = "oases_dp_reduce"
PARAM_INPUTS_KEY = "oases_param_inputs"  # = oases_fx.backend.PARAM_INPUTS_KEY (set there per compiled graph)
ROLE = "dp_reduce"
"""node.meta["oases"].role of every node this pass adds (bucket copies, all-reduce, wait, split, views)."""
DEFAULT_BUCKET_MB = 25.0
"""DDP's bucket_cap_mb: its buckets of 25 MiB are a good size for NCCL and for overlap."""


@dataclass(frozen=True)
class DPBucket:
    """One dp all-reduce of the backward graph."""

    index: int
    outputs: tuple
    """Backward output positions (= forward input positions) of its gradients, in production order."""
    numel: int
    bytes: int
    dtype: str
    issued_after: str
    """Name of the node its all-reduce is issued after (its last gradient's producer)."""
    issue_position: int
    """Index of that node among the backward's compute nodes (0-based, before the dp nodes were added)."""


@dataclass
class DPReduceRecord:
    """What dp_reduce did to one backward graph (explain(), tests)."""

    dp: int
    bucket_bytes: int
    skipped: bool
    num_compute: int
    """Compute nodes of the backward before the dp nodes were added (the position scale)."""
    buckets: list = field(default_factory=list)

    def summary(self) -> str:
        total = sum(b.bytes for b in self.buckets)
        cap = (f"{self.bucket_bytes / 2**20:g} MiB" if self.bucket_bytes >= 2**20 else f"{self.bucket_bytes / 1024:.1f} KiB")
        return (f"{len(self.buckets)} bucket(s), {total / 2**20:.3f} MiB of gradients, cap {cap}, averaged over "
                f"dp={self.dp}"
                + (" [all-reduces SKIPPED: floor benchmark]" if self.skipped else ""))

    def lines(self) -> list:
        return [f"bucket {b.index}: {len(b.outputs)} gradient(s), {b.bytes / 1024:.1f} KiB {b.dtype}, issued after "
                f"{b.issued_after} (compute node {b.issue_position + 1} of {self.num_compute})" for b in self.buckets]


# --- small graph utilities ---------------------------------------------------------------------------

def _val(a):
    return a.meta.get("val") if isinstance(a, fx.Node) else a


def _make(graph: fx.Graph, mode, target, *args, **kwargs) -> fx.Node:
    """A call_function node with its meta["val"] computed on the graph's fake tensors (Inductor reads it)."""
    n = graph.call_function(target, args, kwargs)
    oases_meta.update(n, role=ROLE)
    if mode is not None:
        vals, kvals = torch.utils._pytree.tree_map(_val, (args, kwargs))
        with mode:
            n.meta["val"] = target(*vals, **kvals)
    return n


def is_backward_compute(n: fx.Node) -> bool:
    """A compute node of the backward itself: no collective, wait or getitem, and not one dp_reduce added."""
    return n.op == "call_function" and n.target is not operator.getitem and not (
        _compat.is_all_reduce(n) or _compat.is_wait(n)) and oases_meta.get(n).role != ROLE



# --- finding the gradients and their buckets ----------------------------------------------------------

def _buckets(members, bucket_bytes: int):
    """members: [(position, output index, numel, bytes, dtype)] in production order -> lists of members.
    One open bucket per dtype (one flat buffer cannot mix dtypes), closed when it reaches the cap."""
    open_: dict = {}
    done = []
    for m in members:
        cur = open_.setdefault(m[4], [])
        cur.append(m)
        if sum(x[3] for x in cur) >= bucket_bytes:
            done.append(cur)
            del open_[m[4]]
    done.extend(open_.values())
    return sorted(done, key=lambda b: b[-1][0])  # in the order they become complete


def dp_reduce_pass(gm: fx.GraphModule, *, group_name: str, dp: int,
                   bucket_bytes: int, param_inputs: Optional[tuple] = None,
                   skip: bool = False) -> fx.GraphModule:
    """Average every trainable parameter's gradient over the dp group inside the backward graph,
    bucketed and overlapped with the rest of the backward (see the module docstring); returns gm."""
    if param_inputs is None:
        if PARAM_INPUTS_KEY not in gm.meta:
            raise AssertionError("dp_reduce: the backward graph carries no gm.meta['oases_param_inputs'] (the "
                                 "positions of its trainable parameters); oases_fx.backend sets it per compile")
        param_inputs = gm.meta[PARAM_INPUTS_KEY]
    positions = tuple(param_inputs)
    graph = gm.graph
    nodes = list(graph.nodes)
    out = nodes[-1]
    assert out.op == "output", f"dp_reduce: the backward graph's last node is {out.format_node()}, not its output"
    outs = list(out.args[0])
    if positions and max(positions) >= len(outs):
        raise AssertionError(f"dp_reduce: the backward graph returns {len(outs)} values but the forward's trainable "
                             f"parameters are inputs {positions}: AOTAutograd's calling convention changed")
    pos = {n: i for i, n in enumerate(nodes)}
    compute = [n for n in nodes if is_backward_compute(n)]
    compute_pos = {n: i for i, n in enumerate(compute)}
    members = []
    for i in positions:
        g = outs[i]
        if not isinstance(g, fx.Node):
            continue  # no gradient (None): nothing to reduce, as DDP with every parameter used
        v = g.meta.get("val")
        assert isinstance(v, torch.Tensor), f"dp_reduce: gradient output {i} ({g.format_node()}) has no tensor meta"
        members.append((pos[g], i, v.numel(), v.numel() * v.element_size(), v.dtype))
    members.sort()
    rec = DPReduceRecord(dp=dp, bucket_bytes=bucket_bytes, skipped=skip, num_compute=len(compute))
    gm.meta[RECORD_KEY] = rec
    if not members:
        return gm
    mode = _compat.fake_mode_of([outs[m[1]].meta.get("val") for m in members])
    c10d = _compat.c10d_functional()
    issued = []
    for b_idx, bucket in enumerate(_buckets(members, bucket_bytes)):
        last = nodes[bucket[-1][0]]
        cursor = last
        flat = []

        def after(target, *args, **kwargs):
            nonlocal cursor
            with graph.inserting_after(cursor):
                cursor = _make(graph, mode, target, *args, **kwargs)
            return cursor

        for _, i, _, _, _ in bucket:
            g = outs[i]
            v = g.meta["val"]
            src = g if v.is_contiguous() else after(aten.clone.default, g, memory_format=torch.contiguous_format)
            flat.append(after(aten.view.default, src, [-1]))
        buf = after(aten.cat.default, flat) if len(flat) > 1 else flat[0]
        buf = after(aten.div.Tensor, buf, dp)
        ar = buf if skip else after(c10d.all_reduce.default, buf, "sum", group_name)
        issued.append((bucket, ar))
        producer = last if is_backward_compute(last) else next(
            (n for n in reversed(compute) if pos[n] <= pos[last]), None)
        rec.buckets.append(DPBucket(
            index=b_idx, outputs=tuple(m[1] for m in bucket), numel=sum(m[2] for m in bucket),
            bytes=sum(m[3] for m in bucket), dtype=str(bucket[0][4]).replace("torch.", ""),
            issued_after=last.name, issue_position=compute_pos.get(producer, -1)))
    for bucket, ar in issued:  # waits as late as possible: just before the output
        with graph.inserting_before(out):
            w = ar if skip else _make(graph, mode, c10d.wait_tensor.default, ar)
            sizes = [m[2] for m in bucket]
            parts = _make(graph, mode, aten.split_with_sizes.default, w, sizes)
            for j, (_, i, _, _, _) in enumerate(bucket):
                piece = _make(graph, mode, operator.getitem, parts, j)
                shape = list(outs[i].meta["val"].shape)
                outs[i] = _make(graph, mode, aten.view.default, piece, shape)
    out.args = (type(out.args[0])(outs),) + tuple(out.args[1:])
    graph.lint()
    gm.recompile()
    return gm


# --- the variant that reduces gradients accumulated under no_sync (torch-level, before compile) -------

ACC_PREFIX = "_oases_dp_acc_"


def dp_accumulated_inputs_pass(gm: fx.GraphModule) -> fx.GraphModule:
    """ACT, torch level, on a copy of the program: every trainable parameter (tied names once) goes through
    ``runtime.add_to_grad(W, acc)``, ``acc`` a buffer read by get_attr that the boundary points at the
    gradient accumulated under no_sync before each call, so the gradient leaving the backward graph is
    new + accumulated and dp_reduce averages both in one all-reduce per bucket. Records
    ``graph_meta(gm).dp_acc`` = {parameter name: buffer name}.

        before:  w = get_attr(h.0.mlp.c_fc.weight); y = linear(x, w)
        after:   w = get_attr(h.0.mlp.c_fc.weight); a = get_attr(_oases_dp_acc_3); w1 = add_to_grad(w, a)
                 y = linear(x, w1)
    """
    graph = gm.graph
    by_param: dict = {}
    names: dict = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        if p.requires_grad:
            names.setdefault(id(p), (name, p))
    for n in graph.nodes:
        if n.op == "get_attr":
            p = _attr(gm, n.target)
            if isinstance(p, torch.nn.Parameter) and id(p) in names:
                by_param.setdefault(id(p), []).append(n)
    acc = {}
    for i, (pid, gets) in enumerate(by_param.items()):
        name, p = names[pid]
        buf = f"{ACC_PREFIX}{i}"
        gm.register_buffer(buf, torch.zeros_like(p, device="meta"), persistent=False)
        first = gets[0]
        with graph.inserting_after(first):
            a = graph.get_attr(buf)
        with graph.inserting_after(a):
            w = graph.call_function(runtime.add_to_grad, (first, a))
        for g in gets:
            g.replace_all_uses_with(w, delete_user_cb=lambda u: u is not w)
        acc[name] = buf
    graph_meta(gm).dp_acc = acc
    graph.lint()
    gm.recompile()
    return gm


def _attr(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def bucket_bytes_of(mb: Optional[float]) -> int:
    """A bucket cap in MiB (DDP's bucket_cap_mb) as bytes."""
    return int((DEFAULT_BUCKET_MB if mb is None else mb) * 1024 * 1024)
