"""load_pretrained's hint when a model tensor is in no file of a save_pretrained folder because
transformers converts that architecture's checkpoint keys while loading (oases_fx.moe.checkpoint_hint).
GraniteMoe saves block_sparse_moe.input_linear / output_linear / router.layer, its model holds
experts.gate_up_proj / experts.down_proj / router.weight: before, load_pretrained named the missing
tensors and said only "pass the save_pretrained folder of this model" (which the user had done)."""
import torch
from safetensors import safe_open

from oases_fx.moe import checkpoint_hint


def _granitemoe_keys(tmp_path):
    from transformers import GraniteMoeConfig, GraniteMoeForCausalLM

    torch.manual_seed(0)
    model = GraniteMoeForCausalLM(GraniteMoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32))
    model.save_pretrained(str(tmp_path))
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        return list(f.keys()), list(model.state_dict())


def test_renamed_checkpoint_keys_name_the_stored_keys_and_the_fix(tmp_path):
    stored, own = _granitemoe_keys(tmp_path)
    missing = [k for k in own if k not in stored and k != "lm_head.weight"]  # lm_head: tied, filled by alias
    assert "model.layers.0.block_sparse_moe.router.weight" in missing, missing
    hint = checkpoint_hint(missing, stored, own)
    assert "model.layers.0.block_sparse_moe.input_linear.weight" in hint, hint
    assert "model.layers.0.block_sparse_moe.router.layer.weight" in hint, hint
    assert "load_full_state_dict(AutoModelForCausalLM.from_pretrained(folder).state_dict())" in hint, hint


def test_a_different_models_folder_gets_no_conversion_hint():
    # a tensor the folder simply lacks (another config's checkpoint): the model's other keys are no hint
    own = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"]
    assert checkpoint_hint(own[:1], own[1:], own) == ""
    assert checkpoint_hint(own[:1], ["model.layers.0.self_attn.q.weight"], own) != ""
