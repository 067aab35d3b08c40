"""Quantized modules: the LSQ quantizer with a learnable scale, and the conv and linear layers
that use two (the quantized twins :func:`~domainbed_gaqat.quant.transform.quantize` swaps in).

A quantizer is built from a :class:`~domainbed_gaqat.quant.config.QuantConfig`; it can be
switched off and on (:func:`set_quantization`, :func:`quantization_disabled`): off, it is the
exact identity. Scales are :class:`Scale` parameters from construction on and the
``initialized`` / ``enabled`` flags are buffers, so ``state_dict`` round-trips with
``strict=True`` in every state. Everything is created on the device it is asked for (a quantized
layer: its float layer's), scales stay float32 when a model is cast to 16 bits
(:class:`~.precision.Float32State`), and no step synchronises with the host, range
initialisation included (:func:`check_initialization`).
"""

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from domainbed_gaqat.quant.config import QuantConfig
from domainbed_gaqat.quant.lsq import lsq_quantize
from domainbed_gaqat.quant.precision import Float32State
from domainbed_gaqat.quant.range_init import FiniteCheck, lsq_init_scale, mse_scale

INIT_ERROR = "cannot initialise a quantizer scale from a tensor with inf/nan values"


class Scale(nn.Parameter):
    """A quantizer's learnable scale. Its type marks it wherever it goes: a deep copy of a
    model (``copy.deepcopy`` keeps a parameter's class) holds ``Scale`` s too, so an optimizer
    built over any copy can tell its scales apart
    (:func:`~domainbed_gaqat.optim.param_groups.separate_scales`).

    >>> import copy
    >>> isinstance(copy.deepcopy(nn.Linear(2, 2).requires_grad_().weight), Scale)
    False
    >>> isinstance(copy.deepcopy(LSQQuantizer(QuantConfig(4, False), False)).scale, Scale)
    True
    """


class LSQQuantizer(Float32State):
    """LSQ fake quantizer of one tensor (paper sec. 2.1): a weight (``is_weight``, per tensor,
    or per output channel with ``channels`` scales) or a layer input (per tensor).

    The scale is set by ``config.range_init`` on the first forward while enabled: for weights
    from the weights, for activations from the first (training) batch. The scale is float32 on
    ``device`` whatever the quantized tensor's dtype (the quantizer computes in at least
    float32, :func:`~domainbed_gaqat.quant.lsq.lsq_quantize`). A tensor with inf/nan values is
    an error (``ValueError``), raised as soon as the host can tell without waiting for the
    device: in that forward on the CPU, later on a GPU (:func:`check_initialization`).
    """

    def __init__(self, config: QuantConfig, is_weight: bool, channels: int | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        per_channel = config.granularity == "channel"
        if per_channel and not (is_weight and isinstance(channels, int) and channels >= 1):
            raise ValueError("per-channel scales are for weights and need their number of "
                             f"output channels (is_weight={is_weight}, channels={channels!r})")
        self.config, self.is_weight = config, is_weight
        self.lower, self.upper = config.bounds
        self.scale = Scale(torch.ones(channels if per_channel else (), device=device))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool, device=device))
        self.register_buffer("enabled", torch.tensor(config.enabled, device=device))
        self._initialized, self._enabled = False, config.enabled  # host mirrors: no device sync
        self._check: FiniteCheck | None = None  # of the range initialisation, until read

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
        self._check = None

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
        self._check = FiniteCheck(self.scale)

    def initialization_failed(self, wait: bool = False) -> bool:
        """True if the range initialisation is known to have met inf/nan values (a NaN scale);
        False if it succeeded or is not known yet (``wait``: wait for the device to know).
        Once known, the check is dropped: it reports a failure once."""
        if self._check is None or not (wait or self._check.ready()):
            return False
        check, self._check = self._check, None
        return not check.finite()

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        if not self._enabled:
            return v
        if not self._initialized:
            self.initialize(v)
            if self.initialization_failed():
                raise ValueError(INIT_ERROR)
        return lsq_quantize(v, self._scale(v), self.lower, self.upper, self.grad_scale(v))

    def integers(self, v: torch.Tensor) -> torch.Tensor:
        """The integer codes ``clamp(round(v / s), l, u)`` (for export and inspection)."""
        return torch.clamp(torch.round(v / self._scale(v)), self.lower, self.upper)


