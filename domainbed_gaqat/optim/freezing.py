"""Gradient disorder (paper Definition 3.1) and the freezing rule of Algorithm 1 (sec. 3.3).

For a window of ``K`` gradients ``g_1..g_K`` of one scale,
``delta = (1/K) * #{j in 2..K : sgn(g_j) != sgn(g_{j-1})}`` with ``sgn(0) = 0``.
Every ``K`` steps (``t mod K == 0``, ``t > 0``: at ``t = 0`` no window exists yet) the disorder of
each scale's task gradient over steps ``t-K+1..t`` decides its freeze flag for the next ``K``
steps. A frozen scale is updated by ``g_smooth`` only. All state is in buffers, so a
``state_dict`` round-trip resumes the schedule exactly; the step is pure tensor work, without a
host sync. The state is made on the device it is asked for; the flip counter is an integer
(a bf16 one would stop at 256: with K = 3000 every scale would freeze) and the floating-point
state stays float32 when a model is cast to 16 bits
(:class:`~domainbed_gaqat.quant.precision.Float32State`).
"""

import torch
from torch import nn

from domainbed_gaqat.quant.precision import Float32State

FREEZE_RULES = ("gaqat", "reverse", "no_unfreeze")


def freeze_decision(disorder: torch.Tensor, frozen: torch.Tensor, r: float,
                    rule: str) -> torch.Tensor:
    """New freeze flags. ``gaqat``: ``delta < r`` (Algorithm 1, lines 13-17); ``reverse``
    (Table 4, Reverse Ratio): ``delta >= r``; ``no_unfreeze`` (Table 4, w/o Unfreeze): frozen
    once ``delta < r`` and never unfrozen."""
    if rule == "gaqat":
        return disorder < r
    if rule == "reverse":
        return disorder >= r
    if rule == "no_unfreeze":
        return frozen | (disorder < r)
    raise ValueError(f"freeze rule {rule!r}: expected one of {FREEZE_RULES}")


class DisorderTracker(Float32State):
    """Counts sign flips of a stream of gradient vectors over windows of ``K`` steps."""

    def __init__(self, n: int, K: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        if not isinstance(K, int) or K < 2:
            raise ValueError(f"K (disorder window) must be an integer >= 2, got {K!r}")
        self.K = K
        self.register_buffer("step", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("flips", torch.zeros(n, dtype=torch.long, device=device))
        self.register_buffer("prev_sign", torch.zeros(n, device=device))
        self.register_buffer("disorder", torch.zeros(n, device=device))  # last completed window
        self._step = 0  # host mirror of ``step``: no device sync per step

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._step = int(self.step)

    @torch.no_grad()
    def observe(self, grad: torch.Tensor) -> bool:
        """Record step ``t``'s gradient; returns True when ``t`` closes a window (then
        ``self.disorder`` holds the window's delta)."""
        t, sign = self._step, torch.sign(grad)
        if t > 0 and (t - 1) % self.K != 0:  # a window's first gradient has no predecessor
            self.flips += sign != self.prev_sign
        self.prev_sign.copy_(sign)
        closes = t > 0 and t % self.K == 0
        if closes:
            torch.div(self.flips, self.K, out=self.disorder)
            self.flips.zero_()
        self._step = t + 1
        self.step.fill_(self._step)
        return closes


class ScaleFreezer(nn.Module):
    """Algorithm 1: per-scale freeze flags driven by the task-gradient disorder."""

    def __init__(self, n: int, K: int, r: float, rule: str = "gaqat",
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if rule not in FREEZE_RULES:
            raise ValueError(f"freeze rule {rule!r}: expected one of {FREEZE_RULES}")
        self.r, self.rule = r, rule
        self.tracker = DisorderTracker(n, K, device)
        self.register_buffer("frozen", torch.zeros(n, dtype=torch.bool, device=device))

    @torch.no_grad()
    def combine(self, g_task: torch.Tensor, g_smooth: torch.Tensor) -> torch.Tensor:
        """Scale gradients for this step (lines 4-8), then the K-step re-decision (10-19):
        ``0.5 * g_smooth`` for frozen scales, ``0.5 * (g_task + g_smooth)`` otherwise."""
        grad = 0.5 * (g_smooth + g_task * ~self.frozen)
        if self.tracker.observe(g_task):
            self.frozen.copy_(freeze_decision(self.tracker.disorder, self.frozen, self.r,
                                              self.rule))
        return grad
