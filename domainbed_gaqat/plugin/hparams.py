"""Hyperparameters of the plugin's algorithms: defaults, random grids and checks (paper sec. 4.1).

Each algorithm reads DomainBed's ``data_augmentation`` and ``class_balanced`` (its datasets and
train script use them) and the parameters of its families (see the registry). In DomainBed's
``(default, random)`` form every random draw uses DomainBed's scheme,
``RandomState(seed_hash(seed, name))``; values are plain Python types. :func:`validate`
rejects unknown keys and out-of-range values when an algorithm is built.

GAQAT's ``gaqat_r`` and ``gaqat_K`` depend on the bit-width (the paper's grids per dataset and
W/A bits), so a run's hparams are drawn *for its bits*, in one step, :func:`train_hparams`:
the bits of the run's ``--hparams`` overrides pick the grid, the registry draws from it, then
the overrides apply. ``gaqat train`` and ``gaqat sweep`` call it. DomainBed's own ``train.py``
draws first and applies ``--hparams`` after, through the registry function the plugin adds,
:func:`registry_pairs`; it reads the bits from that ``--hparams`` on the command line of the
running ``domainbed.scripts.train`` (:func:`domainbed_train_overrides`), the only place they
exist when it draws. Elsewhere the registry draws for the default 4 bits.

>>> train_hparams("GAQAT", "PACS")["gaqat_K"], train_hparams("GAQAT", "PACS", overrides={
...     "w_bits": 3, "a_bits": 3})["gaqat_K"]
(350, 150)
"""

import argparse
import difflib
import json
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from domainbed_gaqat.plugin.registry import AlgorithmSpec, algorithm_class, plugin_spec
from domainbed_gaqat.quant.config import GRAD_SCALE_COUNTS, RANGE_INITS

# The paper's grids (sec. 4.1), default first: lr for every plugin algorithm on PACS and
# DomainNet; GAQAT's r and K per (dataset, bits). RotatedDigits (the offline demo) is not in
# the paper. Tables 4-6 fix r = 0.30, K = 350 on PACS W4A4.
LR_GRID = (5e-5, 1e-5, 3e-5)
GAQAT_GRIDS: dict[tuple[str, int], dict[str, tuple]] = {
    ("PACS", 4): {"gaqat_r": (0.30, 0.28, 0.32), "gaqat_K": (350, 300, 400)},
    ("PACS", 3): {"gaqat_r": (0.30, 0.28, 0.32), "gaqat_K": (150, 100, 200)},
    ("DomainNet", 4): {"gaqat_r": (0.25, 0.20), "gaqat_K": (3000, 4000)},
    ("DomainNet", 3): {"gaqat_r": (0.03, 0.02), "gaqat_K": (300, 200)},
    ("RotatedDigits", 4): {"gaqat_r": (0.30, 0.20, 0.40), "gaqat_K": (10, 20)},
    ("RotatedDigits", 3): {"gaqat_r": (0.30, 0.20, 0.40), "gaqat_K": (10, 20)},
}
DOMAINBED_KEYS = ("data_augmentation", "class_balanced")
# DomainBed's featurizer choices, which the shared featurizer replaces: a generic algorithm
# (one with a DomainBed ``base``) has DomainBed's hparams of its base but these
DOMAINBED_FEATURIZER_KEYS = ("resnet50_augmix", "dinov2", "vit", "vit_attn_tune", "vit_dropout")
BIT_KEYS = ("w_bits", "a_bits")
SMALL = ("RotatedDigits", "Debug28", "Debug224", "RotatedMNIST", "ColoredMNIST")
INIT_CHOICES = ("none", "torchvision", "moco", "domainbed")
TRAIN_SCRIPT = "domainbed.scripts.train"


# --- checks: each returns None, or what was expected --------------------------------------


Check = Callable[[object], str | None]


def _flag(value: object) -> str | None:
    return None if isinstance(value, bool) else "true or false"


def _text(value: object) -> str | None:
    return None if isinstance(value, str) else "a string"


def _integer(low: int, high: int | None = None) -> Check:
    expected = f"an integer in {low}..{high}" if high is not None else f"an integer >= {low}"

    def check(value: object) -> str | None:
        ok = (isinstance(value, int) and not isinstance(value, bool) and value >= low
              and (high is None or value <= high))
        return None if ok else expected
    return check


