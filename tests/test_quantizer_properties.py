"""Property tests of the LSQ quantizer against :mod:`references` (hypothesis).

Random shapes, bit-widths 2..8, weights (signed; per tensor and per output channel), activations
(unsigned) and the stem's signed activation, asymmetric value ranges, and values planted exactly
on rounding ties (``v / s = k + 1/2``) and on the clip bounds (``v / s = l`` or ``u``): scales
are dyadic (``m * 2^-e``), so those quotients are exact in float32. Checked: forward values
(bit for bit), ``dL/dv`` (exactly), ``dL/ds`` (to summation-order rounding) and the gradient
scale's ``N`` (LSQ sec. 2.2); MSE range initialisation equal to a brute force over the same
candidate set, per tensor and per channel; LSQ's own initialisation.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from support.references import (
    integer_grid,
    lsq_forward,
    lsq_gradient_scale,
    lsq_grads,
    lsq_n,
    mse_brute_force,
)

from domainbed_gaqat.quant.config import QuantConfig
from domainbed_gaqat.quant.lsq import lsq_quantize
from domainbed_gaqat.quant.modules import LSQQuantizer
from domainbed_gaqat.quant.range_init import lsq_init_scale, mse_scale

SETTINGS = settings(max_examples=100, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
KINDS = {  # name -> (signed, is_weight); the stem's input is a signed activation
    "weight": (True, True),
    "activation": (False, False),
    "stem_input": (True, False),
}
EPS = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}


@st.composite
def cases(draw) -> dict:
    """A quantizer, its scale(s) and an input with ties, bounds and out-of-range values."""
    bits = draw(st.integers(2, 8))
    kind = draw(st.sampled_from(sorted(KINDS)))
    signed, is_weight = KINDS[kind]
    per_channel = is_weight and draw(st.booleans())
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=2, max_size=4)))
    lower, upper = integer_grid(bits, signed)
    n_scales = shape[0] if per_channel else 1
    scales = [draw(st.integers(1, 15)) * 2.0 ** -draw(st.integers(0, 10))
              for _ in range(n_scales)]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    numel = math.prod(shape)
    # asymmetric range of the non-planted values: each end anywhere from inside to beyond
    lo = lower - 3 + rng.uniform(0, 0.8) * (upper - lower + 3)
    hi = upper + 3 - rng.uniform(0, 0.8) * (upper + 3 - lo)
    codes = rng.uniform(lo, hi, numel)
    integer = rng.integers(lower - 2, upper + 3, numel)
    planted = rng.choice(4, numel, p=draw(st.sampled_from([(0.25,) * 4, (0.7, 0.1, 0.1, 0.1)])))
    codes = np.where(planted == 1, integer, codes)  # on the grid (and beyond it)
    codes = np.where(planted == 2, integer + 0.5, codes)  # rounding ties
    codes = np.where(planted == 3, rng.choice([lower, upper], numel), codes)  # the bounds
    s = np.array(scales).reshape(-1, *[1] * (len(shape) - 1))
    return {"bits": bits, "kind": kind, "signed": signed, "is_weight": is_weight,
            "per_channel": per_channel, "shape": shape, "scales": scales, "lower": lower,
            "upper": upper, "v": (codes.reshape(shape) * s),
            "grad_out": rng.standard_normal(shape).round(3),
            "dtype": draw(st.sampled_from([torch.float32, torch.float64])),
            "grad_scale": draw(st.booleans())}


def quantizer_of(case: dict) -> LSQQuantizer:
    config = QuantConfig(case["bits"], case["signed"], grad_scale=case["grad_scale"],
                         granularity="channel" if case["per_channel"] else "tensor")
    q = LSQQuantizer(config, is_weight=case["is_weight"],
                     channels=case["shape"][0] if case["per_channel"] else None)
    scale = torch.tensor(case["scales"] if case["per_channel"] else case["scales"][0])
    q.load_state_dict({"scale": scale, "initialized": torch.tensor(True),
                       "enabled": torch.tensor(True)})
    return q


def _assert_scale_grad(got: torch.Tensor, want: np.ndarray, case: dict, g: float,
                       dtype: torch.dtype) -> None:
    """``dL/ds`` sums ``n`` terms ``g * dL/dq * dq/ds``, ``|dq/ds| <= max(-l, u)``: another
    summation order changes it by at most ``n * eps * g * max(-l, u) * sum|dL/dq|``; it is
    then stored in the scale's float32 (half an ulp)."""
    grad_out = case["grad_out"]
    bound = grad_out.size * EPS[dtype] * g * max(-case["lower"], case["upper"]) * np.abs(
        grad_out).sum() + EPS[torch.float32] * np.abs(want)
    error = np.abs(got.double().numpy().reshape(want.shape) - want)
    assert (error <= bound).all(), (error, bound)


