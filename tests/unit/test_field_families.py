"""What the third field trial of model families found (single process, traced graphs): a column's
split piece read outside its column -> row pair (MLA's k_rot), an encoder-decoder's own decoder
config (T5), data-dependent sizes (JetMoE), and fixes named only where they apply (llama4's bmm
experts, a model without experts)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from oases_fx import moe
from oases_fx.errors import OasesError
from oases_fx.passes.annotate_sharding import annotate_sharding_pass, coverage, find_tmp_regions
from oases_fx.plan import Plan
from oases_fx.tracing import capture

transformers = pytest.importorskip("transformers")


class _LatentPair(nn.Module):
    """DeepSeek's MLA reduced to the pattern: one projection split into a latent (into the next
    linear) and a piece read elsewhere (k_rot, the rotary key shared by every head)."""

    def __init__(self, h=16, latent=8, rot=4):
        super().__init__()
        self.latent = latent
        self.down = nn.Linear(h, latent + rot, bias=False)  # kv_a_proj_with_mqa
        self.up = nn.Linear(latent, h, bias=False)  # kv_b_proj

    def forward(self, x):
        lat, rot = self.down(x).split([self.latent, 4], dim=-1)
        return self.up(F.silu(lat)) + rot.sum(-1, keepdim=True)  # rot outside the pair


def test_a_split_piece_read_outside_the_pair_declines_it():
    """The piece is never propagated (not between the column and the row): sharded with its
    column, rot.sum(-1) would sum half the columns on each rank, silently (DeepSeek: a view of it
    failed at the first call inside dynamo)."""
    x = torch.randn(2, 3, 16)
    gm = capture(_LatentPair(), (x,), {}).gm
    regions, declined = find_tmp_regions(gm, 2)
    assert regions == []
    ((name, why),) = declined
    assert "a sharded tensor is used outside the region" in why and "getitem" in why, why
    assert "self.down(x).split(" in why, why  # the model's source line


def _tiny(config_cls, model_cls, **kw):
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kw))


def _t5():
    return _tiny("T5Config", "T5ForConditionalGeneration", vocab_size=32, d_model=16, d_kv=4, d_ff=32,
                 num_layers=1, num_heads=4, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)


def test_an_encoder_decoder_traces_with_its_decoder_config_uncached_too():
    """T5 deep-copies its config into the decoder stack: use_cache=True there made export return an
    EncoderDecoderCache. Every config is set False for the trace and restored after."""
    m = _t5()
    idx = torch.randint(1, 32, (2, 6))
    traced = capture(m, (), dict(input_ids=idx, labels=idx))
    assert any("use_cache=False" in n for n in traced.notes)
    assert m.config.use_cache and m.decoder.config.use_cache  # restored


def test_the_experts_hint_of_a_failed_trace_only_for_a_model_with_experts():
    assert moe.trace_hint(_t5()) == ""  # every HF config says experts_implementation 'eager'
    mixtral = _tiny("MixtralConfig", "MixtralForCausalLM", vocab_size=32, hidden_size=16, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2, intermediate_size=32, num_local_experts=4,
                    num_experts_per_tok=2, experts_implementation="eager")
    assert "set_experts_implementation('grouped_mm')" in moe.trace_hint(mixtral)


def test_bmm_experts_with_no_implementation_to_switch_are_declined_without_that_fix():
    """Llama4TextExperts runs every expert on every token (bmm with the 3-D weights): declined, and
    no experts_implementation named (the class has none; batched_mm's weight[expert_ids] keeps it,
    tests/unit/test_moe.py)."""
    m = _tiny("Llama4TextConfig", "Llama4ForCausalLM", vocab_size=32, hidden_size=16, num_hidden_layers=1,
              num_attention_heads=4, num_key_value_heads=2, head_dim=4, intermediate_size=16,
              intermediate_size_mlp=32, num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=1)
    idx = torch.randint(0, 32, (2, 8))
    gm = capture(m, (), dict(input_ids=idx, labels=idx)).gm
    annotate_sharding_pass(gm, plan=Plan(tp_degree=2), tp=2)
    _, _, declined = coverage(gm.meta["oases"])
    (why,) = [w for n, w in declined if n.endswith("feed_forward.experts")]
    assert "gate_up_proj feeds aten.bmm.default" in why and "experts_implementation" not in why, why


def test_data_dependent_sizes_are_refused_at_the_trace_naming_the_line():
    """JetMoE turns tokens per expert into Python ints (.tolist()) to split the tokens: the analysis
    read those sizes as numbers and failed inside torch (GuardOnDataDependentSymNode)."""
    m = _tiny("JetMoeConfig", "JetMoeForCausalLM", vocab_size=32, hidden_size=16, num_hidden_layers=1,
              num_key_value_heads=2, kv_channels=4, intermediate_size=16, num_local_experts=4,
              num_experts_per_tok=2, bos_token_id=0, eos_token_id=0)
    idx = torch.randint(0, 32, (2, 8))
    with pytest.raises(OasesError, match="data-dependent size") as e:
        capture(m, (), dict(input_ids=idx, labels=idx))
    assert "modeling_jetmoe.py" in str(e.value) and "tolist()" in str(e.value) and "Fix:" in str(e.value)


def test_a_fused_qkv_viewed_pieces_first_is_declined_as_that_not_as_indivisible_heads():
    """ModernBERT's Wqkv output viewed (B, S, 3, heads, head_dim): 3 does not divide by 2, but the
    heads (4) do; the decline says what the 3 is instead of sending the user after the heads."""
    from oases_fx.errors import ShardingError
    from oases_fx.propagation import ShardState, propagate_node

    g = torch.fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = torch.empty(2, 8, 3 * 4 * 16)
    node = g.call_function(torch.ops.aten.view.default, (x, [2, 8, 3, -1, 16]))
    node.meta["val"] = torch.empty(2, 8, 3, 4, 16)
    st = ShardState(tp=2)
    st.placement[x] = 2
    with pytest.raises(ShardingError) as e:
        propagate_node(node, st)
    msg = str(e.value)
    assert "the q/k/v pieces of a fused projection viewed as (3, 4, 16)" in msg and "not sharded yet" in msg, msg
    assert "divides the number of heads" not in msg, msg


_TRACE_MODERNBERT = """
import hashlib, torch, transformers
from oases_fx.tracing import capture
torch.manual_seed(0)
cfg = transformers.ModernBertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=32, global_attn_every_n_layers=2, local_attention=4,
                                    pad_token_id=0, bos_token_id=0, eos_token_id=0, cls_token_id=0, sep_token_id=0)
