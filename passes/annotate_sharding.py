"""annotate_sharding (TAG): find Megatron column->row pairs in the traced graph and tag them.

Kind: TAG. Reads the torch-level graph from tracing (aten training IR with ``meta["val"]``);
writes ``node.meta["oases"]`` (region, role, placement, pieces) on the weights, linears and
every node between them; writes ``gm.meta["oases"]["regions"]`` (the matches) and
``["declined"]`` (candidates not sharded, with the reason, shown by explain()).

Finding a pair: for every linear-like node R (linear / addmm / mm with a 2-D parameter weight),
walk back from its activation to the nearest linears (its *sources*). If the sources are not
yet in a region and sharding them column-wise and R row-wise propagates cleanly through every
node between them (:mod:`oases_fx.propagation`), (sources -> R) is a TMP region: attention
(q/k/v or fused qkv -> out-proj) or MLP (fc1 or gate/up -> fc2/down).

    before:  x -> linear(x, W_qkv) -> split -> view -> sdpa -> view -> linear(., W_o) -> y
    after:   same graph; W_qkv: role=column S(0) pieces=(h,h,h); W_o: role=row S(1);
             sdpa: region="...attn" placement=S(1)
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx

from oases_fx import meta, moe
from oases_fx.errors import ShardingError, describe
from oases_fx.propagation import (
    SDPA_OPS, SOFTMAX_OPS, Incompatible, ShardState, UnknownOp, linear_parts, propagate_node,
)
from oases_fx.rules import MATMUL_OPS, WEIGHT_VIEW_OPS


@dataclass
class RegionMatch:
    """One Megatron pair found in the graph."""

    name: str
    kind: str  # "attention" | "mlp"
    columns: list  # column linear nodes
    row: fx.Node
    blocks: int = 1  # blocks it counts for coverage(): one per expert for 3-D experts (oases_fx.moe)
    nodes: list = field(default_factory=list)  # every node of the region (columns .. row), graph order
    state: Optional[ShardState] = None
    summary: str = ""  # what was sharded, for explain() (later passes may copy or erase the nodes)
    degree: Optional[int] = None  # TMP degree the region is sharded at (the plan's d; set when chosen)

    def weights(self) -> list:
        return [linear_parts(n)[1] for n in self.columns + [self.row]]


# weight layout (propagation.linear_parts) -> (column dim, row dim) of the weight parameter
_COL_ROW_DIMS = {"oi": (0, 1), "io": (1, 0), **moe.EXPERT_LAYOUTS}


def _fqn(node: fx.Node) -> str:
    return str(node.target)


def _region_name(weights: list) -> str:
    paths = [_fqn(w).split(".")[:-2] for w in weights]  # drop "<linear>.weight"
    common = paths[0]
    for p in paths[1:]:
        n = 0
        while n < min(len(common), len(p)) and common[n] == p[n]:
            n += 1
        common = common[:n]
    return ".".join(common) or _fqn(weights[-1]).rsplit(".", 1)[0]


def _sources(row: fx.Node, linears: set) -> set:
    x = linear_parts(row)[0]
    seen, stack, found = set(), [x], set()
    while stack:
        n = stack.pop()
        if n in seen or not isinstance(n, fx.Node):
            continue
        seen.add(n)
        if n in linears:
            found.add(n)
            continue
        if n.op in ("placeholder", "get_attr"):
            continue
        stack.extend(n.all_input_nodes)
    return found


def _trial(sources: set, row: fx.Node, order: dict, tp: int, replicated: frozenset = frozenset(),
           replicate_qkv: bool = False):
    """Propagate column shards from `sources` to `row`; return (state, region nodes) or raise.
    `replicated`: columns kept whole on every rank (key/value projections with fewer heads than tp);
    `replicate_qkv`: every column kept whole (a fused q/k/v with kv heads < tp)."""
    st = ShardState(tp=tp, replicated_columns=frozenset(sources) if replicate_qkv else frozenset(replicated),
                    replicate_qkv=replicate_qkv)
    for c in sources:
        if c in st.replicated_columns:
            continue
        _, w, bias, layout = linear_parts(c)
        st.weight_dim[w] = _COL_ROW_DIMS[layout][0]
        if isinstance(bias, fx.Node):
            st.bias_dim[bias] = 0
    _, w_row, _, layout = linear_parts(row)
    st.weight_dim[w_row] = _COL_ROW_DIMS[layout][1]
    # Forward cone of the sources, up to the row.
    cone, stack = set(), list(sources)
    while stack:
        n = stack.pop()
        if n in cone or order[n] > order[row]:
            continue
        cone.add(n)
        if n is not row:
            stack.extend(n.users)
    # Backward cone of the row: a node of the forward cone outside it lets a sharded tensor escape.
    anc, stack = set(), [row]
    while stack:
        n = stack.pop()
        if n in anc:
            continue
        anc.add(n)
        stack.extend(m for m in n.all_input_nodes if m in cone)
    escaped = [n for n in cone if n not in anc and n.op == "call_function"
               and n.target is not torch.ops.aten._assert_tensor_metadata.default]
    nodes = sorted(cone & anc, key=order.__getitem__)
    for n in nodes:
        try:
            propagate_node(n, st)
        except (Incompatible, UnknownOp) as e:  # the region is declined: say which op and source line
            raise type(e)(f"{e} at {describe(n)}") from None
    in_nodes = set(nodes)
    for n in escaped:  # never propagated: what it reads from the region says whether a shard leaks
        if st.placement.get(n) is not None or any(_is_sharded(_read_placement(st, m, n)) for m in n.all_input_nodes
                                                  if m in in_nodes):
            raise Incompatible(f"a sharded tensor is used outside the region, at {describe(n)}")
    if st.replicated_columns:
        if not st.local_slices:
            raise Incompatible("the replicated key/value projection reaches no attention op")
        in_nodes = set(nodes)
        stack = [node.args[i] for node, i, *_ in st.local_slices]
        while stack:  # the replicated operands' producers inside the region
            n = stack.pop()
            if n in st.replicated_path or n not in in_nodes or _is_sharded(st.placement.get(n)):
                continue
            st.replicated_path.add(n)
            stack.extend(n.all_input_nodes)
    return st, nodes


def _piece_sizes(columns) -> list:
    """The sizes a fused column's output is split into (split_with_sizes, a few views away), each list."""
    out, stack, seen = [], [(c, 0) for c in columns], set()
    while stack:
        n, depth = stack.pop()
        if n in seen or depth > 3:
            continue
        seen.add(n)
        for u in n.users:
            if u.op == "call_function" and u.target is torch.ops.aten.split_with_sizes.default:
                out.append([int(v) for v in u.args[1]])
            elif u.op == "call_function" and u.target in (torch.ops.aten.unsqueeze.default, torch.ops.aten.view.default,
                                                           torch.ops.aten.reshape.default):
                stack.append((u, depth + 1))
    return out


