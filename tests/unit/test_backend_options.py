"""CompileConfig.cudagraphs: the setting reaches Inductor for the forward and the lazily compiled
backward, Inductor's decision is recorded (and said) per graph, and the option changes no value.

On CPU Inductor captures no CUDA graph (it declines: "cpu device"), so these tests check the
plumbing, the record and that values stay bitwise identical; whether the graphs replay on a GPU
is measured by benchmarks/rank_bench.py (RESULTS.md).
"""
import pytest
import torch

from oases_fx import _compat, backend
from oases_fx.config import CompileConfig
from oases_fx.errors import OasesError


def _fn(lin):
    return lambda x: torch.nn.functional.gelu(lin(x)).sum()


def _compile(lin, *, cudagraphs, keep, spy=None, monkeypatch=None):
    if spy is not None:
        monkeypatch.setattr(_compat, "inductor_inner_compile", lambda: spy)
    fn = backend.make_backend(backend="inductor", fw_passes=[], bw_passes=[], keep=keep, cudagraphs=cudagraphs)
    torch._dynamo.reset()
    return torch.compile(_fn(lin), backend=fn, fullgraph=True)


def test_cudagraphs_setting_reaches_forward_and_backward(monkeypatch):
    import torch._inductor.config as icfg

    seen = []
    real_inner = _compat.inductor_inner_compile()

    def spy(gm, example_inputs, **kw):
        seen.append((bool(kw.get("is_backward")), icfg.triton.cudagraphs, bool(kw.get("cudagraphs"))))
        return real_inner(gm, example_inputs, **kw)

    keep = backend.CompiledGraphs()
    lin = torch.nn.Linear(8, 8)
    _compile(lin, cudagraphs=True, keep=keep, spy=spy, monkeypatch=monkeypatch)(
        torch.randn(4, 8, requires_grad=True)).backward()
    assert [s[0] for s in seen] == [False, True]
    # Both graphs compile with the setting on; the forward is handed Inductor's cudagraphs flag on
    # (the flag is shared: where Inductor declines the forward, the backward starts with it off).
    assert all(cfg_on for _, cfg_on, _ in seen) and seen[0][2], seen
    assert [r.stage for r in keep.cudagraphs] == ["forward", "backward"]
    if not torch.cuda.is_available():
        # A CPU graph has nothing to capture: Inductor declines, and the record says why.
        assert all(not r.applied and r.reason for r in keep.cudagraphs), keep.cudagraphs


def test_cudagraphs_off_asks_for_nothing(monkeypatch):
    import torch._inductor.config as icfg

    seen = []
    real_inner = _compat.inductor_inner_compile()

    def spy(gm, example_inputs, **kw):
        seen.append(icfg.triton.cudagraphs)
        return real_inner(gm, example_inputs, **kw)

    keep = backend.CompiledGraphs()
    _compile(torch.nn.Linear(8, 8), cudagraphs=False, keep=keep, spy=spy, monkeypatch=monkeypatch)(
        torch.randn(4, 8, requires_grad=True)).backward()
    assert seen == [False, False] and keep.cudagraphs == []


