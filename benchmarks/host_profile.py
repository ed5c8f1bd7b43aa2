"""Host time of one oases_fx training step, by component, on CPU (issue 14: a step the host never gates).

The kernels' own time depends on the device; the Python around them does not. This runs a tiny GPT
as rank 0 of a TP=2 world on torch's fake process group (benchmarks/rank_bench.py's `fake_mesh`,
`build`, `make_batch`), with Inductor on the CPU, and times each part of a step (zero_grad, forward,
backward) with clocks around a few functions. Each part's time is its own (exclusive of the
parts it calls), in microseconds per step, the median of many steps:

    python -m benchmarks.host_profile --k 1,2,4
    python -m benchmarks.host_profile --k 2 --cprofile 30      # plus cProfile's top functions
    python -m benchmarks.host_profile --k 2 --interleave       # oases_fx.direct_call on/off, one process
    python3 -m benchmarks.host_profile --k 1,2,4 --device cuda --shape rank_bench --hidden 1024 \
        --cudagraphs --interleave --clock wall                  # the same breakdown on a GPU (issue 14)

"Inductor fw/bw call" is the generated code with its kernels (on a GPU with cudagraphs=True a CUDA
graph replay runs there instead); everything else is the host path that the GPU step also pays. Times
are this thread's CPU time by default (--clock cpu), so a step preempted by other processes on a shared
CPU is not charged for the wait; --rounds N alternates the trees of --roots N times (medians over rounds).

    python -m benchmarks.host_profile --k 1,2,4 --roots before=/tmp/base,after=. --rounds 2
    python -m benchmarks.host_profile --k 1,2,4 --against /tmp/base   # one process: old/new host functions, alternated
    python -m benchmarks.host_profile --k 2 --saved-views            # saved views -> their base (oases_fx.saved_views)

--against PATH loads oases_fx/boundary.py and oases_fx/direct_call.py of the tree at PATH beside this tree's and
alternates, step by step in one process on one compiled program, this tree's per-call functions (AGAINST) with
PATH's: the A/B a shared CPU allows (separate processes differ by more than the change). Its columns are the
uninstrumented step time per arm.
Each k runs in its own process (one fake world per process). No number here is a test assertion.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

# the parts timed: (label, owner, attribute); each wrapper records time exclusive of nested parts
PROGRAM = "program call: torch.compile's wrapping + AOT fw wrappers"
PARTS = (
    ("OasesModule.forward (own)", "oases_fx.api:OasesModule", "forward"),
    (PROGRAM, "oases_fx.direct_call:DirectCall", "__call__"),
    ("Boundary.call (own)", "oases_fx.boundary:Boundary", "call"),
    ("StepTracker.mark", "oases_fx.watchdog:StepTracker", "mark"),
    ("hand-over start (pre-hook)", "oases_fx.boundary:Boundary", "_backward_start"),
    ("hand-over end (callback)", "oases_fx.boundary:Boundary", "_backward_end"),
    ("watchdog marker backward", "oases_fx.watchdog:_BackwardMarker", "backward"),
    ("Inductor call", "torch._inductor.output_code:CompiledFxGraph", "__call__"),
)


_now = time.thread_time  # this thread's CPU time: a step preempted by other processes is not charged for it


class _Clock:
    """A stack of running parts: each part's time excludes the parts it called."""

    def __init__(self):
        self.stack, self.acc = [], {}

    def wrap(self, label, fn, *, split=None):
        clock = self

        def timed(*args, **kwargs):
            name = split(args) if split else label
            clock.stack.append(0.0)
            t0 = _now()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = _now() - t0
                inner = clock.stack.pop()
                clock.acc[name] = clock.acc.get(name, 0.0) + dt - inner
                if clock.stack:
                    clock.stack[-1] += dt

        timed.__wrapped__ = fn
        return timed

    def region(self, label):
        return self.wrap(label, lambda f, *a, **k: f(*a, **k))


def _resolve(spec):
    mod, _, cls = spec.partition(":")
    try:
        m = __import__(mod, fromlist=[cls])
    except ImportError:  # a part the code under test does not have
        return None
    return getattr(m, cls, None)


