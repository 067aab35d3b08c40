"""domainbed-gaqat: quantization-aware training for domain generalization, as a DomainBed plugin.

Importing this package is cheap (no torch): the algorithms, hyperparameters, datasets and
command launchers are added to DomainBed's modules when those are imported (see
:mod:`domainbed_gaqat._startup`) or by calling :func:`register` explicitly.
"""

__version__ = "0.1.0"


def register() -> None:
    """Add the plugin to DomainBed's modules now (idempotent)."""
    from domainbed_gaqat.plugin.register import register_all

    register_all()
