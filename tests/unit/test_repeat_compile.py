"""compile_layers (oases_fx/layers.py): the program cut per block, identical blocks compiled once.

What is checked: the number of compiled artifacts does not grow with depth (a count, never a
time); reuse runs exactly what compiling every piece on its own runs (bitwise: the same compiled
code, fed each block's own parameters); and per-block compilation gives the whole program's
values. Rank programs run on torch's fake process group (one process is rank 0 of TP=2;
collectives return at once), in a subprocess of their own because that group is process-wide.
Equivalence with the unsharded eager model on real gloo ranks: tests/distributed/test_repeat_compile.py.
"""
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.fx as fx

ROOT = Path(__file__).resolve().parents[2]


# --- in the subprocess --------------------------------------------------------------------------

def _run(spec: dict) -> dict:
    """Compile a tiny GPT on the fake group per spec; losses, gradients and the layer report."""
    torch.set_num_threads(1)
    import dataclasses

    import benchmarks.rank_bench as rank_bench
    from benchmarks.rank_bench import Case, build, make_batch

    if spec.get("dropout"):
        plain = rank_bench.gpt_config
        rank_bench.gpt_config = lambda case: dataclasses.replace(plain(case), dropout=spec["dropout"])

    out = {}
    for mode in spec["modes"]:
        case = Case(system="oases", tp=2, hidden=64, layers=spec["layers"], batch=4, seq=16, vocab=64, head_dim=16,
                    k=spec.get("k", 2), recompute=spec.get("recompute", "none"), collectives="fake", dtype="fp32",
                    backend=spec.get("backend", "aot_eager"), dp=spec.get("dp", 1),
                    options=dict(compile_layers=mode, **spec.get("options", {})))
        torch.manual_seed(0)
        step, module, _ = build(case, torch.device("cpu"))
        batch = make_batch(case, torch.device("cpu"))
        losses = [float(step(*batch)) for _ in range(2)]  # the second call runs the compiled code again
        grads = {n: _local(p.grad).detach().flatten().tolist() for n, p in module.named_parameters()
                 if p.grad is not None}
        rep = module.graphs.layers
        out[mode] = dict(losses=losses, grads=grads,
                         report=None if rep is None else dict(pieces=rep.pieces, num_compiled=rep.num_compiled,
                                                              num_structures=rep.num_structures, blocks=rep.blocks),
                         explain=module.explain(), schedule=_overlap(module.graphs.aot))
    return out


def _overlap(aot) -> dict:
    """Per compiled graph (forward, backward): for each all-reduce in graph order, whether a matmul
    runs between its issue and its wait (the overlap schedule_overlap makes; tasks.schedule_order)."""
    from oases_fx._compat import is_all_reduce, is_wait

    mm = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}
    out = {}
    for stage, graphs in (("forward", aot.forward), ("backward", aot.backward)):
        out[stage] = []
        for g in graphs:
            nodes = list(g.graph.nodes)
            pos = {n: i for i, n in enumerate(nodes)}
            covered = [any(x.target in mm for x in nodes[pos[n] + 1:pos[next(u for u in n.users if is_wait(u))]])
                       for n in nodes if is_all_reduce(n)]
            out[stage].append(dict(covered=covered, scheduled="oases_timeline" in g.meta))
    return out


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t  # the DTensor boundary: this rank's shard


def run_in_subprocess(**spec) -> dict:
    from tests.unit.graphs import run_module

    return run_module("tests.unit.test_repeat_compile", json.dumps(spec), timeout=900)


def assert_same_values(a: dict, b: dict, what: str):
    assert a["losses"] == b["losses"], f"{what}: losses differ: {a['losses']} vs {b['losses']}"
    assert set(a["grads"]) == set(b["grads"]), f"{what}: parameters with gradients differ"
    for name in a["grads"]:
        assert a["grads"][name] == b["grads"][name], f"{what}: gradient of {name} differs (not bitwise equal)"


# --- the tests ------------------------------------------------------------------------------------

def test_artifacts_do_not_grow_with_depth():
    """Every block is one structure, so the count of compiled artifacts is prologue + block +
    epilogue at every depth, while the pieces grow with L."""
    got = {L: run_in_subprocess(layers=L, modes=["reuse"])["reuse"]["report"] for L in (3, 6)}
    for L, rep in got.items():
        assert len(rep["blocks"]) == L, (L, rep)
        assert len(rep["pieces"]) == L + 2, (L, rep)
    counts = {L: rep["num_compiled"] for L, rep in got.items()}
    assert counts == {3: 3, 6: 3}, (
        f"compiled artifacts per depth {counts}, expected 3 at every depth: identical blocks are compiled "
        "again (a structure key that differs between blocks, oases_fx/layers.py)")


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("recompute", ["none", "fine", "full"])
def test_first_and_last_block_share_the_middle_blocks_structure(recompute, k):
    """The split sits on block 0's input (before its ln_1) and the cat after the last block's residual
    add, and recompute's segments end at block boundaries, so block 0, the middle block and the last
    block run one compiled artifact: 3 in all (prologue, block, epilogue). 3 layers: first, middle
    and last are all there."""
    rep = run_in_subprocess(layers=3, modes=["reuse"], k=k, recompute=recompute)["reuse"]["report"]
    artifact = dict(rep["pieces"])
    blocks = {artifact[b] for b in rep["blocks"]}
    assert len(blocks) == 1, f"recompute={recompute}, k={k}: blocks compiled apart: {rep['pieces']}"
    assert rep["num_structures"] == 3 and rep["num_compiled"] == 3, (recompute, k, rep)


