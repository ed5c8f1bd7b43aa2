"""The model zoo (tests/zoo.py) at TP=2 and TP=4: every attention and MLP block sharded (counted
against the model's number of blocks) and the compiled model equal to the unsharded eager model
(loss, logits, every gradient, parameters after one SGD step), fp32, k in {1, 2}.

Tolerances: as tests/distributed/test_equivalence.py (sharding only reorders fp32 additions in
the row-parallel contraction and the all-reduce; contractions here are <= 64 terms of O(1)
values, so the reordering error is ~1e-6; atol=2e-5, rtol=1e-4 leaves headroom and still fails
on a wrong shard, a missing or doubled all-reduce or a bias counted twice). Key/value projections
replicated (kv heads < tp): their weight gradient is the all-reduce of per-rank partial sums over
the ranks' own query heads, the same kind of reordering (<= 4 terms); a missing sum is off by O(1).

CI runs one family per construct (CI_FAMILIES); the rest of the grid is `extended`.
"""
import re

import pytest
import torch

from oases_fx.passes.annotate_sharding import PLAN_DECISIONS
from tests import tasks_zoo, zoo
from tests.conftest import get_pool
from tests.distributed.test_equivalence import assert_matches

# Every block sharded at this TP degree (measured; the README table is generated from these tests).
# falcon, gpt_bigcode, gemma (1 kv head) and the GQA families with 2 kv heads at TP=4: key/value
# projection replicated (a fused q/k/v: all of it), each rank's attention reads the kv heads its q
# heads need, the replicated weights' gradients summed over TMP (passes/insert_collectives.py).
# mixtral, olmoe: 3-D expert parameters through grouped_mm, gate_up column-parallel per piece and
# down_proj row-parallel for every expert, the routing replicated (oases_fx/moe.py); one block per expert.
FULL_TP2 = ["gpt_neox", "phi3", "falcon", "gpt_bigcode", "mistral", "qwen2", "olmo2", "cohere", "qwen3", "gemma3",
            "gemma", "gptj", "phi", "stablelm", "opt", "meta_llama", "stack_rope_llama", "moe_llama", "mixtral", "olmoe",
            "granite", "codegen", "starcoder2", "smollm3", "glm", "qwen2_moe", "gemma2", "olmo", "bitnet"]
FULL_TP4 = ["gpt_neox", "phi3", "falcon", "gpt_bigcode", "mistral", "qwen2", "olmo2", "cohere", "qwen3", "gemma3",
            "gemma", "gptj", "phi", "stablelm", "opt", "meta_llama", "stack_rope_llama", "moe_llama", "mixtral", "olmoe",
            "granite", "codegen", "starcoder2", "smollm3", "glm", "qwen2_moe"]
# One family per construct, every CI run (the rest: OASES_FX_EXTENDED=1).
CI_FAMILIES = {
    "gpt_neox": "fused per-head qkv view (B,S,heads,3,hd), parallel residual",
    "phi3": "fused qkv cut by slicing",
    "qwen3": "per-head q/k norm, GQA",
    "olmo2": "q/k RMSNorm over the full width (statistics all-reduced, norm weight sharded)",
    "gptj": "rotary with stack/flatten, parallel attention+MLP",
    "meta_llama": "complex rotary (view_as_complex, polar)",
    "gemma": "multi-query: key/value projection replicated, gradient summed over TMP",
    "falcon": "multi-query, fused q/k/v replicated, attention sliced per rank",
    "mistral": "GQA, 2 kv heads at TP=4: rank r reads kv head (2 r) // 4",
    "moe_llama": "MoE: every expert's column -> row pair",
    "mixtral": "MoE, 3-D experts through grouped_mm: gate_up per piece, down row, routing replicated, split whole",
    "gemma2": "soft-capped attention (eager: tanh of the per-head scores) and logits",
    "bitnet": "a norm between column and row (statistics over the sharded width all-reduced)",
}
# Compile, but some block is declined (with its reason): still exact, replicated there.
DECLINED_TP2 = ["mixtral_batched_mm",  # 3-D experts gathered per routed pair (weight[expert_ids] + bmm)
                "llama4"]  # Llama4TextExperts: bmm over every expert with the 3-D weights


def _grid(names, tp):
    out = []
    for name in names:
        for k in (1, 2):
            ci = name in CI_FAMILIES and (k == 2) == (tp == 2)  # CI: each construct once, k=2 at TP=2, k=1 at TP=4
            marks = () if ci and (tp == 2 or name in ("gpt_neox", "moe_llama")) else (pytest.mark.extended,)
            out.append(pytest.param(name, k, id=f"{name}-k{k}", marks=marks))
    return out


def _check_all_sharded(r, name, tp):
    assert r["sharded_blocks"] == r["found_blocks"] == r["num_blocks"], (
        f"{name} TP={tp}: {r['sharded_blocks']} of {r['num_blocks']} blocks sharded ({r['found_blocks']} found); "
        f"declined: {r['declined']}")
    assert not [d for d in r["declined"] if d[1] not in PLAN_DECISIONS], r["declined"]


