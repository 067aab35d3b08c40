"""The suite's fixtures (its helpers are the package ``support``). DomainBed is the real clone
set up by ``make setup``."""

import pytest
from support.slurm_cluster import slurm  # noqa: F401 (a fixture for the Slurm tests)


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``cuda`` are skipped where PyTorch sees no CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _registered():
    """The plugin is registered by its start-up hook; register() is idempotent anyway."""
    import domainbed_gaqat

    domainbed_gaqat.register()
