"""Hyperparameters of the plugin's algorithms: defaults, random grids and checks (paper sec. 4.1).

Each algorithm reads DomainBed's ``data_augmentation`` and ``class_balanced`` (its datasets and
train script use them) and the parameters of its families (see the registry). In DomainBed's
``(default, random)`` form every random draw uses DomainBed's scheme,
``RandomState(seed_hash(seed, name))``; values are plain Python types. GAQAT's ``gaqat_r`` and
``gaqat_K`` depend on the bit-width (the paper's grids per dataset and W/A bits): the hparams
that ``default_hparams`` / ``random_hparams`` return re-draw them, with the same seed, when an
update sets ``w_bits`` or ``a_bits`` without setting them (train.py applies ``--hparams`` after
the draw). :func:`validate` rejects unknown keys and out-of-range values when an algorithm is
built.
"""

import difflib
import json
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from domainbed_gaqat.plugin.checkpoints import INIT_CHOICES, algorithm_class
from domainbed_gaqat.plugin.registry import AlgorithmSpec
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
BIT_KEYS = ("w_bits", "a_bits")
SMALL = ("RotatedDigits", "Debug28", "Debug224", "RotatedMNIST", "ColoredMNIST")


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
    for name, default in spec.defaults.items():
        entries[name] = Param(default, entries[name].check, entries[name].choices)
    return entries


DOMAINBED_CHECKS: dict[str, Check] = {"data_augmentation": _flag, "class_balanced": _flag}


def paper_grid(spec: AlgorithmSpec, dataset: str, bits: int, name: str) -> list:
    """The sorted values ``random_hparams`` draws ``name`` from (the paper's grid); an error
    naming the parameter where it is fixed."""
    param = params(spec, dataset, bits).get(name)
    if param is None or param.choices is None:
        raise ValueError(f"{name!r} has no grid for {spec.name} on {dataset} at {bits} bits "
                         "(it is fixed or not a hyperparameter of it): give its values")
    return sorted(param.choices)


def _bits(hparams: dict) -> int:
    return min(hparams.get(k, 4) for k in BIT_KEYS if k in hparams) if any(
        k in hparams for k in BIT_KEYS) else 4


def _plain(value: object) -> object:
    return value.item() if isinstance(value, np.generic) else value


def _draws(spec: AlgorithmSpec, dataset: str, seed: int | None, bits: int,
           names: list[str] | None = None) -> dict[str, object]:
    """Defaults (``seed`` None) or DomainBed-style random draws of the plugin's parameters."""
    from domainbed.lib import misc

    out = {}
    for name, param in params(spec, dataset, bits).items():
        if names is None or name in names:
            value = param.default if seed is None else param.draw(
                np.random.RandomState(misc.seed_hash(seed, name)))
            out[name] = _plain(value)
    return out


BIT_DEPENDENT = ("gaqat_r", "gaqat_K")


class Hparams(dict):
    """A plugin algorithm's hparams: setting ``w_bits`` / ``a_bits`` re-draws GAQAT's
    bit-dependent ``gaqat_r`` / ``gaqat_K`` (same seed) unless they were ever set explicitly.
    Pickles and copies as an ``OrderedDict`` (which ``torch.load(weights_only=True)`` reads:
    train.py saves the hparams in ``model.pkl``)."""

    def __init__(self, values: dict, spec: AlgorithmSpec, dataset: str,
                 seed: int | None) -> None:
        super().__init__(values)
        self._origin = spec, dataset, seed
        self._explicit: set[str] = set()

    def __setitem__(self, key, value) -> None:
        self.update({key: value})

    def update(self, other=(), **more) -> None:
        other = dict(other, **more)
        super().update(other)
        self._explicit.update(other)
        if set(BIT_KEYS) & set(other):
            dependent = [k for k in BIT_DEPENDENT if k in self and k not in self._explicit]
            super().update(_draws(*self._origin, _bits(self), dependent))

    def __reduce__(self):
        return OrderedDict, (), None, None, iter(self.items())


def wrap_registry(default_hparams: Callable, random_hparams: Callable, inner: Callable,
                  lookup: Callable[[str], AlgorithmSpec | None]
                  ) -> tuple[Callable, Callable, Callable]:
    """Wrap DomainBed's ``hparams_registry`` functions so they also know the plugin's algorithms
    (``lookup(name)``: a plugin algorithm's spec, else None): ``_hparams`` (the ``(default,
    random)`` pairs) and ``default_hparams`` / ``random_hparams`` (which return
    :class:`Hparams`)."""

    def base(dataset: str, seed: int) -> dict:
        values = inner("ERM", dataset, seed)
        return {k: v for k, v in values.items() if k in DOMAINBED_KEYS}

    def _hparams(algorithm, dataset, random_seed):
        spec = lookup(algorithm)
        if spec is None:
            return inner(algorithm, dataset, random_seed)
        defaults = _draws(spec, dataset, None, 4)
        drawn = _draws(spec, dataset, random_seed, 4)
        return {**base(dataset, random_seed), **{k: (defaults[k], drawn[k]) for k in defaults}}

    def default(algorithm, dataset):
        spec = lookup(algorithm)
        if spec is None:
            return default_hparams(algorithm, dataset)
        values = {k: d for k, (d, _) in base(dataset, 0).items()}
        return Hparams({**values, **_draws(spec, dataset, None, 4)}, spec, dataset, None)

    def random(algorithm, dataset, seed):
        spec = lookup(algorithm)
        if spec is None:
            return random_hparams(algorithm, dataset, seed)
        values = {k: r for k, (_, r) in base(dataset, seed).items()}
        return Hparams({**values, **_draws(spec, dataset, seed, 4)}, spec, dataset, seed)

    for fn, original in ((_hparams, inner), (default, default_hparams),
                         (random, random_hparams)):
        fn._gaqat = True
        fn.__wrapped__ = original
    return default, random, _hparams


def validate(spec: AlgorithmSpec, hparams: dict) -> None:
    """Raise ``ValueError`` naming the first hparam that the algorithm does not read (with the
    closest known names), is missing, or has a value out of its range (the checks are the
    same on every dataset)."""
    algorithm = spec.name
    own = {name: p.check for name, p in params(spec, "PACS").items()}
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
                  overrides: str | dict | None = None) -> dict:
    """Hyperparameters chosen as train.py does (default for seed 0, else random) + overrides
    (a dict or train.py's ``--hparams`` JSON)."""
    from domainbed import hparams_registry
    from domainbed.lib import misc

    algorithm_class(algorithm)
    if hparams_seed == 0:
        hparams = hparams_registry.default_hparams(algorithm, dataset)
    else:
        hparams = hparams_registry.random_hparams(algorithm, dataset,
                                                  misc.seed_hash(hparams_seed, trial_seed))
    if isinstance(overrides, str) and overrides:
        try:
            overrides = json.loads(overrides)
        except json.JSONDecodeError as err:
            raise ValueError(f"--hparams {overrides!r} is not a JSON object ({err})") from err
    if overrides:
        if not isinstance(overrides, dict):
            raise ValueError(f"hparams overrides must be a JSON object, got {overrides!r}")
        hparams.update(overrides)
    return hparams