def _real(low: float, high: float = math.inf, low_open: bool = False,
          high_open: bool = False) -> Check:
    if high == math.inf:
        expected = f"a number {'>' if low_open else '>='} {low:g}"
    else:
        expected = (f"a number in {'(' if low_open else '['}{low:g}, {high:g}"
                    f"{')' if high_open else ']'}")

    def check(value: object) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            return expected
        ok = ((value > low if low_open else value >= low)
              and (value < high if high_open else value <= high))
        return None if ok else expected
    return check


def _anything(value: object) -> str | None:
    return None


def _one_of(choices: tuple) -> Check:
    return lambda value: None if value in choices else f"one of {list(choices)}"


# Bounds beyond which a value is a typo, not an experiment (a learning rate of 1e308 trains a
# model of NaNs): learning rates in (0, 1], weight decay and SAGM's alpha in [0, 1], a radius
# (SAGM's, SAQ's rho) in [0, 10], batch sizes up to 2^16, step counts up to 10^9.
LR_CHECK = _real(0, 1, low_open=True)
MAX_BATCH, MAX_RHO, MAX_STEPS = 2**16, 10.0, 10**9


# --- parameters ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """A hyperparameter: its default, the values ``random_hparams`` draws from (None: fixed)
    and its check."""

    default: object
    check: Check
    choices: tuple | None = None

    def draw(self, state: np.random.RandomState) -> object:
        return self.default if self.choices is None else self.choices[state.randint(
            len(self.choices))]


def gaqat_grid(dataset: str, bits: int) -> dict[str, tuple]:
    """GAQAT's ``gaqat_r`` / ``gaqat_K`` grid for a dataset and bit-width: the paper's for that
    bit-width, else the dataset's nearest one (ties to fewer bits), else PACS's."""
    known = sorted(b for d, b in GAQAT_GRIDS if d == dataset) or [4]
    nearest = min(known, key=lambda b: (abs(b - bits), b))
    return GAQAT_GRIDS.get((dataset, nearest), GAQAT_GRIDS["PACS", 4])


def params(spec: AlgorithmSpec, dataset: str, bits: int = 4) -> dict[str, Param]:
    """The parameters of an algorithm (its families, then its own defaults) on one dataset;
    ``bits``: the smaller of W/A, which picks GAQAT's grid."""
    families = spec.families
    small = dataset in SMALL
    entries = {
        "resnet18": Param(small, _flag),
        "resnet_dropout": Param(0.0, _real(0, 1, high_open=True)),
        "init": Param("none" if small else "moco", _one_of(INIT_CHOICES)),
        "init_path": Param("", _text),
        "lr": Param(1e-3, LR_CHECK) if small else Param(LR_GRID[0], LR_CHECK, LR_GRID),
        "weight_decay": Param({"DomainNet": 1e-6}.get(dataset, 0.0 if small else 1e-4),
                              _real(0, 1)),
        # DomainBed's Debug datasets have 13 training images per env: a larger batch makes its
        # infinite loader (drop_last=True) spin forever.
        "batch_size": Param({"DomainNet": 24, "Debug28": 8, "Debug224": 8}.get(dataset, 32),
                            _integer(1, MAX_BATCH)),
    }
    weights = {"scale_lr": Param(1e-5, LR_CHECK),
               "lsq_grad_scale": Param(True, _flag)}
    if "quant" in families:
        entries.update(w_bits=Param(4, _integer(2, 8)), a_bits=Param(4, _integer(2, 8)),
                       **weights)
    if "qtdog" in families:  # QT-DoG: LSQ on conv weights only, per channel, from a step on
        entries.update(w_bits=Param(7, _integer(2, 8)), w_per_channel=Param(True, _flag),
                       w_scale_init=Param("lsq_mean", _one_of(RANGE_INITS)),
                       w_grad_scale_n=Param("tensor", _one_of(GRAD_SCALE_COUNTS)),
                       quant_start=Param(2000, _integer(0, MAX_STEPS)),
                       quant_stem_weight=Param(False, _flag), qtdog_release=Param(False, _flag),
                       **weights)
    if "sagm" in families:
        entries.update(rho=Param(0.05, _real(0, MAX_RHO)),
                       alpha=Param(0.0005 if dataset == "DomainNet" else 0.001, _real(0, 1)))
    if "saq" in families:  # SAQ's radius: 0.1 by default, 0.3-0.4 in its ImageNet scripts;
        # its release perturbs the activation clips too (include_aclip): here the act. scales
        entries.update(rho=Param(0.1, _real(0, MAX_RHO), (0.1, 0.05, 0.3, 0.4)),
                       saq_perturb_act_scales=Param(True, _flag))
    if "swad" in families:  # SWAD's LossValley, its official constants
        entries.update(swad_n_converge=Param(3, _integer(1, 1000)),
                       swad_n_tolerance=Param(6, _integer(1, 1000)),
                       swad_tolerance_ratio=Param(0.3, _real(0, 100)))
    if "gaqat" in families:
        grid = gaqat_grid(dataset, bits)
        entries.update(gaqat_r=Param(grid["gaqat_r"][0], _real(0, 1), grid["gaqat_r"]),
                       gaqat_K=Param(grid["gaqat_K"][0], _integer(2, MAX_STEPS), grid["gaqat_K"]))
    if spec.base is not None:  # DomainBed's algorithms read it; the shared BN is always frozen
        entries["freeze_bn"] = Param(True, _one_of((True,)))
    for name, default in spec.defaults.items():
        entries[name] = Param(default, entries[name].check, entries[name].choices)
    return entries


