"""One SAQ step, its case 3 (Liu et al., sharpness-aware quantization), on quantized weights.

1. clean pass: ``g = grad L`` with respect to the quantized weights ``Q(w)`` (and to the other
   trainable parameters, which are not quantized: for them ``Q`` is the identity);
2. perturbation ``eps = rho * g / (||g|| + 1e-12)``, ``||g||`` the global L2 norm (scales
   excluded), added *after* quantization, ``Q(w) + eps``; the latent weights never move;
3. perturbed pass, BatchNorm running statistics untouched: the update uses its gradient only
   (plain SAM: no ``alpha``, no mix with the clean gradient), scales included.

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
             quantized: Sequence[nn.Module], others: Sequence[nn.Parameter],
             scales: Sequence[nn.Parameter], rho: float) -> torch.Tensor:
    """Leave the perturbed pass's gradients in every parameter's ``.grad``; return the clean
    loss (detached). ``quantized``: modules with a quantized ``weight`` and the
    ``weight_offset`` hook; ``others``: every other trainable parameter but the ``scales``."""
    everything = [*(m.weight for m in quantized), *others, *scales]
    for p in everything:
        p.grad = None
    zeros = [torch.zeros_like(m.weight, requires_grad=True) for m in quantized]
    with weight_offsets(quantized, zeros):
        loss = loss_fn()
        loss.backward()
    g = _grads(zeros) + _grads(others)

    with torch.no_grad():
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(g)))
        eps = torch._foreach_mul(g, rho / (norm + 1e-12))
        saved = [p.detach().clone() for p in others]
        torch._foreach_add_(list(others), eps[len(quantized):])

    for p in everything:
        p.grad = None
    with frozen_bn_statistics(model), weight_offsets(quantized, eps[:len(quantized)]):
        loss_fn().backward()
    with torch.no_grad():
        torch._foreach_copy_(list(others), saved)
    return loss.detach()
