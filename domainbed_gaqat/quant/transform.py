"""Quantize any module in place, and back: swap every ``nn.Conv2d`` (and, where the policy says
so, every ``nn.Linear`` but the last) for its quantized twin, in the spirit of torchao's
prepare / convert.

The GAQAT paper's policy (sec. 4.1), generalised from a ResNet to any featurizer: every conv
quantizes its input activations and its weights, except **the first conv** (in module order,
the stem of a CNN), which quantizes its input only (weights full precision) and on the signed
grid (its input is the normalised image); the classifier stays full precision (a featurizer has
none; with ``linear`` the last ``nn.Linear`` of the module is taken as the classifier and left
alone). Each twin keeps the float layer's parameters, device and dtype (its quantizers' scales
are float32 on that device); :func:`dequantize` gives the float layers back.

>>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
>>> policy = QuantPolicy(weight=QuantConfig(4, True), activation=QuantConfig(4, False),
...                      first_input=QuantConfig(4, True))
>>> quantize(net, policy) is net, type(net[0]).__name__, net[0].w_quant, net[2].w_quant.bits
(True, 'QuantConv2d', None, 4)
>>> [type(m).__name__ for m in dequantize(net)]
['Conv2d', 'ReLU', 'Conv2d']
"""

from dataclasses import dataclass

from torch import nn

from domainbed_gaqat.quant.config import QuantConfig
from domainbed_gaqat.quant.modules import QuantConv2d, QuantizedWeights, QuantLinear


@dataclass(frozen=True)
class QuantPolicy:
    """Which tensor of which layer gets which :class:`QuantConfig` (None: full precision).

    ``weight`` / ``activation``: every conv's weights and input (after a ReLU: the unsigned
    grid) but the first conv's; ``first_input`` / ``first_weight``: the first conv's (signed)
    input and its weights; ``linear``: every ``nn.Linear`` but the last gets ``weight`` and
    ``activation`` too."""

    weight: QuantConfig | None
    activation: QuantConfig | None
    first_input: QuantConfig | None
    first_weight: QuantConfig | None = None
    linear: bool = False


def quantize(module: nn.Module, policy: QuantPolicy) -> nn.Module:
    """Swap ``module``'s convs (and linears, with ``policy.linear``) for quantized twins, in
    place; returns ``module``. A module that already holds quantizers is refused."""
    if any(isinstance(m, QuantizedWeights) for m in module.modules()):
        raise ValueError(f"{type(module).__name__} is already quantized: dequantize it first")
    if type(module) in (nn.Conv2d, nn.Linear):
        raise ValueError(f"{module}: expected a module holding layers (quantized in place), "
                         "not a layer")
    convs = [m for m in module.modules() if type(m) is nn.Conv2d]
    linears = [m for m in module.modules() if type(m) is nn.Linear][:-1] if policy.linear else []
    twins: dict[int, nn.Module] = {}
    for i, conv in enumerate(convs):
        first = i == 0
        twins[id(conv)] = QuantConv2d(conv, policy.first_weight if first else policy.weight,
                                      policy.first_input if first else policy.activation)
    for linear in linears:
        twins[id(linear)] = QuantLinear(linear, policy.weight, policy.activation)
    _swap(module, twins)
    return module


def dequantize(module: nn.Module) -> nn.Module:
    """The inverse of :func:`quantize`, in place: every quantized twin back to its float layer
    with the same latent weights (the model of ``quantization_disabled``); returns ``module``."""
    _swap(module, {id(m): m.to_float() for m in module.modules()
                   if isinstance(m, QuantizedWeights)})
    return module


def _swap(module: nn.Module, replacements: dict[int, nn.Module]) -> None:
    """Replace children (at any depth) by identity of the module object; a module reached
    under two names is replaced under both."""
    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if id(child) in replacements:
                setattr(parent, name, replacements[id(child)])
