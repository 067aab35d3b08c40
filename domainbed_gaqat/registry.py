"""Adds the plugin's algorithms, hyperparameters, datasets and launchers to DomainBed.

Each ``_patch_*`` function takes the DomainBed module right after it executed and is
idempotent, so the start-up hook and an explicit :func:`register_all` can both run.
"""

import importlib
from types import ModuleType


def _patch_algorithms(module: ModuleType) -> None:
    from domainbed_gaqat import algorithms

    for name in algorithms.ALGORITHMS:
        setattr(module, name, getattr(algorithms, name))
        if name not in module.ALGORITHMS:
            module.ALGORITHMS.append(name)


def _patch_hparams_registry(module: ModuleType) -> None:
    from domainbed_gaqat import hparams

    if not getattr(module._hparams, "_gaqat", False):
        module._hparams = hparams.wrap_hparams(module._hparams)


def _patch_datasets(module: ModuleType) -> None:
    from domainbed_gaqat import datasets

    for name in datasets.DATASETS:
        setattr(module, name, getattr(datasets, name))
        if name not in module.DATASETS:
            module.DATASETS.append(name)


def _patch_command_launchers(module: ModuleType) -> None:
    from domainbed_gaqat import launchers

    module.REGISTRY.update(launchers.REGISTRY)


PATCHES = {
    "domainbed.algorithms": _patch_algorithms,
    "domainbed.hparams_registry": _patch_hparams_registry,
    "domainbed.datasets": _patch_datasets,
    "domainbed.command_launchers": _patch_command_launchers,
}


def patch(module: ModuleType) -> None:
    """Register the plugin into one freshly executed DomainBed module."""
    PATCHES[module.__name__](module)


def register_all() -> None:
    """Import DomainBed's registries and register the plugin into each (idempotent)."""
    for name, fn in PATCHES.items():
        fn(importlib.import_module(name))
