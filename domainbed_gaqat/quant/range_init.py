"""Initial quantizer scales from a tensor: MSE range estimation and LSQ's own rule.

Neither synchronises with the host: a tensor (or channel) with inf/nan values gets a NaN scale,
which :class:`FiniteCheck` reports once the host can read it without waiting for the device.
"""

import torch


def mse_scale(v: torch.Tensor, lower: int, upper: int, channel_axis: int | None = None,
              n_candidates: int = 100) -> torch.Tensor:
    """MSE range estimation (Nagel et al. 2021, sec. 3.4): the scale minimising
    ``||clamp(round(v / s), l, u) * s - v||^2``, per tensor (a 0-d result) or, with
    ``channel_axis``, per slice along it (shape ``[C, 1, ...]``, broadcasting against ``v``).

    Candidates are relative to the observed range: ``s_k = (k / n_candidates) * m / u`` for
    ``k = 1..n_candidates``, ``m = max|v|`` (signed grid) or ``max(v)`` (unsigned grid), so the
    clipping range sweeps 1%..100% of it. Ties go to the smallest candidate; an all-zero
    tensor (or channel) gets scale 1, one with an inf/nan value NaN.
    """
    v = v.detach().float()
    rows = v.reshape(1, -1) if channel_axis is None else v.movedim(channel_axis, 0).flatten(1)
    m = (rows.abs() if lower < 0 else rows.clamp(min=0)).amax(dim=1, keepdim=True)
    k = torch.arange(1, n_candidates + 1, device=v.device, dtype=v.dtype)
    candidates = k * (m / (n_candidates * upper))  # [rows, candidates]
    buf = torch.empty_like(rows)  # the error of one candidate per row, in place in one buffer
    errors = torch.stack([
        torch.div(rows, s, out=buf).round_().clamp_(lower, upper).mul_(s).sub_(rows).pow_(2)
        .sum(dim=1) for s in candidates.T.unsqueeze(-1)], dim=1)
    best = candidates.gather(1, errors.argmin(dim=1, keepdim=True)).squeeze(1)
    best = torch.where(m.squeeze(1) > 0, best, torch.ones_like(best))
    return _shaped(_nan_unless_finite(best, rows), v, channel_axis)


def lsq_init_scale(v: torch.Tensor, upper: int, channel_axis: int | None = None) -> torch.Tensor:
    """LSQ's initialisation (Esser et al. 2019, sec. 2.1): ``2 * mean|v| / sqrt(u)``, per tensor
    or per slice along ``channel_axis``; 1 where ``v`` is all zero, NaN where it has inf/nan."""
    v = v.detach().float()
    rows = v.reshape(1, -1) if channel_axis is None else v.movedim(channel_axis, 0).flatten(1)
    best = 2 * rows.abs().mean(dim=1) / upper**0.5
    best = torch.where(best > 0, best, torch.ones_like(best))
    return _shaped(_nan_unless_finite(best, rows), v, channel_axis)


def _nan_unless_finite(per_row: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(rows).all(dim=1), per_row, torch.nan)


def _shaped(per_row: torch.Tensor, v: torch.Tensor, channel_axis: int | None) -> torch.Tensor:
    if channel_axis is None:
        return per_row.reshape(())
    shape = [1] * v.dim()
    shape[channel_axis] = -1
    return per_row.reshape(shape)


class FiniteCheck:
    """Whether ``tensor`` is all finite, for the host to read without a host-device sync.

    On a CUDA device the flag is copied to pinned host memory behind the work queued so far and
    is readable once an event recorded after the copy has completed (:meth:`ready`); on the CPU
    (and other devices) at once; on ``meta`` (shapes without values) it is never known and
    reads as finite.

    >>> FiniteCheck(torch.tensor([1.0, float("inf")])).finite()
    False
    """

    def __init__(self, tensor: torch.Tensor) -> None:
        flag = torch.isfinite(tensor).all()
        self._event = None
        if flag.device.type == "meta":
            self._flag = None
        elif flag.device.type == "cuda":
            self._flag = flag.to("cpu", non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(flag.device))
        else:
            self._flag = flag.cpu()

    def __deepcopy__(self, memo: dict) -> "FiniteCheck":
        return self  # read-only once made; CUDA events cannot be copied

    def ready(self) -> bool:
        """True once :meth:`finite` can answer without waiting for the device."""
        return self._event is None or self._event.query()

    def finite(self) -> bool:
        """The answer (waits for the device where it is not :meth:`ready`)."""
        if self._event is not None:
            self._event.synchronize()
        return self._flag is None or bool(self._flag)
