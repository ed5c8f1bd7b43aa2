"""Bad input gets a clear error naming the problem and the fix, on every rank."""
import torch

from tests import tasks
from tests.conftest import get_pool

GPT = dict(vocab_size=64, block_size=16, n_layer=1, n_head=4, n_embd=32)


def _both(results):
    assert results[0] is not None and results[1] is not None, "compile did not raise"
    assert results[0][0] == results[1][0]
    return results[0]


def test_heads_not_divisible_by_tp():
    cfg = dict(GPT, n_head=3, n_embd=24)
    idx = torch.zeros(2, 8, dtype=torch.long)
    kind, msg = _both(get_pool(2).run(tasks.expect_error, kind="gpt", cfg=cfg, batch=2, seq=8,
                                      example_inputs=(idx, idx)))
    assert kind == "ShardingError" and "attention heads" in msg and "n_head=3" in msg and "Fix" in msg


def test_kv_heads_neither_dividing_nor_a_multiple_of_tp():
    # kv heads < tp are replicated (MQA/GQA, tests/distributed/test_zoo.py); 3 kv heads at TP=2 can be
    # neither split evenly nor replicated evenly (tp % kv != 0): a named error with the fix.
    cfg = dict(vocab_size=64, block_size=16, n_layer=1, n_head=6, n_kv_head=3, n_embd=48)
    kind, msg = _both(get_pool(2).run(tasks.expect_error, kind="hf_llama", cfg=cfg, batch=2, seq=8))
    assert kind == "ShardingError" and "key/value heads" in msg and "num_key_value_heads=3" in msg and "Fix" in msg


def test_hidden_not_divisible_by_tp():
    cfg = dict(GPT, n_head=1, n_embd=9)
    idx = torch.zeros(2, 8, dtype=torch.long)
    kind, msg = _both(get_pool(2).run(tasks.expect_error, kind="gpt", cfg=cfg, batch=2, seq=8,
                                      example_inputs=(idx, idx)))
    assert kind == "ShardingError" and "not divisible by the TMP degree 2" in msg


def test_heads_not_divisible_found_in_graph_without_config():
    # A model with no `config` attribute: the reshape into heads is found in the graph.
    kind, msg = _both(get_pool(2).run(tasks.error_without_config))
    assert kind == "ShardingError" and "heads" in msg and "tests/tasks.py" in msg


def test_unknown_op_in_region_names_op_and_line():
    kind, msg = _both(get_pool(2).run(tasks.error_unknown_op))
    assert kind == "ShardingError" and "cumsum" in msg and "tests/tasks.py" in msg and "Fix" in msg


def test_mesh_without_tp_axis():
    idx = torch.zeros(2, 8, dtype=torch.long)
    kind, msg = _both(get_pool(2).run(tasks.expect_error, kind="gpt", cfg=GPT, batch=2, seq=8, mesh_names=("x",),
                                      example_inputs=(idx, idx)))
    assert kind == "OasesError" and "no 'tp' axis" in msg and "init_device_mesh" in msg


def test_example_inputs_missing():
    kind, msg = _both(get_pool(2).run(tasks.expect_error, kind="gpt", cfg=GPT, batch=2, seq=8))
    assert kind == "InputError" and "example_inputs" in msg


def test_example_inputs_of_different_batch():
    a, b = torch.zeros(2, 8, dtype=torch.long), torch.zeros(3, 8, dtype=torch.long)
    kind, msg = _both(get_pool(2).run(tasks.expect_error, kind="gpt", cfg=GPT, batch=2, seq=8,
                                      example_inputs=(a, b)))
    assert kind == "InputError" and "batch" in msg


def test_ranks_disagreeing_on_plan_refuse_before_training():
    kind, msg = _both(get_pool(2).run(tasks.rank_dependent_plan, cfg=GPT))
    assert kind == "PlanMismatchError" and "rank 0" in msg and "rank 1" in msg


def test_custom_autograd_function_is_refused_with_its_name_and_line():
    r = get_pool(2).run(tasks.error_custom_function)
    # Capture would trace only the forward (x2): fc1's gradient would be 2/3 of the model's own (x3).
    assert abs(r[0]["grad_ratio"] - 1.5) < 1e-4
    kind, msg = _both([x["error"] for x in r])
    assert kind == "OasesError" and "tests.tasks._TimesTwo" in msg and "autograd.Function" in msg
    assert "tests/tasks.py:" in msg and "Fix" in msg  # the line that applies it


def test_deepcopy_of_the_compiled_model_is_a_clear_error_with_a_working_fix():
    for r in get_pool(2).run(tasks.error_deepcopy):
        kind, msg = r["error"]
        assert kind == "OasesError" and "deepcopy" in msg and "Fix" in msg and "named_parameters" in msg
        assert r["ema_ok"], "the EMA the message suggests (DTensor copies, lerp_) must work"


def test_call_under_autocast_is_an_error_not_a_silent_float32_step():
    # Eager layers under autocast run in bfloat16; the compiled program would ignore it and train in
    # float32 with nothing said. It is an InputError naming autocast and the fix (cast before compile).
    for r in get_pool(2).run(tasks.error_under_autocast):
        assert r["eager_dtype"] == "torch.bfloat16"
        kind, msg = r["error"]
        assert kind == "InputError" and "torch.autocast('cpu', dtype=torch.bfloat16)" in msg and "Fix" in msg
        assert "model.to(torch.bfloat16)" in msg
        assert r["after"] == r["after"]  # a call outside autocast afterwards runs (a number, not NaN)


def test_float64_input_at_compile_names_dtype_and_fix():
    kind, msg = _both(get_pool(2).run(tasks.error_bad_input, case="compile_float64"))
    assert kind == "InputError" and "torch.float64" in msg and "torch.float32" in msg and "Fix" in msg
    assert "Attempt to trace generator" not in msg


def test_float64_input_at_call_names_dtype_and_fix():
    kind, msg = _both(get_pool(2).run(tasks.error_bad_input, case="call_float64"))
    assert kind == "InputError" and "positional argument 0 is torch.float64" in msg and "x.to(torch.float32)" in msg


def test_input_on_another_device_names_both_devices():
    # "meta" stands in for another device on a CPU-only machine (a cuda input to a CPU model).
    for case in ("compile_meta", "call_meta"):
        kind, msg = _both(get_pool(2).run(tasks.error_bad_input, case=case))
        assert kind == "InputError" and "is on meta" in msg and "parameters are on cpu" in msg and "Fix" in msg
