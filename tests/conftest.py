"""The suite's fixtures (its helpers are the package ``support``). DomainBed is the real clone
set up by ``make setup``."""

import pytest
from hypothesis import settings
from support.slurm_cluster import slurm  # noqa: F401 (a fixture for the Slurm tests)


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``cuda`` are skipped where PyTorch sees no CUDA device. The modules run
    longest first: those using the Slurm cluster, then by their number of ``slow`` tests (with
    ``make test``'s ``-n 2 --dist loadfile`` a module is one unit of work: long ones started
    last would leave one worker idle at the end); the order within a module is kept."""
    import torch

    def module(item: pytest.Item) -> str:
        return item.nodeid.split("::")[0]

    weight: dict[str, tuple[bool, int]] = {}
    for item in items:
        cluster, slow = weight.get(module(item), (False, 0))
        weight[module(item)] = (cluster or "slurm" in getattr(item, "fixturenames", ()),
                                slow + (item.get_closest_marker("slow") is not None))
    items.sort(key=lambda item: tuple(-w for w in weight[module(item)]))
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


# No per-example deadline: the suite runs two workers on two shared cores (``make test``), and
# an example's time says nothing about its correctness (settings given in a test still apply).
settings.register_profile("suite", deadline=None)
settings.load_profile("suite")
