"""The one featurizer every algorithm shares: a (quantized) torchvision ResNet, and its
quantization policy from the hparams.

Policy (paper sec. 4.1, :mod:`domainbed_gaqat.quant.transform`): every conv quantizes its input
activations and its weights, except the stem conv (the ResNet's first conv), which quantizes its
input only (weights stay full precision); the linear classifier is not quantized. The stem's
input is the normalised image, which is signed, so its activation quantizer uses the signed
grid (an unsigned one would zero every negative pixel); every other conv input follows a ReLU
and uses the unsigned grid. Options (QT-DoG's): weights only (no activation quantizers), one
scale per output channel, the stem's weights quantized too, and quantizers that start disabled
(the exact identity) until a training step.
"""

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torchvision
from torch import nn

from domainbed_gaqat.quant.config import QuantConfig
from domainbed_gaqat.quant.transform import QuantPolicy, quantize


def quant_policy(hparams: dict) -> QuantPolicy:
    """The paper's policy at ``w_bits`` / ``a_bits``; without ``a_bits``, weights only.
    The options are hparams of the algorithms that have them (QT-DoG's): ``w_per_channel``,
    ``w_scale_init`` and ``w_grad_scale_n`` (the weight scales' initialisation and LSQ
    gradient-scale count, :class:`QuantConfig`'s ``range_init`` and ``grad_scale_n``),
    ``quant_stem_weight`` (implied by ``qtdog_release``: its release quantized the stem),
    ``quant_start`` (quantizers start disabled when it is > 0)."""
    common = {"grad_scale": hparams["lsq_grad_scale"],
              "enabled": hparams.get("quant_start", 0) == 0}
    granularity = "channel" if hparams.get("w_per_channel", False) else "tensor"
    options = {field: hparams[name] for name, field in (("w_scale_init", "range_init"),
                                                        ("w_grad_scale_n", "grad_scale_n"))
               if name in hparams}
    weight = QuantConfig(hparams["w_bits"], signed=True, granularity=granularity,
                         **options, **common)
    bits = hparams.get("a_bits")
    return QuantPolicy(weight=weight,
                       activation=QuantConfig(bits, signed=False, **common) if bits else None,
                       first_input=QuantConfig(bits, signed=True, **common) if bits else None,
                       first_weight=weight if hparams.get("quant_stem_weight", False)
                       or hparams.get("qtdog_release", False) else None)


def scale_label(quantizer_name: str) -> str:
    """Readable label of a quantizer: ``featurizer.network.layer3.0.conv1.w_quant`` ->
    ``layer3.0.conv1 w``."""
    layer, kind = quantizer_name.rsplit(".", 1)
    return f"{layer.removeprefix('featurizer.').removeprefix('network.')} {kind[0]}"


class Featurizer(nn.Module):
    """ResNet-50 (ResNet-18 with the ``resnet18`` hparam) without ``fc``, frozen BatchNorm,
    dropout on the pooled features; quantized by ``policy`` when one is given."""

    def __init__(self, input_shape: tuple[int, ...], hparams: dict,
                 policy: QuantPolicy | None) -> None:
        super().__init__()
        arch = torchvision.models.resnet18 if hparams["resnet18"] else torchvision.models.resnet50
        self.network = arch(weights=None)
        if input_shape[0] != 3:
            old = self.network.conv1
            self.network.conv1 = nn.Conv2d(input_shape[0], old.out_channels, old.kernel_size,
                                           old.stride, old.padding, bias=False)
        self.n_outputs = self.network.fc.in_features
        self.network.fc = nn.Identity()
        if policy is not None:
            quantize(self.network, policy)
        self.dropout = nn.Dropout(hparams["resnet_dropout"])
        self.train()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.network(x))

    def train(self, mode: bool = True) -> "Featurizer":
        """Switch modes but keep every BatchNorm in eval mode (frozen statistics)."""
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self


# --- DomainBed's algorithms on the shared featurizer ---------------------------------------
#
# Every DomainBed algorithm builds its featurizer(s) through ``networks.Featurizer(input_shape,
# hparams)`` (Fish through ``networks.WholeFish``, inside ``update`` too): the one call they all
# make. The start-up hook wraps that function once, when ``domainbed.networks`` is imported, by
# :func:`domainbed_featurizer`: inside :func:`building` it returns what the given builder makes
# (the shared featurizer), everywhere else DomainBed's own, unchanged. DomainBed's ResNet would
# also download ImageNet weights at construction, which fails offline.

Builder = Callable[[tuple[int, ...], dict], nn.Module]
_BUILDER: ContextVar[Builder | None] = ContextVar("domainbed_gaqat_featurizer", default=None)


def domainbed_featurizer(domainbeds: Builder) -> Builder:
    """DomainBed's ``networks.Featurizer`` that builds with the builder of :func:`building`
    when there is one (idempotent: a wrapped function is returned as it is)."""
    if hasattr(domainbeds, "__wrapped__"):
        return domainbeds

    @functools.wraps(domainbeds)
    def featurizer(input_shape, hparams):
        build = _BUILDER.get()
        return domainbeds(input_shape, hparams) if build is None else build(input_shape, hparams)

    return featurizer


@contextmanager
def building(build: Builder) -> Iterator[None]:
    """DomainBed's ``networks.Featurizer(input_shape, hparams)`` calls ``build`` inside."""
    token = _BUILDER.set(build)
    try:
        yield
    finally:
        _BUILDER.reset(token)
