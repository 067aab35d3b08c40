"""LSQ fake quantization (Esser et al. 2019), paper sec. 2.1 and SPEC section 1.

``q(v; s) = s * clamp(round(v / s), l, u)``; round-to-nearest (ties to even, as ``torch.round``),
straight-through estimator for the rounding. Weights use the signed grid
``[-2^(b-1), 2^(b-1) - 1]``, activations after a ReLU the unsigned grid ``[0, 2^b - 1]``.
"""

import math

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
        return torch.clamp(torch.round(v / scale), lower, upper) * scale

    @staticmethod
    def backward(ctx, grad_out):
        v, scale = ctx.saved_tensors
        lower, upper, grad_scale = ctx.bounds
        x = v / scale
        below, above = x < lower, x > upper
        inside = ~(below | above)
        grad_v = grad_out * inside if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            ds = torch.where(below, float(lower), torch.where(above, float(upper), torch.round(x) - x))
            grad_s = (grad_out * ds).sum().reshape(scale.shape) * grad_scale
        return grad_v, grad_s, None, None, None


def lsq_quantize(v: torch.Tensor, scale: torch.Tensor, lower: int, upper: int,
                 grad_scale: float = 1.0) -> torch.Tensor:
    """Functional LSQ fake quantization (see :class:`LSQFunction`)."""
    return LSQFunction.apply(v, scale, lower, upper, grad_scale)


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
    candidates = torch.arange(1, n_grid + 1, device=v.device, dtype=v.dtype) * (m / (n_grid * upper))
    errors = torch.stack([
        (torch.clamp(torch.round(v / s), lower, upper) * s - v).pow(2).sum() for s in candidates
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