def _read_placement(st: ShardState, src: fx.Node, user: fx.Node):
    """The placement of what `user` reads from `src`: one piece of a tuple-valued op (split) for a getitem."""
    p = st.placement.get(src)
    if isinstance(p, tuple) and user.target is operator.getitem and isinstance(user.args[1], int):
        return p[user.args[1]]
    return p


def _is_sharded(p) -> bool:
    return (p is not None and not isinstance(p, tuple)) or (isinstance(p, tuple) and any(v is not None for v in p))


def _trial_kv(sources: set, row: fx.Node, order: dict, tp: int, like: Optional[ShardState] = None):
    """_trial, and where it fails in an attention block whose key/value heads do not split over tp,
    Megatron's answer: the narrower (key/value) columns replicated on every rank (gradients summed
    over TMP), then -- a fused q/k/v -- every column replicated; the first error if neither works.
    `like`: the options of an earlier trial (the same decision at another degree)."""
    if like is not None:
        return _trial(sources, row, order, tp, like.replicated_columns, like.replicate_qkv)
    try:
        return _trial(sources, row, order, tp)
    except (Incompatible, UnknownOp, ShardingError) as first:
        widths = {c: int(c.meta["val"].shape[-1]) for c in sources}
        narrow = frozenset(c for c in sources if widths[c] < max(widths.values()))
        options = ([(narrow, False)] if narrow else []) + [(frozenset(), True)]
        for replicated, replicate_qkv in options:
            try:
                st, nodes = _trial(sources, row, order, tp, replicated, replicate_qkv)
            except (Incompatible, UnknownOp, ShardingError):
                continue
            # only for what it is for: an attention reading fewer key/value heads than tp (otherwise the
            # first failure stands, e.g. overlapping slices of a fused projection)
            narrow_heads = [q_heads * widths[c] // max(widths.values()) for c in replicated
                            for _, _, _, q_heads, _ in st.local_slices[:1]]  # kv repeated before the attention
            if replicate_qkv:  # a fused q/k/v cut into unequal pieces (q wider): its kv heads
                narrow_heads += [q_heads * p // max(sizes) for sizes in _piece_sizes(sources)
                                 for p in sizes for _, _, _, q_heads, _ in st.local_slices[:1]]
            seen = [heads for _, _, _, _, heads in st.local_slices] + narrow_heads
            if any(h % tp for h in seen):
                return st, nodes
        raise first


