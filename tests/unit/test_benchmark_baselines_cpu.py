"""The benchmark baselines hold the plain GPT's weights and compute its loss and gradients.

Single-process checks of the weight mappings, then 2 gloo ranks (the shared rank pool) running
torch_tp, torch_tp_sp, eager_tp and domino sharded against the unsharded GPT. All in fp32, no
compile (CPU Inductor is slow; the harness's --dry-run exercises compiled paths). Megatron-Core
needs CUDA (and triton) so only its pure layout functions are checked here.
"""
import torch

from benchmarks.baselines.common import (
    build_titan_gpt,
    flops_per_token,
    load_plain_gpt,
    make_batch,
    make_master_state_dict,
    num_params,
)
from benchmarks.baselines.megatron_gpt import megatron_qkv_from_fused, megatron_state_dict_from_gpt
from oases_fx.models.gpt import GPT, GPTConfig
from tests.conftest import get_pool

CFG = dict(vocab_size=128, block_size=32, n_layer=2, n_head=4, n_embd=64)
CPU = torch.device("cpu")

# fp32 tolerances: the baselines compute the same sums as the plain GPT but split differently
# (q/k/v as three matmuls, per-rank partial sums added by an all-reduce, vocab-parallel softmax),
# so results differ only by fp32 rounding: ~1e-7 relative per op, a few ulps after 2 layers.
LOSS_ATOL = 1e-5
GRAD_ATOL = 1e-6  # gradients here are O(1e-2) or smaller


def _reference(cfg, seed=0):
    sd = make_master_state_dict(cfg, seed=seed, device=CPU, dtype=torch.float32)
    idx, targets = make_batch(cfg, batch=4, seq=cfg.block_size, seed=seed + 1, device=CPU)
    ref = load_plain_gpt(cfg, sd, device=CPU, dtype=torch.float32)
    _, loss = ref(idx, targets)
    loss.backward()
    grads = {n: p.grad for n, p in ref.named_parameters()}  # tied wte/lm_head appears once
    return sd, (idx, targets), loss.item(), grads


# ------------------------------------------------------------------------------------------
# single process
# ------------------------------------------------------------------------------------------


def test_master_weights_are_the_seeded_plain_gpt():
    cfg = GPTConfig(**CFG)
    sd = make_master_state_dict(cfg, seed=3, device=CPU, dtype=torch.float32)
    torch.manual_seed(3)
    plain = GPT(cfg)
    for name, tensor in plain.state_dict().items():
        assert torch.equal(sd[name], tensor), name
    loaded = load_plain_gpt(cfg, sd, device=CPU, dtype=torch.float32)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_titan_gpt_loaded_from_plain_gpt_has_its_loss():
    cfg = GPTConfig(**CFG)
    sd, (idx, targets), ref_loss, _ = _reference(cfg)
    titan = build_titan_gpt(cfg, sd, device=CPU, dtype=torch.float32)
    assert titan.output.weight is titan.tok_embeddings.weight
    _, loss = titan(idx, targets)
    assert abs(loss.item() - ref_loss) <= LOSS_ATOL


