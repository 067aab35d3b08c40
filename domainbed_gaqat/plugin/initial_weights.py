"""Checkpoints, all untrusted (``torch.load(..., weights_only=True)``): the initial weights of
the featurizer (MoCo-v2, torchvision, a DomainBed ``model.pkl``) and ``model.pkl`` files read
back into their algorithm.
"""

import os
from collections.abc import Sequence

import torch
import torchvision
from torch import nn

from domainbed_gaqat.plugin.featurizer import Featurizer

INIT_CHOICES = ("none", "torchvision", "moco", "domainbed")
MOCO_ENV = "DOMAINBED_GAQAT_MOCO"
CHECKPOINT_KEYS = ("args", "model_input_shape", "model_num_classes", "model_num_domains",
                   "model_hparams", "model_dict")


def read_weights(path: str, what: str) -> object:
    """``torch.load(path, weights_only=True)`` on CPU; errors name the path and ``what`` it
    should be."""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no file at {path!r}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{what}: could not read {path!r} as a weights-only torch checkpoint "
                         f"({err})") from err


# --- initial weights -----------------------------------------------------------------------


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
        ckpt = read_weights(path, what)
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model_dict"), dict):
            raise ValueError(f"{path!r} is not a {what}")
        model = ckpt["model_dict"]
        feat = {k[len("featurizer."):]: v for k, v in model.items() if k.startswith("featurizer.")}
        head = {k[len("classifier."):]: v for k, v in model.items() if k.startswith("classifier.")}
        if not feat or not head:
            raise ValueError(f"{path!r} has no featurizer.*/classifier.* weights: not a {what}")
        _load_exact(featurizer, feat, path, what)
        _load_exact(classifier, head, path, what)


# --- model.pkl --------------------------------------------------------------------------


def algorithm_class(name: str) -> type:
    """A DomainBed algorithm class (the plugin's are registered by its start-up hook)."""
    from domainbed import algorithms

    if name not in algorithms.ALGORITHMS:
        raise ValueError(f"algorithm {name!r}: expected one of {sorted(algorithms.ALGORITHMS)}")
    return algorithms.get_algorithm_class(name)


def load_checkpoint(path: str) -> dict:
    """A DomainBed ``model.pkl`` (train.py's ``save_checkpoint`` dict), loaded weights-only."""
    ckpt = read_weights(path, "DomainBed model.pkl")
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{path!r} is not a DomainBed model.pkl: missing keys {missing} "
                         f"(expected {list(CHECKPOINT_KEYS)})")
    return ckpt


def algorithm_from_checkpoint(ckpt: dict, device: str = "cpu") -> nn.Module:
    """Rebuild the checkpoint's algorithm and load its ``model_dict`` with ``strict=True``.

    The initialisation hparams are reset to ``init='none'`` first: the weights come from the
    checkpoint, so the stage-1 / MoCo file it was started from need not exist any more.
    """
    name = ckpt["args"].get("algorithm")
    hparams = dict(ckpt["model_hparams"], init="none", init_path="")
    algorithm = algorithm_class(name)(tuple(ckpt["model_input_shape"]),
                                      ckpt["model_num_classes"], ckpt["model_num_domains"],
                                      hparams)
    algorithm.load_state_dict(ckpt["model_dict"])
    return algorithm.to(device).eval()


def load_algorithm(path: str, device: str = "cpu") -> tuple[nn.Module, dict]:
    """``(algorithm in eval mode, checkpoint dict)`` of a ``model.pkl``."""
    ckpt = load_checkpoint(path)
    return algorithm_from_checkpoint(ckpt, device), ckpt


def quantized_algorithms() -> list[str]:
    """The registered algorithms with quantizers (the plugin's declare it in their ``SPEC``)."""
    from domainbed import algorithms

    return [name for name in algorithms.ALGORITHMS
            if getattr(getattr(algorithms, name, None), "SPEC", None) is not None
            and algorithms.get_algorithm_class(name).SPEC.quantized]


def require_quantized(ckpt: dict, path: str) -> None:
    name = ckpt["args"].get("algorithm")
    if name not in quantized_algorithms():
        raise ValueError(f"{path!r} holds algorithm {name!r}: expected a quantized model "
                         f"({', '.join(quantized_algorithms())})")


def checkpoint_dict(args: dict, dataset, test_envs: Sequence[int], hparams: dict,
                    algorithm: nn.Module) -> dict:
    """The dict train.py saves as ``model.pkl``."""
    return {"args": args, "model_input_shape": dataset.input_shape,
            "model_num_classes": dataset.num_classes,
            "model_num_domains": len(dataset) - len(test_envs),
            "model_hparams": hparams, "model_dict": algorithm.state_dict()}


