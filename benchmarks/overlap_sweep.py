"""Sub-batch overlap sweep (the schedule issue's benchmark) and planner accuracy, on 2 GPUs.

For the plain GPT (bf16, TP=2): step time (forward + backward, median of --steps after warm-up,
CUDA events) and peak memory for k in --ks x recompute in --recomputes, the floor (the same
compiled graph with every collective skipped) and the planner's own choice (plan="auto");
the planner's predicted step time for every measured plan (from a profile measured on these
GPUs); the hidden share of the exposed communication (T_k1 - T_best) / (T_k1 - T_floor); a bf16
check of loss and gradients against the unsharded model; and, from a torch.profiler trace of
the k=2 plan, the fraction of NCCL kernel time that ran concurrently with compute kernels.

    torchrun --nproc-per-node 2 -m benchmarks.overlap_sweep --hidden 2048 --layers 4 --out DIR

Planner accuracy (issue #4): besides the k x recompute grid, the planner's choice and its first
--runners-up runners-up are measured, so "choice vs best measured" covers the plans the planner
itself ranked next. Each (hidden size, interconnect) is written to DIR/sweep_<ic>_h<H>.json after
every plan (a run cut short keeps what it measured), with the measured profile and the model spec
beside it (profile_<ic>_h<H>.json, spec_h<H>.json) so `python -m benchmarks.accuracy DIR
--repredict` can re-predict every measured plan with a changed cost model, off the GPU.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import os
import statistics
import sys
import time

for _k, _v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_k, _v)

import torch
import torch.distributed as dist


def _time_steps(m, idx, tgt, steps, warmup):
    cuda = idx.is_cuda
    for _ in range(warmup):
        _, loss = m(idx, tgt)
        loss.backward()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        if not cuda:
            t0 = time.perf_counter()
            _, loss = m(idx, tgt)
            loss.backward()
            times.append((time.perf_counter() - t0) * 1e3)
            continue
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        _, loss = m(idx, tgt)
        loss.backward()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    for p in m.parameters():
        p.grad = None
    return statistics.median(times)


def overlap_from_trace(path):
    """Fraction of NCCL kernel time that overlaps some non-NCCL kernel (from a chrome trace)."""
    with open(path) as f:
        ev = json.load(f)["traceEvents"]
    kern = [e for e in ev if e.get("cat") == "kernel" and e.get("ph") == "X"]
    by_pid = {}
    for e in kern:
        by_pid.setdefault(e["pid"], []).append(e)
    total = over = 0.0
    for evs in by_pid.values():
        nccl = [(e["ts"], e["ts"] + e["dur"]) for e in evs if "nccl" in e["name"].lower()]
        comp = sorted((e["ts"], e["ts"] + e["dur"]) for e in evs if "nccl" not in e["name"].lower())
        merged = []
        for s, t in comp:
            if merged and s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], t)
            else:
                merged.append([s, t])
        for s, t in nccl:
            total += t - s
            over += sum(max(0.0, min(t, b) - max(s, a)) for a, b in merged if a < t and b > s)
    return (over / total if total else float("nan")), total


STEP_MARK = "oases_step"
"""record_function name around each profiled step (see profiled_steps)."""


def profiled_steps(step, n: int = 3) -> None:
    """Run `step()` n times, each inside record_function(STEP_MARK) so the trace shows where each
    step's GPU work lies (collective_table reads the last one)."""
    from torch.profiler import record_function

    for _ in range(n):
        with record_function(STEP_MARK):
            step()