def test_megatron_qkv_layout_is_per_head_q_k_v():
    # Megatron (get_query_key_value_tensors, num_query_groups == n_head) views linear_qkv's
    # output as (..., n_head, 3 * hn) and splits each head's block into q, k, v; a TP rank holds
    # a contiguous block of heads. Replay that on the mapped weight.
    h, nh, tp = 64, 4, 2
    hn = h // nh
    fused = torch.randn(3 * h, h)  # plain GPT c_attn: rows [Q; K; V]
    q, k, v = fused.split(h)
    mapped = megatron_qkv_from_fused(fused, nh)
    per_head = mapped.view(nh, 3 * hn, h)
    mq, mk, mv = per_head.split(hn, dim=1)
    assert torch.equal(mq.reshape(h, h), q)
    assert torch.equal(mk.reshape(h, h), k)
    assert torch.equal(mv.reshape(h, h), v)
    rank1 = mapped.chunk(tp)[1].view(nh // tp, 3 * hn, h)  # rank 1: heads 2, 3
    assert torch.equal(rank1[:, :hn].reshape(-1, h), q[h // 2:])
    bias = torch.randn(3 * h)
    mb = megatron_qkv_from_fused(bias, nh).view(nh, 3, hn)
    assert torch.equal(mb[:, 2].reshape(-1), bias[2 * h:])


def test_megatron_state_dict_names_match_megatron_core_0_19_2():
    # named_parameters() of megatron-core 0.19.2's GPTModel (local spec, tied embeddings,
    # learned positions, L=2), as printed from the wheel.
    cfg = GPTConfig(**CFG)
    sd = make_master_state_dict(cfg, seed=0, device=CPU, dtype=torch.float32)
    expected = {"embedding.word_embeddings.weight", "embedding.position_embeddings.weight",
                "decoder.final_layernorm.weight", "decoder.final_layernorm.bias"}
    for i in range(2):
        for sub in ("input_layernorm", "self_attention.linear_proj", "self_attention.linear_qkv",
                    "pre_mlp_layernorm", "mlp.linear_fc1", "mlp.linear_fc2"):
            expected |= {f"decoder.layers.{i}.{sub}.weight", f"decoder.layers.{i}.{sub}.bias"}
    mapped = megatron_state_dict_from_gpt(sd, cfg)
    assert set(mapped) == expected
    assert mapped["decoder.layers.1.mlp.linear_fc2.weight"].shape == (64, 256)


def test_flops_per_token_is_nanogpt_estimate():
    cfg = GPTConfig(**CFG)
    n = sum(p.numel() for p in GPT(cfg).parameters()) - cfg.block_size * cfg.n_embd
    assert num_params(cfg) == n
    assert flops_per_token(cfg, 32) == 6 * n + 12 * cfg.n_layer * cfg.n_embd * 32


def test_speedup_and_hidden_share():
    from benchmarks.harness import Row, derive_relative

    rows = {name: Row(name, "") for name in ("megatron", "oases_fx", "floor")}
    for name, ms in (("megatron", 30.0), ("oases_fx", 27.0), ("floor", 24.0)):
        rows[name].step_ms_median = ms
    derive_relative(rows, "megatron")
    assert abs(rows["oases_fx"].speedup - 30 / 27) < 1e-12
    assert abs(rows["oases_fx"].hidden_share - 0.5) < 1e-12  # half of the 6 ms of communication
    assert rows["floor"].hidden_share is None


# ------------------------------------------------------------------------------------------
# 2 gloo ranks
# ------------------------------------------------------------------------------------------


def sharded_baselines_task(rank, world_size, systems):
    """Runs on every rank: build each system from the master weights, one step, compare the loss
    and every gradient (gathered to full tensors, mapped like the weights) with the plain GPT."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor

    from benchmarks.baselines import domino, torch_tp
    from benchmarks.baselines.common import BuildContext, titan_state_dict_from_gpt

    cfg = GPTConfig(**CFG)
    sd, batch, ref_loss, ref_grads = _reference(cfg)
    ref_grads["lm_head.weight"] = ref_grads["transformer.wte.weight"]
    out = {}
    for name in systems:
        group = dist.new_group(list(range(world_size)))
        mesh = DeviceMesh.from_group(group, "cpu", mesh_dim_names=("tp",))
        ctx = BuildContext(cfg=cfg, mesh=mesh, device=CPU, dtype=torch.float32, state_dict=sd,
                           example=batch, backend="none")
        module = torch_tp if name.startswith("torch_tp") else domino
        system = getattr(module, f"build_{name}")(ctx)
        system.step(*batch)  # a first step: grads must be reset, not accumulated, by the next
        loss = system.step(*batch).item()
        model = system.modules[0]
        if name.startswith("torch_tp"):
            want = titan_state_dict_from_gpt(ref_grads, cfg)
        else:
            want = domino.megatron_style_state_dict_from_gpt(ref_grads, cfg, rank, world_size)
        worst, worst_name = 0.0, ""
        for pname, p in model.named_parameters():
            pname = pname.replace("._orig_mod", "")  # torch.compile wrappers, if any
            grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            err = (grad - want[pname]).abs().max().item()
            if err >= worst:
                worst, worst_name = err, pname
        out[name] = (loss - ref_loss, worst, worst_name)
    return out


def test_sharded_baselines_match_plain_gpt_on_two_ranks():
    systems = ["torch_tp", "torch_tp_sp", "eager_tp", "domino"]
    results = get_pool(2).run(sharded_baselines_task, systems=systems)
    for rank, per_system in enumerate(results):
        for name in systems:
            loss_diff, grad_err, grad_name = per_system[name]
            assert abs(loss_diff) <= LOSS_ATOL, f"{name} rank {rank}: loss off by {loss_diff}"
            assert grad_err <= GRAD_ATOL, f"{name} rank {rank}: grad {grad_name} off by {grad_err}"
