"""One SAGM step (Wang et al., CVPR 2023; paper sec. 2.2 and Eq. 1).

1. clean pass: ``g = grad L(w)``                                  (its loss is reported)
2. perturb the latent weights: ``w' = w + g * (rho / (||g|| + 1e-12) - alpha)``
3. perturbed pass at ``w'``, BatchNorm running statistics untouched: ``g_p = grad L(w')``
4. restore ``w`` exactly; weight gradient ``0.5 * g + 0.5 * g_p``.

Quantizer scales are not perturbed (Eq. 1 perturbs ``theta`` only) and ``||g||`` excludes them;
their two gradients are returned apart, ``g_task`` (clean pass) and ``g_smooth`` (perturbed
pass), as flat vectors so the caller can combine them per scale on the device.
"""

from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def frozen_bn_statistics(model: nn.Module):
    """Run forward passes without updating any BatchNorm running statistics (BatchNorms in
    eval mode, e.g. the frozen ones of the shared featurizer, never update them: skipped)."""
    bns = [m for m in model.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    momenta = [bn.momentum for bn in bns]
    tracked = [bn.num_batches_tracked.clone() if bn.num_batches_tracked is not None else None
               for bn in bns]
    for bn in bns:
        bn.momentum = 0.0
    try:
        yield
    finally:
        for bn, momentum, count in zip(bns, momenta, tracked):
            bn.momentum = momentum
            if count is not None:
                bn.num_batches_tracked.copy_(count)


def _grads(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]


def flat_grads(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """The gradients of (at least one of) ``params`` in one vector (zeros where none; a
    per-channel scale is several entries)."""
    return torch.cat([g.reshape(-1) for g in _grads(params)])


def sagm_step(loss_fn: Callable[[], torch.Tensor], model: nn.Module,
              weights: Sequence[nn.Parameter], scales: Sequence[nn.Parameter],
              rho: float, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compute SAGM gradients; leaves ``0.5 * (g + g_p)`` in ``weights[i].grad``.

    ``loss_fn()`` runs a forward pass of ``model`` and returns the loss. Returns the clean loss
    (detached) and the scale gradients ``g_task`` and ``g_smooth``, each one vector of every
    scale's entries in order (``[len(scales)]`` for per-tensor scales; a per-channel scale is
    several entries); the caller writes the scales' ``.grad`` and steps its optimizer.
    No host-device synchronisation happens here.
    """
    for p in [*weights, *scales]:
        p.grad = None
    loss = loss_fn()
    loss.backward()
    g = _grads(weights)  # kept as they are: the second backward allocates fresh gradients
    g_task = flat_grads(scales) if scales else loss.new_zeros(0, dtype=torch.float32)

    with torch.no_grad():
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(g)))
        step = rho / (norm + 1e-12) - alpha
        saved = [w.detach().clone() for w in weights]
        torch._foreach_add_(weights, torch._foreach_mul(g, step))

    for p in [*weights, *scales]:
        p.grad = None
    with frozen_bn_statistics(model):
        loss_fn().backward()

    with torch.no_grad():
        torch._foreach_copy_(weights, saved)
        g_p = _grads(weights)
        torch._foreach_lerp_(g_p, g, 0.5)  # g_p + 0.5 * (g - g_p) = 0.5 * g + 0.5 * g_p
        for w, grad in zip(weights, g_p):
            w.grad = grad
    g_smooth = flat_grads(scales) if scales else torch.zeros_like(g_task)
    return loss.detach(), g_task, g_smooth