def find_tmp_regions(gm: fx.GraphModule, tp: int, degrees: Optional[dict] = None):
    """All Megatron pairs in graph order, and the declined candidates as (name, reason).
    `degrees` (region name -> TMP degree d) checks a region's divisibility against its own d
    instead of tp."""
    degrees = degrees or {}
    moe.register()  # grouped expert matmuls (3-D expert parameters) are linear-like
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    linears = [n for n in gm.graph.nodes if linear_parts(n) is not None]
    linear_set = set(linears)
    weight_users = {}
    for n in linears:
        weight_users.setdefault(linear_parts(n)[1], []).append(n)
    assigned: set = set()
    tried_rows: set = set()  # rows of declined candidates (_orphan_attention: their attention is explained).
    # They may still be the columns of a later candidate: a pair across the residual (o_proj -> gate_proj,
    # tried when the attention was declined) must not hide the MLP (gate_proj, up_proj -> down_proj).
    regions, declined = [], []
    for row in linears:
        if row in assigned:
            continue
        sources = _sources(row, linear_set)
        if not sources or sources & assigned:
            continue
        tried_rows.add(row)
        weights = [linear_parts(n)[1] for n in sorted(sources, key=order.__getitem__)] + [linear_parts(row)[1]]
        name = _region_name(weights)
        shared = [w for w in weights if len(weight_users[w]) > 1]
        if shared:
            declined.append((name, f"weight {_fqn(shared[0])} is used by several ops (tied)"))
            continue
        try:
            st, nodes = _trial_kv(sources, row, order, degrees.get(name, tp))
        except Incompatible as e:
            declined.append((name, str(e)))
            continue
        except ShardingError as e:
            if name in degrees:
                raise ShardingError(f"region '{name}' planned at TMP degree {degrees[name]}: {e}") from None
            declined.append((name, f"not divisible by the TMP degree {tp}: {e}"))  # e.g. kv heads < tp
            continue
        except UnknownOp as e:  # no rule: declined (the model runs replicated there), never an error
            declined.append((name, f"no sharding rule: {e}. Fix: report the op so a rule can be added "
                                   "to oases_fx/propagation.py"))
            continue
        kind = "attention" if any(n.target in SDPA_OPS or n.target in SOFTMAX_OPS for n in nodes) else "mlp"
        cols = sorted(sources, key=order.__getitem__)
        regions.append(RegionMatch(name=name, kind=kind, columns=cols, row=row, nodes=nodes, state=st,
                                   blocks=moe.num_experts(row)))
        assigned |= sources | {row}
    declined.extend(_orphan_attention(gm, regions, declined, tried_rows, linear_set))
    declined.extend(_orphan_weights(gm, regions, declined, linear_set))
    names = [r.name for r in regions]
    for r in regions:  # two blocks under one module path get an index to stay unique
        if names.count(r.name) > 1:
            r.name = f"{r.name}.{r.kind}"
            if degrees.get(r.name, tp) != r.state.tp:  # checked at the wrong degree under the short name
                r.state, r.nodes = _trial_kv(set(r.columns), r.row, order, degrees.get(r.name, tp), r.state)
    return regions, declined


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    paths = [v[0] for v in stack.values() if isinstance(v, tuple) and v and v[0]]
    return paths[-1] if paths else node.name


def _next_linears(node, linears) -> set:
    seen, stack, found = set(), list(node.users), set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in linears:
            found.add(n)
        else:
            stack.extend(n.users)
    return found


def _orphan_attention(gm, regions, declined, tried_rows, linears) -> list:
    """An attention op (SDPA) in no region and before no declined candidate's row: said, never
    silent (e.g. its projections are no linear the analysis knows)."""
    in_region = {n for r in regions for n in r.nodes}
    named = [name for name, _ in declined]
    out, seen = [], set()
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target not in SDPA_OPS or n in in_region:
            continue
        if _next_linears(n, linears) & tried_rows:  # its block was tried and declined with a reason
            continue
        path = _module_path(n)
        if path in seen or any(path == d or path.startswith(d + ".") or d.startswith(path + ".") for d in named):
            continue
        seen.add(path)
        out.append((path, f"attention in no column -> row pair (no linear with a parameter weight found "
                          f"before and after it) at {describe(n)}"))
    return out