def _last_step(ev, kern, pid):
    """The kernels of the last profiled step: inside the last GPU-side STEP_MARK range if the
    trace has one; else launched (CPU side) inside the last CPU STEP_MARK range; else after the
    second-longest idle gap on the GPU (3 steps: the gaps between them are the longest)."""
    marks = sorted((e for e in ev if e.get("name") == STEP_MARK and e.get("ph") == "X"), key=lambda e: e["ts"])
    gpu = [e for e in marks if e.get("cat") == "gpu_user_annotation" and e.get("pid") == pid]
    if gpu:
        a, b = gpu[-1]["ts"], gpu[-1]["ts"] + gpu[-1]["dur"]
        return [e for e in kern if a <= e["ts"] < b], "GPU step range"
    cpu = [e for e in marks if e.get("cat") == "user_annotation"]
    if cpu:
        a, b = cpu[-1]["ts"], cpu[-1]["ts"] + cpu[-1]["dur"]
        launched = {e["args"]["correlation"]: e["ts"] for e in ev
                    if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
        got = [e for e in kern if a <= launched.get(e.get("args", {}).get("correlation"), -1.0) <= b]
        if got:
            return got, "launched in the last CPU step range"
    gaps = sorted(((kern[i + 1]["ts"] - (kern[i]["ts"] + kern[i]["dur"]), i) for i in range(len(kern) - 1)),
                  reverse=True)[:2]
    start = max(i for _, i in gaps) + 1 if len(gaps) == 2 else 0
    return kern[start:], "after the second-longest GPU idle gap (no step marks)"


def save_trace(prof, path: str) -> tuple:
    """Write `prof`'s chrome trace gzipped to path + ".gz" and the per-collective table next to
    it (<path without .json>_collectives.txt); return (overlap fraction, NCCL us, table)."""
    import gzip
    import shutil

    prof.export_chrome_trace(path)
    frac, total = overlap_from_trace(path)
    table = collective_table(path)
    with open(path[:-len(".json")] + "_collectives.txt", "w") as f:
        f.write(table)
    with open(path, "rb") as src, gzip.open(path + ".gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.remove(path)
    return frac, total, table


def collective_table(path) -> str:
    """One line per NCCL kernel of the last profiled step on the first GPU: when it started (ms
    from the step's first kernel), how long it ran, how much of it overlapped compute kernels,
    and the compute kernels that ran while it was in flight (the schedule as the device ran it)."""
    with open(path) as f:
        ev = json.load(f)["traceEvents"]
    kern = [e for e in ev if e.get("cat") == "kernel" and e.get("ph") == "X"]
    if not kern:
        return f"# {path}: no GPU kernel events in the trace\n"
    pid = min(e["pid"] for e in kern)
    kern = sorted((e for e in kern if e["pid"] == pid), key=lambda e: e["ts"])
    kern, how = _last_step(ev, kern, pid)
    if not kern:
        return f"# {path}: no GPU kernel in the last step\n"
    t0 = kern[0]["ts"]
    comp = [e for e in kern if "nccl" not in e["name"].lower()]
    lines = [f"# {path}: last step ({how}), GPU pid {pid}; t in ms from the step's first kernel",
             "# start_ms  dur_ms  overlapped  compute kernels in flight (count, busy ms)"]
    tot = hid = 0.0
    for e in kern:
        if "nccl" not in e["name"].lower():
            continue
        s, t = e["ts"], e["ts"] + e["dur"]
        ov = [c for c in comp if c["ts"] < t and c["ts"] + c["dur"] > s]
        busy = sum(min(t, c["ts"] + c["dur"]) - max(s, c["ts"]) for c in ov)
        tot += e["dur"]
        hid += min(busy, e["dur"])
        lines.append(f"{(s - t0) / 1e3:9.3f} {e['dur'] / 1e3:7.3f}  {min(busy, e['dur']) / max(e['dur'], 1e-9):9.0%}"
                     f"  {len(ov):4d} {busy / 1e3:7.3f}  {e['name'][:60]}")
    end = max(e["ts"] + e["dur"] for e in kern)
    lines.append(f"# step {(end - t0) / 1e3:.3f} ms on the device; NCCL {tot / 1e3:.3f} ms, of which "
                 f"{hid / 1e3:.3f} ms overlapped compute; compute busy {sum(c['dur'] for c in comp) / 1e3:.3f} ms")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, nargs="+", default=[2048])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--recomputes", nargs="+", default=["none", "fine"])
    p.add_argument("--runners-up", type=int, default=2, help="measure the planner's first N runners-up too")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--backend", default="inductor")
    p.add_argument("--no-auto", action="store_true")
    p.add_argument("--search-all", action="store_true", help="the planner also searches per-block degrees")
    p.add_argument("--no-check", action="store_true", help="skip the bf16 check against the unsharded model")
    p.add_argument("--trace", action="store_true", help="profile the k=2 plan and compute the overlap")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--device", default="cuda", help="cuda, or cpu (gloo) for a smoke test of this script")
    args = p.parse_args(argv)

    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=10))
    rank = dist.get_rank()
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)
        torch.cuda.reset_peak_memory_stats = lambda *a: None
        torch.cuda.max_memory_allocated = lambda *a: 0
        torch.cuda.empty_cache = lambda *a: None
    from torch.distributed.device_mesh import init_device_mesh

    import oases_fx
    from benchmarks.accuracy import plan_key
    from oases_fx.models import GPT, GPTConfig
    from oases_fx.passes.annotate_sharding import find_tmp_regions
    from oases_fx.plan import Plan, RegionPlan
    from oases_fx.planner import (ProfileOptions, choose_plan, describe_model, measure_profile, predict_plan,
                                  runner_up_plans)
    from oases_fx.tracing import capture

    mesh = init_device_mesh(args.device, (2,), mesh_dim_names=("tp",))
    say = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    interconnect = "NCCL_P2P_DISABLE=1" if os.environ.get("NCCL_P2P_DISABLE") == "1" else "NVLink"
    tag = "p2p_disabled" if interconnect != "NVLink" else "nvlink"
    os.makedirs(args.out, exist_ok=True)
    meta = dict(card=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
                nccl=".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command="torchrun --nproc-per-node 2 -m benchmarks.overlap_sweep " + " ".join(sys.argv[1:]))
    for h in args.hidden:
        cfg = GPTConfig(vocab_size=args.vocab, block_size=args.seq, n_layer=args.layers, n_head=h // 64, n_embd=h)
        torch.manual_seed(0)
        base = GPT(cfg).to(args.device, torch.bfloat16 if cuda else torch.float32)
        g = torch.Generator(device=args.device).manual_seed(0)
        idx = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device, generator=g)
        tgt = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device, generator=g)

        # Planner inputs: one trace, a profile measured on these GPUs (cached on disk).
        t0 = time.time()
        traced = capture(base, (idx, tgt), {})
        regions, _ = find_tmp_regions(traced.gm, 2)
        spec = describe_model(traced.gm, regions, tp=2, batch=args.batch, k_choices=tuple(args.ks))
        profile = measure_profile(spec, group=mesh.get_group("tp"), options=ProfileOptions.for_device(args.device),
                                  progress=rank == 0)
        say(f"h={h}: profile in {time.time() - t0:.1f} s")
        if rank == 0:
            profile.save(os.path.join(args.out, f"profile_{tag}_h{h}.json"))
            with open(os.path.join(args.out, f"spec_h{h}.json"), "w") as f:
                json.dump(spec.to_dict(), f)

        variants = [(k, rc) for k in args.ks for rc in args.recomputes]
        # The schedule pass reads the measured interconnect from plan.predicted (as for plan="auto").
        link = {"profile": profile.label(),
                "all_reduce": {"alpha_us": profile.all_reduce.alpha_us, "gb_per_s": profile.all_reduce.bandwidth_gb_s},
                "interference": {"compute": profile.compute_interference, "comm": profile.comm_interference}}
        plans = {f"k={k} recompute={rc}": Plan(tp_degree=2, num_sub_batches=k, recompute=rc, predicted=link,
                                               regions=tuple(RegionPlan(name=r.name, kind=r.kind) for r in regions))
                 for k, rc in variants}
        plans["floor (no comm)"] = Plan(tp_degree=2, num_sub_batches=1, recompute="none",
                                        regions=tuple(RegionPlan(name=r.name, kind=r.kind) for r in regions))
        if not args.no_auto:
            # plan="auto" as compile() runs it by default (CompileConfig: planner_degrees="full",
            # planner_vocab_parallel=(False,)); --search-all widens it to every degree and vocab-parallel.
            auto = choose_plan(spec, tp=2, batch=args.batch, seq_len=args.seq, profile=profile,
                               **({} if args.search_all else dict(degrees=(2,), vocab_parallel_choices=(False,))))
            space = " --search-all" if args.search_all else ""
            plans["plan=auto" + space] = auto
            for i, up in enumerate(runner_up_plans(auto)[:args.runners_up]):
                plans[f"runner-up {i + 1}" + (" (--search-all)" if space else "")] = dataclasses.replace(up, predicted=link)
        results = {}
        seen = {}  # plan key -> the name it was measured under
        row = dict(hidden=h, layers=args.layers, batch=args.batch, seq=args.seq, interconnect=interconnect,
                   results=results, check={}, best=None, hidden_share=None,
                   planner_choice=next((plan_key(p.to_dict()) for n, p in plans.items() if n.startswith("plan=auto")), None))
        path = os.path.join(args.out, f"sweep_{tag}_h{h}.json")

        def write():
            if rank == 0:
                with open(path, "w") as f:
                    json.dump(dict(meta=meta, rows=[row]), f, indent=1)

        for name, plan in plans.items():
            floor = name.startswith("floor")
            key = None if floor else plan_key(plan.to_dict())
            pr = None if floor else predict_plan(spec, plan, profile)
            pred = None if pr is None else pr.step_us / 1000
            desc = (None if pr is None else pr.choice.summary([r.name for r in spec.regions]))
            if key in seen:  # the planner picked a plan of the grid: one measurement, two names
                results[name] = dict(results[seen[key]], same_as=seen[key], plan=plan.to_dict())
                say(f"  {name}: same plan as {seen[key]} ({desc})")
                write()
                continue
            t0 = time.time()
            model = copy.deepcopy(base)
            torch.cuda.reset_peak_memory_stats()
            try:
                m = oases_fx.compile(model, mesh, example_inputs=(idx, tgt), plan=plan, backend=args.backend,
                                     verbose=False, skip_collectives=floor)
                ms = _time_steps(m, idx, tgt, args.steps, args.warmup)
            except Exception as e:  # report, never drop a row silently
                say(f"  {name}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                results[name] = dict(error=f"{type(e).__name__}: {str(e)[:300]}", plan=plan.to_dict())
                write()
                continue
            peak = torch.cuda.max_memory_allocated() / 2 ** 30
            results[name] = dict(ms=ms, peak_gib=peak, predicted_ms=pred, plan=plan.to_dict(), summary=desc,
                                 compile_s=time.time() - t0)
            if pr is not None:
                tl = pr.timeline
                results[name].update(predicted_compute_ms=tl.compute_busy_us / 1e3,
                                     predicted_exposed_comm_ms=tl.comm_exposed_us / 1e3,
                                     predicted_hidden_comm_ms=tl.comm_hidden_us / 1e3,
                                     predicted_memory_gib=pr.memory.total / 2 ** 30)
                seen[key] = name
            say(f"  {name}: {ms:.2f} ms (predicted {pred if pred is None else round(pred, 2)}), "
                f"peak {peak:.1f} GiB, built+timed in {time.time() - t0:.0f} s" + (f"  [{desc}]" if desc else ""))
            write()
            if (args.trace and plan.num_sub_batches == 2 and plan.recompute == args.recomputes[-1]
                    and name.startswith("k=")):
                from torch.profiler import ProfilerActivity, profile as tprof

                with tprof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    profiled_steps(lambda: m(idx, tgt)[1].backward())
                    torch.cuda.synchronize()
                if rank == 0:
                    tp = os.path.join(args.out, f"trace_h{h}_{tag}.json")
                    frac, total, _ = save_trace(prof, tp)
                    results[name]["nccl_overlap_fraction"] = frac
                    say(f"  trace: {frac:.1%} of NCCL kernel time ({total / 1e3:.1f} ms over 3 steps) ran "
                        "concurrently with compute kernels")
            del m, model
            torch.cuda.empty_cache()
        ok = {n: r for n, r in results.items() if "ms" in r}
        t1 = ok.get("k=1 recompute=none", {}).get("ms")
        tf = ok.get("floor (no comm)", {}).get("ms")
        best_name = min((n for n in ok if not n.startswith("floor")), key=lambda n: ok[n]["ms"], default=None)
        row["best"] = best_name
        row["hidden_share"] = (t1 - ok[best_name]["ms"]) / (t1 - tf) if t1 and tf and best_name and t1 > tf else None
        write()
        say(f"h={h} {interconnect}: best {best_name}"
            + "".join(f"; {n} {ok[n]['ms']:.2f} ms vs best {ok[best_name]['ms']:.2f} ms"
                      for n in ok if n.startswith("plan=auto") and best_name))
        # bf16 correctness of k=2 fine against the unsharded model (first batch).
        if "k=2 recompute=fine" in plans and not args.no_check:
            model = copy.deepcopy(base)
            m = oases_fx.compile(model, mesh, example_inputs=(idx, tgt), plan=plans["k=2 recompute=fine"],
                                 backend=args.backend, verbose=False)
            _, loss = m(idx, tgt)
            loss.backward()
            ref = copy.deepcopy(base)
            _, rloss = ref(idx, tgt)
            rloss.backward()
            grads = m.full_grads()
            rel = max(((grads[n].float() - q.grad.float()).norm() / q.grad.float().norm()).item()
                      for n, q in ref.named_parameters())
            row["check"] = dict(loss=loss.item(), ref_loss=rloss.item(), max_rel_grad_err=rel)
            say(f"  bf16 check k=2 fine: loss {loss.item():.5f} vs unsharded {rloss.item():.5f}, "
                f"max relative grad error {rel:.2e}")
            write()
            del m, model, ref
            torch.cuda.empty_cache()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