@SETTINGS
@given(cases())
@example({"bits": 4, "kind": "stem_input", "signed": True, "is_weight": False,
          "per_channel": False, "shape": (3, 2, 2), "scales": [0.25], "lower": -8, "upper": 7,
          "v": np.array([-8.0, -8.5, -2.5, -0.5, 0.5, 1.5, 7.0, 7.5, 9.0, 6.9, -7.9, 3.25]
                        ).reshape(3, 2, 2) * 0.25,
          "grad_out": np.linspace(-1, 1, 12).reshape(3, 2, 2), "dtype": torch.float32,
          "grad_scale": True})
def test_quantizer_matches_lsq_reference(case: dict) -> None:
    """``LSQQuantizer`` forward / backward and its gradient scale vs LSQ eq. 1-3, sec. 2.2."""
    dtype = case["dtype"]
    q = quantizer_of(case)
    v = torch.tensor(case["v"], dtype=dtype, requires_grad=True)
    grad_out = torch.tensor(case["grad_out"], dtype=dtype)
    out = q(v)
    out.backward(grad_out)

    v64 = v.detach().double().numpy()  # the values as the quantizer saw them
    s = q.scale.detach().double().numpy().reshape(-1, *[1] * (v.dim() - 1))
    n = lsq_n(case["shape"], case["is_weight"], case["per_channel"])
    g = lsq_gradient_scale(n, case["upper"]) if case["grad_scale"] else 1.0
    assert q.grad_scale(v) == pytest.approx(g, rel=1e-12)
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    want = lsq_forward(v64, s, case["lower"], case["upper"], np_dtype)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out.detach().numpy(), want)
    axis = 0 if case["per_channel"] else None
    grad_v, grad_s = lsq_grads(v64, s, case["lower"], case["upper"], grad_out.double().numpy(),
                               g, axis, np_dtype)
    np.testing.assert_array_equal(v.grad.double().numpy(), grad_v)
    assert q.scale.grad.shape == q.scale.shape
    _assert_scale_grad(q.scale.grad, grad_s, case, g, dtype)


@SETTINGS
@given(cases())
def test_lsq_quantize_float64_gradients_are_the_reference(case: dict) -> None:
    """The functional form in float64 with a broadcast scale: both gradients to 1e-12."""
    s64 = np.array(case["scales"]).reshape(-1, *[1] * (len(case["shape"]) - 1))
    v = torch.tensor(case["v"], requires_grad=True)
    scale = torch.tensor(s64 if case["per_channel"] else case["scales"][0], dtype=torch.float64,
                         requires_grad=True)
    g = 0.37 if case["grad_scale"] else 1.0
    out = lsq_quantize(v, scale, case["lower"], case["upper"], g)
    out.backward(torch.tensor(case["grad_out"]))
    np.testing.assert_array_equal(out.detach().numpy(),
                                  lsq_forward(case["v"], s64, case["lower"], case["upper"]))
    grad_v, grad_s = lsq_grads(case["v"], s64, case["lower"], case["upper"], case["grad_out"],
                               g, 0 if case["per_channel"] else None)
    np.testing.assert_array_equal(v.grad.numpy(), grad_v)
    np.testing.assert_allclose(scale.grad.numpy().reshape(grad_s.shape), grad_s, rtol=1e-12,
                               atol=1e-12 * np.abs(case["grad_out"]).sum() * 300)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("batch", [1, 3])
def test_gradient_scale_n_is_per_example_for_every_activation(kind: str, batch: int) -> None:
    """LSQ sec. 2.2: N is the number of weights, or of features of *one* example; the stem's
    signed activation included (N independent of the batch)."""
    signed, is_weight = KINDS[kind]
    shape = (batch, 3, 5, 4)
    q = LSQQuantizer(QuantConfig(4, signed), is_weight=is_weight)
    upper = integer_grid(4, signed)[1]
    expected = lsq_gradient_scale(lsq_n(shape, is_weight), upper)
    assert q.grad_scale(torch.zeros(shape)) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(1 / math.sqrt((batch if is_weight else 1) * 60 * upper))