idx = torch.randint(1, 32, (2, 8))
gm = capture(transformers.ModernBertForMaskedLM(cfg), (), dict(input_ids=idx, labels=idx)).gm
print("CODE", hashlib.md5(gm.code.encode()).hexdigest())
"""


def test_a_graph_that_differs_by_the_hash_seed_names_pythonhashseed():
    """ModernBERT iterates set(config.layer_types): its traced op order follows the per-process hash
    seed (0 and 6 order the two layer types differently), so two ranks that built the same model
    disagree; the agreement error's fix says so instead of only 'build the same model'."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from oases_fx import agreement

    root = str(Path(__file__).resolve().parents[2])
    codes = set()
    for seed in ("0", "6"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=root)
        out = subprocess.run([sys.executable, "-c", _TRACE_MODERNBERT], env=env, capture_output=True, text=True,
                             timeout=600)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("CODE ")]
        assert lines, out.stderr[-3000:]
        codes.add(lines[-1])
    assert len(codes) == 2  # the same model, two graphs
    assert "PYTHONHASHSEED" in agreement._FIX["graph"]


class _DeclinedAttentionLayer(nn.Module):
    """A layer whose attention pair is declined (the _LatentPair escape), then a gated MLP."""

    def __init__(self, h=16):
        super().__init__()
        self.kv_a, self.kv_b = nn.Linear(h, 8 + 4, bias=False), nn.Linear(8, h, bias=False)
        self.q, self.o = nn.Linear(h, h, bias=False), nn.Linear(h, h, bias=False)
        self.gate, self.up, self.down = nn.Linear(h, 32, bias=False), nn.Linear(h, 32, bias=False), nn.Linear(32, h)

    def forward(self, x):
        lat, rot = self.kv_a(x).split([8, 4], dim=-1)
        h = x + self.o(self.q(x) * self.kv_b(F.silu(lat)) + rot.sum(-1, keepdim=True))
        return h + self.down(F.silu(self.gate(h)) * self.up(h))


