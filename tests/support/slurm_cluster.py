"""A real one-node Slurm cluster with accounting, on loopback, for the tests that need one
(``scripts/slurm_cluster.sh``: it installs Debian's packages when missing and runs as root).

Where it cannot start (not root, no apt), the tests that use it are skipped with the reason,
except under ``CI=true``, where they fail: CI must run them. Every daemon it starts is stopped
by its pid at the end of the session.
"""

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "slurm_cluster.sh"


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """``SLURM_CONF`` of a running cluster (set in this process's environment too)."""
    state = tmp_path_factory.mktemp("slurm")
    proc = subprocess.run([str(SCRIPT), "up", str(state)], capture_output=True, text=True,
                          timeout=600)
    if proc.returncode == 3 and os.environ.get("CI", "").lower() != "true":
        pytest.skip(f"no local Slurm cluster: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    conf = str(state / "slurm.conf")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    try:
        yield conf
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        down = subprocess.run([str(SCRIPT), "down", str(state)], capture_output=True, text=True,
                              timeout=300)
        assert down.returncode == 0, down.stderr[-3000:]