def _weight_param(a) -> Optional[fx.Node]:
    """The get_attr parameter (>= 2-D) behind argument `a`, through a few view-like ops."""
    for _ in range(4):
        if not isinstance(a, fx.Node):
            return None
        if a.op == "get_attr":
            v = a.meta.get("val")
            return a if isinstance(v, torch.Tensor) and v.dim() >= 2 else None
        if a.op == "call_function" and a.target in WEIGHT_VIEW_OPS and a.args:
            a = a.args[0]
            continue
        if a.op == "call_function" and a.target is torch.ops.aten.index.Tensor:  # weight[expert_ids]
            a = a.args[0]
            continue
        return None
    return None


def _orphan_weights(gm, regions, declined, linears) -> list:
    """A >= 2-D parameter consumed by a matmul-like op the analysis does not know (a custom op such as
    Hugging Face's grouped_mm for 3-D MoE experts, a bmm/einsum with a weight) outside every region:
    that block runs replicated; said, never silent."""
    in_region = {n for r in regions for n in r.nodes} | {c for r in regions for c in r.columns} | {r.row for r in regions}
    named = [name for name, _ in declined]
    out, seen = [], set()
    for n in gm.graph.nodes:
        if n.op != "call_function" or n in linears or n in in_region:
            continue
        custom = isinstance(n.target, torch._ops.OpOverload) and n.target.namespace not in ("aten", "prims")
        if not (custom or n.target in MATMUL_OPS):
            continue
        weights = [w for w in (_weight_param(a) for a in n.all_input_nodes) if w is not None]
        if not weights:
            continue
        path = _module_path(n)
        if path in seen or any(path == d or path.startswith(d + ".") for d in named):
            continue
        seen.add(path)
        fix = moe.decline_fix(weights[0])
        out.append((path, f"parameter {weights[0].target} feeds {n.target}, which no sharding rule covers "
                          f"(not a column -> row pair of linears), at {describe(n)}; replicated" + fix))
    return out


def _summary(r: RegionMatch) -> str:
    def desc(n):
        w = linear_parts(n)[1]
        rec = meta.get(w)
        return f"{w.target} {rec.placement}" + (f" interleaved {list(rec.pieces)}" if rec.pieces else "")

    out = f"column {', '.join(desc(c) for c in r.columns)} -> row {desc(r.row)}"
    st = r.state
    if st is not None and st.replicated_columns:
        what = ("q/k/v projection replicated (fused, kv heads < tp): attention sliced to this rank's heads"
                if st.replicate_qkv else "key/value projection replicated (kv heads < tp)")
        out += f"; {what}, its weight gradient summed over TMP"
    return out


def annotate_sharding_pass(gm: fx.GraphModule, *, plan, tp: int) -> fx.GraphModule:
    """Tag the regions the plan shards; record the rest as declined (TAG). A region planned at
    degree d < tp has its propagation (divisibility of heads, hidden sizes) checked against d."""
    degrees = {r.name: plan.region_degree(r.name) for r in plan.regions if plan.region_degree(r.name)}
    regions, declined = find_tmp_regions(gm, tp, degrees)
    gm_meta = gm.meta.setdefault("oases", {})
    planned = {r.name: r for r in plan.regions}
    found = {r.name for r in regions}
    unknown = sorted(set(planned) - found)
    if unknown:
        raise ShardingError(
            f"the plan names regions {unknown} that are not in this model's graph (found: {sorted(found)}). "
            "Fix: make the plan for this model (oases_fx.compile(..., plan='auto') then .plan.save(path))."
        )
    chosen = []
    for r in regions:
        rp = planned.get(r.name)
        if rp is not None and not rp.shard:
            declined.append((r.name, "replicated by the plan"))
            continue
        if rp is None and planned:
            declined.append((r.name, "not in the plan: replicated"))
            continue
        r.degree = plan.region_degree(r.name) or tp
        chosen.append(r)
        st = r.state
        for n in r.nodes:
            p = st.placement.get(n)
            role = "column" if n in r.columns else "row" if n is r.row else None
            meta.update(n, region=r.name, role=role,
                        placement=None if isinstance(p, tuple) else ("R" if p is None else f"S({p})"))
        for n in st.replicated_path:
            meta.update(n, placement="R")
        for c in r.columns:
            _, w, bias, _ = linear_parts(c)
            if c in st.replicated_columns:  # key/value heads < tp: whole on every rank, gradient summed
                meta.update(w, region=r.name, role="column", placement="R")
                if isinstance(bias, fx.Node):
                    meta.update(bias, region=r.name, role="column", placement="R")
                continue
            pieces = tuple(st.pieces[c]) if c in st.pieces else None
            meta.update(w, region=r.name, role="column", placement=f"S({st.weight_dim[w]})", pieces=pieces)
            if isinstance(bias, fx.Node):
                meta.update(bias, region=r.name, role="column", placement="S(0)", pieces=pieces)
        for base in st.param_inputs.values():  # norm weights over the sharded width
            meta.update(base, region=r.name, role="column", placement=f"S({st.bias_dim[base]})")
        _, w, bias, _ = linear_parts(r.row)
        meta.update(w, region=r.name, role="row", placement=f"S({st.weight_dim[w]})")
        if isinstance(bias, fx.Node):
            meta.update(bias, region=r.name, role="row_bias", placement="R")
        r.summary = _summary(r)
    gm_meta["regions"] = chosen
    gm_meta["all_regions"] = regions
    gm_meta["declined"] = declined
    gm_meta["declined_blocks"] = _declined_blocks(gm, declined)
    return gm


