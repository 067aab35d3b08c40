"""The suite's fixtures (its helpers are the package ``support``). DomainBed is the real clone
set up by ``make setup``."""

import pytest
from support.slurm_cluster import slurm  # noqa: F401 (a fixture for the Slurm tests)


@pytest.fixture(autouse=True, scope="session")
def _registered():
    """The plugin is registered by its start-up hook; register() is idempotent anyway."""
    import domainbed_gaqat

    domainbed_gaqat.register()
