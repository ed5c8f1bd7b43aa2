"""`python -m oases_fx plan`: plan a named model config without a GPU or training.

    python -m oases_fx plan --model gpt --hidden 2048 --layers 4 --heads 32 --seq 2048 --batch 8 --tp 2 \
        [--profile cached|analytical|PATH] [--degrees full|all|2,1] [--vocab-parallel off|auto|on]
        [--save plan.json] [--diff other.json]

The model is built on the meta device (no memory, no weights) and traced with torch.export on
fake tensors; the planner then uses the cached measured profile for these shapes if there is one
(compile() writes it on the GPU machine: copy ~/.cache/oases_fx/profiles/ over), else the
analytical roofline constants of oases_fx.timeline, labelled "analytical, not measured".
The search space defaults to compile()'s plan="auto" (CompileConfig: every block at the full TMP
degree or replicated, no vocab-parallel), so the plan printed is the one compile() would choose
from the same profile; --degrees all and --vocab-parallel auto widen it.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Optional

import torch

MODELS = ("gpt", "hf_gpt2", "hf_llama")
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
CPU_FALLBACK_MAX_PARAMS = 200_000_000
"""Largest model the CLI builds on the CPU when tracing on the meta device fails (fp32: 0.8 GB)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m oases_fx plan",
                                description="Plan k, recompute, the TMP degree (or replicate) per block and "
                                            "vocab_parallel for a model config.")
    p.add_argument("--model", choices=MODELS, default="gpt",
                   help="gpt: oases_fx.models.GPT; hf_gpt2 / hf_llama: transformers configs, random init, no downloads")
    p.add_argument("--hidden", type=int, default=2048, help="hidden size")
    p.add_argument("--layers", type=int, default=4, help="transformer blocks")
    p.add_argument("--heads", type=int, default=32, help="attention heads")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (hf_llama; default = heads)")
    p.add_argument("--ffn", type=int, default=None, help="MLP intermediate size (hf_llama; default 8/3 h rounded to 256)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary (default: gpt 1024, hf_gpt2 50257, hf_llama 32000)")
    p.add_argument("--seq", type=int, default=2048, help="sequence length")
    p.add_argument("--batch", type=int, default=8, help="batch size of one step (per data-parallel replica)")
    p.add_argument("--tp", type=int, default=2, help="TMP degree")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="parameter/activation dtype")
    p.add_argument("--profile", default="cached",
                   help="'cached' (a measured profile from the cache, else analytical), 'analytical', or a profile JSON path")
    p.add_argument("--comm-gbps", type=float, default=None,
                   help="analytical all-reduce bus bandwidth, GB/s (default 250: H100 NVLink; 27.5: PCIe-class)")
    p.add_argument("--memory-gib", type=float, default=None,
                   help="memory budget, GiB (default 0.9 x device memory; analytical device: 80 GiB)")
    p.add_argument("--k", default="1,2,4", help="sub-batch counts to consider, comma-separated")
    p.add_argument("--recompute", default="none,fine,full", help="recompute policies to consider, comma-separated")
    p.add_argument("--top-n", type=int, default=5, help="candidates per global choice; runners-up shown")
    p.add_argument("--degrees", default="full",
                   help="per-region TMP degrees to consider: 'full' (only --tp, compile()'s default), 'all' (every "
                        "divisor of --tp) or comma-separated divisors (replicate is always considered)")
    p.add_argument("--vocab-parallel", choices=("auto", "on", "off"), default="off",
                   help="vocabulary-parallel embedding/LM head/cross-entropy: leave it out (off, compile()'s "
                        "default), let the planner choose (auto) or force it (on)")
    p.add_argument("--save", default=None, help="write the plan as JSON here")
    p.add_argument("--diff", default=None, help="print the differences to this saved plan")
    p.add_argument("--plain", action="store_true", help="plain-text tables (no rich)")
    return p


