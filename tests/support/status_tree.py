"""Generated sweep trees: run folders as DomainBed's train.py leaves them, for a config's jobs.

A generator of test data (records with made-up accuracies and step times), not a stand-in for
training: the tests of ``gaqat sweep status`` and ``gaqat tables --plots`` build their trees
with it, and as a script it times ``gaqat sweep status`` on a large tree (docs/reproducing.md):

    python tests/support/status_tree.py /tmp/tree --config pacs_w4a4 --runs 2000
"""

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from domainbed import datasets
from domainbed.scripts.sweep import Job

from domainbed_gaqat.experiments import status
from domainbed_gaqat.experiments.configs import SweepConfig, load_config
from domainbed_gaqat.experiments.results import find_runs
from domainbed_gaqat.experiments.sweep import plan


def checkpoint_steps(steps: int, checkpoint_freq: int, last_step: int) -> list[int]:
    """The steps train.py records up to ``last_step``: every ``checkpoint_freq`` and the last."""
    found = list(range(0, min(last_step, steps - 1) + 1, checkpoint_freq))
    if last_step >= steps - 1 and found[-1] != steps - 1:
        found.append(steps - 1)
    return found


def write_run(folder: str | os.PathLike, train_args: dict, last_step: int | None,
              step_time: float = 0.5, done: bool = False, err: str = "",
              curve: Callable[[int, int, str], float] | None = None) -> list[dict]:
    """A run folder: records at each checkpoint up to ``last_step`` (None: none yet), ``done``
    and an empty ``model.pkl`` when ``done``, ``err.txt`` holding ``err``. ``curve(step, env,
    split)`` gives the accuracies (default: seeded noise rising with the step). Returns the
    records."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    args = {**train_args, "output_dir": str(folder), "save_model_every_checkpoint": False,
            "skip_model_save": False, "uda_holdout_fraction": 0}
    hparams = json.loads(train_args["hparams"])
    n_envs = datasets.num_environments(train_args["dataset"])
    seed = int(hashlib.md5(str(folder).encode()).hexdigest()[:8], 16)
    rng = np.random.default_rng(seed)
    if curve is None:
        base = rng.uniform(0.4, 0.7)
        def curve(step, env, split):  # noqa: E306
            return float(min(1.0, base + 0.25 * step / train_args["steps"]
                             + rng.uniform(-0.02, 0.02)))
    records = []
    steps = [] if last_step is None else checkpoint_steps(
        train_args["steps"], train_args["checkpoint_freq"], last_step)
    for step in steps:
        record = {"step": step, "epoch": step / 100, "loss": float(rng.uniform(0.1, 2)),
                  "step_time": step_time, "mem_gb": 0.0, "args": args, "hparams": hparams}
        for env in range(n_envs):
            for split in ("in", "out"):
                record[f"env{env}_{split}_acc"] = curve(step, env, split)
        if train_args["algorithm"].startswith("GAQAT"):
            record["frozen_frac"] = min(1.0, step / train_args["steps"])
            record["disorder_mean"] = 0.5 - 0.2 * step / train_args["steps"]
        records.append(record)
    (folder / "results.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n"
                                                  for r in records))
    (folder / "out.txt").write_text("")
    (folder / "err.txt").write_text(err)
    if done:
        (folder / "model.pkl").write_bytes(b"")
        (folder / "done").write_text("done")
    return records


def fill_stage(config: SweepConfig, out: str, data: str, stage: str,
               state: Callable[[Job], tuple[int | None, bool] | None] = lambda job: (10**9, True),
               step_time: float = 0.5,
               curve: Callable[[Job], Callable] | None = None) -> list[Job]:
    """Write the runs of one stage of ``config`` (the earlier stages must be done):
    ``state(job)`` gives ``(last_step, done)``, or None for a job not launched; ``curve(job)``
    the run's accuracies (see :func:`write_run`)."""
    [planned] = [s for s in plan(config, out, data) if s.name == stage]
    assert not planned.blocked, planned.blocked
    for job in planned.jobs:
        found = state(job)
        if found is not None:
            last_step, done = found
            write_run(job.output_dir, job.train_args, last_step, step_time, done,
                      curve=curve(job) if curve else None)
    return planned.jobs


def generate(config_name: str, out: str, runs: int) -> int:
    """A tree of ``runs`` run folders: every stage of the config but the last done, the last
    one a third done, a third half-way, a third not launched; the rest are runs of other
    trials (not the config's jobs, read all the same). Returns the folders written."""
    config = load_config(config_name)
    data = out
    *earlier, last = [s.name for s in config.stages]
    jobs = [j for name in earlier for j in fill_stage(config, out, data, name)]
    mid = config.stages[-1].steps // 2
    jobs += fill_stage(config, out, data, last,
                       lambda j: [(10**9, True), (mid, False), None][int(j.output_dir[-1], 16) % 3])
    written = sum(os.path.isdir(j.output_dir) for j in jobs)
    source = [j for j in jobs if os.path.isdir(j.output_dir)]
    for i in range(runs - written):
        job = source[i % len(source)]
        trial = job.train_args["trial_seed"] + config.trials * (1 + i // len(source))
        other = Job({**job.train_args, "trial_seed": trial},
                    os.path.dirname(job.output_dir))
        write_run(other.output_dir, other.train_args, 10**9, done=True)
    return max(runs, written)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir")
    parser.add_argument("--config", default="pacs_w4a4")
    parser.add_argument("--runs", type=int, default=2000)
    args = parser.parse_args()
    if os.path.exists(args.output_dir):
        sys.exit(f"{args.output_dir} exists: give a new folder")
    start = time.monotonic()
    folders = generate(args.config, args.output_dir, args.runs)
    print(f"wrote {folders} run folders in {time.monotonic() - start:.1f} s")
    for _ in range(3):  # interleaved: the ratio holds on a loaded machine
        start = time.monotonic()
        found = status.sweep_status(load_config(args.config), args.output_dir, args.output_dir,
                                    progress=False)
        took = time.monotonic() - start
        start = time.monotonic()
        find_runs([args.output_dir], progress=False)  # every record, as gaqat tables reads
        full = time.monotonic() - start
        print(f"gaqat sweep status {args.config}: {found.folders} folders, "
              f"{len(found.runs())} planned runs, {took:.2f} s (reading {found.read_seconds:.2f} "
              f"s); reading every record {full:.2f} s; ratio {took / full:.2f}")

if __name__ == "__main__":
    main()
