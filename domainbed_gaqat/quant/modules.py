"""Quantized modules: the LSQ quantizer with a learnable scale, and a conv that uses two.

A quantizer is built from a :class:`~domainbed_gaqat.quant.config.QuantConfig`; it can be
switched off and on (:func:`set_quantization`, :func:`quantization_disabled`): off, it is the
exact identity. Scales are ``nn.Parameter`` s from construction on and the ``initialized`` /
``enabled`` flags are buffers, so ``state_dict`` round-trips with ``strict=True`` in every state.
"""

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from domainbed_gaqat.quant.config import QuantConfig
from domainbed_gaqat.quant.lsq import lsq_quantize
from domainbed_gaqat.quant.range_init import lsq_init_scale, mse_scale


class LSQQuantizer(nn.Module):
    """LSQ fake quantizer of one tensor (paper sec. 2.1): a weight (``is_weight``, per tensor,
    or per output channel with ``channels`` scales) or a layer input (per tensor).

    The scale is set by ``config.range_init`` on the first forward while enabled: for weights
    from the weights, for activations from the first (training) batch.
    """

    def __init__(self, config: QuantConfig, is_weight: bool, channels: int | None = None) -> None:
        super().__init__()
        per_channel = config.granularity == "channel"
        if per_channel and not (is_weight and isinstance(channels, int) and channels >= 1):
            raise ValueError("per-channel scales are for weights and need their number of "
                             f"output channels (is_weight={is_weight}, channels={channels!r})")
        self.config, self.is_weight = config, is_weight
        self.lower, self.upper = config.bounds
        self.scale = nn.Parameter(torch.ones(channels if per_channel else ()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("enabled", torch.tensor(config.enabled))
        self._initialized, self._enabled = False, config.enabled  # host mirrors: no device sync

    @property
    def bits(self) -> int:
        return self.config.bits

    def extra_repr(self) -> str:
        kind = "weight" if self.is_weight else "activation"
        return (f"{kind}, bits={self.bits}, grid=[{self.lower}, {self.upper}], "
                f"per {self.config.granularity}")

    _version = 2  # version 1 (domainbed-gaqat 0.1) had no ``enabled`` buffer: always on

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        if local_metadata.get("version", 1) < 2 and prefix + "enabled" not in state_dict:
            state_dict[prefix + "enabled"] = torch.tensor(True)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)
        self._initialized, self._enabled = bool(self.initialized), bool(self.enabled)

    def set_enabled(self, enabled: bool) -> None:
        """Quantize (True) or pass the input through unchanged (False)."""
        self.enabled.fill_(enabled)
        self._enabled = enabled

    def _scale(self, v: torch.Tensor) -> torch.Tensor:
        """The scale, shaped to broadcast against ``v`` (per channel: ``[C, 1, ...]``)."""
        return self.scale if self.scale.dim() == 0 else self.scale.view(-1, *[1] * (v.dim() - 1))

    def grad_scale(self, v: torch.Tensor) -> float:
        """LSQ gradient scale ``1 / sqrt(N * u)`` (Esser et al. 2019, sec. 2.2), or 1 without
        ``config.grad_scale``. ``N``: for a weight, the weights one scale quantizes (all of them,
        or one channel's), or with ``config.grad_scale_n == "tensor"`` the whole tensor's; for an
        activation its features per example (independent of the batch)."""
        if not self.config.grad_scale:
            return 1.0
        if not self.is_weight:
            n = v[0].numel()
        elif self.config.grad_scale_n == "tensor":
            n = v.numel()
        else:
            n = v.numel() // self.scale.numel()
        return 1.0 / math.sqrt(n * self.upper)

    @torch.no_grad()
    def initialize(self, v: torch.Tensor) -> None:
        axis = 0 if self.scale.dim() else None
        if self.config.range_init == "mse":
            scale = mse_scale(v, self.lower, self.upper, channel_axis=axis)
        else:
            scale = lsq_init_scale(v, self.upper, channel_axis=axis)
        self.scale.copy_(scale.reshape(self.scale.shape))
        self.initialized.fill_(True)
        self._initialized = True

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        if not self._enabled:
            return v
        if not self._initialized:
            self.initialize(v)
        return lsq_quantize(v, self._scale(v), self.lower, self.upper, self.grad_scale(v))

    def integers(self, v: torch.Tensor) -> torch.Tensor:
        """The integer codes ``clamp(round(v / s), l, u)`` (for export and inspection)."""
        return torch.clamp(torch.round(v / self._scale(v)), self.lower, self.upper)


class QuantConv2d(nn.Conv2d):
    """``nn.Conv2d`` with LSQ quantizers on its input (``a_quant``) and weight (``w_quant``);
    either may be None (that tensor stays full precision). ``weight_offset``, when set, is added
    to the (quantized) weight: the hook SAQ perturbs the quantized weights through."""

    def __init__(self, conv: nn.Conv2d, weight: QuantConfig | None,
                 activation: QuantConfig | None) -> None:
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                         conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                         conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
        self.load_state_dict(conv.state_dict())
        self.a_quant = LSQQuantizer(activation, is_weight=False) if activation else None
        self.w_quant = (LSQQuantizer(weight, is_weight=True, channels=conv.out_channels)
                        if weight else None)
        self.weight_offset: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.w_quant is None else self.w_quant(self.weight)
        if self.weight_offset is not None:
            weight = weight + self.weight_offset
        x = x if self.a_quant is None else self.a_quant(x)
        return self._conv_forward(x, weight, self.bias)


def quantizers(module: nn.Module) -> Iterator[tuple[str, LSQQuantizer]]:
    """``(name, quantizer)`` pairs in forward order, e.g. ``("layer1.0.conv1.w_quant", q)``."""
    return ((n, m) for n, m in module.named_modules() if isinstance(m, LSQQuantizer))


def set_quantization(module: nn.Module, enabled: bool) -> None:
    """Switch every quantizer of ``module`` on or off."""
    for _, q in quantizers(module):
        q.set_enabled(enabled)


@contextmanager
def quantization_disabled(module: nn.Module) -> Iterator[None]:
    """Every quantizer of ``module`` is the identity inside (the float model of the same
    latent weights); each gets its own state back after."""
    states = [(q, q._enabled) for _, q in quantizers(module)]
    try:
        for q, _ in states:
            q.set_enabled(False)
        yield
    finally:
        for q, enabled in states:
            q.set_enabled(enabled)
