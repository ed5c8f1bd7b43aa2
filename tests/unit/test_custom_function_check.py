"""The custom autograd.Function check of capture (oases_fx.tracing._backward_matches_forward):
torch.export keeps only a Function's forward, so a Function is kept only when its own backward
equals autograd of its forward. Each case below is a Function that either must pass (a memory- or
speed-motivated rewrite of the same math) or must be refused (a backward that is a different
gradient), so a checker that accepts everything or refuses everything fails here."""
import torch

from oases_fx.tracing import _backward_matches_forward


def _sig(*shapes, rg=True, dtype=torch.float32):
    return tuple(("tensor", s, dtype, rg) for s in shapes), {}


class _SquareSaved(torch.autograd.Function):  # backward equals autograd of the forward
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        x, = ctx.saved_tensors
        return 2 * x * g


class _StraightThrough(torch.autograd.Function):  # round() forward, identity backward: a different gradient
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


class _Scaled(torch.autograd.Function):  # two inputs, a non-tensor argument, tuple output
    @staticmethod
    def forward(ctx, x, w, scale):
        ctx.save_for_backward(x, w)
        ctx.scale = scale
        return x * w * scale, x + w

    @staticmethod
    def backward(ctx, g1, g2):
        x, w = ctx.saved_tensors
        return g1 * w * ctx.scale + g2, g1 * x * ctx.scale + g2, None


class _ScaledWrongSecondInput(_Scaled):
    @staticmethod
    def backward(ctx, g1, g2):
        x, w = ctx.saved_tensors
        return g1 * w * ctx.scale + g2, g1 * x * ctx.scale, None  # drops g2 for w


class _NewStyle(torch.autograd.Function):  # forward without ctx + setup_context
    @staticmethod
    def forward(x):
        return torch.sin(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        x, = ctx.saved_tensors
        return torch.cos(x) * g


class _InPlace(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.mark_dirty(x)
        return x.mul_(2)

    @staticmethod
    def backward(ctx, g):
        return g * 2


class _Dropout(torch.autograd.Function):  # draws from the RNG: two runs differ, so it cannot be checked equal
    @staticmethod
    def forward(ctx, x):
        mask = (torch.rand_like(x) > 0.5).to(x.dtype)
        ctx.save_for_backward(mask)
        return x * mask * 2

    @staticmethod
    def backward(ctx, g):
        mask, = ctx.saved_tensors
        return g * mask * 2


def test_equal_backward_is_accepted():
    reason, checked = _backward_matches_forward(_SquareSaved, _sig((3, 5)))
    assert reason is None and "float64 inputs of shape (3, 5)" in checked


def test_different_backward_is_refused_with_the_difference():
    reason, _ = _backward_matches_forward(_StraightThrough, _sig((3, 5)))
    assert reason is not None and "differs from autograd of its forward" in reason


def test_two_inputs_tuple_output_and_a_constant():
    args = (("tensor", (4, 6), torch.float32, True), ("tensor", (6,), torch.float32, True), 0.5)
    assert _backward_matches_forward(_Scaled, (args, {}))[0] is None
    assert "differs" in _backward_matches_forward(_ScaledWrongSecondInput, (args, {}))[0]


def test_new_style_function_with_setup_context():
    assert _backward_matches_forward(_NewStyle, _sig((2, 3)))[0] is None


def test_in_place_forward_is_refused():
    reason, _ = _backward_matches_forward(_InPlace, _sig((2, 3)))
    assert reason is not None and ("in place" in reason or "in-place" in reason), reason


def test_random_forward_is_refused_and_the_users_rng_is_untouched():
    torch.manual_seed(7)
    want = torch.rand(3)
    torch.manual_seed(7)
    reason, _ = _backward_matches_forward(_Dropout, _sig((8, 8)))
    assert reason is not None
    assert torch.equal(torch.rand(3), want)  # the check forked the RNG


def test_large_inputs_are_narrowed_consistently():
    args = (("tensor", (64, 512, 32), torch.float32, True), ("tensor", (32,), torch.float32, True), 2.0)
    reason, checked = _backward_matches_forward(_Scaled, (args, {}))
    assert reason is None and "(2, 2, 32)" in checked


def test_no_input_requiring_grad_needs_no_check():
    reason, checked = _backward_matches_forward(_StraightThrough, _sig((3, 5), rg=False))
    assert reason is None and "never runs" in checked
