"""LSQ fake quantization (Esser et al. 2019; paper sec. 2.1) as one autograd node.

``q(v; s) = s * clamp(round(v / s), l, u)``; round-to-nearest (ties to even, as ``torch.round``),
straight-through estimator for the rounding. ``s`` is a scalar (per-tensor) or broadcasts
against ``v`` (per-channel: shape ``[C, 1, ...]``).
"""

import os
from types import SimpleNamespace

import torch


class LSQFunction(torch.autograd.Function):
    """Fake quantization with LSQ gradients in one autograd node.

    Backward (LSQ eq. 3 and the STE of paper sec. 2.1), with ``x = v / s``:
    ``dL/dv = dL/dq * 1[l <= x <= u]`` and
    ``dL/ds = g * sum(dL/dq * (round(x) - x | l | u))`` inside / below / above the range,
    ``g`` the gradient scale; a per-channel ``dL/ds`` sums over each channel's entries. Only
    ``v`` and ``s`` are saved; the masks are recomputed.
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
            grad_s = grad_s * grad_scale
        return grad_v, grad_s, None, None, None


def _promote(v: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``v`` in at least the scale's precision (float32): a bf16 ``v`` (under bf16 autocast, or
    in a model cast to bf16) is quantized in float32, since ``round(x) - x`` in bf16 would swamp
    the scale gradient; a no-op otherwise. Forward and backward both compute so."""
    return v.to(torch.promote_types(v.dtype, scale.dtype))


def _forward(v: torch.Tensor, scale: torch.Tensor, lower: int, upper: int) -> torch.Tensor:
    """``clamp(round(v / s), l, u) * s`` in one buffer (the ops of the formula, in place),
    returned in ``v``'s dtype (bf16 in, bf16 out: the cast the next bf16 conv would make)."""
    return (_promote(v, scale) / scale).round_().clamp_(lower, upper).mul_(scale).to(v.dtype)


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
    grad_s = (c.round_().sub_(x.masked_fill_(outside, 0.0)).mul_(grad_out)
              .sum_to_size(scale.shape) if need_s else None)
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
    """Functional LSQ fake quantization (see :class:`LSQFunction`).

    >>> v = torch.tensor([0.12, -0.4, 0.9], requires_grad=True)
    >>> s = torch.tensor(0.25, requires_grad=True)
    >>> q = lsq_quantize(v, s, 0, 3)  # 2-bit unsigned grid: 0, s, 2s, 3s
    >>> q.tolist()
    [0.0, 0.0, 0.75]
    >>> q.sum().backward()  # v / s = 0.48 inside, -1.6 below, 3.6 above the grid
    >>> v.grad.tolist(), round(s.grad.item(), 4)  # STE; (0 - 0.48) + 0 + 3
    ([1.0, 0.0, 0.0], 2.52)
    """
    return LSQFunction.apply(v, scale, lower, upper, grad_scale)


if os.environ.get(COMPILE_ENV) == "1":
    compile_kernels()
