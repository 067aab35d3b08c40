"""The one featurizer every algorithm shares: a (quantized) torchvision ResNet (SPEC section 2).

Quantization policy (paper sec. 4.1): every conv quantizes its input activations and its
weights, except the stem conv, which quantizes its input only (weights stay full precision);
the linear classifier is not quantized. The stem's input is the normalised image, which is
signed, so its activation quantizer uses the signed grid (an unsigned one would zero every
negative pixel); every other conv input follows a ReLU and uses the unsigned grid.
"""

import os
from collections.abc import Iterator

import torch
import torchvision
from torch import nn

from domainbed_gaqat.quantizer import LSQQuantizer

INIT_CHOICES = ("none", "torchvision", "moco", "domainbed")
MOCO_ENV = "DOMAINBED_GAQAT_MOCO"


class QuantConv2d(nn.Conv2d):
    """``nn.Conv2d`` with LSQ quantizers on its input (``a_quant``) and weight (``w_quant``)."""

    def __init__(self, conv: nn.Conv2d, w_bits: int | None, a_bits: int, signed_input: bool,
                 lsq_grad_scale: bool = True) -> None:
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                         conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                         conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
        self.load_state_dict(conv.state_dict())
        self.a_quant = LSQQuantizer(a_bits, signed_input, is_weight=False,
                                    lsq_grad_scale=lsq_grad_scale)
        self.w_quant = (LSQQuantizer(w_bits, signed=True, is_weight=True,
                                     lsq_grad_scale=lsq_grad_scale)
                        if w_bits is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.w_quant is None else self.w_quant(self.weight)
        return self._conv_forward(self.a_quant(x), weight, self.bias)


def quantize_resnet(resnet: nn.Module, w_bits: int, a_bits: int,
                    lsq_grad_scale: bool = True) -> None:
    """Replace every conv of a torchvision ResNet by a :class:`QuantConv2d`, in place."""
    for parent in list(resnet.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Conv2d:
                stem = parent is resnet and name == "conv1"
                setattr(parent, name, QuantConv2d(child, None if stem else w_bits, a_bits,
                                                  signed_input=stem,
                                                  lsq_grad_scale=lsq_grad_scale))


def quantizers(module: nn.Module) -> Iterator[tuple[str, LSQQuantizer]]:
    """``(name, quantizer)`` pairs in forward order, e.g. ``("layer1.0.conv1.w_quant", q)``."""
    return ((n, m) for n, m in module.named_modules() if isinstance(m, LSQQuantizer))


def scale_label(quantizer_name: str) -> str:
    """Readable label of a quantizer: ``layer3.0.conv1.w_quant`` -> ``layer3.0.conv1 w``."""
    layer, kind = quantizer_name.rsplit(".", 1)
    return f"{layer.removeprefix('featurizer.').removeprefix('network.')} {kind[0]}"


class Featurizer(nn.Module):
    """ResNet-50 (ResNet-18 with the ``resnet18`` hparam) without ``fc``, frozen BatchNorm,
    dropout on the pooled features; quantized when ``bits = (w_bits, a_bits)`` is given."""

    def __init__(self, input_shape: tuple[int, ...], hparams: dict,
                 bits: tuple[int, int] | None) -> None:
        super().__init__()
        arch = torchvision.models.resnet18 if hparams["resnet18"] else torchvision.models.resnet50
        self.network = arch(weights=None)
        if input_shape[0] != 3:
            old = self.network.conv1
            self.network.conv1 = nn.Conv2d(input_shape[0], old.out_channels, old.kernel_size,
                                           old.stride, old.padding, bias=False)
        self.n_outputs = self.network.fc.in_features
        self.network.fc = nn.Identity()
        if bits is not None:
            quantize_resnet(self.network, *bits, lsq_grad_scale=hparams["lsq_grad_scale"])
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


# --- initialisation (SPEC section 2) -------------------------------------------------------


def _load_checkpoint(path: str, what: str) -> dict:
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no file at init_path={path!r}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{what}: could not read {path!r} as a weights-only torch checkpoint "
                         f"({err})") from err


def _load_exact(module: nn.Module, state: dict, path: str, what: str) -> None:
    """Load ``state`` into ``module``; only quantizer entries may be missing (they calibrate)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state and "_quant." not in k]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in state if k in own and (not isinstance(state[k], torch.Tensor)
                                                or state[k].shape != own[k].shape)]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{what} at {path!r} does not match the {type(module).__name__}: "
            f"missing {missing[:5]} ({len(missing)}), unexpected {unexpected[:5]} "
            f"({len(unexpected)}), shape mismatch {shapes[:5]} ({len(shapes)})")
    module.load_state_dict(state, strict=False)


def _moco_state(path: str) -> dict:
    """ResNet weights of a MoCo-v2 checkpoint: ``module.encoder_q.*`` keys, ``fc`` head dropped."""
    what = "MoCo-v2 checkpoint (state_dict with module.encoder_q.* keys)"
    ckpt = _load_checkpoint(path, what)
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    prefix = "module.encoder_q."
    if not isinstance(state, dict) or not any(k.startswith(prefix) for k in state):
        raise ValueError(f"{path!r} is not a {what}")
    return {k[len(prefix):]: v for k, v in state.items()
            if k.startswith(prefix) and not k.startswith(prefix + "fc.")}


def _torchvision_state(hparams: dict) -> tuple[str, dict]:
    """ImageNet weights from the torch hub cache (never downloaded here)."""
    name = "ResNet18_Weights" if hparams["resnet18"] else "ResNet50_Weights"
    weights = getattr(torchvision.models, name).IMAGENET1K_V1
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    what = f"torchvision {name}.IMAGENET1K_V1 in the torch hub cache"
    state = _load_checkpoint(path, what)
    if not isinstance(state, dict):
        raise ValueError(f"{path!r} is not a {what} (a state_dict)")
    return path, {k: v for k, v in state.items() if not k.startswith("fc.")}


def initialize(featurizer: Featurizer, classifier: nn.Linear, hparams: dict) -> None:
    """Load the initial weights chosen by ``hparams['init']`` / ``hparams['init_path']``.

    ``moco``: a MoCo-v2 file (``init_path``, else ``$DOMAINBED_GAQAT_MOCO``); ``torchvision``:
    ImageNet weights from the torch hub cache; ``domainbed``: a DomainBed ``model.pkl`` of a
    run on the shared featurizer (featurizer and classifier, e.g. the full-precision ERM stage);
    ``none``: random. Checkpoints are untrusted: loaded with ``weights_only=True``.
    """
    init, path = hparams["init"], hparams["init_path"]
    if init not in INIT_CHOICES:
        raise ValueError(f"hparams['init']={init!r}: expected one of {INIT_CHOICES}")
    if init == "none":
        return
    if init == "torchvision":
        path, state = _torchvision_state(hparams)
        _load_exact(featurizer.network, state, path, "torchvision weights")
    elif init == "moco":
        path = path or os.environ.get(MOCO_ENV, "")
        if not path:
            raise FileNotFoundError(f"init='moco' needs the MoCo-v2 file: set hparams init_path "
                                    f"or ${MOCO_ENV} (moco_v2_800ep_pretrain.pth.tar)")
        _load_exact(featurizer.network, _moco_state(path), path, "MoCo-v2 ResNet weights")
    else:
        what = "DomainBed model.pkl (a dict with model_dict) of a run on the shared featurizer"
        ckpt = _load_checkpoint(path, what)
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model_dict"), dict):
            raise ValueError(f"{path!r} is not a {what}")
        model = ckpt["model_dict"]
        feat = {k[len("featurizer."):]: v for k, v in model.items() if k.startswith("featurizer.")}
        head = {k[len("classifier."):]: v for k, v in model.items() if k.startswith("classifier.")}
        if not feat or not head:
            raise ValueError(f"{path!r} has no featurizer.*/classifier.* weights: not a {what}")
        _load_exact(featurizer, feat, path, what)
        _load_exact(classifier, head, path, what)
