"""split_sub_batches and recompute_policy on a small traced GPT (one rank, collectives are identities)."""
import copy

import pytest
import torch

from oases_fx import meta, runtime
from oases_fx.meta import graph_meta
from oases_fx.api import batch_dims
from oases_fx.errors import InputError
from oases_fx.passes.annotate_sharding import annotate_sharding_pass, find_tmp_regions
from oases_fx.passes.insert_collectives import insert_collectives_pass
from oases_fx.passes.recompute_policy import recompute_policy_pass
from oases_fx.passes.shard import shard_pass
from oases_fx.passes.split_sub_batches import split_sub_batches_pass
from oases_fx.plan import Plan, RegionPlan
from oases_fx.tracing import capture
from tests.unit.graphs import single_rank_group, traced_gpt


def _split(model, gm, idx, k, batch):
    """The torch-level passes up to split_sub_batches on a traced model, at TP=1 (every block sharded)."""
    regions, _ = find_tmp_regions(gm, 1)
    plan = Plan(tp_degree=1, regions=tuple(RegionPlan(name=r.name, kind=r.kind) for r in regions))
    annotate_sharding_pass(gm, plan=plan, tp=1)
    shard_pass(gm, rank=0, tp=1)
    insert_collectives_pass(gm, group_name=single_rank_group().group_name)
    gm.meta["oases"]["batch_dims"] = batch_dims(model, (idx, idx.clone()), {}, gm)
    split_sub_batches_pass(gm, num_sub_batches=k, batch_size=batch)
    return gm


def _pipeline(k, recompute="none", batch=4):
    model, traced, idx = traced_gpt(batch=batch)
    gm = _split(model, traced.gm, idx, k, batch)
    recompute_policy_pass(gm, policy=recompute)
    return model, gm, idx


def test_batch_dims_found_by_tracing_two_batch_sizes():
    model, traced, idx = traced_gpt(batch=4)
    dims = batch_dims(model, (idx, idx.clone()), {}, traced.gm)
    assert dims["idx"] == 0 and dims["layer_norm"] == 0
    assert "arange" not in dims  # positions do not depend on the batch


@pytest.mark.parametrize("k", [2, 4])
def test_split_makes_k_copies_and_keeps_values(k):
    model, gm, idx = _pipeline(k)
    gm.graph.lint()
    subs = {meta.get(n).sub_batch for n in gm.graph.nodes if meta.get(n).sub_batch is not None}
    assert subs == set(range(k))
    gs = [n for n in gm.graph.nodes if n.target is runtime.reduce_from_tp]
    assert len(gs) == 4 * k  # every region's g runs once per sub-batch
    logits, loss = gm(idx, idx.clone())
    ref_logits, ref_loss = model(idx, idx.clone())
    # row-wise ops on a slice of the rows: same arithmetic, so equal to float rounding of the
    # matmul blocking (different row counts can pick different kernels): 1e-6.
    torch.testing.assert_close(logits, ref_logits, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)


def test_k1_leaves_the_graph_unchanged():
    _, traced, _ = traced_gpt()
    before = [n.target for n in traced.gm.graph.nodes]
    _, gm, _ = _pipeline(1)
    # only f/g/bias were added by insert_collectives; no split or cat
    assert not any(meta.get(n).role in ("chunk", "cat") for n in gm.graph.nodes)
    assert len(list(gm.graph.nodes)) == len(before) + 12


def test_batch_that_does_not_split_is_an_error():
    with pytest.raises(InputError, match="does not split"):
        _pipeline(3, batch=4)


@pytest.mark.parametrize("policy", ["fine", "full"])
def test_recompute_outlines_one_checkpoint_per_segment_and_sub_batch(policy):
    model, gm, idx = _pipeline(2, policy)
    gm.graph.lint()
    wrapper = runtime.checkpoint_fine if policy == "fine" else runtime.checkpoint_full
    calls = [n for n in gm.graph.nodes if n.target is wrapper]
    assert len(calls) == 2 * 4  # 2 sub-batches x 4 regions
    ref = copy.deepcopy(model)
    _, loss = gm(idx, idx.clone())
    loss.backward()
    _, ref_loss = ref(idx, idx.clone())
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    for (n, p), (_, q) in zip(gm.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=n)


class _BatchCentred(torch.nn.Module):
    """x minus its mean over the batch: mixes batch rows (a sub-batch's mean is not the batch's)."""

    def forward(self, x):
        return x - x.mean(0, keepdim=True)


def _split_graph(model, batch=4, k=2, seq=8):
    idx = torch.randint(0, model.config.vocab_size, (batch, seq))
    return _split(model, capture(model, (idx, idx.clone()), {}).gm, idx, k, batch), idx