def test_cudagraphs_values_bitwise_identical():
    """The same kernels with and without the option: the loss and every gradient are equal bit
    for bit (no tolerance: nothing but the launch mechanism may differ)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8)
    got = []
    for on in (False, True):
        lin.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        out = _compile(lin, cudagraphs=on, keep=backend.CompiledGraphs())(xi)
        out.backward()
        got.append((out.detach().clone(), xi.grad.clone(), lin.weight.grad.clone(), lin.bias.grad.clone()))
    for a, b in zip(*got):
        assert torch.equal(a, b)


def test_cudagraphs_needs_inductor():
    with pytest.raises(OasesError, match="backend='inductor'"):
        CompileConfig(backend="aot_eager", cudagraphs=True)
    with pytest.raises(OasesError, match="inductor"):
        backend.make_backend(backend="aot_eager", fw_passes=[], bw_passes=[], keep=backend.CompiledGraphs(),
                             cudagraphs=True)
    assert CompileConfig(backend="inductor", cudagraphs=True).cudagraphs


def test_record_says_why_not_applied(caplog):
    """A GPU graph Inductor declines is a warning, not silence; the reason comes from the compiled graph."""
    class Compiled:
        disabled_cudagraphs_reason = "mutated inputs (1 instances)"
        device_types = {"cuda"}

    class Flag:
        def __bool__(self):
            return False

    keep = backend.CompiledGraphs()
    with caplog.at_level("WARNING", logger="oases_fx"):
        rec = backend.record_cudagraphs(Compiled(), {"cudagraphs": Flag()}, "backward", keep)
    assert not rec.applied and "mutated inputs" in rec.reason and keep.cudagraphs == [rec]
    assert "backward graph without CUDA graphs" in caplog.text


def test_inductor_options_reach_forward_and_backward(monkeypatch):
    """CompileConfig.inductor_options travel as compile_fx's config patches: both graphs (the
    backward compiles lazily, outside any `with patch`) see the user's setting and still our order."""
    import torch._inductor.config as icfg

    seen = []
    real_inner = _compat.inductor_inner_compile()

    def spy(gm, example_inputs, **kw):
        seen.append((bool(kw.get("is_backward")), icfg.size_asserts, icfg.reorder_for_locality))
        return real_inner(gm, example_inputs, **kw)

    monkeypatch.setattr(_compat, "inductor_inner_compile", lambda: spy)
    opts = CompileConfig(inductor_options={"size_asserts": not icfg.size_asserts}).inductor_options
    fn = backend.make_backend(backend="inductor", fw_passes=[], bw_passes=[], keep=backend.CompiledGraphs(),
                              inductor_options=opts)
    torch._dynamo.reset()
    lin = torch.nn.Linear(8, 8)
    torch.compile(_fn(lin), backend=fn, fullgraph=True)(torch.randn(4, 8, requires_grad=True)).backward()
    assert seen == [(False, opts["size_asserts"], False), (True, opts["size_asserts"], False)], seen


@pytest.mark.parametrize("options, match", [
    ({"max_autotune_gem": True}, r"not an Inductor setting \(did you mean 'max_autotune_gemm'"),
    ({"reorder_for_locality": True}, "keeps the sub-batch overlap schedule's order"),
    ({"triton.cudagraphs": True}, "cudagraphs=True"),
    (["max_autotune_gemm"], "expected a dict"),
])
def test_inductor_options_refused_with_the_fix(options, match):
    with pytest.raises(OasesError, match=match):
        CompileConfig(inductor_options=options)


def test_inductor_options_need_inductor():
    with pytest.raises(OasesError, match="backend='inductor'"):
        CompileConfig(backend="aot_eager", inductor_options={"max_autotune_gemm": True})
    assert CompileConfig(inductor_options={"max_autotune_gemm": True}).inductor_options == {"max_autotune_gemm": True}


def test_compile_hands_inductor_options_to_the_backend(monkeypatch):
    """oases_fx.compile(..., inductor_options=...) reaches make_backend (the plumbing the tests above
    start from); the backend is stopped before Inductor runs."""
    import oases_fx
    from torch.distributed.device_mesh import init_device_mesh

    from tests.unit.graphs import TINY, single_rank_group
    from oases_fx.models import GPT

    class Stop(Exception):
        pass

    seen = {}

    def spy(**kw):
        seen.update(kw)
        raise Stop

    single_rank_group()
    monkeypatch.setattr(backend, "make_backend", spy)
    idx = torch.randint(0, TINY.vocab_size, (2, 8))
    with pytest.raises(Stop):
        oases_fx.compile(GPT(TINY), init_device_mesh("cpu", (1,), mesh_dim_names=("tp",)), example_inputs=(idx, idx), plan="megatron",
                         inductor_options={"size_asserts": False}, verbose=False)
    assert seen["inductor_options"] == {"size_asserts": False} and seen["backend"] == "inductor"
