"""LSQ fake quantizer (paper sec. 2.1): forward grid, gradients, gradient scale, MSE init, bits.

References are independent of the implementation: a nearest-level search for the forward pass,
hand-worked examples and central finite differences (float64) for the gradients, and a
brute-force search over a much finer grid of scales for the MSE range initialisation.
"""

import copy
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from support.references import (
    lsq_autograd,
    lsq_gradient_scale,
    lsq_n,
    mse_brute_force,
    round_half_even,
)
from torch import nn

from domainbed_gaqat.quant.config import QuantConfig, integer_range
from domainbed_gaqat.quant.lsq import LSQFunction, lsq_quantize
from domainbed_gaqat.quant.modules import (
    LSQQuantizer,
    QuantConv2d,
    check_initialization,
    quantization_disabled,
    set_quantization,
)
from domainbed_gaqat.quant.range_init import lsq_init_scale, mse_scale

BITS = list(range(2, 9))
KINDS = {  # name -> (signed, is_weight); the stem's input is a signed activation
    "weight": (True, True),
    "activation": (False, False),
    "stem_input": (True, False),
}


def _levels(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range written from the spec, independently of :func:`grid`."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _away_from(x: torch.Tensor, points: list[float], margin: float) -> torch.Tensor:
    """Mask of the entries of ``x`` at least ``margin`` away from every value in ``points``."""
    keep = torch.ones_like(x, dtype=torch.bool)
    for p in points:
        keep &= (x - p).abs() > margin
    return keep


def _grid_points(bits: int, signed: bool, s: float, n: int, seed: int) -> torch.Tensor:
    """float64 values ``v = s * x`` with ``x`` spread over and beyond ``[l, u]``, none of them
    near a rounding boundary (half-integer) or a clipping end, so finite differences are clean."""
    lo, hi = _levels(bits, signed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(4 * n, generator=gen, dtype=torch.float64) * (hi - lo + 6) + (lo - 3)
    frac = x - torch.floor(x)
    keep = ((frac - 0.5).abs() > 0.05) & _away_from(x, [lo, hi], 0.05)
    x = x[keep][:n]
    assert len(x) == n
    return x * s


# --- bits ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed", [True, False])
def test_grid_has_2_pow_bits_levels(bits: int, signed: bool) -> None:
    lower, upper = integer_range(bits, signed)
    assert (lower, upper) == _levels(bits, signed)
    assert upper - lower + 1 == 2**bits
    assert (lower == -(upper + 1)) if signed else (lower == 0)


@pytest.mark.parametrize("bits", [0, 1, 9, 16, -4, 4.0, "4", True, None])
def test_bits_outside_2_to_8_raise(bits) -> None:
    with pytest.raises(ValueError, match=r"2\.\.8"):
        integer_range(bits, signed=True)
    with pytest.raises(ValueError, match=r"2\.\.8"):
        LSQQuantizer(QuantConfig(bits, False), is_weight=False)


# --- forward ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_forward_is_nearest_level_and_clipped(bits: int, kind: str) -> None:
    signed, is_weight = KINDS[kind]
    lo, hi = _levels(bits, signed)
    s = 0.037
    quantizer = LSQQuantizer(QuantConfig(bits, signed), is_weight=is_weight)
    quantizer.load_state_dict({"scale": torch.tensor(s), "initialized": torch.tensor(True)})

    v = _grid_points(bits, signed, s, 2000, seed=bits).float()
    q = quantizer(v).detach().double()
    levels = torch.arange(lo, hi + 1, dtype=torch.float64) * torch.tensor(s).double()
    nearest = levels[(v.double()[:, None] - levels[None, :]).abs().argmin(dim=1)]
    torch.testing.assert_close(q, nearest, rtol=0, atol=1e-6)

    codes = q / quantizer.scale.item()
    assert torch.allclose(codes, codes.round(), atol=1e-4)  # on the integer grid times s
    assert codes.min().round() == lo and codes.max().round() == hi  # both clip ends reached
    below, above = v < lo * s, v > hi * s
    assert below.any() and above.any()
    torch.testing.assert_close(q[below], torch.full_like(q[below], lo * s), rtol=0, atol=1e-6)
    torch.testing.assert_close(q[above], torch.full_like(q[above], hi * s), rtol=0, atol=1e-6)


def test_forward_hand_worked_examples() -> None:
    s = torch.tensor(1.0)
    v = torch.tensor([-3.0, -1.2, -0.4, 0.6, 2.4])
    # 2-bit signed grid {-2, -1, 0, 1}: the stem keeps negative pixels
    signed = integer_range(2, signed=True)
    assert lsq_quantize(v, s, *signed).tolist() == [-2.0, -1.0, 0.0, 1.0, 1.0]
    # 2-bit unsigned grid {0, 1, 2, 3}: every negative input becomes 0
    assert lsq_quantize(v, s, *integer_range(2, signed=False)).tolist() == [0.0, 0.0, 0.0, 1.0, 2.0]


@pytest.mark.parametrize("bits", BITS)
def test_signed_activation_grid_keeps_negative_inputs(bits: int) -> None:
    """The stem's input is a normalised image: a signed grid keeps its negative half."""
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(bits))
    stem = LSQQuantizer(QuantConfig(bits, True), is_weight=False)
    relu_input = LSQQuantizer(QuantConfig(bits, False), is_weight=False)
    qs, qu = stem(x).detach(), relu_input(x).detach()
    assert (qs[x < -float(stem.scale)] < 0).all()
    assert (qu[x < 0] == 0).all()
    assert (qs - x).pow(2).mean() < (qu - x).pow(2).mean()


# --- gradients -------------------------------------------------------------------------------


def _grads(v: torch.Tensor, s: torch.Tensor, lower: int, upper: int, go: torch.Tensor,
           grad_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    v = v.clone().requires_grad_(True)
    s = s.clone().requires_grad_(True)
    (LSQFunction.apply(v, s, lower, upper, grad_scale) * go).sum().backward()
    return v.grad, s.grad


@pytest.mark.parametrize("signed, s, v, go, grad_v, grad_s", [
    # 2-bit unsigned, l=0, u=3, s=0.5: x = v/s = [-0.6, 0.4, 1.48, 3.2, 4.2]
    # dq/dv = [0, 1, 1, 0, 0]; dq/ds = [l, round(x)-x, round(x)-x, u, u]
    #                                = [0, -0.4, -0.48, 3, 3]
    # dL/ds = 1*0 + 2*(-0.4) + 3*(-0.48) + 4*3 + 5*3 = 24.76
    (False, 0.5, [-0.3, 0.2, 0.74, 1.6, 2.1], [1.0, 2.0, 3.0, 4.0, 5.0],
     [0.0, 2.0, 3.0, 0.0, 0.0], 24.76),
    # 3-bit signed, l=-4, u=3, s=0.25: x = [-5.2, -2.44, 0.4, 2.8, 3.8]
    # dq/ds = [-4, -2+2.44, 0-0.4, 3-2.8, 3] = [-4, 0.44, -0.4, 0.2, 3]
    # dL/ds = 0.5*(-4) - 1*0.44 + 2*(-0.4) + 1*0.2 - 3*3 = -12.04
    (True, 0.25, [-1.3, -0.61, 0.1, 0.7, 0.95], [0.5, -1.0, 2.0, 1.0, -3.0],
     [0.0, -1.0, 2.0, 1.0, 0.0], -12.04),
])
def test_gradients_hand_worked(signed, s, v, go, grad_v, grad_s) -> None:
    bits = 3 if signed else 2
    gv, gs = _grads(torch.tensor(v, dtype=torch.float64), torch.tensor(s, dtype=torch.float64),
                    *integer_range(bits, signed), torch.tensor(go, dtype=torch.float64))
    torch.testing.assert_close(gv, torch.tensor(grad_v, dtype=torch.float64))
    assert gs.shape == ()
    assert gs.item() == pytest.approx(grad_s, abs=1e-12)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed", [True, False])
def test_gradients_match_finite_differences(bits: int, signed: bool) -> None:
    """Central differences in float64, at points away from rounding and clipping boundaries.

    1. LSQ's STE gradient is the exact gradient of ``s * (clamp(v/s, l, u) + c)`` with the
       rounding residual ``c = clamp(round(x0)) - clamp(x0)`` held constant: both ``dL/dv`` and
       ``dL/ds`` must match its finite differences.
    2. The true quantizer is piecewise linear in ``s`` there, and LSQ's ``dL/ds`` differs from
       its finite difference only by the straight-through term ``-x`` inside the range.
    """
    lower, upper = _levels(bits, signed)
    s0 = 0.013
    v0 = _grid_points(bits, signed, s0, 600, seed=100 + bits)
    go = torch.randn(len(v0), generator=torch.Generator().manual_seed(bits), dtype=torch.float64)
    s = torch.tensor(s0, dtype=torch.float64)
    gv, gs = _grads(v0, s, lower, upper, go)

    x0 = v0 / s0
    c = x0.round().clamp(lower, upper) - x0.clamp(lower, upper)

    def ste_surrogate(v: torch.Tensor, scale: float) -> torch.Tensor:
        return scale * ((v / scale).clamp(lower, upper) + c)

    h_v = 1e-5 * s0
    fd_v = (ste_surrogate(v0 + h_v, s0) - ste_surrogate(v0 - h_v, s0)) / (2 * h_v) * go
    torch.testing.assert_close(gv, fd_v, rtol=1e-6, atol=1e-8)

    h_s = 1e-5 * s0
    fd_s = ((ste_surrogate(v0, s0 + h_s) * go).sum()
            - (ste_surrogate(v0, s0 - h_s) * go).sum()) / (2 * h_s)
    assert gs.item() == pytest.approx(fd_s.item(), rel=1e-7, abs=1e-5)

    def true_loss(scale: float) -> float:
        return (lsq_quantize(v0, torch.tensor(scale, dtype=torch.float64), lower, upper)
                * go).sum().item()

    fd_true = (true_loss(s0 + h_s) - true_loss(s0 - h_s)) / (2 * h_s)
    inside = (x0 >= lower) & (x0 <= upper)
    assert gs.item() == pytest.approx(fd_true - (go * x0 * inside).sum().item(), rel=1e-7,
                                      abs=1e-5)


def test_grad_scale_multiplies_only_the_scale_gradient() -> None:
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(200, generator=gen, dtype=torch.float64)
    go = torch.randn(200, generator=gen, dtype=torch.float64)
    s = torch.tensor(0.1, dtype=torch.float64)
    gv1, gs1 = _grads(v, s, -8, 7, go, grad_scale=1.0)
    gv2, gs2 = _grads(v, s, -8, 7, go, grad_scale=0.37)
    torch.testing.assert_close(gv2, gv1)
    assert gs2.item() == pytest.approx(0.37 * gs1.item(), rel=1e-12)


@pytest.mark.parametrize("is_weight, shapes", [
    (True, [(16, 8, 3, 3)]),
    (False, [(2, 8, 5, 5), (7, 8, 5, 5)]),  # per-example count: independent of the batch size
])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_lsq_gradient_scale_option(is_weight: bool, shapes: list, bits: int) -> None:
    """On: ``g = 1 / sqrt(N * u)``, ``N`` = numel (weights) or features per example
    (activations). Off: ``g = 1``. Checked on the scale's actual gradient."""
    signed = is_weight
    upper = _levels(bits, signed)[1]
    for shape in shapes:
        gen = torch.Generator().manual_seed(len(shape) + shape[0])
        v = torch.randn(shape, generator=gen)
        if not signed:
            v = v.relu()
        go = torch.randn(shape, generator=gen)
        n = math.prod(shape) if is_weight else math.prod(shape[1:])
        expected_g = 1.0 / math.sqrt(n * upper)

        grads = {}
        for option in (True, False):
            config = QuantConfig(bits, signed, grad_scale=option)
            quantizer = LSQQuantizer(config, is_weight=is_weight)
            assert quantizer.grad_scale(v) == pytest.approx(expected_g if option else 1.0)
            vv = v.clone().requires_grad_(True)
            (quantizer(vv) * go).sum().backward()
            grads[option] = (vv.grad, quantizer.scale.grad.item())
        torch.testing.assert_close(grads[True][0], grads[False][0])
        assert grads[False][1] != 0
        assert grads[True][1] == pytest.approx(expected_g * grads[False][1], rel=1e-5)


# --- MSE range initialisation ----------------------------------------------------------------


def _mse(v: torch.Tensor, s: torch.Tensor, lower: int, upper: int) -> torch.Tensor:
    """Mean squared quantization error for each scale in ``s`` (1-d)."""
    x = v[None, :] / s[:, None]
    return (x.round().clamp(lower, upper) * s[:, None] - v[None, :]).pow(2).mean(dim=1)


def _sample(signed: bool, magnitude: float, n: int = 2048) -> torch.Tensor:
    """Stratified standard-normal sample (the ``(i + 0.5) / n`` quantiles), scaled; its ReLU for
    unsigned grids. Evenly spread values keep the MSE-vs-scale curve free of sampling noise."""
    p = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    v = math.sqrt(2) * torch.erfinv(2 * p - 1)
    return magnitude * (v if signed else v.relu())


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed", [True, False])
def test_mse_scale_matches_brute_force(bits: int, signed: bool) -> None:
    """Conv-weight-sized (signed, std 0.02) and post-ReLU (unsigned) tensors: the chosen scale's
    MSE is within 3% (its grid's resolution is 1% of the range) of the best of 625 scales
    spanning 0..125% of the tensor's range."""
    lower, upper = _levels(bits, signed)
    v = _sample(signed, 0.02 if signed else 3.0)
    s = mse_scale(v, lower, upper).double()
    top = v.abs().max() if signed else v.max()
    fine = torch.linspace(0, 1.25, 626, dtype=torch.float64)[1:] * top / upper
    best = _mse(v, fine, lower, upper).min()
    got = _mse(v, s.reshape(1), lower, upper)[0]
    assert got <= 1.03 * best, (got / best).item()
    if bits <= 3:  # min-max calibration is clearly worse here: the test can tell them apart
        assert got < 0.7 * _mse(v, (top / upper).reshape(1), lower, upper)[0]


@pytest.mark.parametrize("magnitude", [1e-4, 1.0, 1e3])
def test_mse_scale_grid_is_relative_to_the_tensor(magnitude: float) -> None:
    v = _sample(True, 1.0)
    base = mse_scale(v, -8, 7)
    assert mse_scale(magnitude * v, -8, 7).item() == pytest.approx(magnitude * base.item(),
                                                                    rel=1e-5)


def test_mse_scale_degenerate_inputs() -> None:
    """All zero: scale 1. An inf/nan value (-inf below an unsigned grid too): a NaN scale, the
    marker the quantizer's check reads (no host sync in the range initialisation); per channel,
    only that channel's."""
    assert mse_scale(torch.zeros(10), -8, 7).item() == 1.0
    assert mse_scale(-torch.rand(10), 0, 15).item() == 1.0  # nothing above zero to quantize
    for bad in (float("nan"), float("inf"), -float("inf")):
        for lower, upper in ((-8, 7), (0, 15)):
            assert mse_scale(torch.tensor([1.0, bad]), lower, upper).isnan()
        assert lsq_init_scale(torch.tensor([1.0, bad]), 7).isnan()
        rows = torch.tensor([[1.0, 2.0], [1.0, bad]])
        for init in (lambda v: mse_scale(v, -8, 7, channel_axis=0),
                     lambda v: lsq_init_scale(v, 7, channel_axis=0)):
            scales = init(rows).flatten()
            assert scales[0].isfinite() and scales[0] > 0 and scales[1].isnan()


@pytest.mark.parametrize("is_weight", [True, False])
def test_quantizer_refuses_to_initialise_from_non_finite_values(is_weight: bool) -> None:
    """On the CPU the forward that initialises raises at once; a quantizer's check reports
    once; :func:`check_initialization` names the quantizers (what a training step calls where
    the device answers later)."""
    message = "^cannot initialise a quantizer scale from a tensor with inf/nan values$"
    q = LSQQuantizer(QuantConfig(4, True), is_weight=is_weight)
    with pytest.raises(ValueError, match=message):
        q(torch.tensor([1.0, float("nan")]))
    assert not q.initialization_failed(wait=True)  # reported once
    ok, bad = (LSQQuantizer(QuantConfig(4, True), is_weight=is_weight) for _ in range(2))
    with torch.no_grad():
        ok.initialize(torch.tensor([1.0, -2.0]))
        bad.initialize(torch.tensor([1.0, float("inf")]))
    with pytest.raises(ValueError, match=message[:-1] + ": layer1.w_quant$"):
        check_initialization([("layer0.w_quant", ok), ("layer1.w_quant", bad)])
    check_initialization([("layer0.w_quant", ok), ("layer1.w_quant", bad)])  # read already


@pytest.mark.parametrize("best_k", [1, 100])
def test_mse_scale_tries_both_ends_of_its_candidates(best_k: int) -> None:
    """Where the finest candidate (1% of the range) or the full range is the only error-free
    or least-error one, it is chosen: a tensor on the full-range grid of a 2-bit signed
    quantizer, and 10^5 values on the finest grid plus one outlier (clipping the outlier
    costs less than rounding them all to zero)."""
    m, upper = 3.0, 1
    if best_k == 100:
        v = torch.tensor([-1.0, 0.0, 1.0, 1.0] * 50) * (m / upper)  # codes within [-u, u]
    else:
        fine = m / (100 * upper)
        v = torch.cat([torch.tensor([fine, -fine] * 50000), torch.tensor([m])])
    candidates, errors = mse_brute_force(v.double().numpy(), -2, 1)
    assert errors.argmin() == best_k - 1
    assert mse_scale(v, -2, 1).item() == pytest.approx(candidates[best_k - 1], rel=1e-6)


def test_quantizer_initialises_once_from_its_first_input() -> None:
    """Weights calibrate from the weights, activations from the first batch only; the flag is a
    buffer, so a restored quantizer does not re-calibrate."""
    gen = torch.Generator().manual_seed(3)
    first = torch.randn(8, 16, 5, 5, generator=gen).relu()
    second = 10 * torch.randn(8, 16, 5, 5, generator=gen).relu()
    quantizer = LSQQuantizer(QuantConfig(4, False), is_weight=False)
    assert isinstance(quantizer.scale, torch.nn.Parameter)
    assert not bool(quantizer.initialized)
    quantizer(first)
    assert bool(quantizer.initialized)
    candidates, errors = mse_brute_force(first.double().numpy(), 0, 15)
    calibrated = quantizer.scale.item()
    assert calibrated == pytest.approx(candidates[errors.argmin()], rel=1e-6)
    quantizer(second)
    assert quantizer.scale.item() == calibrated

    restored = LSQQuantizer(QuantConfig(4, False), is_weight=False)
    restored.load_state_dict(quantizer.state_dict(), strict=True)
    restored(second)
    assert restored.scale.item() == quantizer.scale.item()


# --- the modules ---------------------------------------------------------------------------


def _set(q: LSQQuantizer, scale) -> None:
    q.load_state_dict({"scale": torch.as_tensor(scale, dtype=q.scale.dtype),
                       "initialized": torch.tensor(True), "enabled": torch.tensor(True)})


@pytest.mark.parametrize("weight, activation", [
    ("tensor", "unsigned"), ("channel", "unsigned"), (None, "signed"), ("tensor", None)])
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_quant_conv_is_conv_of_the_quantized_tensors(weight, activation, padding_mode) -> None:
    """``QuantConv2d`` = the conv (stride, padding, its mode, dilation, groups, bias, dtype
    kept) of the LSQ-quantized input and weight (:func:`references.lsq_autograd`), with LSQ's
    gradient scales (N: one channel's or all weights; one example's features); either
    quantizer may be absent (the stem's weight, full precision)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2, bias=True,
                     padding_mode=padding_mode).double()
    w_config = weight and QuantConfig(3, True, granularity=weight)
    a_config = activation and QuantConfig(4, activation == "signed")
    qconv = QuantConv2d(conv, w_config, a_config)
    assert qconv.weight.dtype == torch.float64 and torch.equal(qconv.bias, conv.bias)
    assert (qconv.w_quant is None) == (weight is None)
    assert (qconv.a_quant is None) == (activation is None)
    # dyadic scales: the same in the quantizer's float32 scale and the float64 reference
    w_scale = torch.arange(8, 14) / 128 if weight == "channel" else 0.0625
    if weight:
        _set(qconv.w_quant, w_scale)
    if activation:
        _set(qconv.a_quant, 0.25)
    x = torch.randn(3, 4, 7, 7, dtype=torch.float64)
    x_ref, x_got = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = qconv(x_got)
    out.backward(torch.ones_like(out))

    ref = copy.deepcopy(conv)
    scales = {}
    w, inp = ref.weight, x_ref
    if weight:
        scales["w"] = torch.as_tensor(w_scale, dtype=torch.float64).clone().requires_grad_()
        lower, upper = integer_range(3, True)
        g = lsq_gradient_scale(lsq_n(tuple(w.shape), True, weight == "channel"), upper)
        s = scales["w"].view(-1, 1, 1, 1) if weight == "channel" else scales["w"]
        w = lsq_autograd(w, s, lower, upper, g)
    if activation:
        scales["a"] = torch.tensor(0.25, dtype=torch.float64, requires_grad=True)
        lower, upper = integer_range(4, activation == "signed")
        g = lsq_gradient_scale(lsq_n(tuple(x.shape), False), upper)
        inp = lsq_autograd(inp, scales["a"], lower, upper, g)
    want = ref._conv_forward(inp, w, ref.bias)
    want.backward(torch.ones_like(want))
    assert torch.equal(out, want)
    assert torch.equal(x_got.grad, x_ref.grad)
    torch.testing.assert_close(qconv.weight.grad, ref.weight.grad)
    torch.testing.assert_close(qconv.bias.grad, ref.bias.grad)
    for key, q in (("w", qconv.w_quant), ("a", qconv.a_quant)):
        if key in scales:
            assert q.scale.grad.shape == scales[key].shape
            # the scale is a float32 Parameter: its gradient is stored in float32
            torch.testing.assert_close(q.scale.grad.double(), scales[key].grad, rtol=1e-6,
                                       atol=1e-9)


def test_integer_codes_and_switching_quantization_off() -> None:
    """``integers`` are ``clamp(round(v / s), l, u)`` (per channel too); switched off, a
    quantizer is the identity, and ``quantization_disabled`` restores each one's state."""
    q = LSQQuantizer(QuantConfig(3, True, granularity="channel"), is_weight=True, channels=2)
    _set(q, [0.5, 0.25])
    v = torch.tensor([[-3.0, -0.75, 0.25, 1.4], [0.375, -0.625, 2.0, -0.2]])
    s = np.array([[0.5], [0.25]])
    np.testing.assert_array_equal(q.integers(v).detach().numpy(),
                                  np.clip(round_half_even(v.double().numpy() / s), -4, 3))
    model = nn.Sequential(q, LSQQuantizer(QuantConfig(2, False), is_weight=False))
    model[1].set_enabled(False)
    with quantization_disabled(model):
        assert torch.equal(model(v), v) and not q._enabled
    assert q._enabled and bool(q.enabled) and not model[1]._enabled
    set_quantization(model, True)
    assert all(bool(m.enabled) and m._enabled for m in model)
    set_quantization(model, False)
    assert torch.equal(model(v), v) and not any(bool(m.enabled) for m in model)


def test_quantizer_repr_and_checks() -> None:
    q = LSQQuantizer(QuantConfig(4, True), is_weight=True)
    assert "(weight, bits=4, grid=[-8, 7], per tensor)" in repr(q)
    a = LSQQuantizer(QuantConfig(2, False), is_weight=False)
    assert "(activation, bits=2, grid=[0, 3], per tensor)" in repr(a)
    channel = QuantConfig(4, True, granularity="channel")
    message = "^per-channel scales are for weights and need their number of output channels"
    for is_weight, channels in ((True, 0), (False, 4), (True, None), (True, 2.0)):
        with pytest.raises(ValueError, match=message):
            LSQQuantizer(channel, is_weight=is_weight, channels=channels)
    assert LSQQuantizer(channel, is_weight=True, channels=3).scale.shape == (3,)


def test_version_1_state_dicts_load_enabled() -> None:
    """domainbed-gaqat 0.1 saved no ``enabled`` buffer (version 1): it loads as enabled; a
    version-2 state without it is a missing key; a saved ``enabled`` is kept."""
    q = LSQQuantizer(QuantConfig(4, False, enabled=False), is_weight=False)
    old = OrderedDict(scale=torch.tensor(0.5), initialized=torch.tensor(True))
    old._metadata = {"": {"version": 1}}
    q.load_state_dict(old, strict=True)
    assert bool(q.enabled) and q._enabled and q.scale.item() == 0.5
    kept = OrderedDict(scale=torch.tensor(0.5), initialized=torch.tensor(True),
                       enabled=torch.tensor(False))
    kept._metadata = {"": {"version": 1}}
    q.load_state_dict(kept, strict=True)
    assert not bool(q.enabled) and not q._enabled
    new = OrderedDict(scale=torch.tensor(0.5), initialized=torch.tensor(True))
    new._metadata = {"": {"version": 2}}
    with pytest.raises(RuntimeError, match="enabled"):
        q.load_state_dict(new, strict=True)


def test_quant_config_checks_name_the_field() -> None:
    cases = [({"granularity": "row"}, r"granularity 'row': expected one of \('tensor', "
                                      r"'channel'\)"),
             ({"range_init": "max"}, r"range_init 'max': expected one of \('mse', 'lsq_mean'\)"),
             ({"grad_scale_n": "channel"}, r"grad_scale_n 'channel': expected one of "
                                           r"\('scale', 'tensor'\)"),
             ({"signed": 1}, "signed 1: expected True or False"),
             ({"grad_scale": "yes"}, "grad_scale 'yes': expected True or False"),
             ({"enabled": None}, "enabled None: expected True or False")]
    for change, message in cases:
        with pytest.raises(ValueError, match=f"^{message}$"):
            QuantConfig(**{"bits": 4, "signed": True, **change})


def test_state_dict_format() -> None:
    """What a checkpoint holds: the float32 scale (a Parameter, shape () or (C,)) and the
    ``initialized`` / ``enabled`` flags as bool buffers."""
    q = LSQQuantizer(QuantConfig(4, True, granularity="channel"), is_weight=True, channels=5)
    state = q.state_dict()
    assert list(state) == ["scale", "initialized", "enabled"]
    assert state["scale"].dtype == torch.float32 and state["scale"].shape == (5,)
    assert state["initialized"].dtype == state["enabled"].dtype == torch.bool
    assert isinstance(q.scale, nn.Parameter)


def test_lsq_quantize_defaults_to_no_gradient_scale() -> None:
    v = torch.tensor([0.3, -0.7, 2.2], requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    lsq_quantize(v, s, -2, 1).sum().backward()
    # x = [0.6, -1.4, 4.4]: round(x) - x = 0.4, 0.4 inside; u = 1 above
    assert s.grad.item() == pytest.approx(0.4 + 0.4 + 1.0)
