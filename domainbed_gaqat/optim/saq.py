"""One SAQ step, its case 3 (Liu et al., sharpness-aware quantization), on quantized weights.

1. clean pass: ``g = grad L`` with respect to the quantized weights ``Q(w)`` and to the other
   perturbed parameters (the full-precision ones, for which ``Q`` is the identity, and, as the
   release's default ``include_aclip``, the activation quantizers' scales);
2. perturbation ``eps = rho * g / (||g|| + 1e-12)``, ``||g||`` the global L2 norm over all of
   them, added *after* quantization, ``Q(w) + eps``; the latent weights never move;
3. perturbed pass, BatchNorm running statistics untouched: the update uses its gradient only
   (plain SAM: no ``alpha``, no mix with the clean gradient), every parameter included.

The quantized weights are perturbed through the modules' ``weight_offset`` hook; a parameter
that is not quantized is moved by its ``eps`` and restored exactly. No host-device sync.
"""

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from domainbed_gaqat.optim.sagm import frozen_bn_statistics


@contextmanager
def weight_offsets(modules: Sequence[nn.Module], offsets: Sequence[torch.Tensor]
                   ) -> Iterator[None]:
    """Add ``offsets[i]`` to ``modules[i]``'s quantized weight inside."""
    for module, offset in zip(modules, offsets):
        module.weight_offset = offset
    try:
        yield
    finally:
        for module in modules:
            module.weight_offset = None


def _grads(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [t.grad if t.grad is not None else torch.zeros_like(t) for t in tensors]


def saq_step(loss_fn: Callable[[], torch.Tensor], model: nn.Module,
             quantized: Sequence[nn.Module], perturbed: Sequence[nn.Parameter],
             unperturbed: Sequence[nn.Parameter], rho: float) -> torch.Tensor:
    """Leave the perturbed pass's gradients in every parameter's ``.grad``; return the clean
    loss (detached). ``quantized``: modules with a quantized ``weight`` and the
    ``weight_offset`` hook (``Q(w)`` is perturbed); ``perturbed``: the other parameters moved
    by their ``eps`` (counted in ``||g||``); ``unperturbed``: trainable parameters left where
    they are and out of the norm (the weight scales; the release's ``include_wclip=False``)."""
    everything = [*(m.weight for m in quantized), *perturbed, *unperturbed]
    for p in everything:
        p.grad = None
    zeros = [torch.zeros_like(m.weight, requires_grad=True) for m in quantized]
    with weight_offsets(quantized, zeros):
        loss = loss_fn()
        loss.backward()
    g = _grads(zeros) + _grads(perturbed)

    with torch.no_grad():
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(g)))
        eps = torch._foreach_mul(g, rho / (norm + 1e-12))
        saved = [p.detach().clone() for p in perturbed]
        torch._foreach_add_(list(perturbed), eps[len(quantized):])

    for p in everything:
        p.grad = None
    with frozen_bn_statistics(model), weight_offsets(quantized, eps[:len(quantized)]):
        loss_fn().backward()
    with torch.no_grad():
        torch._foreach_copy_(list(perturbed), saved)
    return loss.detach()
