"""The Oases planner: profile the device, model overlapped execution, search the strategy.

    regions, _ = find_tmp_regions(gm, tp)
    model = describe_model(gm, regions, tp=tp, batch=batch)          # ops per region, variant, degree
                                                                      # and the vocab-parallel head/tail
    profile = measure_profile(model, group=tp_group)                  # or analytical_profile(model)
    plan = choose_plan(model, tp=tp, batch=batch, seq_len=seq, profile=profile)
    print(explain_plan(plan))

:func:`plan_model` does the four steps.
"""
from __future__ import annotations

from typing import Optional

import torch

from oases_fx.planner.cost_model import (
    REPLICATED, Choice, ModelSpec, OpSpec, Prediction, RegionSpec, RegionVariant, VocabPattern, VocabSpec,
    choice_of, describe_model, divisors, find_vocab_pattern, memory, predict, predict_plan,
)
from oases_fx.planner.profile import (
    AlphaBeta, Profile, ProfileOptions, analytical_profile, cache_dir, collective_key, derived_collective,
    fit_alpha_beta, load_cached_profile, measure_profile, required_collectives,
)
from oases_fx.planner.search import choose_plan, explain_plan, kbest_chain, region_states, runner_up_plans


def plan_model(gm, regions, *, tp: int, batch: int, seq_len: int, group=None, device=None,
               measure: bool = True, options: Optional[ProfileOptions] = None, cache: bool = True,
               progress: bool = True, degrees=None, vocab_parallel_choices=(False, True),
               merge_collectives: bool = True, **search):
    """describe_model + measure_profile (collective: all ranks of ``group``; or the analytical
    profile when ``measure`` is False) + choose_plan. ``search`` goes to choose_plan
    (memory_budget_bytes, k_choices, recompute_choices, top_n).

    degrees: per-region TMP degrees to consider (divisors of tp; None: all). Degrees below tp make
    the profile measure collectives on subgroups (dist.new_group on every rank of the world).
    vocab_parallel_choices: values of Plan.vocab_parallel to consider (default both).
    merge_collectives: the merge_collectives pass will run (priced: ModelSpec.merged)."""
    k_choices = search.get("k_choices", (1, 2, 4))
    vocab_parallel_choices = tuple(bool(v) for v in vocab_parallel_choices)
    model = describe_model(gm, regions, tp=tp, batch=batch, k_choices=k_choices, degrees=degrees,
                           vocab=True in vocab_parallel_choices, merge_collectives=merge_collectives)
    if measure:
        if options is None:
            dev = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
            options = ProfileOptions.for_device(torch.device(dev).type)
        profile = measure_profile(model, group=group, device=device, options=options,
                                  cache=cache, progress=progress)
    else:
        profile = analytical_profile(model)
    return choose_plan(model, tp=tp, batch=batch, seq_len=seq_len, profile=profile, degrees=degrees,
                       vocab_parallel_choices=vocab_parallel_choices, **search)


__all__ = [
    "plan_model", "describe_model", "ModelSpec", "RegionSpec", "RegionVariant", "OpSpec", "Choice", "choice_of",
    "Prediction", "predict", "predict_plan", "memory", "Profile", "ProfileOptions", "AlphaBeta", "fit_alpha_beta",
    "measure_profile", "analytical_profile", "load_cached_profile", "cache_dir", "choose_plan", "explain_plan",
    "kbest_chain", "region_states", "runner_up_plans", "REPLICATED", "VocabSpec", "VocabPattern", "divisors", "find_vocab_pattern",
    "collective_key", "derived_collective", "required_collectives",
]