def test_a_declined_attention_does_not_hide_the_mlp_after_it():
    """o -> gate (across the residual) is tried once the attention is declined, and declined; its
    row gate used to be barred from being a column, so the MLP was never tried and the whole model
    ran replicated, explained only by the residual add (DeepSeek-V2: 0 of 20 blocks)."""
    x = torch.randn(2, 3, 16)
    gm = capture(_DeclinedAttentionLayer(), (x,), {}).gm
    regions, declined = find_tmp_regions(gm, 2)
    from oases_fx.propagation import linear_parts

    weights = [([str(linear_parts(c)[1].target) for c in r.columns], str(linear_parts(r.row)[1].target))
               for r in regions]
    assert weights == [(["gate.weight", "up.weight"], "down.weight")], (weights, declined)
    assert any("a sharded tensor is used outside the region" in why for _, why in declined), declined


def test_mla_key_buffer_written_after_the_split_keeps_its_order():
    """DeepSeek-V2's attention builds key_states with new_empty and two slice copy_ (expand_kv); the
    split region ends at that new_empty in block 1, so the second copy_'s source is the cat of the
    sub-batch copies. The sub-batch sort moved that copy_ after the attention reading the buffer (no
    data edge orders a write with the buffer's readers): a silent wrong loss in fp64 (4e-4 at this
    size). In fp64 at TP=1 the split program equals the model up to reassociation (1e-12)."""
    from oases_fx.api import batch_dims
    from oases_fx.meta import graph_meta
    from oases_fx.passes.insert_collectives import insert_collectives_pass
    from oases_fx.passes.shard import shard_pass
    from oases_fx.passes.split_sub_batches import split_sub_batches_pass
    from oases_fx.plan import RegionPlan
    from tests.unit.graphs import single_rank_group

    torch.manual_seed(0)
    cfg = transformers.DeepseekV2Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, n_routed_experts=4, n_shared_experts=1,
        num_experts_per_tok=2, moe_intermediate_size=64, first_k_dense_replace=1, n_group=1, topk_group=1,
        topk_method="greedy", q_lora_rank=None, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=16, head_dim=8, experts_implementation="batched_mm", bos_token_id=0, eos_token_id=0,
        pad_token_id=None, tie_word_embeddings=False)
    model = transformers.DeepseekV2ForCausalLM(cfg).double()
    ids = torch.randint(0, 128, (4, 8))
    kw = dict(input_ids=ids, labels=ids.clone())
    gm = capture(model, (), kw).gm
    regions, _ = find_tmp_regions(gm, 1)
    assert regions, "no region: nothing would be split"
    annotate_sharding_pass(gm, plan=Plan(tp_degree=1, regions=tuple(RegionPlan(name=r.name, kind=r.kind)
                                                                    for r in regions)), tp=1)
    shard_pass(gm, rank=0, tp=1)
    insert_collectives_pass(gm, group_name=single_rank_group().group_name)
    graph_meta(gm).batch_dims = batch_dims(model, (), kw, gm)
    split_sub_batches_pass(gm, num_sub_batches=2, batch_size=4)
    assert any(n.startswith("split ") for n in graph_meta(gm).sub_batch_notes)
    with torch.no_grad():
        want = model(**kw)
        got = gm(ids, ids.clone())
    loss = got[0] if isinstance(got, (tuple, list)) else got.loss
    assert loss.numel() == 1, type(got)
    torch.testing.assert_close(loss, want.loss, rtol=0, atol=1e-12)