def domainbed_pairs(spec: AlgorithmSpec, dataset: str, seed: int) -> dict[str, tuple]:
    """DomainBed's ``(default, random)`` pairs that a plugin algorithm takes from DomainBed's
    registry: ``data_augmentation`` and ``class_balanced``, or for a generic algorithm every
    hparam of its DomainBed base but the featurizer choices the shared featurizer replaces."""
    from domainbed import hparams_registry

    pairs = hparams_registry._hparams(spec.base or "ERM", dataset, seed)
    if spec.base is None:
        return {k: pairs[k] for k in DOMAINBED_KEYS}
    return {k: v for k, v in pairs.items() if k not in DOMAINBED_FEATURIZER_KEYS}


DOMAINBED_CHECKS: dict[str, Check] = {"data_augmentation": _flag, "class_balanced": _flag}


def paper_grid(spec: AlgorithmSpec, dataset: str, bits: int, name: str) -> list:
    """The sorted values ``random_hparams`` draws ``name`` from (the paper's grid); an error
    naming the parameter where it is fixed."""
    param = params(spec, dataset, bits).get(name)
    if param is None or param.choices is None:
        raise ValueError(f"{name!r} has no grid for {spec.name} on {dataset} at {bits} bits "
                         "(it is fixed or not a hyperparameter of it): give its values")
    return sorted(param.choices)


def bits_of(hparams: Mapping[str, object]) -> int:
    """The bit-width that picks GAQAT's grid: the smaller of ``w_bits`` / ``a_bits`` given
    (the other one's default 4), or 4 when neither is."""
    return min(hparams.get(k, 4) for k in BIT_KEYS)


def _plain(value: object) -> object:
    return value.item() if isinstance(value, np.generic) else value


def draw(spec: AlgorithmSpec, dataset: str, seed: int | None, bits: int = 4) -> dict[str, object]:
    """A plugin algorithm's hparams for ``bits``: DomainBed's (:func:`domainbed_pairs`), then
    its parameters, as defaults (``seed`` None) or DomainBed-style random draws with
    ``seed``."""
    from domainbed.lib import misc

    pairs = domainbed_pairs(spec, dataset, 0 if seed is None else seed)
    out = {k: _plain(v[0 if seed is None else 1]) for k, v in pairs.items()}
    for name, param in params(spec, dataset, bits).items():
        value = param.default if seed is None else param.draw(
            np.random.RandomState(misc.seed_hash(seed, name)))
        out[name] = _plain(value)
    return out


