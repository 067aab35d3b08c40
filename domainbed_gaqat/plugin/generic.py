"""Every DomainBed algorithm, quantized: ``<Name>_FP``, ``<Name>_LSQ`` and ``<Name>_QTDoG``.

For each algorithm of DomainBed's ``ALGORITHMS`` and each of the plugin's full-precision ones
(``SAGM``, ``SWAD``), three names resolve on demand, through DomainBed's own
``get_algorithm_class`` and ``hparams_registry`` (the start-up hook wraps the first; the
second asks :func:`~domainbed_gaqat.plugin.registry.plugin_spec`):

- ``<Name>_FP``: the algorithm on the shared featurizer (the plugin's ResNet, frozen
  BatchNorm, its initial weights), full precision: the first stage;
- ``<Name>_LSQ``: the same on the featurizer quantized by the paper's W/A LSQ policy
  (:func:`~domainbed_gaqat.plugin.featurizer.quant_policy`);
- ``<Name>_QTDoG``: with QT-DoG's policy (weights only, 7 bits, per channel), quantized from
  the ``quant_start``-th update on.

The class is made the first time its name is asked for and set on ``domainbed.algorithms``
(so DomainBed's ``globals()`` lookup finds it after); the names are not added to DomainBed's
``ALGORITHMS`` list (docs/coverage.md says why, with DomainBed's test times). Where a name
means an algorithm that exists, it is that class: ``ERM_FP`` is the plugin's; ``ERM_LSQ`` is
``LSQ``, ``ERM_QTDoG`` is ``QTDoG`` and ``SAGM_FP`` is ``SAGM`` (:data:`ALIASES`: the second
name is canonical, the one sweep configs and tables use). The plugin's ``<Name>_LSQ`` /
``_QTDoG`` are :func:`~domainbed_gaqat.plugin.algorithms.variant_of` its full-precision class;
DomainBed's are :class:`OnSharedFeaturizer` before DomainBed's class.

>>> resolve("CORAL_LSQ").SPEC.base, resolve("CORAL_LSQ").SPEC.quantized
('CORAL', True)
>>> resolve("ERM_LSQ") is resolve("LSQ"), resolve("NoSuchMethod_LSQ")
(True, None)
"""

import functools
import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from domainbed import algorithms as domainbed_algorithms
from torch.optim.optimizer import register_optimizer_step_pre_hook

from domainbed_gaqat.optim.param_groups import separate_scales
from domainbed_gaqat.plugin import algorithms as plugin_algorithms
from domainbed_gaqat.plugin.algorithms import QuantStart, variant_of
from domainbed_gaqat.plugin.featurizer import Featurizer, building, quant_policy
from domainbed_gaqat.plugin.hparams import validate
from domainbed_gaqat.plugin.initial_weights import initialize, load_earlier_stage
from domainbed_gaqat.plugin.registry import algorithm
from domainbed_gaqat.quant.modules import check_initialization, quantizers

VARIANTS = ("FP", "LSQ", "QTDoG")
NAME = re.compile(r"^(?P<base>\w+?)_(?P<variant>FP|LSQ|QTDoG)$")
PLUGIN_BASES = {"ERM": "ERM_FP", "SAGM": "SAGM", "SWAD": "SWAD_FP"}  # base -> its FP class
ALIASES = {"ERM_LSQ": "LSQ", "ERM_QTDoG": "QTDoG", "SAGM_FP": "SAGM"}  # name -> canonical name