@pytest.mark.parametrize("name,k", _grid(FULL_TP2, 2))
def test_zoo_tp2_every_block_sharded_and_exact(name, k):
    r = get_pool(2).run(tasks_zoo.compare, name=name, k=k)[0]
    _check_all_sharded(r, name, 2)
    assert_matches(r)


@pytest.mark.parametrize("name,k", _grid(FULL_TP4, 4))
def test_zoo_tp4_every_block_sharded_and_exact(name, k):
    r = get_pool(4).run(tasks_zoo.compare, name=name, k=k)[0]
    _check_all_sharded(r, name, 4)
    assert_matches(r)


@pytest.mark.parametrize("name", [pytest.param(n, marks=())
                                  for n in DECLINED_TP2])
def test_declined_block_explains_itself_and_trains_exactly(name):
    """A block the rules cannot shard is declined with the reason, the op and the model's source
    line, shows in explain(), and the model still equals the reference (two SGD steps)."""
    r = get_pool(2).run(tasks_zoo.compare, name=name, k=1, steps=2)[0]
    declined = [d for d in r["declined"] if d[1] not in PLAN_DECISIONS]
    assert declined and r["sharded_blocks"] < r["found_blocks"] == r["num_blocks"]
    for block, why in declined:
        assert re.search(r" at node '[^']+' \([\w.]+\)", why), why  # the node and its op
        assert "File \"" in why and ", line " in why, why  # the model's source line
        assert block in r["explain"] and why in r["explain"]
    assert_matches(r, steps=2)


def test_strict_raises_on_a_declined_block():
    out = get_pool(2).run(tasks_zoo.compile_error, name="mixtral_batched_mm", strict=True)
    kind, msg = out[0]
    assert kind == "ShardingError" and "strict=True" in msg and "at node '" in msg, msg
    assert "set_experts_implementation('grouped_mm')" in msg, msg  # the fix is named
    assert get_pool(2).run(tasks_zoo.compile_error, name="mixtral_batched_mm", strict=False)[0] is None


@pytest.mark.parametrize("tp", [2, 4])
def test_kv_replicated_blocks_say_so_in_explain(tp):
    """The attention blocks with key/value heads < tp say in explain() that the kv projection is replicated."""
    r = get_pool(tp).run(tasks_zoo.compare, name="gemma", k=1)[0]
    assert r["explain"].count("key/value projection replicated (kv heads < tp)") == zoo.LAYERS, r["explain"]


def test_kv_heads_neither_dividing_nor_divisible_is_a_named_error():
    """3 key/value heads at TP=2: no rank's q heads read whole kv heads; refused, naming the fix."""
    out = get_pool(2).run(tasks_zoo.compile_error, name="qwen2_kv3")
    kind, msg = out[0]
    assert kind == "ShardingError" and "num_key_value_heads=3" in msg and "Fix:" in msg, msg


def test_moe_expert_parameters_at_the_boundary_dtensors_dcp_and_full_state_dict(tmp_path):
    """mixtral at TP=2: gate_up_proj is a per-piece (_StridedShard on dim 1, gate and up) DTensor,
    down_proj Shard(2); full_tensor() of every parameter, a DCP round trip into a model compiled
    from other weights and load_full_state_dict give the reference's weights bit for bit (copies,
    no arithmetic: atol=0), and the reloaded models' losses equal the reference's (fp32, as above)."""
    r = get_pool(2).run(tasks_zoo.state_round_trip, name="mixtral", path=str(tmp_path / "ckpt"))[0]
    pl = r["placements"]
    assert pl["model.layers.0.mlp.experts.gate_up_proj"] == "(_StridedShard(dim=1, sf=2),)", pl
    assert pl["model.layers.0.mlp.experts.down_proj"] == "(Shard(dim=2),)", pl
    for what in ("from_dtensors", "dcp_params", "loaded_params"):
        assert set(r[what]) >= set(r["ref_params"]), what
        for k, ref in r["ref_params"].items():
            torch.testing.assert_close(r[what][k], ref, atol=0, rtol=0, msg=lambda m: f"{what} {k}: {m}")
    ref_loss, dcp_loss, loaded_loss = r["losses"]
    torch.testing.assert_close(dcp_loss, ref_loss, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(loaded_loss, ref_loss, atol=2e-5, rtol=1e-4)


def test_moe_load_pretrained_of_the_per_expert_checkpoint_layout_names_the_fix(tmp_path):
    """save_pretrained writes mixtral's experts one by one (experts.N.w1/w2/w3, which transformers converts
    to the 3-D parameters while loading): load_pretrained does not read that layout and says what to do."""
    zoo.build("mixtral").save_pretrained(str(tmp_path))
    kind, msg = get_pool(2).run(tasks_zoo.load_pretrained_error, name="mixtral", folder=str(tmp_path))[0]
    assert kind == "OasesError" and "experts.gate_up_proj" in msg and "per-expert layout" in msg, msg
    assert "load_full_state_dict(AutoModelForCausalLM.from_pretrained(folder).state_dict())" in msg, msg