def _install(clock):
    """Wrap the parts (class attributes); returns a function that undoes it."""
    undo = []
    for label, owner, attr in PARTS:
        cls = _resolve(owner)
        if cls is None or attr not in vars(cls):
            continue
        orig = vars(cls)[attr]
        fn = orig.__func__ if isinstance(orig, staticmethod) else orig
        if label == "Inductor call":
            w = clock.wrap(label, fn, split=lambda a: "Inductor bw call" if torch._C._current_graph_task_id() != -1
                           else "Inductor fw call")
        else:
            w = clock.wrap(label, fn)
        setattr(cls, attr, staticmethod(w) if isinstance(orig, staticmethod) else w)
        undo.append((cls, attr, orig))
    return lambda: [setattr(c, a, o) for c, a, o in undo]


# the per-call functions --against swaps: (module, class, attribute)
AGAINST = (("boundary", "Boundary", "call"), ("boundary", "Boundary", "_backward_start"),
           ("boundary", "Boundary", "_backward_end"), ("direct_call", "DirectCall", "__call__"))


def _against(path):
    """[(class, attribute, this tree's function, PATH's function)] for AGAINST (PATH's modules loaded under
    other names; they import the rest of oases_fx from this tree)."""
    import importlib.util

    got = []
    mods = {}
    for mod, cls, attr in AGAINST:
        if mod not in mods:
            spec = importlib.util.spec_from_file_location(f"_against_{mod}", Path(path) / "oases_fx" / f"{mod}.py")
            m = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(m)
            mods[mod] = m
        new_cls = getattr(__import__(f"oases_fx.{mod}", fromlist=[cls]), cls)
        old_cls = getattr(mods[mod], cls, None)
        if old_cls is not None and attr in vars(old_cls) and attr in vars(new_cls):
            got.append((new_cls, attr, vars(new_cls)[attr], vars(old_cls)[attr]))
    return got


def _install_saved_views():
    """oases_fx.saved_views on every partition compiled from here on (aot_eager's partition_fn, Inductor's
    custom_partitioner_fn); returns the list of results per partition."""
    from oases_fx import _compat, saved_views

    orig = _compat.default_partition
    part = saved_views.wrap_partition(orig())
    _compat.default_partition = lambda: part
    ind = saved_views.inductor_partitioner()
    if ind is None:
        raise SystemExit("--saved-views: this torch has no torch._inductor.config.custom_partitioner_fn")
    import torch._inductor.config as icfg

    icfg.custom_partitioner_fn = ind
    return part.stats, ind.stats


def _graph_counts(module) -> dict:
    """Inputs and outputs of the last compiled forward and backward graphs (what the runtime wrappers and
    cudagraph trees handle per call)."""
    aot = module.graphs.aot
    out = {}
    for stage, gs in (("fw", aot.forward), ("bw", aot.backward)):
        if not gs:
            continue
        g = gs[-1].graph
        ph = [n for n in g.nodes if n.op == "placeholder"]
        outs = next(n for n in g.nodes if n.op == "output").args[0]
        out[f"{stage}_inputs"] = len(ph)
        out[f"{stage}_outputs"] = len(outs) if isinstance(outs, (tuple, list)) else 1
    out["params"] = sum(1 for _ in module.parameters())
    return out


