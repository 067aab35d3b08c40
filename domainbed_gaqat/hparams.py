"""Hyperparameters of the plugin's algorithms, in DomainBed's ``(default, random)`` form.

Paper sec. 4.1 / SPEC section 5. The plugin's algorithms keep DomainBed's entries that its
train script and datasets read (``DOMAINBED_KEYS``) and add their own; every random draw uses
DomainBed's scheme,
``RandomState(seed_hash(seed, name))``, and values are plain Python types. Imports no torch.
"""

from collections.abc import Callable

import numpy as np

# Which hyperparameter families each algorithm uses (the algorithms module checks it agrees).
FAMILIES: dict[str, tuple[str, ...]] = {
    "ERM_FP": (),
    "SAGM": ("sagm",),
    "LSQ": ("quant",),
    "SAGM_LSQ": ("quant", "sagm"),
    "GAQAT": ("quant", "sagm", "gaqat"),
    "GAQAT_ReverseRatio": ("quant", "sagm", "gaqat"),
    "GAQAT_NoUnfreeze": ("quant", "sagm", "gaqat"),
}

# GAQAT grids of the paper (sec. 4.1): (dataset, bits) -> {"gaqat_r": [...], "gaqat_K": [...]}.
# The first entry of a list is the default. Ablations (Tables 4-6) fix K=350, r=0.30 on PACS.
GAQAT_GRIDS: dict[tuple[str, int], dict[str, list]] = {
    ("PACS", 4): {"gaqat_r": [0.30, 0.28, 0.32], "gaqat_K": [350, 300, 400]},
    ("PACS", 3): {"gaqat_r": [0.30, 0.28, 0.32], "gaqat_K": [150, 100, 200]},
    ("DomainNet", 4): {"gaqat_r": [0.25, 0.20], "gaqat_K": [3000, 4000]},
    ("DomainNet", 3): {"gaqat_r": [0.03, 0.02], "gaqat_K": [300, 200]},
    ("RotatedDigits", 4): {"gaqat_r": [0.30, 0.20, 0.40], "gaqat_K": [10, 20]},
    ("RotatedDigits", 3): {"gaqat_r": [0.30, 0.20, 0.40], "gaqat_K": [10, 20]},
}
LR_GRID = [5e-5, 1e-5, 3e-5]  # paper sec. 4.1, default first
DOMAINBED_KEYS = ("data_augmentation", "class_balanced")
SMALL = ("RotatedDigits", "Debug28", "Debug224", "RotatedMNIST", "ColoredMNIST")

Entry = tuple[object, Callable[[np.random.RandomState], object]]


def _fixed(value: object) -> Entry:
    return value, lambda r: value


def _choice(values: list) -> Entry:
    return values[0], lambda r: values[int(r.randint(len(values)))]


def plugin_hparams(algorithm: str, dataset: str) -> dict[str, Entry]:
    """The plugin's entries for one algorithm and dataset: ``{name: (default, random_fn)}``."""
    families = FAMILIES[algorithm]
    small = dataset in SMALL
    entries: dict[str, Entry] = {
        "resnet18": _fixed(small),
        "resnet_dropout": _fixed(0.0),
        "init": _fixed("none" if small else "moco"),
        "init_path": _fixed(""),
        "lr": _fixed(1e-3) if small else _choice(LR_GRID),
        "weight_decay": _fixed({"DomainNet": 1e-6}.get(dataset, 0.0 if small else 1e-4)),
        # DomainBed's Debug datasets have 13 training images per env: a larger batch makes its
        # infinite loader (drop_last=True) spin forever (SPEC section 6).
        "batch_size": _fixed({"DomainNet": 24, "Debug28": 8, "Debug224": 8}.get(dataset, 32)),
    }
    if "quant" in families:
        entries.update(w_bits=_fixed(4), a_bits=_fixed(4), scale_lr=_fixed(1e-5),
                       lsq_grad_scale=_fixed(True))
    if "sagm" in families:
        entries.update(rho=_fixed(0.05), alpha=_fixed(0.0005 if dataset == "DomainNet" else 0.001))
    if "gaqat" in families:
        grid = GAQAT_GRIDS.get((dataset, 4), GAQAT_GRIDS[("PACS", 4)])
        entries.update(gaqat_r=_choice(grid["gaqat_r"]), gaqat_K=_choice(grid["gaqat_K"]))
    return entries


def _plain(value: object) -> object:
    return value.item() if isinstance(value, np.generic) else value


def wrap_hparams(original: Callable) -> Callable:
    """Wrap DomainBed's ``hparams_registry._hparams`` so it also knows the plugin's algorithms."""
    from domainbed.lib import misc

    def _hparams(algorithm, dataset, random_seed):
        if algorithm not in FAMILIES:
            return original(algorithm, dataset, random_seed)
        base = original("ERM", dataset, random_seed)
        hparams = {k: v for k, v in base.items() if k in DOMAINBED_KEYS}
        for name, (default, random_fn) in plugin_hparams(algorithm, dataset).items():
            state = np.random.RandomState(misc.seed_hash(random_seed, name))
            hparams[name] = (_plain(default), _plain(random_fn(state)))
        return hparams

    _hparams._gaqat = True
    _hparams.__wrapped__ = original
    return _hparams
