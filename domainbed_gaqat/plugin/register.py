"""Adds the plugin's algorithms, hyperparameters, datasets, launchers and reporting to DomainBed.

Each ``_patch_*`` function takes one of DomainBed's registry modules right after it executed
and is idempotent, so the start-up hook and an explicit :func:`register_all` can both run.
"""

import functools
import importlib
from collections.abc import Callable
from types import ModuleType


def _add(module: ModuleType, names: list[str], classes: dict[str, type], listing: str) -> None:
    for name in names:
        setattr(module, name, classes[name])
        if name not in getattr(module, listing):
            getattr(module, listing).append(name)


def _patch_algorithms(module: ModuleType) -> None:
    from domainbed_gaqat.plugin.algorithms import ALGORITHMS

    _add(module, list(ALGORITHMS), {n: s.cls for n, s in ALGORITHMS.items()}, "ALGORITHMS")
    if not hasattr(module.get_algorithm_class, "__wrapped__"):
        module.get_algorithm_class = _resolving(module.get_algorithm_class)


def _resolving(get_algorithm_class: Callable[[str], type]) -> Callable[[str], type]:
    """DomainBed's ``get_algorithm_class``, making a generic ``<Name>_FP`` / ``_LSQ`` /
    ``_QTDoG`` class first (:func:`domainbed_gaqat.plugin.generic.resolve`)."""

    @functools.wraps(get_algorithm_class)
    def lookup(algorithm_name):
        from domainbed_gaqat.plugin.generic import resolve

        resolve(algorithm_name)
        return get_algorithm_class(algorithm_name)

    return lookup


def _patch_networks(module: ModuleType) -> None:
    from domainbed_gaqat.plugin.featurizer import domainbed_featurizer

    module.Featurizer = domainbed_featurizer(module.Featurizer)


def _patch_hparams_registry(module: ModuleType) -> None:
    from domainbed_gaqat.plugin import hparams, registry

    installed = module._hparams
    if getattr(installed, "func", None) is not hparams.registry_pairs:
        module._hparams = functools.partial(hparams.registry_pairs, installed,
                                           registry.plugin_spec)


def _patch_datasets(module: ModuleType) -> None:
    from domainbed_gaqat.plugin import datasets

    _add(module, datasets.DATASETS, vars(datasets), "DATASETS")


def _patch_command_launchers(module: ModuleType) -> None:
    from domainbed_gaqat.plugin import launchers

    module.REGISTRY.update(launchers.REGISTRY)


def _patch_reporting(module: ModuleType) -> None:
    from domainbed_gaqat.plugin import reporting

    reporting.patch_reporting(module)


def _patch_model_selection(module: ModuleType) -> None:
    from domainbed_gaqat.plugin import reporting

    reporting.patch_model_selection(module)


PATCHES = {
    "domainbed.networks": _patch_networks,
    "domainbed.algorithms": _patch_algorithms,
    "domainbed.hparams_registry": _patch_hparams_registry,
    "domainbed.datasets": _patch_datasets,
    "domainbed.command_launchers": _patch_command_launchers,
    "domainbed.lib.reporting": _patch_reporting,
    "domainbed.model_selection": _patch_model_selection,
}


def patch(module: ModuleType) -> None:
    """Register the plugin into one freshly executed DomainBed module."""
    PATCHES[module.__name__](module)


def register_all() -> None:
    """Import DomainBed's registries and register the plugin into each (idempotent)."""
    for name, fn in PATCHES.items():
        fn(importlib.import_module(name))