def domainbed_train_overrides(argv: list[str] | None = None,
                              main: object = None) -> dict[str, object]:
    """The ``--hparams`` JSON of DomainBed's ``train.py`` when it is the running script
    (``main``: the ``__main__`` module, ``argv``: its arguments; default: this process's),
    else ``{}``; ``{}`` too where it is not a JSON object (train.py reports that itself)."""
    main = sys.modules.get("__main__") if main is None else main
    script = getattr(getattr(main, "__spec__", None), "name", None) or os.path.splitext(
        os.path.abspath(getattr(main, "__file__", None) or "-"))[0].replace(os.sep, ".")
    if not (script == TRAIN_SCRIPT or script.endswith("." + TRAIN_SCRIPT)):
        return {}
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--hparams")
    text = parser.parse_known_args(sys.argv[1:] if argv is None else argv)[0].hparams
    try:
        overrides = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}
    return overrides if isinstance(overrides, dict) else {}


def registry_pairs(inner: Callable, lookup: Callable[[str], AlgorithmSpec | None],
                   algorithm: str, dataset: str, random_seed: int) -> dict[str, tuple]:
    """DomainBed's ``hparams_registry._hparams`` (``{name: (default, random)}``) knowing the
    plugin's algorithms (``lookup(name)``: a plugin algorithm's spec, else None; ``inner``:
    DomainBed's own function). The plugin installs it as
    ``functools.partial(registry_pairs, inner, lookup)``; DomainBed's ``default_hparams`` and
    ``random_hparams`` read it. The bits are those of :func:`domainbed_train_overrides`."""
    spec = lookup(algorithm)
    if spec is None:
        return inner(algorithm, dataset, random_seed)
    bits = bits_of(domainbed_train_overrides())
    defaults, drawn = draw(spec, dataset, None, bits), draw(spec, dataset, random_seed, bits)
    return {k: (defaults[k], drawn[k]) for k in defaults}


def validate(spec: AlgorithmSpec, hparams: dict) -> None:
    """Raise ``ValueError`` naming the first hparam that the algorithm does not read (with the
    closest known names), is missing, or has a value out of its range (the checks are the
    same on every dataset)."""
    algorithm = spec.name
    own = {name: p.check for name, p in params(spec, "PACS").items()}
    if spec.base is not None:  # its DomainBed base's hparams (its own checks, if it has any)
        own = {**{k: DOMAINBED_CHECKS.get(k, _anything)
                  for k in domainbed_pairs(spec, "PACS", 0)}, **own}
    known = {**DOMAINBED_CHECKS, **own}
    for key in hparams:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
            hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
            raise ValueError(f"hparams key {key!r} is not a hyperparameter of {algorithm}: "
                             f"{hint}expected some of {sorted(known)}")
    missing = [k for k in own if k not in hparams]
    if missing:
        raise ValueError(f"hparams of {algorithm} lack {missing}")
    for key, check in known.items():
        if key in hparams:
            expected = check(hparams[key])
            if expected:
                raise ValueError(f"hparams[{key!r}]={hparams[key]!r} for {algorithm}: "
                                 f"expected {expected}")


def train_hparams(algorithm: str, dataset: str, hparams_seed: int = 0, trial_seed: int = 0,
                  overrides: str | Mapping | None = None) -> dict:
    """A run's hparams, chosen as DomainBed's train.py does, in one step: the registry's
    default (``hparams_seed`` 0) or random draw (seed ``seed_hash(hparams_seed,
    trial_seed)``) *for the bits of the overrides* (GAQAT's grid), then the overrides (a dict
    or train.py's ``--hparams`` JSON)."""
    from domainbed import hparams_registry
    from domainbed.lib import misc

    algorithm_class(algorithm)
    if isinstance(overrides, str) and overrides:
        try:
            overrides = json.loads(overrides)
        except json.JSONDecodeError as err:
            raise ValueError(f"--hparams {overrides!r} is not a JSON object ({err})") from err
    if overrides and not isinstance(overrides, Mapping):
        raise ValueError(f"hparams overrides must be a JSON object, got {overrides!r}")
    overrides = dict(overrides or {})
    seed = None if hparams_seed == 0 else misc.seed_hash(hparams_seed, trial_seed)
    spec = plugin_spec(algorithm)
    if spec is not None:
        hparams = draw(spec, dataset, seed, bits_of(overrides))
    elif seed is None:
        hparams = hparams_registry.default_hparams(algorithm, dataset)
    else:
        hparams = hparams_registry.random_hparams(algorithm, dataset, seed)
    return {**hparams, **overrides}
