"""How each of the plugin's algorithms is declared, once, with what it needs, and the queries
over DomainBed's registry that it joins.

``@algorithm(...)`` on a class records an :class:`AlgorithmSpec` (and sets the class's
``SPEC``); :data:`domainbed_gaqat.plugin.algorithms.ALGORITHMS` holds them all, and DomainBed's
``ALGORITHMS``, the hyperparameter families, the benchmark, the tools and the tests read it.
Whether an algorithm is quantized has one answer, :attr:`AlgorithmSpec.quantized`:

>>> plugin_spec("GAQAT").quantized, plugin_spec("ERM_FP").quantized, plugin_spec("ERM")
(True, False, None)
>>> "LSQ" in quantized_algorithms() and "ERM_FP" not in quantized_algorithms()
True
"""

from collections.abc import Callable
from dataclasses import dataclass

FAMILIES = ("quant", "sagm", "gaqat", "saq", "qtdog", "swad")
QUANTIZED = ("quant", "qtdog")  # the families that quantize the featurizer
_SPECS: dict[str, "AlgorithmSpec"] = {}


@dataclass(frozen=True)
class AlgorithmSpec:
    """``families``: the hyperparameter families it reads (``quant``: W/A bits and scales,
    ``sagm``: rho and alpha, ``gaqat``: r and K, ``saq``: SAQ's rho and what it perturbs,
    ``qtdog``: QT-DoG's weight-only per-channel quantization and its start step, ``swad``:
    SWAD's loss-valley rule); ``defaults``: its own defaults
    of shared hyperparameters; ``baseline``: the algorithm whose step it extends (the
    benchmark's ratios); ``benchmark``: timed by ``gaqat bench``; ``base``: the DomainBed
    algorithm whose update and hyperparameters it runs on the shared featurizer (None: one of
    the plugin's own steps; :mod:`domainbed_gaqat.plugin.generic`)."""

    name: str
    cls: type
    families: tuple[str, ...]
    baseline: str | None
    benchmark: bool
    defaults: dict
    base: str | None = None

    @property
    def quantized(self) -> bool:
        return any(f in self.families for f in QUANTIZED)

    @property
    def summary(self) -> str:
        """The first line of the class docstring."""
        return (self.cls.__doc__ or "").strip().splitlines()[0]


def algorithm(families: tuple[str, ...] = (), baseline: str | None = None,
              benchmark: bool = False, defaults: dict | None = None,
              base: str | None = None) -> Callable[[type], type]:
    """Class decorator: register a plugin algorithm under its class name (and set its ``SPEC``,
which subclasses inherit)."""
    unknown = set(families) - set(FAMILIES)
    if unknown:
        raise ValueError(f"hparam families {sorted(unknown)}: expected some of {FAMILIES}")

    def register(cls: type) -> type:
        if cls.__name__ in _SPECS:
            raise ValueError(f"algorithm {cls.__name__!r} is registered twice")
        if baseline is not None and baseline not in _SPECS:
            raise ValueError(f"{cls.__name__}: baseline {baseline!r} is not registered before it")
        cls.SPEC = _SPECS[cls.__name__] = AlgorithmSpec(cls.__name__, cls, tuple(families),
                                                        baseline, benchmark, defaults or {},
                                                        base)
        return cls

    return register


def specs() -> dict[str, AlgorithmSpec]:
    """The algorithms declared so far, in declaration order (the tables' row order)."""
    return dict(_SPECS)


# --- queries over DomainBed's registry (which the start-up hook has joined) -----------------


def algorithm_class(name: str) -> type:
    """A DomainBed algorithm class: DomainBed's, the plugin's (registered by its start-up
    hook), or a ``<Name>_FP`` / ``_LSQ`` / ``_QTDoG`` resolved on demand."""
    from domainbed import algorithms

    from domainbed_gaqat.plugin.generic import resolve

    cls = resolve(name)
    if not (isinstance(cls, type) and issubclass(cls, algorithms.Algorithm)):
        raise ValueError(f"algorithm {name!r}: expected one of {sorted(algorithms.ALGORITHMS)}"
                         " or <Name>_FP, <Name>_LSQ, <Name>_QTDoG of one of them")
    return cls


def plugin_spec(name: str) -> AlgorithmSpec | None:
    """The spec of DomainBed's algorithm ``name`` if it is one of the plugin's (a generic
    ``<Name>_*`` included), else None (DomainBed's own, or no algorithm)."""
    from domainbed_gaqat.plugin.generic import resolve

    return getattr(resolve(name), "SPEC", None)


def is_quantized(name: str) -> bool:
    """Whether algorithm ``name`` quantizes the featurizer (:attr:`AlgorithmSpec.quantized`)."""
    spec = plugin_spec(name)
    return spec is not None and spec.quantized


def quantized_algorithms() -> list[str]:
    """DomainBed's listed algorithms that are quantized, in registration order (the
    ``<Name>_LSQ`` / ``_QTDoG`` resolved on demand are not listed)."""
    from domainbed import algorithms

    return [n for n in algorithms.ALGORITHMS if is_quantized(n)]