def build_model(args) -> tuple:
    """(model, example args, example kwargs) on `device` for the named config."""
    dtype = DTYPES[args.dtype]
    ids = torch.zeros(args.batch, args.seq, dtype=torch.long, device=args.device)
    targets = torch.zeros(args.batch, args.seq, dtype=torch.long, device=args.device)
    with torch.device(args.device):
        if args.model == "gpt":
            from oases_fx.models import GPT, GPTConfig

            cfg = GPTConfig(vocab_size=args.vocab or 1024, block_size=args.seq, n_layer=args.layers,
                            n_head=args.heads, n_embd=args.hidden)
            model = GPT(cfg).to(dtype)
            return model, (ids, targets), {}
        import transformers

        if args.model == "hf_gpt2":
            cfg = transformers.GPT2Config(n_embd=args.hidden, n_layer=args.layers, n_head=args.heads,
                                          n_positions=args.seq, vocab_size=args.vocab or 50257,
                                          bos_token_id=0, eos_token_id=0)
        else:
            ffn = args.ffn or 256 * ((8 * args.hidden // 3 + 255) // 256)
            cfg = transformers.LlamaConfig(hidden_size=args.hidden, intermediate_size=ffn,
                                           num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                           num_key_value_heads=args.kv_heads or args.heads,
                                           vocab_size=args.vocab or 32000, max_position_embeddings=args.seq,
                                           bos_token_id=0, eos_token_id=0)
        cfg.use_cache = False
        model = transformers.AutoModelForCausalLM.from_config(cfg).to(dtype)
        model.train()
        return model, (), dict(input_ids=ids, labels=targets)


def _trace(args):
    from oases_fx.errors import OasesError
    from oases_fx.tracing import capture

    args.device = "meta"
    model, a, kw = build_model(args)
    try:
        return capture(model, a, kw), "meta device"
    except OasesError as e:
        n = sum(p.numel() for p in model.parameters())
        if n > CPU_FALLBACK_MAX_PARAMS:
            raise OasesError(
                f"tracing {args.model} on the meta device failed ({e}) and at {n / 1e6:.0f}M parameters it is too "
                "large to build on the CPU here. Fix: plan a smaller config with the same block shapes "
                "(--layers 2): the per-block decisions do not depend on the depth.") from e
        print(f"[oases_fx] tracing on the meta device failed ({e}); building on the CPU instead", file=sys.stderr)
    args.device = "cpu"
    model, a, kw = build_model(args)
    return capture(model, a, kw), "CPU"


CLI_FIXES = ("With this CLI: a larger budget (--memory-gib N), a larger TMP degree (--tp N), a smaller batch "
             "(--batch N), or allow recomputation (--recompute none,fine,full).")
"""Appended to a "no plan fits" error: the planner's fixes, as this CLI's flags."""


def plan_main(argv: Optional[list] = None) -> int:
    """The CLI: a user's mistake (an OasesError) is printed as one message with its fix, no
    traceback, exit status 2; anything else is a bug and keeps its traceback."""
    from oases_fx.errors import OasesError

    try:
        return _plan(argv)
    except OasesError as e:
        msg = str(e)
        if msg.startswith("no plan fits"):
            msg = f"{msg} {CLI_FIXES}"
        print(f"[oases_fx] error: {msg}", file=sys.stderr)
        return 2


def _plan(argv: Optional[list] = None) -> int:
    args = _parser().parse_args(argv)
    from oases_fx.passes.annotate_sharding import find_tmp_regions
    from oases_fx.planner import (
        Profile, analytical_profile, choose_plan, describe_model, explain_plan, load_cached_profile,
    )
    from oases_fx.plan import Plan
    from oases_fx.planner.profile import PLANNER_DEVICE, StepConstants

    k_choices = tuple(int(x) for x in args.k.split(",") if x.strip())
    spec = args.degrees.strip()
    degrees = (None if spec == "all" else (args.tp,) if spec == "full"
               else tuple(int(x) for x in spec.split(",") if x.strip()))
    vp_choices = {"auto": (False, True), "on": (True,), "off": (False,)}[args.vocab_parallel]
    rc_choices = tuple(x.strip() for x in args.recompute.split(",") if x.strip())
    traced, where = _trace(args)
    regions, declined = find_tmp_regions(traced.gm, args.tp)
    print(f"[oases_fx] {args.model}: h={args.hidden} L={args.layers} heads={args.heads} seq={args.seq} "
          f"batch={args.batch} tp={args.tp} {args.dtype}; traced on the {where}: {len(regions)} TMP regions"
          + (f", {len(declined)} declined" if declined else ""))
    for name, why in declined:
        print(f"  declined {name}: {why}")
    model = describe_model(traced.gm, regions, tp=args.tp, batch=args.batch, k_choices=k_choices, degrees=degrees,
                           vocab=True in vp_choices)

    # the planner's default device (PLANNER_DEVICE, its host terms too); --comm-gbps changes only the link
    device = dataclasses.replace(PLANNER_DEVICE, group_size=args.tp, **(
        {"comm_bus_bw_bytes_per_s": args.comm_gbps * 1e9} if args.comm_gbps else {}))
    analytical = lambda: analytical_profile(  # noqa: E731
        model, constants=device, step=StepConstants.analytical(mem_bw_bytes_per_s=device.mem_bw_bytes_per_s))
    if args.profile == "analytical":
        profile = analytical()
    elif args.profile == "cached":
        profile = load_cached_profile(model)
        if profile is None:
            print("[oases_fx] no cached measured profile for these shapes; using the analytical cost model "
                  "(analytical, not measured)")
            profile = analytical()
    else:
        profile = Profile.load(args.profile)
    print(f"[oases_fx] cost model: {profile.label()}" + (" (from the profile cache)" if profile.from_cache else ""))
    budget = int(args.memory_gib * 1024 ** 3) if args.memory_gib else None
    plan = choose_plan(model, tp=args.tp, batch=args.batch, seq_len=args.seq, profile=profile,
                       memory_budget_bytes=budget, k_choices=k_choices, recompute_choices=rc_choices,
                       top_n=args.top_n, degrees=degrees, vocab_parallel_choices=vp_choices)
    print(explain_plan(plan, use_rich=False if args.plain else None))
    if args.save:
        plan.save(args.save)
        print(f"[oases_fx] plan saved to {args.save} (digest {plan.digest()})")
    if args.diff:
        other = Plan.load(args.diff)
        lines = other.diff(plan)
        print(f"[oases_fx] {args.diff} -> this plan: " + ("no differences" if not lines else f"{len(lines)} differences"))
        for ln in lines:
            print(f"  {ln}")
    return 0


def main(argv=None) -> int:
    return plan_main(argv)


if __name__ == "__main__":
    sys.exit(main())