# What cannot be made right, refused when built (docs/coverage.md: what was run to find it).
REFUSED: dict[tuple[str, str], str] = {
    **{("URM", v): "URM sets an output activation on DomainBed's own featurizer classes only "
       "(it asserts the featurizer is one of them)" for v in VARIANTS},
    **{("Fish", v): "Fish's meta-update is arithmetic on every state_dict entry "
       "(misc.ParamDict, a negation among them), which the quantizers' bool flags do not "
       "support; and every update steps a fresh copy" for v in ("LSQ", "QTDoG")},
}
# Refused with QT-DoG's quantization switched on later than the first update: their update
# differentiates every parameter (autograd.grad without allow_unused), and a quantizer that is
# still the identity leaves its scale out of the graph. With quant_start 0 they work.
ALL_PARAMETERS = ("ANDMask", "SANDMask", "IGA")


def split(name: str) -> tuple[str, str] | None:
    """``(base, variant)`` of a generic name, e.g. ``("CORAL", "LSQ")``, else None."""
    match = NAME.match(name)
    return (match["base"], match["variant"]) if match else None


def refusal(name: str, hparams: dict) -> str | None:
    """Why the generic algorithm ``name`` cannot run with ``hparams`` (its build raises
    ``ValueError: <name> is not supported: <why>``), or None. DomainBed's own requirements
    (a GPU, an optional package) are not the plugin's to refuse.

    >>> refusal("CORAL_LSQ", {}) is None, refusal("IGA_QTDoG", {"quant_start": 0}) is None
    (True, True)
    >>> refusal("IGA_QTDoG", {"quant_start": 1}).startswith("quant_start 1: IGA's update")
    True
    """
    base, variant = split(name)
    if (base, variant) in REFUSED:
        return REFUSED[base, variant]
    if hparams.get("qtdog_release", False):
        return "qtdog_release reproduces the release of QT-DoG with ERM (QTDoG) only"
    if base in ALL_PARAMETERS and hparams.get("quant_start", 0) > 0:
        return (f"quant_start {hparams['quant_start']}: {base}'s update differentiates every "
                "parameter, and before quant_start the scales are not in the graph "
                "(quant_start 0 works)")
    return None


def domainbed_bases() -> list[str]:
    """DomainBed's own algorithms (its ``ALGORITHMS`` without the plugin's)."""
    return [n for n in domainbed_algorithms.ALGORITHMS
            if not hasattr(getattr(domainbed_algorithms, n, None), "SPEC")]


def resolve(name: str) -> type | None:
    """The class of algorithm ``name``: what ``domainbed.algorithms`` holds under it, else the
    generic class (made now and set there), else None."""
    found = getattr(domainbed_algorithms, name, None)
    if isinstance(found, type):
        return found
    parts = split(name)
    if parts is None:
        return None
    base, variant = parts
    if name in ALIASES:
        cls = resolve(ALIASES[name])
    elif base in PLUGIN_BASES:
        cls = variant_of(resolve(PLUGIN_BASES[base]), variant, name)
    elif base in domainbed_bases():
        cls = _domainbed_variant(getattr(domainbed_algorithms, base), variant, name)
    else:
        return None
    setattr(domainbed_algorithms, name, cls)
    return cls


def optimizers(algorithm: torch.nn.Module) -> list[torch.optim.Optimizer]:
    """The optimizers an algorithm keeps as attributes (DomainBed's keep them so)."""
    return [v for v in vars(algorithm).values() if isinstance(v, torch.optim.Optimizer)]


@contextmanager
def scales_in_their_group(lr: float) -> Iterator[None]:
    """Inside, every optimizer that steps has its quantizer scales in their own group at
    ``lr`` first (:func:`~domainbed_gaqat.optim.param_groups.separate_scales`): the ones an
    update builds and keeps local (MLDG's inner optimizer, over a copy of the network)."""
    def split_first(optimizer, args, kwargs) -> None:
        separate_scales(optimizer, lr)

    handle = register_optimizer_step_pre_hook(split_first)
    try:
        yield
    finally:
        handle.remove()


