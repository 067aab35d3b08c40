"""How one tensor is fake-quantized: a small checked object from which a quantizer is built."""

from dataclasses import dataclass

GRANULARITIES = ("tensor", "channel")
RANGE_INITS = ("mse", "lsq_mean")
GRAD_SCALE_COUNTS = ("scale", "tensor")


def integer_range(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range ``(l, u)`` of a ``bits``-bit grid (paper sec. 2.1): ``[-2^(b-1), 2^(b-1)-1]``
    signed, ``[0, 2^b - 1]`` unsigned."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 2..8, got {bits!r}")
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


@dataclass(frozen=True)
class QuantConfig:
    """One quantizer's settings.

    ``bits`` (2..8) and ``signed`` give the integer grid; ``granularity`` ``tensor`` (one scale,
    the paper's "tensor-wise scale") or ``channel`` (one scale per output channel of a weight);
    ``grad_scale``: LSQ's gradient scaling ``1 / sqrt(N * u)`` (Esser et al. 2019, sec. 2.2);
    ``grad_scale_n``: what ``N`` counts for a weight, ``scale`` (the weights one scale
    quantizes: one channel's per channel, the LSQ paper's) or ``tensor`` (the whole weight
    tensor, as lsq-net and QT-DoG's release do; the same thing per tensor); for an activation
    ``N`` is always its features per example. ``range_init``: how the scale is initialised on
    the first tensor seen, ``mse`` (the clipping range of least squared error, Nagel et al.
    2021, sec. 3.4) or ``lsq_mean`` (LSQ's ``2 * mean|v| / sqrt(u)``, Esser et al. 2019,
    sec. 2.1); ``enabled``: the quantizer's initial state (disabled, it is the identity).

    >>> QuantConfig(bits=4, signed=False).bounds
    (0, 15)
    >>> QuantConfig(bits=7, signed=True, granularity="channel", range_init="lsq_mean",
    ...             grad_scale_n="tensor").bounds
    (-64, 63)
    """

    bits: int
    signed: bool
    granularity: str = "tensor"
    grad_scale: bool = True
    range_init: str = "mse"
    enabled: bool = True
    grad_scale_n: str = "scale"

    def __post_init__(self) -> None:
        integer_range(self.bits, self.signed)
        for name, value, choices in (("granularity", self.granularity, GRANULARITIES),
                                     ("range_init", self.range_init, RANGE_INITS),
                                     ("grad_scale_n", self.grad_scale_n, GRAD_SCALE_COUNTS)):
            if value not in choices:
                raise ValueError(f"{name} {value!r}: expected one of {choices}")
        for name in ("signed", "grad_scale", "enabled"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} {getattr(self, name)!r}: expected True or False")

    @property
    def bounds(self) -> tuple[int, int]:
        return integer_range(self.bits, self.signed)