def test_reuse_gives_the_values_of_each_and_of_the_whole_program():
    """aot_eager runs the same aten ops either way: reuse, every piece compiled, and the whole program
    agree bit for bit (loss of two calls, every gradient). A block fed another block's parameters,
    or pieces run out of order, would differ."""
    for recompute in ("none", "fine"):
        got = run_in_subprocess(layers=4, modes=["whole", "reuse", "each"], recompute=recompute)
        assert got["whole"]["report"] is None
        assert got["reuse"]["report"]["num_compiled"] < got["each"]["report"]["num_compiled"]
        assert_same_values(got["reuse"], got["each"], f"recompute={recompute}: reuse vs each")
        assert_same_values(got["reuse"], got["whole"], f"recompute={recompute}: reuse vs whole")
        assert "compiled per block (compile_layers='reuse')" in got["reuse"]["explain"]


def test_reuse_with_dropout_draws_the_masks_of_the_whole_program():
    """Dropout on (CPU generator, aot_eager): the pieces draw in the whole program's order, so the
    masks, the loss and the gradients are the whole program's, bit for bit, and the blocks still
    share one artifact (the random ops carry no per-block constant)."""
    got = run_in_subprocess(layers=4, modes=["whole", "reuse"], dropout=0.1, recompute="fine")
    assert_same_values(got["reuse"], got["whole"], "dropout 0.1: reuse vs whole")
    assert got["reuse"]["report"]["num_compiled"] == 3, got["reuse"]["report"]


def test_dp_reduce_graph_is_compiled_whole_and_says_so():
    """dp_reduce="graph" buckets gradients across layers inside the backward graph: with a dp axis the
    program is compiled whole, and explain() says why (nothing skipped silently)."""
    got = run_in_subprocess(layers=3, modes=["reuse"], dp=2, options=dict(dp_reduce="graph"))["reuse"]
    assert got["report"] is None
    assert "compile_layers='reuse' with dp_reduce='graph': compiled whole" in got["explain"], got["explain"]


def test_each_block_keeps_the_sub_batch_overlap():
    """Each block's graphs still hold both sub-batches and schedule_overlap still runs on them: in a
    block's forward and backward (2 regions x 2 sub-batches = 4 all-reduces), every all-reduce but
    the block's last has a matmul of the other sub-batch between its issue and its wait."""
    got = run_in_subprocess(layers=3, modes=["reuse"])["reuse"]
    blocks = 0
    for stage in ("forward", "backward"):
        for g in got["schedule"][stage]:
            assert g["scheduled"], f"{stage}: a compiled piece was not scheduled (schedule_overlap did not run)"
            if len(g["covered"]) == 4:
                blocks += 1
                assert all(g["covered"][:-1]), f"{stage}: exposed all-reduces in a block: {g['covered']}"
    # the one block artifact, its forward and its backward
    assert blocks == 2, got["schedule"]


@pytest.mark.slow
def test_reuse_gives_the_values_of_each_under_inductor():
    """Under Inductor the shared artifact is the same generated code as each block's own: bitwise
    equal values (k=1, so the test compiles few distinct graphs)."""
    got = run_in_subprocess(layers=3, modes=["reuse", "each"], backend="inductor", k=1)
    assert got["reuse"]["report"]["num_compiled"] == 3 and got["each"]["report"]["num_compiled"] == 5
    assert_same_values(got["reuse"], got["each"], "inductor: reuse vs each")


def test_compiletime_grid_pairs_reuse_with_whole_and_regional():
    """benchmarks/rank_bench.py's compiletime grid (issue 14): at L=4 and L=32, oases_fx with
    compile_layers reuse and whole and torch.compile regional and whole, all at the same shape."""
    from benchmarks.rank_bench import load_grid

    cases = load_grid("compiletime")
    got = [(c.system, c.layers, c.options.get("compile_layers"), c.options.get("regional", False)) for c in cases]
    assert got == [(s, L, m, r) for L in (4, 32) for s, m, r in (
        ("oases", "reuse", False), ("oases", "whole", False), ("torch_compile", None, True),
        ("torch_compile", None, False))], got
    assert {(c.hidden, c.batch, c.tp) for c in cases} == {(4096, 4, 2)}
    assert all(c.k == 2 and c.collectives == "skip" for c in cases if c.system == "oases")
    assert len(load_grid("compiletime_tiny")) == len(cases)


def _chain(scale: float, names=("x",)):
    g = fx.Graph()
    x = g.placeholder(names[0])
    w = g.placeholder("param_0")
    w.meta["oases_input_sig"] = "T(4,)"
    y = g.call_function(torch.ops.aten.mul.Tensor, (x, w))
    z = g.call_function(torch.ops.aten.mul.Tensor, (y, scale))
    g.output((z,))
    return fx.GraphModule({}, g)


def test_structure_key_ignores_names_and_sees_constants():
    from oases_fx.layers import structure_key

    a, b = _chain(2.0), _chain(2.0, names=("renamed",))
    assert structure_key(a) == structure_key(b), "node names must not matter"
    assert structure_key(a) != structure_key(_chain(3.0)), "a different constant is a different program"


def test_config_rejects_an_unknown_mode():
    from oases_fx.config import CompileConfig

    with pytest.raises(ValueError, match="compile_layers"):
        CompileConfig(compile_layers="per_layer")
    from oases_fx.errors import OasesError

    with pytest.raises(OasesError, match="cudagraphs=True with compile_layers='reuse'"):
        CompileConfig(compile_layers="reuse", cudagraphs=True)


if __name__ == "__main__":
    print("RESULT " + json.dumps(_run(json.loads(sys.argv[1]))), flush=True)