# --- range initialisation ----------------------------------------------------------------------


@st.composite
def tensors(draw) -> dict:
    """Asymmetric tensors: a skewed normal sample (either tail longer), or values exactly on
    a grid (the full range is then the error-free candidate), per tensor or per channel."""
    bits = draw(st.integers(2, 8))
    signed = draw(st.booleans())
    lower, upper = integer_grid(bits, signed)
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))) + (8,)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["skewed", "on_grid", "negative", "sparse"]))
    if kind == "on_grid":  # codes up to u, so max|v| / u is the grid step
        step = 2.0 ** -int(rng.integers(0, 8))
        v = rng.integers(-upper if signed else -2, upper + 1, shape) * step
        v.reshape(shape[0], -1)[:, 0] = upper * step
    else:
        v = rng.standard_normal(shape) * 10.0 ** rng.uniform(-3, 1)
        v = np.where(v > 0, v * rng.uniform(0.2, 5), v)  # one tail longer than the other
        if kind == "negative":
            v = v - np.abs(v).max()  # nothing above zero for an unsigned grid
        if kind == "sparse":
            v = np.where(rng.random(shape) < 0.8, 0.0, v)
    return {"v": v.astype(np.float32), "bits": bits, "signed": signed, "lower": lower,
            "upper": upper, "axis": draw(st.sampled_from([None, 0]))}


def _check_mse_choice(got: float, v: np.ndarray, lower: int, upper: int) -> None:
    """``got`` is a candidate of the brute force (float32 rounding of its computation) whose
    error is the least (to float32 summation rounding: a near tie may go either way)."""
    candidates, errors = mse_brute_force(v.astype(np.float64), lower, upper)
    k = int(np.argmin(np.abs(candidates - got)))
    assert got == pytest.approx(candidates[k], rel=1e-6)
    total = float((v.astype(np.float64) ** 2).sum())
    assert errors[k] <= errors.min() * (1 + 1e-5) + 1e-9 * total, (k, errors[k], errors.min())
    if k != int(np.argmin(errors)):  # another candidate only on a float32 near tie
        assert errors[k] - errors.min() <= 1e-5 * errors.min() + 1e-9 * total


@SETTINGS
@given(tensors())
def test_mse_scale_is_the_brute_force_minimum(t: dict) -> None:
    v, lower, upper, axis = t["v"], t["lower"], t["upper"], t["axis"]
    got = mse_scale(torch.from_numpy(v), lower, upper, channel_axis=axis)
    if axis is None:
        assert got.shape == ()
        _check_mse_choice(got.item(), v, lower, upper)
    else:
        assert got.shape == (v.shape[0], *[1] * (v.ndim - 1))
        for c in range(v.shape[0]):
            _check_mse_choice(got.reshape(-1)[c].item(), v[c], lower, upper)


@SETTINGS
@given(tensors())
def test_quantizer_initialises_from_the_brute_force(t: dict) -> None:
    """A weight quantizer's first forward sets its scale(s) by MSE, per tensor or channel."""
    v, per_channel = t["v"], t["axis"] == 0
    config = QuantConfig(t["bits"], t["signed"],
                         granularity="channel" if per_channel else "tensor")
    q = LSQQuantizer(config, is_weight=True, channels=v.shape[0] if per_channel else None)
    q(torch.from_numpy(v))
    assert bool(q.initialized)
    scales = q.scale.detach().reshape(-1).tolist()
    slices = [v[c] for c in range(v.shape[0])] if per_channel else [v]
    assert len(scales) == len(slices)
    for s, part in zip(scales, slices):
        _check_mse_choice(s, part, t["lower"], t["upper"])


@SETTINGS
@given(tensors())
def test_lsq_init_scale_is_two_mean_abs_over_sqrt_qp(t: dict) -> None:
    """LSQ sec. 2.1: ``s = 2 * mean|v| / sqrt(Q_P)``; 1 where ``v`` is all zero."""
    v, upper, axis = t["v"], t["upper"], t["axis"]
    got = lsq_init_scale(torch.from_numpy(v), upper, channel_axis=axis).double().numpy()
    rows = v.reshape(1, -1) if axis is None else v.reshape(v.shape[0], -1)
    want = 2 * np.abs(rows.astype(np.float64)).mean(axis=1) / math.sqrt(upper)
    want = np.where(want > 0, want, 1.0)
    np.testing.assert_allclose(got.reshape(-1), want, rtol=1e-6)
