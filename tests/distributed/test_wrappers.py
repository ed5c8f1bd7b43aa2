"""A compiled model inside torch's wrappers, or with a parameter swapped after compile: exact, or an
error that names the problem and the fix -- never training that silently does nothing.

Before this check, FSDP's fully_shard over the compiled module (or a parent of it) ran without error and
every step's loss stayed the first step's: FSDP trained its own parameters, the compiled program read the
shards compile() had registered. The unwrapped run of the same task is the control: its losses follow
the eager model's (fp32, sums reordered by sharding: rtol 1e-5, as test_equivalence).
"""
import pytest

from tests import tasks_wrap
from tests.conftest import get_pool


def test_unwrapped_control_trains_exactly():
    for r in get_pool(4).run(tasks_wrap.wrapped_training, wrap="none"):
        assert r["error"] is None, r["error"]
        assert r["losses"][0] != r["losses"][-1]  # it trains
        assert r["losses"] == pytest.approx(r["ref"], rel=1e-5)


@pytest.mark.parametrize("wrap", ["fully_shard", "fully_shard_parent"])
def test_fully_shard_over_the_compiled_model_is_refused(wrap):
    for r in get_pool(4).run(tasks_wrap.wrapped_training, wrap=wrap):
        assert r["error"] is not None, f"{wrap}: trained without error, losses {r['losses']} (eager {r['ref']})"
        assert r["error"].startswith("InputError") and "replaced" in r["error"], r["error"]
        assert "fully_shard" in r["error"] and "('dp', 'tp') mesh" in r["error"], r["error"]
        assert r["losses"] == []  # refused at the first call, before any step


def test_a_parameter_assigned_after_compile_is_refused():
    for r in get_pool(2).run(tasks_wrap.wrapped_training, wrap="assign"):
        assert r["error"] is not None and "'transformer.h.0.mlp.c_fc.weight'" in r["error"], r
        assert "load_state_dict" in r["error"]


@pytest.mark.parametrize("wrap, names", [
    ("parallelize_module", ["already a DTensor", "'transformer.h.0.mlp.c_fc.weight'", "parallelize_module"]),
    ("ddp", ["DistributedDataParallel", "model.module"]),
    ("twice", ["already returned"]),
])
def test_a_model_wrapped_before_compile_is_refused_naming_it(wrap, names):
    """Before: parallelize_module and DDP failed inside torch.export with errors about DTensorSpec and
    torch.compiler.disable, and a fix line about traceable forwards."""
    for r in get_pool(2).run(tasks_wrap.pre_wrapped, wrap=wrap):
        assert r["error"] is not None and r["error"].startswith("InputError"), r
        for n in names:
            assert n in r["error"], (n, r["error"])


def test_torch_compiled_model_compiles_and_trains_exactly():
    """torch.compile(model) before oases_fx.compile: traced through, the same losses as eager (rtol as above)."""
    for r in get_pool(2).run(tasks_wrap.pre_wrapped, wrap="torch_compile"):
        assert r["error"] is None, r["error"]
        assert r["losses"] == pytest.approx(r["ref"], rel=1e-5) and r["losses"][0] != r["losses"][-1]
