"""The model given to oases_fx.compile is released (its sharded weights are meta now): using it
raises OasesError instead of writing meta tensors or never training (oases_fx.released)."""
from tests import tasks_safety as T
from tests.conftest import get_pool


def test_released_original_raises_on_use_and_compiled_module_still_retraces():
    for r in get_pool(2).run(T.released_original):
        for what in ("forward", "state_dict", "load_state_dict"):
            assert r[what] is not None and r[what][0] == "OasesError", (what, r[what])
            assert "released" in r[what][1] and "Fix" in r[what][1]
        kind, msg = r["early_optimizer"]
        assert kind == "OasesError" and "SGD.step()" in msg and "parameters()" in msg, msg
        # the control: the compiled module retraces a new shape and trains with its own optimizer
        assert r["compiled_optimizer"] is None and r["trained"] and r["programs"] == 2
