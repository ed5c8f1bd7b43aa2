"""Sharding rules one by one, on tiny traced attention blocks (single process): each construct is
found as one column -> row region with the expected placement, or declined with its reason, op
and source line."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from oases_fx import meta
from oases_fx.passes.annotate_sharding import coverage, coverage_message, find_tmp_regions
from oases_fx.tracing import capture

H, NH, HD = 16, 4, 4


class _Attn(nn.Module):
    """x -> fused or separate q/k/v -> `mix` (the construct under test) -> sdpa -> out-proj."""

    def __init__(self, mix):
        super().__init__()
        self.qkv = nn.Linear(H, 3 * H)
        self.o = nn.Linear(H, H)
        self.mix = mix

    def forward(self, x):
        B, S, _ = x.shape
        q, k, v = self.mix(self.qkv(x), B, S)  # each (B, NH, S, HD)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(B, S, H))


def _heads(t, B, S):
    return t.view(B, S, NH, HD).transpose(1, 2)


def _slices(t, B, S):  # Phi-3: qkv[..., :q_end], ...
    return _heads(t[..., :H], B, S), _heads(t[..., H:2 * H], B, S), _heads(t[..., 2 * H:], B, S)


def _overlapping_slices(t, B, S):
    return _heads(t[..., :H], B, S), _heads(t[..., H // 2:H // 2 + H], B, S), _heads(t[..., 2 * H:], B, S)


def _per_head(t, B, S):  # GPT-NeoX: [q0 k0 v0 | q1 k1 v1 ...] viewed (B, S, NH, 3, HD)
    qkv = t.view(B, S, NH, 3 * HD).transpose(1, 2)
    return qkv[..., :HD], qkv[..., HD:2 * HD], qkv[..., 2 * HD:]


def _stack_rotary(t, B, S):
    q, k, v = (x.view(B, S, NH, HD) for x in t.split(H, -1))

    def rot(x):  # interleaved pairs rotated with stack/flatten (GPT-J)
        x1, x2 = x[..., ::2], x[..., 1::2]
        return torch.stack((-x2, x1), dim=-1).flatten(-2)

    return rot(q).transpose(1, 2), rot(k).transpose(1, 2), v.transpose(1, 2)


def _complex_rotary(t, B, S):
    q, k, v = (x.view(B, S, NH, HD) for x in t.split(H, -1))
    freqs = torch.polar(torch.ones(S, HD // 2), torch.arange(S * HD // 2, dtype=torch.float32).view(S, HD // 2))

    def rot(x):  # Meta's apply_rotary_emb
        xc = torch.view_as_complex(x.float().reshape(B, S, NH, HD // 2, 2))
        return torch.view_as_real(xc * freqs.view(1, S, 1, HD // 2)).flatten(3)

    return rot(q).transpose(1, 2), rot(k).transpose(1, 2), v.transpose(1, 2)


def _cumsum_heads(t, B, S):  # an op with no rule on the sharded tensor
    q, k, v = _slices(t, B, S)
    return q.cumsum(-1), k, v


def _regions(mix, tp=2):
    gm = capture(_Attn(mix), (torch.randn(2, 8, H),), {}).gm
    return gm, *find_tmp_regions(gm, tp)


def _placement(r, target):
    return next(r.state.placement[n] for n in r.nodes if n.target is target)


def test_slices_of_a_fused_projection_are_interleaved_pieces():
    _, regions, declined = _regions(_slices)
    assert not declined and len(regions) == 1
    (r,) = regions
    assert r.state.pieces[r.columns[0]] == [H, H, H]


def test_overlapping_slices_decline_with_reason_op_and_source_line():
    _, regions, declined = _regions(_overlapping_slices)
    assert not regions and len(declined) == 1
    name, why = declined[0]
    assert "overlap" in why and "aten.slice.Tensor" in why and "test_rules.py" in why, why


def test_per_head_fused_view_shards_heads_contiguously():
    _, regions, declined = _regions(_per_head)
    assert not declined and len(regions) == 1
    (r,) = regions
    assert r.columns[0] not in r.state.pieces  # a contiguous block of the output dim is head-aligned
    assert _placement(r, torch.ops.aten.scaled_dot_product_attention.default) == 1  # heads


def test_stack_flatten_rotary_keeps_the_heads_dim():
    _, regions, declined = _regions(_stack_rotary)
    assert not declined and len(regions) == 1
    (r,) = regions
    assert _placement(r, torch.ops.aten.stack.default) == 2  # (B, S, NH, HD/2, 2): heads
    assert _placement(r, torch.ops.aten.flatten.using_ints) == 2


def test_complex_rotary_keeps_the_heads_dim():
    _, regions, declined = _regions(_complex_rotary)
    assert not declined and len(regions) == 1
    (r,) = regions
    assert _placement(r, torch.ops.aten.view_as_complex.default) == 2
    assert _placement(r, torch.ops.aten.view_as_real.default) == 2


def test_op_without_rule_is_declined_not_an_error():
    gm, regions, declined = _regions(_cumsum_heads)
    assert not regions and len(declined) == 1
    why = declined[0][1]
    assert "no sharding rule" in why and "aten.cumsum" in why and "test_rules.py" in why, why
    m = {"regions": regions, "all_regions": regions, "declined": declined}
    assert coverage(m)[:2] == (0, 1)
    assert coverage_message(m).startswith("0 of 1 blocks sharded")


def test_indivisible_heads_decline_the_region():
    _, regions, declined = _regions(_slices, tp=8)  # 4 heads over 8 ranks
    assert not regions and "not divisible by the TMP degree 8" in declined[0][1]


class _BmmExperts(nn.Module):
    """MoE experts as one 3-D parameter used by a bmm (as Hugging Face's grouped_mm experts): no
    column -> row pair of linears, so no rule covers it."""

    def __init__(self):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(2, H, 2 * H) * 0.1)
        self.w_out = nn.Parameter(torch.randn(2, 2 * H, H) * 0.1)

    def forward(self, x):
        h = torch.bmm(x.unsqueeze(0).expand(2, -1, -1), self.w_in).relu()
        return torch.bmm(h, self.w_out).sum(0)


def test_experts_of_3d_parameters_are_declined_not_silently_replicated():
    gm = capture(_BmmExperts(), (torch.randn(6, H),), {}).gm
    regions, declined = find_tmp_regions(gm, 2)
    assert not regions
    assert declined, "a weight-carrying matmul outside every region must be said"
    name, why = declined[0]
    assert "w_in" in why and "aten.bmm" in why and "no sharding rule" in why and ", line " in why, why


def test_hf_mixtral_experts_custom_op_traced_whole_and_sharded():
    # transformers' grouped_mm custom op (torch.library.custom_op + register_autograd) is kept whole by
    # torch.export, so it is no dropped autograd.Function; oases_fx.moe's rule shards its 3-D expert
    # weights (tests/unit/test_moe.py): 2 attention + 2 MoE regions, nothing declined.
    from tests import zoo

    m = zoo.build("mixtral")
    idx = torch.randint(0, 64, (2, 8))
    gm = capture(m, (), dict(input_ids=idx, labels=idx)).gm
    regions, declined = find_tmp_regions(gm, 2)
    assert len(regions) == 4 and not declined, (regions, declined)
    assert [r.row.target for r in regions if r.kind == "mlp"] == [torch.ops.transformers.grouped_mm_fallback.default] * 2
