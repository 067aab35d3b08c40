"""LSQ fake quantization (Esser et al. 2019), paper sec. 2.1 and SPEC section 1.

``q(v; s) = s * clamp(round(v / s), l, u)``; round-to-nearest (ties to even, as ``torch.round``),
straight-through estimator for the rounding. Weights use the signed grid
``[-2^(b-1), 2^(b-1) - 1]``, activations after a ReLU the unsigned grid ``[0, 2^b - 1]``.
"""

import math
import os
from types import SimpleNamespace

import torch
from torch import nn


def grid(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range ``(l, u)`` of a ``bits``-bit quantizer."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 2..8, got {bits!r}")
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


class LSQFunction(torch.autograd.Function):
    """Fake quantization with LSQ gradients in one autograd node.

    Backward (LSQ eq. 3 and the STE of paper sec. 2.1), with ``x = v / s``:
    ``dL/dv = dL/dq * 1[l <= x <= u]`` and
    ``dL/ds = g * sum(dL/dq * (round(x) - x | l | u))`` inside / below / above the range,
    ``g`` the gradient scale. Only ``v`` and ``s`` are saved; the masks are recomputed.
    """

    @staticmethod
    def forward(ctx, v, scale, lower: int, upper: int, grad_scale: float):
        ctx.save_for_backward(v, scale)
        ctx.bounds = (lower, upper, grad_scale)
        # plain tensors: compiled kernels would specialise on every Parameter's shape
        return _kernels.forward(v.detach(), scale.detach(), lower, upper)

    @staticmethod
    def backward(ctx, grad_out):
        v, scale = ctx.saved_tensors
        lower, upper, grad_scale = ctx.bounds
        need_v, need_s = ctx.needs_input_grad[:2]
        grad_v, grad_s = _kernels.backward(grad_out, v.detach(), scale.detach(), lower, upper,
                                           need_v, need_s)
        if grad_s is not None:
            grad_s = grad_s.reshape(scale.shape) * grad_scale
        return grad_v, grad_s, None, None, None


