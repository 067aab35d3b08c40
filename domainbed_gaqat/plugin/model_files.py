"""DomainBed ``model.pkl`` files and every other torch file this project reads, all untrusted
(``torch.load(..., weights_only=True)``): the dict train.py saves, and an algorithm rebuilt
from it.
"""

import os
from collections.abc import Sequence

import torch
from torch import nn

from domainbed_gaqat.plugin.hooks import hosted
from domainbed_gaqat.plugin.registry import algorithm_class, is_quantized, quantized_algorithms

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


def checkpoint_dict(args: dict, dataset, test_envs: Sequence[int], hparams: dict,
                    algorithm: nn.Module) -> dict:
    """The dict train.py saves as ``model.pkl`` (its keys: :data:`CHECKPOINT_KEYS`)."""
    return {"args": args, "model_input_shape": dataset.input_shape,
            "model_num_classes": dataset.num_classes,
            "model_num_domains": len(dataset) - len(test_envs),
            "model_hparams": hparams, "model_dict": algorithm.state_dict()}


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
    checkpoint, so the stage-1 / MoCo file it was started from need not exist any more. It is
    built :func:`~domainbed_gaqat.plugin.hooks.hosted`: evaluated here, not trained.
    """
    name = ckpt["args"].get("algorithm")
    hparams = dict(ckpt["model_hparams"], init="none", init_path="")
    with hosted():
        algorithm = algorithm_class(name)(tuple(ckpt["model_input_shape"]),
                                          ckpt["model_num_classes"], ckpt["model_num_domains"],
                                          hparams)
    algorithm.load_state_dict(ckpt["model_dict"])
    return algorithm.to(device).eval()


def load_algorithm(path: str, device: str = "cpu") -> tuple[nn.Module, dict]:
    """``(algorithm in eval mode, checkpoint dict)`` of a ``model.pkl``."""
    ckpt = load_checkpoint(path)
    return algorithm_from_checkpoint(ckpt, device), ckpt


def require_quantized(ckpt: dict, path: str) -> None:
    """Refuse a checkpoint whose algorithm is not quantized."""
    name = ckpt["args"].get("algorithm")
    if not is_quantized(name):
        raise ValueError(f"{path!r} holds algorithm {name!r}: expected a quantized model "
                         f"({', '.join(quantized_algorithms())}, or a <Name>_LSQ / _QTDoG)")
