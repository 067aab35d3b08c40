"""Initial quantizer scales from a tensor: MSE range estimation and LSQ's own rule."""

import torch


def mse_scale(v: torch.Tensor, lower: int, upper: int, channel_axis: int | None = None,
              n_candidates: int = 100) -> torch.Tensor:
    """MSE range estimation (Nagel et al. 2021, sec. 3.4): the scale minimising
    ``||clamp(round(v / s), l, u) * s - v||^2``, per tensor (a 0-d result) or, with
    ``channel_axis``, per slice along it (shape ``[C, 1, ...]``, broadcasting against ``v``).

    Candidates are relative to the observed range: ``s_k = (k / n_candidates) * m / u`` for
    ``k = 1..n_candidates``, ``m = max|v|`` (signed grid) or ``max(v)`` (unsigned grid), so the
    clipping range sweeps 1%..100% of it. Ties go to the smallest candidate; an all-zero
    tensor (or channel) gets scale 1.
    """
    v = v.detach().float()
    rows = v.reshape(1, -1) if channel_axis is None else v.movedim(channel_axis, 0).flatten(1)
    m = (rows.abs() if lower < 0 else rows.clamp(min=0)).amax(dim=1, keepdim=True)
    if not torch.isfinite(m).all():
        raise ValueError("cannot initialise a quantizer scale from a tensor with inf/nan values")
    k = torch.arange(1, n_candidates + 1, device=v.device, dtype=v.dtype)
    candidates = k * (m / (n_candidates * upper))  # [rows, candidates]
    buf = torch.empty_like(rows)  # the error of one candidate per row, in place in one buffer
    errors = torch.stack([
        torch.div(rows, s, out=buf).round_().clamp_(lower, upper).mul_(s).sub_(rows).pow_(2)
        .sum(dim=1) for s in candidates.T.unsqueeze(-1)], dim=1)
    best = candidates.gather(1, errors.argmin(dim=1, keepdim=True)).squeeze(1)
    best = torch.where(m.squeeze(1) > 0, best, torch.ones_like(best))
    return _shaped(best, v, channel_axis)


def lsq_init_scale(v: torch.Tensor, upper: int, channel_axis: int | None = None) -> torch.Tensor:
    """LSQ's initialisation (Esser et al. 2019, sec. 2.1): ``2 * mean|v| / sqrt(u)``, per tensor
    or per slice along ``channel_axis``; 1 where ``v`` is all zero."""
    v = v.detach().float()
    rows = v.reshape(1, -1) if channel_axis is None else v.movedim(channel_axis, 0).flatten(1)
    best = 2 * rows.abs().mean(dim=1) / upper**0.5
    if not torch.isfinite(best).all():
        raise ValueError("cannot initialise a quantizer scale from a tensor with inf/nan values")
    return _shaped(torch.where(best > 0, best, torch.ones_like(best)), v, channel_axis)


def _shaped(per_row: torch.Tensor, v: torch.Tensor, channel_axis: int | None) -> torch.Tensor:
    if channel_axis is None:
        return per_row.reshape(())
    shape = [1] * v.dim()
    shape[channel_axis] = -1
    return per_row.reshape(shape)
