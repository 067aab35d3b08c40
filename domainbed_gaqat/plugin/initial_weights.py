"""The featurizer's initial weights (hparams ``init`` / ``init_path``): MoCo-v2, torchvision's
ImageNet weights, or a DomainBed ``model.pkl`` of an earlier stage; all untrusted files
(``torch.load(..., weights_only=True)``).

An earlier stage's model (``init: domainbed``) is loaded once the algorithm is built
(:func:`load_earlier_stage`): the plugin's own algorithms are a featurizer and a linear
classifier, and take those two from the file (a model of any algorithm on the shared
featurizer, DomainBed's own ERM on PACS included); DomainBed's algorithms on the shared
featurizer (``<Name>_FP`` / ``_LSQ`` / ``_QTDoG``) take the whole model (their discriminators,
second heads, ...), from a ``<Name>_*`` run or DomainBed's own ``<Name>`` where its featurizer
is the same ResNet. Quantizer entries may be missing (their scales calibrate on the first
batch), and so may the update counter QT-DoG adds; any other difference is an error naming
the missing and unexpected keys.
"""

import os

import torch
import torchvision
from torch import nn

from domainbed_gaqat.plugin.featurizer import Featurizer
from domainbed_gaqat.plugin.hparams import INIT_CHOICES
from domainbed_gaqat.plugin.model_files import read_weights

MOCO_ENV = "DOMAINBED_GAQAT_MOCO"


OPTIONAL = ("_quant.", "steps_done")  # entries a quantized model adds to a full-precision one


def _load_exact(module: nn.Module, state: dict, path: str, what: str) -> None:
    """Load ``state`` into ``module``; only the entries quantization adds may be missing."""
    own = module.state_dict()
    missing = [k for k in own if k not in state and not any(o in k for o in OPTIONAL)]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in state if k in own and (not isinstance(state[k], torch.Tensor) or (
        state[k].shape != own[k].shape and own[k].numel()))]  # empty: made at the 1st update
    if missing or unexpected or shapes:
        raise ValueError(
            f"{what} at {path!r} does not match the {type(module).__name__}: "
            f"missing {missing[:5]} ({len(missing)}), unexpected {unexpected[:5]} "
            f"({len(unexpected)}), shape mismatch {shapes[:5]} ({len(shapes)})")
    module.load_state_dict(state, strict=False)


def _moco_state(path: str) -> dict:
    """ResNet weights of a MoCo-v2 checkpoint: ``module.encoder_q.*`` keys, ``fc`` head dropped."""
    what = "MoCo-v2 checkpoint (state_dict with module.encoder_q.* keys)"
    ckpt = read_weights(path, what)
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    prefix = "module.encoder_q."
    if not isinstance(state, dict) or not any(k.startswith(prefix) for k in state):
        raise ValueError(f"{path!r} is not a {what}")
    return {k[len(prefix):]: v for k, v in state.items()
            if k.startswith(prefix) and not k.startswith(prefix + "fc.")}


def torchvision_path(resnet18: bool) -> str:
    """Where torchvision keeps its ImageNet ResNet weights (the torch hub cache)."""
    name = "ResNet18_Weights" if resnet18 else "ResNet50_Weights"
    url = getattr(torchvision.models, name).IMAGENET1K_V1.url
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def _torchvision_state(hparams: dict) -> tuple[str, dict]:
    """ImageNet weights from the torch hub cache (never downloaded here)."""
    name = "ResNet18_Weights" if hparams["resnet18"] else "ResNet50_Weights"
    path = torchvision_path(hparams["resnet18"])
    what = f"torchvision {name}.IMAGENET1K_V1 in the torch hub cache"
    state = read_weights(path, what)
    if not isinstance(state, dict):
        raise ValueError(f"{path!r} is not a {what} (a state_dict)")
    return path, {k: v for k, v in state.items() if not k.startswith("fc.")}


def initialize(featurizer: Featurizer, hparams: dict) -> None:
    """Load the featurizer's initial weights chosen by ``hparams['init']`` /
    ``hparams['init_path']``.

    ``moco``: a MoCo-v2 file (``init_path``, else ``$DOMAINBED_GAQAT_MOCO``); ``torchvision``:
    ImageNet weights from the torch hub cache; ``none``: random; ``domainbed``: nothing here,
    the whole algorithm is built first (:func:`load_earlier_stage`). Checkpoints are untrusted:
    loaded with ``weights_only=True``.
    """
    init, path = hparams["init"], hparams["init_path"]
    if init not in INIT_CHOICES:
        raise ValueError(f"hparams['init']={init!r}: expected one of {INIT_CHOICES}")
    if init == "torchvision":
        path, state = _torchvision_state(hparams)
        _load_exact(featurizer.network, state, path, "torchvision weights")
    elif init == "moco":
        path = path or os.environ.get(MOCO_ENV, "")
        if not path:
            raise FileNotFoundError(f"init='moco' needs the MoCo-v2 file: set hparams init_path "
                                    f"or ${MOCO_ENV} (moco_v2_800ep_pretrain.pth.tar)")
        _load_exact(featurizer.network, _moco_state(path), path, "MoCo-v2 ResNet weights")


def load_earlier_stage(algorithm: nn.Module, hparams: dict,
                       parts: tuple[str, ...] | None = None) -> None:
    """With ``init: domainbed``, load the ``model.pkl`` at ``init_path`` into ``algorithm``:
    its submodules ``parts`` (each exactly), or with None the whole model (see the module
    docstring); any other ``init``: nothing."""
    if hparams["init"] != "domainbed":
        return
    path = hparams["init_path"]
    what = "DomainBed model.pkl (a dict with model_dict) of a run on the shared featurizer"
    ckpt = read_weights(path, what)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model_dict"), dict):
        raise ValueError(f"{path!r} is not a {what}")
    model = ckpt["model_dict"]
    if parts is None:
        _load_exact(algorithm, model, path, what)
        return
    for part in parts:
        state = {k[len(part) + 1:]: v for k, v in model.items() if k.startswith(part + ".")}
        if not state:
            raise ValueError(f"{path!r} has no {part}.* weights: not a {what}")
        _load_exact(getattr(algorithm, part), state, path, what)