def _declined_blocks(gm, declined) -> dict:
    """Declined name -> blocks it counts, where more than one: the experts of the 3-D expert
    parameters under it (one block per expert, as a sharded MoE region counts)."""
    owners = {}  # module holding 3-D (expert) parameters -> E
    for n in gm.graph.nodes:
        v = n.meta.get("val") if n.op == "get_attr" else None
        if isinstance(v, torch.Tensor) and v.dim() == 3 and _used_as_experts(n):
            owners[str(n.target).rsplit(".", 1)[0]] = int(v.shape[0])
    out = {}
    for name, _ in declined:
        e = sum(v for o, v in owners.items() if o == name or o.startswith(name + "."))
        if e > 1:
            out[name] = e
    return out


def _used_as_experts(n: fx.Node) -> bool:
    """A 3-D parameter used as E expert matrices: the weight of a grouped matmul (moe.expert_matmul_parts),
    or indexed per expert on dim 0 (HF's eager expert loop: ``self.gate_up_proj[expert_idx]``), directly
    or through dtype casts and transposes. Not, e.g., LFM2's short-conv weight (64, 1, 3): channels."""
    todo, seen = [n], set()
    while todo:
        u = todo.pop()
        for user in u.users:
            if user in seen or user.op != "call_function":
                continue
            seen.add(user)
            if moe.expert_matmul_parts(user) is not None:
                return True
            t = user.target
            if t in (torch.ops.aten.select.int, torch.ops.aten.index.Tensor) and (
                    t is torch.ops.aten.index.Tensor or (len(user.args) > 1 and user.args[1] in (0, -3))):
                return True
            if t in (torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype, torch.ops.aten.to.dtype_layout,
                     torch.ops.aten.transpose.int, torch.ops.aten.permute.default):
                todo.append(user)
    return False


PLAN_DECISIONS = ("replicated by the plan", "not in the plan: replicated")


def coverage(gm_meta) -> tuple:
    """(blocks sharded, blocks found, [(name, reason)] declined by the analysis, not by the plan).
    A block the plan chose to replicate counts as found, not as declined. An MoE region of 3-D
    experts counts one block per expert (RegionMatch.blocks, declined_blocks)."""
    declined = [(n, why) for n, why in gm_meta.get("declined", []) if why not in PLAN_DECISIONS]
    counts = gm_meta.get("declined_blocks", None) or {}
    found = sum(r.blocks for r in gm_meta.get("all_regions", [])) + sum(counts.get(n, 1) for n, _ in declined)
    return sum(r.blocks for r in gm_meta.get("regions", [])), found, declined


def coverage_message(gm_meta, top: int = 3) -> str:
    """"N of M blocks sharded" and the most frequent reasons (op and source line included), or ""
    when every block found is sharded or replicated by the plan's choice."""
    n, m, declined = coverage(gm_meta)
    if not declined:
        return ""
    counts = {}
    for _, why in declined:
        counts[why] = counts.get(why, 0) + 1
    reasons = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
    return (f"{n} of {m} blocks sharded; {len(declined)} declined (replicated), top reasons:\n"
            + "\n".join(f"  {c} x {why}" for why, c in reasons))


def check_strict(gm_meta) -> None:
    """CompileConfig(strict=True): any block declined by the analysis is an error."""
    n, m, declined = coverage(gm_meta)
    if declined:
        name, why = declined[0]
        raise ShardingError(
            f"strict=True: {len(declined)} of {m} blocks cannot be sharded; first: '{name}': {why}. "
            "Fix: compile with strict=False to run those blocks replicated, or replicate them in the plan "
            "(RegionPlan(name=..., shard=False)).")
