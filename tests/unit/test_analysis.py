"""GraphMeta (the typed gm.meta["oases"] record) and the per-trace analysis (oases_fx.analysis)."""
import torch.fx as fx
import torch.nn as nn

from oases_fx.meta import GraphMeta, graph_meta


def test_graph_meta_answers_the_old_dict_accesses():
    gm = fx.symbolic_trace(nn.Linear(2, 2))
    gm.meta.setdefault("oases", {})["batch_dims"] = {"x": 0}  # older code left a dict
    m = graph_meta(gm)
    assert isinstance(m, GraphMeta) and gm.meta["oases"] is m and m.batch_dims == {"x": 0}
    assert graph_meta(gm) is m  # one record per graph
    # a None field is absent: get gives the default, setdefault writes it, `in` is False
    assert "vocab_parallel" not in m and m.get("vocab_parallel", "d") == "d"
    assert m.setdefault("vocab_parallel", "s") == "s" and m.vocab_parallel == "s" and "vocab_parallel" in m
    m.setdefault("collectives", []).append("c")  # the same list as the field
    assert m.collectives == ["c"] and m["collectives"] is m.collectives
    m["sharded_params"] = {"w": (0, None, (2, 2))}
    assert m.sharded_params == {"w": (0, None, (2, 2))}
    m["brand_new_key"] = 1  # not a field: kept, visible
    assert m.extra == {"brand_new_key": 1} and m["brand_new_key"] == 1 and "brand_new_key" in m
    assert gm.meta.setdefault("oases", {}) is m  # later setdefault("oases", {}) gets the record


# --- batch dims: propagated on one trace, checked against the old method (trace again at B+1) ----
import pytest
import torch

from oases_fx import analysis
from oases_fx.api import batch_dims as batch_dims_by_retrace
from oases_fx.tracing import capture
from tests.unit.graphs import traced_gpt


def _hf(family, batch, seq):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "llama":
        cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=1, n_head=4, n_positions=64)
        model = transformers.GPT2LMHeadModel(cfg)
    idx = torch.randint(0, 96, (batch, seq))
    return model, (), {"input_ids": idx, "labels": idx}


@pytest.mark.parametrize("family,batch,seq", [("gpt", 4, 8), ("llama", 4, 16), ("gpt2", 2, 8),
                                              ("llama", 8, 8)])  # batch == seq: sizes alone are ambiguous
def test_propagated_batch_dims_equal_the_two_trace_method(family, batch, seq):
    if family == "gpt":
        model, traced, idx = traced_gpt(batch=batch, seq=seq)
        args, kwargs = (idx, idx.clone()), {}
    else:
        model, args, kwargs = _hf(family, batch, seq)
        traced = capture(model, args, kwargs)
    got = analysis.propagate_batch_dims(traced.gm, batch)
    want = batch_dims_by_retrace(model, args, kwargs, traced.gm)
    assert got == want
    if family == "llama":  # HF's masks are built from expand(arange, (B, S)), not from the inputs
        assert any(traced.gm.graph.find_nodes(op="call_function", target=torch.ops.aten.expand.default))


class _RowsByRows(torch.nn.Module):
    """h @ h.T is (B, B): both dims have the batch size, so propagation cannot say which is the batch."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        h = self.lin(x)
        return (h @ h.t()).sum()


def test_analysis_falls_back_to_two_traces_and_says_so():
    model = _RowsByRows()
    x = torch.randn(4, 8)
    traced = capture(model, (x,), {})
    with pytest.raises(analysis.BatchDimsUnknown):
        analysis.propagate_batch_dims(traced.gm, 4)
    calls = []

    def retrace():
        calls.append(1)
        return batch_dims_by_retrace(model, (x,), {}, traced.gm)

    a = analysis.analyze(traced.gm, tp=2, batch_size=4, model=model, retrace=retrace)
    assert a.batch_dims is None and not calls  # the second trace only when something needs the dims
    dims = a.require_batch_dims()
    assert calls == [1] and dims["x"] == 0 and dims["linear"] == 0
    assert "traced again at batch 5" in a.batch_dims_method
    assert any(d.subject == "batch dims" and "propagation failed" in d.reason for d in a.decisions)


def test_analysis_records_regions_vocab_and_tied_parameters():
    model, traced, idx = traced_gpt(batch=2)
    a = analysis.analyze(traced.gm, tp=2, batch_size=2, model=model)
    from oases_fx.passes.annotate_sharding import find_tmp_regions

    assert [r.name for r in a.regions] == [r.name for r in find_tmp_regions(traced.gm, 2)[0]]
    assert a.vocab is not None and a.vocab.vocab_size == model.lm_head.weight.shape[0]
    tied = model.transformer.wte.weight is model.lm_head.weight
    names = {p.name for p in a.params.values()} | {n for p in a.params.values() for n in p.aliases}
    assert names == {n for n, _ in model.named_parameters(remove_duplicate=False)}
    assert any(p.aliases for p in a.params.values()) == tied
    assert all(p.requires_grad for p in a.params.values())
    assert any(d.subject == "vocab-parallel" and d.decision == "pattern found" for d in a.decisions)
