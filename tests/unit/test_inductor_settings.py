"""Inductor must keep the schedule in the forward AND the lazily compiled backward graph, and
must not fuse kernels across a collective's issue or wait."""
from types import SimpleNamespace

import torch

from oases_fx import _compat, backend


def _node(lo, hi=None):
    return SimpleNamespace(min_order=lo, max_order=lo if hi is None else hi)


def test_crosses_fence():
    fences = [5, 9]
    assert backend.crosses_fence(fences, _node(3), _node(7))        # wait at 5 between them
    assert not backend.crosses_fence(fences, _node(6), _node(8))    # same segment
    assert not backend.crosses_fence(fences, _node(5), _node(6))    # the fence itself is not between
    assert backend.crosses_fence(fences, _node(6, 8), _node(10))    # a fused node (6..8) and 10: 9 between
    assert not backend.crosses_fence([], _node(0), _node(100))


def test_backward_compile_sees_the_patches(monkeypatch):
    """AOTAutograd compiles the backward at the first backward(), outside any `with patch`: the
    settings must travel as compile_fx's config_patches, and the fence as the choices handler."""
    import torch._inductor.config as icfg

    seen = []
    real_inner = _compat.inductor_inner_compile()

    def spy_inner(gm, example_inputs, **kw):
        from torch._inductor.virtualized import V

        seen.append((bool(kw.get("is_backward")), icfg.reorder_for_locality, icfg.reorder_for_peak_memory,
                     type(V.choices).__name__))
        return real_inner(gm, example_inputs, **kw)

    monkeypatch.setattr(_compat, "inductor_inner_compile", lambda: spy_inner)
    fn = backend.make_backend(backend="inductor", fw_passes=[], bw_passes=[], keep=backend.CompiledGraphs())
    lin = torch.nn.Linear(8, 8)
    compiled = torch.compile(lambda x: torch.nn.functional.gelu(lin(x)).sum(), backend=fn, fullgraph=True)
    compiled(torch.randn(4, 8, requires_grad=True)).backward()
    assert [s[0] for s in seen] == [False, True]
    want_choices = "KeepSubBatchesApart" if _compat.inductor_choices_base() is not None else "InductorChoices"
    for is_bw, locality, peak, choices in seen:
        assert (locality, peak) == (False, False), f"backward={is_bw}: Inductor reordering left on"
        assert choices == want_choices
