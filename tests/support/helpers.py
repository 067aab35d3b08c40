"""Helpers of the test suite: child processes in this environment, ``gaqat`` in process, tiny
hparams. DomainBed is the real clone set up by ``make setup``."""

import os
import subprocess
import sys

PYTHON = sys.executable


def subprocess_env(**extra: str) -> dict:
    """Environment for child processes: this interpreter's ``bin`` first on PATH, so the
    ``python -m domainbed.scripts.train`` commands of DomainBed's sweep use this environment."""
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(PYTHON) + os.pathsep + env.get("PATH", "")
    env.setdefault("OMP_NUM_THREADS", "2")
    env.update(extra)
    return env


def run(args: list[str], cwd: str | os.PathLike | None = None, timeout: int = 600,
        check: bool = True, **env: str) -> subprocess.CompletedProcess:
    """Run a command; on failure the assertion shows its output."""
    proc = subprocess.run(args, cwd=cwd, env=subprocess_env(**env), capture_output=True,
                          text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, (
            f"{args} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
            f"\n--- stderr\n{proc.stderr[-4000:]}")
    return proc


def tiny_hparams(algorithm: str = "GAQAT", **overrides) -> dict:
    """Default hparams of ``algorithm`` on the offline dataset (ResNet-18, random init), drawn
    for the bits of ``overrides`` as a run's are."""
    from domainbed_gaqat.plugin.hparams import train_hparams

    return train_hparams(algorithm, "RotatedDigits", overrides=overrides)


def gaqat(*argv: str) -> int:
    """``gaqat ARGV...`` in this process; returns the exit status."""
    from domainbed_gaqat import cli

    return cli.main(list(argv))