def test_split_sits_on_block_boundaries():
    """The split is on block 0's input (its ln_1 runs per sub-batch) and the cat after the last
    block's residual add (ln_f sees the whole batch): every block is split alike."""
    model, _, _ = traced_gpt()
    gm, idx = _split_graph(model)
    ln = [n for n in gm.graph.nodes if n.target is torch.ops.aten.layer_norm.default]
    first_ln, ln_f = ln[0], ln[-1]
    assert meta.get(first_ln).sub_batch == 0 and meta.get(first_ln.args[0]).role == "chunk", first_ln.format_node()
    cat = ln_f.args[0]
    assert meta.get(cat).role == "cat" and all(a.target is torch.ops.aten.add.Tensor for a in cat.args[0]), \
        cat.format_node()
    logits, loss = gm(idx, idx.clone())
    ref_logits, ref_loss = model(idx, idx.clone())
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)  # as test_split_makes_k_copies_and_keeps_values


def test_block_edge_ops_that_mix_batch_rows_stay_whole_and_say_so():
    """Block 0's first op and the last block's last op mix batch rows: the split stays after the first
    (at block 0's first TMP region, as without the widening) and the cat before the last, both said in
    the notes, and the values stay the unsplit model's."""
    model, _, _ = traced_gpt()
    model.transformer.h[0].ln_1 = _BatchCentred()
    model.transformer.h[-1].mlp.dropout = _BatchCentred()
    gm, idx = _split_graph(model)
    notes = "\n".join(gm.meta["oases"].sub_batch_notes)
    assert "of block transformer.h.0 stays before the split" in notes, notes
    assert "region ends before" in notes and "mixes batch rows" in notes, notes
    f = next(n for n in gm.graph.nodes if n.target is runtime.copy_to_tp)
    assert meta.get(f.args[0]).role == "chunk", f"block 0's first region should read the split: {f.format_node()}"
    means = [n for n in gm.graph.nodes if n.target is torch.ops.aten.mean.dim]
    assert len(means) == 2 and all(meta.get(n).sub_batch is None for n in means), [n.format_node() for n in means]
    logits, loss = gm(idx, idx.clone())
    ref_logits, ref_loss = model(idx, idx.clone())
    # row-wise ops on slices of the rows, the batch means on the whole batch: 1e-6 as above
    torch.testing.assert_close(logits, ref_logits, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)


class _WrittenKeyAttn(torch.nn.Module):
    """Attention whose key is built in place: zeros_like, then two slice copy_ (DeepSeek MLA's
    key_states written in pieces). copy_ has no sharding rule, so the split region ends at it."""

    def __init__(self, h=32, nh=4):
        super().__init__()
        self.nh = nh
        self.q, self.k, self.v, self.o = (torch.nn.Linear(h, h) for _ in range(4))

    def forward(self, x):
        B, S, H = x.shape
        hd = H // self.nh
        q, k0, v = (f(x).view(B, S, -1, hd).transpose(1, 2) for f in (self.q, self.k, self.v))
        k = torch.zeros_like(k0)
        k[:, :, :, : hd // 2].copy_(k0[..., : hd // 2] * 2.0)
        k[:, :, :, hd // 2:].copy_(k0[..., hd // 2:])
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(B, S, H))


class _WrittenKeyLM(torch.nn.Module):
    def __init__(self, V=64, h=32, L=2):
        super().__init__()
        self.emb = torch.nn.Embedding(V, h)
        self.attn = torch.nn.ModuleList(_WrittenKeyAttn(h) for _ in range(L))
        self.fc = torch.nn.ModuleList(torch.nn.Linear(h, 4 * h) for _ in range(L))
        self.proj = torch.nn.ModuleList(torch.nn.Linear(4 * h, h) for _ in range(L))
        self.head = torch.nn.Linear(h, V)

    def forward(self, idx, tgt):
        x = self.emb(idx)
        for a, f, p in zip(self.attn, self.fc, self.proj):
            x = x + a(x)
            x = x + p(torch.nn.functional.gelu(f(x)))
        logits = self.head(x)
        return logits, torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten())


def test_split_ends_before_a_tensor_written_in_place_after_it():
    """Block 1's key is zeros_like(...) written by copy_ into slices; the region ended at the first
    copy_, so the zeros_like was split and joined by a cat, the copy_ wrote into the cat, and the
    attention's sub-batch copies read the unwritten zeros: a silent wrong loss (5e-3 off in fp64).
    The region now ends before the written tensor; fp64 values equal the model's (no tolerance
    beyond fp64 reassociation: the split does not change any reduction's order here)."""
    torch.manual_seed(0)
    model = _WrittenKeyLM().double()
    idx = torch.randint(0, 64, (4, 8))
    gm = _split(model, capture(model, (idx, idx.clone()), {}).gm, idx, 2, 4)
    with torch.no_grad():
        want_logits, want = model(idx, idx.clone())
        got_logits, got = gm(idx, idx.clone())
    torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=1e-12)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    notes = graph_meta(gm).sub_batch_notes
    assert any("writes in place into it" in n for n in notes), notes