class OnSharedFeaturizer:
    """A DomainBed algorithm on the shared featurizer, quantized by its variant's policy (mixed
    in before DomainBed's class; its ``SPEC.base`` names that class).

    Built inside :func:`~domainbed_gaqat.plugin.featurizer.building`, so each
    ``networks.Featurizer`` it makes is the shared one, with its initial weights (``init``);
    then an earlier stage's model is loaded (``init: domainbed``, the whole model), and every
    optimizer it keeps has the scales in their own group at ``scale_lr`` without weight decay.
    Each update runs inside the same context (Fish builds featurizers there, with no initial
    weights: its copies take the model's) and inside :func:`scales_in_their_group`, which
    splits the optimizers an update builds (IRM, VREx, Fishr, EQRM, IB_*, RDM rebuild theirs
    at a step; MLDG builds one per update) before they step. Range initialisation happens on
    the first batch the featurizer sees in training; BatchNorm stays frozen (the featurizer's).
    """

    SPEC = None  # set by @algorithm on the generated class

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        validate(self.SPEC, hparams)
        reason = refusal(self.SPEC.name, hparams)
        if reason:
            raise ValueError(f"{self.SPEC.name} is not supported: {reason}")
        self._policy = quant_policy(hparams) if self.SPEC.quantized else None
        with building(functools.partial(self._featurizer, initial=True)):
            super().__init__(input_shape, num_classes, num_domains, hparams)
        load_earlier_stage(self, hparams)
        self._quantizers = list(quantizers(self))
        self.scales = [q.scale for _, q in self._quantizers]
        for optimizer in optimizers(self) if self.scales else ():
            separate_scales(optimizer, hparams["scale_lr"])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A buffer DomainBed makes empty and fills at the first update (GroupDRO's ``q``)
        takes the saved shape, so a model loads into a fresh instance."""
        for name, buffer in self._buffers.items():
            saved = state_dict.get(prefix + name)
            if buffer is not None and buffer.numel() == 0 and saved is not None and saved.numel():
                self._buffers[name] = torch.empty_like(saved, device=buffer.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _featurizer(self, input_shape, hparams, initial: bool) -> Featurizer:
        featurizer = Featurizer(tuple(input_shape), hparams, self._policy)
        if initial:
            initialize(featurizer, hparams)
        return featurizer

    def update(self, minibatches, unlabeled=None):
        """DomainBed's update; a range initialisation that met inf/nan values is an error
        (DomainBed's update has read its losses: the device is done)."""
        with building(functools.partial(self._featurizer, initial=False)):
            if not self.scales:
                return super().update(minibatches, unlabeled)
            with scales_in_their_group(self.hparams["scale_lr"]):
                stats = super().update(minibatches, unlabeled)
        check_initialization(self._quantizers, wait=True)
        return stats


class QuantStartUpdates(QuantStart):
    """:class:`~domainbed_gaqat.plugin.algorithms.QuantStart` counting DomainBed ``update``
    calls."""

    def update(self, minibatches, unlabeled=None):
        self._begin_update()
        stats = super().update(minibatches, unlabeled)
        self._end_update()
        return stats


def _domainbed_variant(base: type, variant: str, name: str) -> type:
    """``name``: DomainBed's algorithm ``base`` on the shared featurizer, ``variant``'s way."""
    bases = (OnSharedFeaturizer, QuantStartUpdates, base) if variant == "QTDoG" else (
        OnSharedFeaturizer, base)
    summary = (f"{base.__name__} (DomainBed) on the shared featurizer, "
               + ("full precision." if variant == "FP" else
                  plugin_algorithms.VARIANT_SUMMARIES[variant] + "."))
    cls = type(name, bases, {"__doc__": summary, "__module__": __name__,
                             "__qualname__": name})
    return algorithm(families=plugin_algorithms.VARIANT_FAMILIES.get(variant, ()),
                     baseline=plugin_algorithms.VARIANT_BASELINES.get(variant, "ERM_FP"),
                     defaults=plugin_algorithms.VARIANT_DEFAULTS.get(variant, {}),
                     base=base.__name__)(cls)
