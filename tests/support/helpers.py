"""Helpers of the test suite: child processes in this environment, ``gaqat`` in process, tiny
hparams, a run folder as train.py writes it. DomainBed is the real clone set up by
``make setup``."""

import json
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


def write_run(folder, algorithm: str, dataset_envs: int, test_envs: list[int], trial: int,
              accs: dict[int, tuple[dict, dict]], hparams: dict, done: bool = True,
              tail: str = "") -> None:
    """A run as train.py writes it; ``accs``: step -> ({env: in_acc}, {env: out_acc}), every
    other accuracy 0.0. ``tail`` is appended to results.jsonl as is (e.g. a truncated line)."""
    os.makedirs(folder)
    args = {"dataset": "PACS" if dataset_envs == 4 else "DomainNet", "algorithm": algorithm,
            "test_envs": test_envs, "trial_seed": trial, "hparams_seed": 0}
    with open(os.path.join(folder, "results.jsonl"), "w") as f:
        for step, (ins, outs) in accs.items():
            record = {"step": step, "args": args, "hparams": hparams}
            for env in range(dataset_envs):
                record[f"env{env}_in_acc"] = ins.get(env, 0.0)
                record[f"env{env}_out_acc"] = outs.get(env, 0.0)
            f.write(json.dumps(record) + "\n")
        f.write(tail)
    if done:
        open(os.path.join(folder, "done"), "w").close()