class QuantizedWeights:
    """What the quantized twins of ``nn.Conv2d`` and ``nn.Linear`` share: LSQ quantizers on the
    input (``a_quant``) and the weight (``w_quant``), either None (that tensor stays full
    precision), built on the float layer's device; ``weight_offset``, when set, is added to the
    (quantized) weight: the hook SAQ perturbs the quantized weights through. The twin holds the
    float layer's parameters (its latent weights); :meth:`to_float` gives them back as a plain
    layer (the inverse, :func:`~domainbed_gaqat.quant.transform.dequantize`)."""

    def _add_quantizers(self, weight: QuantConfig | None, activation: QuantConfig | None,
                        float_layer: nn.Module) -> None:
        self.load_state_dict(float_layer.state_dict())
        device = float_layer.weight.device
        self.a_quant = LSQQuantizer(activation, is_weight=False, device=device) if activation \
            else None
        self.w_quant = (LSQQuantizer(weight, is_weight=True, channels=self.weight.shape[0],
                                     device=device) if weight else None)
        self.weight_offset: torch.Tensor | None = None

    def _quantized(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input, weight)`` as the layer's operation sees them."""
        weight = self.weight if self.w_quant is None else self.w_quant(self.weight)
        if self.weight_offset is not None:
            weight = weight + self.weight_offset
        return (x if self.a_quant is None else self.a_quant(x)), weight

    def to_float(self) -> nn.Module:
        """The float layer of the same latent weights (quantizers dropped)."""
        layer = self._float_layer()
        layer.load_state_dict({k: v for k, v in self.state_dict().items()
                               if k in ("weight", "bias")})
        return layer


class QuantConv2d(QuantizedWeights, nn.Conv2d):
    """``nn.Conv2d`` with LSQ quantizers on its input and weight (:class:`QuantizedWeights`)."""

    def __init__(self, conv: nn.Conv2d, weight: QuantConfig | None,
                 activation: QuantConfig | None) -> None:
        nn.Conv2d.__init__(self, **_conv_args(conv))
        self._add_quantizers(weight, activation, conv)

    def _float_layer(self) -> nn.Conv2d:
        return nn.Conv2d(**_conv_args(self))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(*self._quantized(x), self.bias)


class QuantLinear(QuantizedWeights, nn.Linear):
    """``nn.Linear`` with LSQ quantizers on its input and weight (:class:`QuantizedWeights`)."""

    def __init__(self, linear: nn.Linear, weight: QuantConfig | None,
                 activation: QuantConfig | None) -> None:
        nn.Linear.__init__(self, **_linear_args(linear))
        self._add_quantizers(weight, activation, linear)

    def _float_layer(self) -> nn.Linear:
        return nn.Linear(**_linear_args(self))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(*self._quantized(x), self.bias)


def _conv_args(conv: nn.Conv2d) -> dict:
    return {"in_channels": conv.in_channels, "out_channels": conv.out_channels,
            "kernel_size": conv.kernel_size, "stride": conv.stride, "padding": conv.padding,
            "dilation": conv.dilation, "groups": conv.groups, "bias": conv.bias is not None,
            "padding_mode": conv.padding_mode, "device": conv.weight.device,
            "dtype": conv.weight.dtype}


def _linear_args(linear: nn.Linear) -> dict:
    return {"in_features": linear.in_features, "out_features": linear.out_features,
            "bias": linear.bias is not None, "device": linear.weight.device,
            "dtype": linear.weight.dtype}


def quantizers(module: nn.Module) -> Iterator[tuple[str, LSQQuantizer]]:
    """``(name, quantizer)`` pairs in forward order, e.g. ``("layer1.0.conv1.w_quant", q)``."""
    return ((n, m) for n, m in module.named_modules() if isinstance(m, LSQQuantizer))


def check_initialization(named: Iterable[tuple[str, LSQQuantizer]], wait: bool = False) -> None:
    """Raise ``ValueError`` naming the quantizers whose range initialisation met inf/nan
    values, among those the host can tell without waiting for the device (all with ``wait``).
    No host sync: on a GPU a failure is reported a step or so after it happened, at the first
    call that finds the device done (the training steps call it; see docs/performance.md)."""
    failed = [name for name, q in named if q.initialization_failed(wait)]
    if failed:
        raise ValueError(f"{INIT_ERROR}: {', '.join(failed)}")


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