def profile_k(k: int, *, steps: int, hidden: int, backend: str, collectives: str, cprofile: int,
              interleave: bool = False, shape: str = "tiny", device: str = "cpu", cudagraphs: bool = False,
              against: str = "", saved_views: bool = False, tp: int = 2) -> dict:
    from benchmarks import rank_bench
    from benchmarks.rank_bench import Case

    torch.set_num_threads(1)
    views = _install_saved_views() if saved_views is True else None
    size = (dict(batch=8, seq=8, vocab=64, head_dim=16, dtype="fp32") if shape == "tiny"
            else dict(batch=8, seq=2048, vocab=1024, head_dim=64, dtype="bf16"))  # "rank_bench": RESULTS 7's
    case = Case(system="oases", tp=tp, hidden=hidden, layers=2, k=k, backend=backend, collectives=collectives,
                options=dict(cudagraphs=True) if cudagraphs else {}, **size)
    dev = torch.device(device)
    batch = rank_bench.make_batch(case, dev)
    t0 = _now()
    _, module, _ = rank_bench.build(case, dev)
    params = [p for p in module.parameters() if p.requires_grad]
    clock = _Clock()

    def zero_grad():
        for p in params:
            p.grad = None

    def step(idx, targets):
        zero_grad()
        _, loss = module(idx, targets)
        loss.backward()

    step(*batch)  # compiles forward and backward
    compile_s = _now() - t0
    for _ in range(10):
        step(*batch)
    totals = []
    for _ in range(steps):  # unwrapped: the step's wall time
        t = _now()
        step(*batch)
        totals.append(_now() - t)

    ab = None
    if saved_views == "ab":  # a second program compiled with oases_fx.saved_views; steps alternate between them
        views = _install_saved_views()
        _, module2, _ = rank_bench.build(case, dev)
        params2 = [p for p in module2.parameters() if p.requires_grad]

        def step2(idx, targets):
            for p in params2:
                p.grad = None
            _, loss = module2(idx, targets)
            loss.backward()

        for _ in range(10):
            step2(*batch)
        arm_t = {"plain": [], "saved views": []}
        for i in range(2 * steps):
            arm = "plain" if i % 2 == 0 else "saved views"
            t = _now()
            (step if arm == "plain" else step2)(*batch)
            arm_t[arm].append(_now() - t)
        ab = {f"step, {arm} (median)": statistics.median(v) * 1e6 for arm, v in arm_t.items()}
        ab.update({f"step, {arm} (p20)": sorted(v)[len(v) // 5] * 1e6 for arm, v in arm_t.items()})
        c2 = _graph_counts(module2)
        ab["swapped"] = f"fw_outputs {_graph_counts(module)['fw_outputs']} -> {c2['fw_outputs']}"
    elif against:  # the same steps, alternating this tree's per-call functions with PATH's (uninstrumented)
        swaps = _against(against)
        arm_t = {"this tree": [], "against": []}
        for i in range(2 * steps):
            arm = "this tree" if i % 2 == 0 else "against"
            for cls, attr, new_fn, old_fn in swaps:
                setattr(cls, attr, new_fn if arm == "this tree" else old_fn)
            t = _now()
            step(*batch)
            arm_t[arm].append(_now() - t)
        for cls, attr, new_fn, _ in swaps:
            setattr(cls, attr, new_fn)
        ab = {f"step, {arm} (median)": statistics.median(v) * 1e6 for arm, v in arm_t.items()}
        ab.update({f"step, {arm} (p20)": sorted(v)[len(v) // 5] * 1e6 for arm, v in arm_t.items()})
        ab["swapped"] = ", ".join(f"{c.__name__}.{a}" for c, a, _, _ in swaps)

    undo = _install(clock)

    prog = module.graphs  # the program's torch.compile'd callable: dynamo's frame, guards, AOT's wrappers
    compiled = prog.compiled
    if _resolve("oases_fx.direct_call:DirectCall") is None:  # code before oases_fx.direct_call
        prog.compiled = clock.wrap(PROGRAM, compiled)
    t_zero = clock.region("zero_grad")
    t_fwd = clock.region("module call (nn.Module __call__)")
    t_bwd = clock.region("backward: engine + AOT bw wrappers")
    dc = sys.modules.get("oases_fx.direct_call")
    arms = (True, False) if interleave and dc is not None else (None,)
    per = {arm: [] for arm in arms}
    for i in range(steps * len(arms)):
        arm = arms[i % len(arms)]  # interleaved: both arms see the same load
        if arm is not None:
            dc.ENABLED = arm
        clock.acc = {}
        t = _now()
        t_zero(zero_grad)
        _, loss = t_fwd(module, *batch)
        t_bwd(loss.backward)
        wall = _now() - t
        row = dict(clock.acc)
        row["step (instrumented)"] = wall
        per[arm].append(row)
    if dc is not None:
        dc.ENABLED = True
    undo()
    prog.compiled = compiled
    comps = {}
    for arm, rows in per.items():
        names = list(dict.fromkeys(n for r in rows for n in r))
        comp = {name: statistics.median(r.get(name, 0.0) for r in rows) * 1e6 for name in names}
        if arm is None:
            comp["step (uninstrumented)"] = statistics.median(totals) * 1e6
            comp["step (uninstrumented), p20"] = sorted(totals)[len(totals) // 5] * 1e6
        parts = [n for n in names if n != "step (instrumented)"]
        comp["sum of the parts' medians"] = sum(comp[n] for n in parts)
        # what the GPU step pays on the host too (with cudagraphs a replay stands where the Inductor calls are)
        comp["host path: parts without the Inductor calls"] = sum(comp[n] for n in parts
                                                                  if not n.startswith("Inductor"))
        comps[arm] = comp
    direct = getattr(prog, "__dict__", {}).get("direct")
    res = dict(k=k, backend=backend, collectives=collectives, compile_s=round(compile_s, 1),
               us=comps[arms[0]], counts=_graph_counts(module), guards=_guard_us(module, batch),
               direct=getattr(direct, "state", "-"))
    if len(arms) == 2:
        res["us_direct_off"] = comps[False]
    if ab is not None:
        res["against"] = ab
    if views is not None:
        res["saved_views"] = [x for got in views for x in got]
    if cprofile:
        import cProfile
        import io
        import pstats

        pr = cProfile.Profile()
        pr.enable()
        for _ in range(steps):
            step(*batch)
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(cprofile)
        res["cprofile"] = s.getvalue()
    return res


def _guard_us(module, batch) -> dict:
    """Dynamo's guard check of the compiled program, called on its own (median us), and the number of
    cache entries of the compiled frame."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    prog = module.graphs
    gm = prog.gm
    got = {}
    for name, code in (("forward", type(gm).forward.__code__), ("_call_impl", torch.nn.Module._call_impl.__code__)):
        try:
            entries = _debug_get_cache_entry_list(code)
        except Exception:  # noqa: BLE001 - a torch without this debug API
            continue
        if not entries:
            continue
        gmgr = entries[0].guard_manager
        f_locals = {"self": gm, **{n: t for n, t in zip(("idx", "targets"), batch)}}
        try:
            ts = []
            for _ in range(200):
                t = _now()
                gmgr.check(f_locals)
                ts.append(_now() - t)
            got[name] = dict(entries=len(entries), check_us=round(statistics.median(ts) * 1e6, 1))
        except Exception as e:  # noqa: BLE001 - locals named differently: report, do not fail
            got[name] = dict(entries=len(entries), error=f"{type(e).__name__}: {e}"[:120])
    return got


def _format(results, labels) -> str:
    names = []
    for r in results:
        for n in r["us"]:
            if n not in names:
                names.append(n)
    head = "| us per step | " + " | ".join(labels) + " |"
    lines = [head, "|---|" + "---|" * len(results)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{r['us'][n]:.0f}" if n in r["us"] else "-" for r in results) + " |")
    for key in ("fw_inputs", "fw_outputs", "bw_inputs", "bw_outputs", "params"):
        lines.append(f"| {key} | " + " | ".join(str(r["counts"].get(key, "-")) for r in results) + " |")
    lines.append("| direct call | " + " | ".join(str(r.get("direct", "-")) for r in results) + " |")
    if any("saved_views" in r for r in results):
        lines.append("| saved_views: fewer saved tensors per partition | " + " | ".join(
            str(r.get("saved_views", "-")) for r in results) + " |")
    lines.append("| guard check (standalone) | " + " | ".join(
        "; ".join(f"{v.get('check_us', v.get('error'))} us" for v in r["guards"].values()) or "-"
        for r in results) + " |")
    return "\n".join(lines)


def _median_of_rounds(rounds):
    """One result from several rounds of the same (root, k): each part's median over the rounds."""
    out = dict(rounds[0])
    names = {n for r in rounds for n in r["us"]}
    out["us"] = {n: statistics.median(r["us"].get(n, 0.0) for r in rounds) for n in rounds[0]["us"]}
    out["us"].update({n: statistics.median(r["us"].get(n, 0.0) for r in rounds) for n in names - set(out["us"])})
    if all("against" in r for r in rounds):
        out["against"] = {n: (v if isinstance(v, str) else statistics.median(r["against"][n] for r in rounds))
                          for n, v in rounds[0]["against"].items()}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", default="1,2,4", help="sub-batch counts, comma-separated (one process each)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--backend", default="inductor")
    p.add_argument("--collectives", default="fake", help='"fake" (kept) or "skip"')
    p.add_argument("--cprofile", type=int, default=0, help="also print cProfile's top N functions (tottime)")
    p.add_argument("--roots", default="",
                   help="label=path,... : source trees of oases_fx to compare (e.g. before=/tmp/base,after=.); "
                        "default: this checkout")
    p.add_argument("--rounds", type=int, default=1,
                   help="processes per (tree, k), alternating between the trees; each part is the median over "
                        "rounds (a shared CPU is noisy)")
    p.add_argument("--clock", default="cpu", choices=("cpu", "wall"),
                   help="cpu: this thread's CPU time (default; robust on a shared CPU), wall: perf_counter")
    p.add_argument("--interleave", action="store_true",
                   help="in one process, alternate steps with oases_fx.direct_call on and off (an A/B under the "
                        "same load); the off arm is reported as its own column")
    p.add_argument("--shape", default="tiny", choices=("tiny", "rank_bench"),
                   help="tiny (b=8, s=8, fp32) or rank_bench (b=8, s=2048, vocab 1024, bf16: with --device cuda)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda for the same breakdown on a GPU (host time only)")
    p.add_argument("--cudagraphs", action="store_true", help="CompileConfig.cudagraphs=True (GPU)")
    p.add_argument("--against", default="",
                   help="PATH of another tree: alternate its per-call host functions (AGAINST) with this tree's, "
                        "step by step in one process; prints the step time per arm")
    p.add_argument("--saved-views", nargs="?", const="on", default="", choices=("on", "ab"),
                   help="compile with oases_fx.saved_views (saved views replaced by their base, saved once); "
                        "'ab': a second program with it beside the plain one, steps alternated in one process")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--tp", type=int, default=2, help="the TP degree of the fake world (rank 0 of it)")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # internal: one k in this process
    a = p.parse_args(argv)
    kw = dict(steps=a.steps, hidden=a.hidden, backend=a.backend, collectives=a.collectives, cprofile=a.cprofile,
              interleave=a.interleave, shape=a.shape, device=a.device, cudagraphs=a.cudagraphs,
              against=str(Path(a.against).resolve()) if a.against else "",
              saved_views={"on": True, "ab": "ab"}.get(a.saved_views, False), tp=a.tp)
    if a.clock == "wall":
        global _now
        _now = time.perf_counter
    if a.one is not None:
        print("RESULT " + json.dumps(profile_k(a.one, **kw)))
        return 0
    here = Path(__file__).resolve().parents[1]
    roots = [tuple(x.split("=", 1)) for x in a.roots.split(",") if x] or [("", str(here))]
    ks = [int(x) for x in a.k.split(",")]
    got = {}
    for rnd in range(a.rounds):
        for k in ks:
            for label, root in roots:
                root = str(Path(root).resolve())
                cmd = [sys.executable, str(Path(__file__).resolve()), "--one", str(k), "--steps", str(a.steps),
                       "--hidden", str(a.hidden), "--backend", a.backend, "--collectives", a.collectives,
                       "--cprofile", str(a.cprofile), "--clock", a.clock, "--shape", a.shape, "--device", a.device, "--tp", str(a.tp)]
                cmd += (["--interleave"] if a.interleave else []) + (["--cudagraphs"] if a.cudagraphs else [])
                cmd += (["--against", str(Path(a.against).resolve())] if a.against else [])
                cmd += ["--saved-views", a.saved_views] if a.saved_views else []
                env = dict(os.environ, PYTHONPATH=root)
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env)
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if line is None:
                    print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                    return 1
                r = json.loads(line[len("RESULT "):])
                if r.get("cprofile"):
                    print(f"--- {label} k={k} round {rnd}: cProfile, {a.steps} steps ---\n{r.pop('cprofile')}")
                got.setdefault((label, k), []).append(r)
    keys = [(label, k) for k in ks for label, _ in roots]
    results, labels = [], []
    for key in keys:
        rounds = got[key]
        label, k = key
        if all("us_direct_off" in r for r in rounds):
            results.append(_median_of_rounds([dict(r, us=r["us_direct_off"], direct="switched off") for r in rounds]))
            labels.append(f"{label} k={k} direct off".strip())
        results.append(_median_of_rounds(rounds))
        labels.append(f"{label} k={k}".strip())
    print(f"host path per step, {a.device}, {a.backend}, collectives={a.collectives}, h={a.hidden}, L=2, {a.shape} "
          f"shape, cudagraphs={a.cudagraphs}, "
          f"torch {torch.__version__} (median of {a.steps} steps; median over {a.rounds} round(s))")
    print(_format(results, labels))
    if any("against" in r for r in results):
        print(f"\n{'--saved-views ab' if a.saved_views == 'ab' else '--against ' + a.against}: uninstrumented "
              "step, us, the two arms alternated in one process")
        names = [n for n in results[0]["against"] if n != "swapped"]
        print("| us per step | " + " | ".join(labels) + " |\n|---|" + "---|" * len(results))
        print("| arms differ by | " + " | ".join(r["against"].get("swapped", "") for r in results) + " |")
        for n in names:
            print(f"| {n} | " + " | ".join(f"{r['against'][n]:.0f}" for r in results) + " |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump([dict(r, label=lab) for r, lab in zip(results, labels)], f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
