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
