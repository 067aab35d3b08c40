"""How one tensor is fake-quantized: a small checked object from which a quantizer is built."""

from dataclasses import dataclass

GRANULARITIES = ("tensor", "channel")
RANGE_INITS = ("mse", "minmax")


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
    ``range_init``: how the scale is initialised on the first tensor seen (``mse``: Nagel et al.
    2021, sec. 3.4; ``minmax``: the largest magnitude on the top of the grid); ``enabled``: the
    quantizer's initial state (disabled, it is the identity).

    >>> QuantConfig(bits=4, signed=False).bounds
    (0, 15)
    """

    bits: int
    signed: bool
    granularity: str = "tensor"
    grad_scale: bool = True
    range_init: str = "mse"
    enabled: bool = True

    def __post_init__(self) -> None:
        integer_range(self.bits, self.signed)
        for name, value, choices in (("granularity", self.granularity, GRANULARITIES),
                                     ("range_init", self.range_init, RANGE_INITS)):
            if value not in choices:
                raise ValueError(f"{name} {value!r}: expected one of {choices}")
        for name in ("signed", "grad_scale", "enabled"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} {getattr(self, name)!r}: expected True or False")

    @property
    def bounds(self) -> tuple[int, int]:
        return integer_range(self.bits, self.signed)