def _promote(v: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``v`` in at least the scale's precision: under bf16 autocast the quantizer computes in
    float32 (``round(x) - x`` in bf16 would swamp the scale gradient); a no-op otherwise."""
    return v.to(torch.promote_types(v.dtype, scale.dtype))


def _forward(v: torch.Tensor, scale: torch.Tensor, lower: int, upper: int) -> torch.Tensor:
    """``clamp(round(v / s), l, u) * s`` in one buffer (the ops of the formula, in place)."""
    return (_promote(v, scale) / scale).round_().clamp_(lower, upper).mul_(scale)


def _backward(grad_out: torch.Tensor, v: torch.Tensor, scale: torch.Tensor, lower: int,
              upper: int, need_v: bool, need_s: bool
              ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``dL/dv`` and the unscaled ``dL/ds`` of :class:`LSQFunction`. With ``x = v / s`` and
    ``c = clamp(x, l, u)``, ``x`` is outside the range iff ``c != x``, and ``round(c)`` minus
    (``x`` inside, 0 outside) is ``round(x) - x`` inside, ``l`` below, ``u`` above. Masks
    select (``where``, ``masked_fill_``): multiplying by a bool mask copies it to floats."""
    x = _promote(v, scale) / scale
    c = x.clamp(lower, upper)
    outside = c != x
    grad_v = torch.where(outside, 0.0, grad_out) if need_v else None
    grad_s = (c.round_().sub_(x.masked_fill_(outside, 0.0)).mul_(grad_out).sum()
              if need_s else None)
    return grad_v, grad_s


# The kernels LSQFunction calls: eager by default, or compiled by compile_kernels (one fused
# pass each; outputs and dL/dv bit-identical to eager, dL/ds equal up to summation order).
_kernels = SimpleNamespace(forward=_forward, backward=_backward)
COMPILE_ENV = "DOMAINBED_GAQAT_COMPILE"


def compile_kernels(enable: bool = True, **compile_options) -> None:
    """Run every :class:`LSQFunction` through ``torch.compile``-d kernels (``enable=False``:
    back to eager). Optional and off by default; ``$DOMAINBED_GAQAT_COMPILE=1`` turns it on at
    import, which reaches the training processes a DomainBed sweep launches. The first calls
    compile (tens of seconds on a CPU; a C++ or Triton tool chain is needed); shapes are
    dynamic, so ResNet's many tensor shapes share the kernels."""
    if enable:
        options = {"dynamic": True, **compile_options}
        _kernels.forward = torch.compile(_forward, **options)
        _kernels.backward = torch.compile(_backward, **options)
    else:
        _kernels.forward, _kernels.backward = _forward, _backward


def lsq_quantize(v: torch.Tensor, scale: torch.Tensor, lower: int, upper: int,
                 grad_scale: float = 1.0) -> torch.Tensor:
    """Functional LSQ fake quantization (see :class:`LSQFunction`)."""
    return LSQFunction.apply(v, scale, lower, upper, grad_scale)


def lsq_reference(v: torch.Tensor, scale: torch.Tensor, lower: int, upper: int,
                  grad_scale: float = 1.0) -> torch.Tensor:
    """Plain-autograd LSQ, the reference :func:`lsq_quantize` is tested against: the STE
    through ``detach`` on ``round(clamp(v / s, l, u))`` and the gradient scale through
    ``s.detach() + (s - s.detach()) * g``, whose value is exactly ``s``. The clamp passes
    gradients on the closed range ``[l, u]`` (``torch.clamp``'s own backward excludes the
    bounds)."""
    s = scale.detach() + (scale - scale.detach()) * grad_scale
    x = v / s
    x = torch.where((x >= lower) & (x <= upper), x, x.detach().clamp(lower, upper))
    return ((torch.round(x) - x).detach() + x) * s


def mse_scale(v: torch.Tensor, lower: int, upper: int, n_grid: int = 100) -> torch.Tensor:
    """MSE range estimation (Nagel et al. 2021, sec. 3.4): the scale minimising ``||q(v) - v||^2``.

    Candidates are relative to the tensor's own range: ``s_k = (k / n_grid) * m / u`` for
    ``k = 1..n_grid``, with ``m = max|v|`` (signed grid) or ``max(v)`` (unsigned grid), so the
    clipping range sweeps 1%..100% of the observed range.
    """
    v = v.detach().float().flatten()
    m = v.abs().max() if lower < 0 else v.clamp(min=0).max()
    if not torch.isfinite(m):
        raise ValueError("cannot initialise a quantizer scale from a tensor with inf/nan values")
    if m == 0:
        return torch.ones((), device=v.device)
    step = m / (n_grid * upper)
    candidates = torch.arange(1, n_grid + 1, device=v.device, dtype=v.dtype) * step
    buf = torch.empty_like(v)  # ||clamp(round(v / s), l, u) * s - v||^2, in place in one buffer
    errors = torch.stack([
        torch.div(v, s, out=buf).round_().clamp_(lower, upper).mul_(s).sub_(v).pow_(2).sum()
        for s in candidates
    ])
    return candidates[torch.argmin(errors)]


class LSQQuantizer(nn.Module):
    """Per-tensor LSQ quantizer with a learnable scale (SPEC section 1).

    The scale is an ``nn.Parameter`` from construction on, so ``state_dict`` round-trips with
    ``strict=True``. It is set by :func:`mse_scale` on the first forward: for weights from the
    weights, for activations from the first (training) batch. ``initialized`` is a buffer, so a
    loaded model is not re-initialised.
    """

    def __init__(self, bits: int, signed: bool, is_weight: bool,
                 lsq_grad_scale: bool = True) -> None:
        super().__init__()
        self.bits, self.signed, self.is_weight = bits, signed, is_weight
        self.lsq_grad_scale = lsq_grad_scale
        self.lower, self.upper = grid(bits, signed)
        self.scale = nn.Parameter(torch.ones(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self._initialized = False  # host mirror of the buffer: no device sync per forward

    def extra_repr(self) -> str:
        kind = "weight" if self.is_weight else "activation"
        return f"{kind}, bits={self.bits}, grid=[{self.lower}, {self.upper}]"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initialized = bool(self.initialized)

    def grad_scale(self, v: torch.Tensor) -> float:
        """LSQ gradient scale ``1 / sqrt(N * u)`` (Esser et al. 2019, sec. 2.2), or 1.

        ``N`` is the number of weights (signed weight quantizers) or of features per example
        (activation quantizers), so the scale does not depend on the batch size.
        """
        if not self.lsq_grad_scale:
            return 1.0
        n = v.numel() if self.is_weight else v[0].numel()
        return 1.0 / math.sqrt(n * self.upper)

    @torch.no_grad()
    def initialize(self, v: torch.Tensor) -> None:
        self.scale.copy_(mse_scale(v, self.lower, self.upper))
        self.initialized.fill_(True)
        self._initialized = True

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        if not self._initialized:
            self.initialize(v)
        return lsq_quantize(v, self.scale, self.lower, self.upper, self.grad_scale(v))

    def integers(self, v: torch.Tensor) -> torch.Tensor:
        """The integer codes ``clamp(round(v / s), l, u)`` (for export and inspection)."""
        return torch.clamp(torch.round(v / self.scale), self.lower, self.upper)


if os.environ.get(COMPILE_ENV) == "1":
    compile_kernels()
