"""``gaqat sweep status``: how far a sweep is, read-only.

    gaqat sweep status CONFIG --output_dir OUT --data_dir DATA [--json]

Each planned run of each stage is one of:

- ``done``: its folder has train.py's ``done`` file;
- ``running``: not done, and a process owns the folder (the train entry holds the lock of
  :mod:`~domainbed_gaqat.experiments.ownership` for its lifetime);
- ``failed``: not done, no owner, and its ``err.txt`` ends in an error (a Python traceback, or
  the train entry's ``gaqat train: ...`` line for what ended the run: divergence, a full disk);
  its folder and the last lines of ``err.txt`` are shown;
- ``stopped``: not done, no owner, no error (killed, a time limit, a job not requeued);
- ``queued``: launched (DomainBed's ``Job.launch`` made its folder) but no process has started
  in it yet (no owner, no file): waiting in the launcher's queue;
- ``not launched``: no run folder;
- ``waiting``: its stage starts from runs of an earlier stage that are not all done, so its jobs
  are not known yet (:attr:`~domainbed_gaqat.experiments.sweep.PlannedStage.blocked`).

Runs are found as ``gaqat tables`` finds them, by what they recorded
(:class:`~domainbed_gaqat.experiments.results.Locator`; moved or merged trees work), with a
job's own folder for a run that has no record yet. Only the first and last records of each
``results.jsonl`` are read, except for the done runs of the stages later stages start from,
among whose checkpoints the planner chooses (:func:`plan_with`).

Time left, from the records' ``step_time`` (DomainBed's train.py: the mean seconds of a
training step over the last checkpoint interval; evaluation at checkpoints is not included):
a running, stopped or failed run (resumed by the train entry) has ``steps - 1 - step`` steps
left at its latest step time; a run queued, not launched or waiting has ``steps`` at the mean
latest step time of its algorithm's runs in this sweep, else of its registry ``baseline``'s
(GAQAT: SAGM_LSQ, ...). How many runs the launcher runs at once is not known here: the times
are per run, and their sum is the serial total.
"""

import json
import os
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass

from domainbed.scripts.sweep import Job

from domainbed_gaqat.experiments.configs import SweepConfig, load_config
from domainbed_gaqat.experiments.ownership import holder
from domainbed_gaqat.experiments.results import (
    Locator,
    RunFolder,
    read_run,
    read_run_ends,
    run_folders,
)
from domainbed_gaqat.experiments.sweep import PlannedStage, plan
from domainbed_gaqat.plugin.algorithms import ALGORITHMS
from domainbed_gaqat.progress import track

DONE, RUNNING, FAILED, STOPPED = "done", "running", "failed", "stopped"
QUEUED, NOT_LAUNCHED, WAITING = "queued", "not launched", "waiting"
STATES = (DONE, RUNNING, FAILED, STOPPED, QUEUED, NOT_LAUNCHED, WAITING)
TRAIN_FILES = ("results.jsonl", "out.txt", "err.txt")
ERR_LINES = 8  # of a failed run's err.txt
# a traceback, an exception's line, or the train entry's line for an error that ended the run
_ERROR = re.compile(r"^(Traceback \(most recent call last\):|[A-Za-z_][\w.]*(Error|Exception)"
                    r"(: |$)|gaqat train: )")


@dataclass(frozen=True)
class RunState:
    """One planned run: where it is and how far it got."""

    stage: str
    algorithm: str
    test_envs: tuple[int, ...]
    trial: int
    state: str
    steps: int
    folder: str | None = None
    step: int | None = None  # the latest record's
    step_time: float | None = None  # seconds per step: the latest record's, or the estimate
    seconds_left: float | None = None
    owner: dict | None = None
    err_tail: tuple[str, ...] = ()


@dataclass(frozen=True)
class StageStatus:
    name: str
    folder: str
    algorithms: tuple[str, ...]
    steps: int
    blocked: str
    runs: tuple[RunState, ...]

    def counts(self) -> dict[str, dict[str, int]]:
        """``{algorithm: {state: runs}}`` (states with runs only)."""
        return {a: dict(Counter(r.state for r in self.runs if r.algorithm == a))
                for a in self.algorithms}


@dataclass(frozen=True)
class SweepStatus:
    config: str
    output_dir: str
    folders: int  # run folders found under output_dir
    read_seconds: float  # finding, reading and planning
    stages: tuple[StageStatus, ...]
    notes: tuple[str, ...]

    def runs(self) -> list[RunState]:
        return [r for s in self.stages for r in s.runs]

    def time_left(self) -> dict:
        """Seconds left per group of states and serially in all; runs without a step time
        counted apart."""
        groups = {"running": (RUNNING,), "to resume": (STOPPED, FAILED),
                  "not started": (QUEUED, NOT_LAUNCHED), "waiting": (WAITING,)}
        out = {}
        for name, states in groups.items():
            runs = [r for r in self.runs() if r.state in states]
            known = [r.seconds_left for r in runs if r.seconds_left is not None]
            out[name] = {"runs": len(runs), "seconds": sum(known, 0.0), "unknown": len(runs)
                         - len(known), "longest": max(known, default=0.0)}
        out["serial_seconds"] = sum((g["seconds"] for g in out.values()), 0.0)
        return out

    def to_json(self) -> dict:
        return {"config": self.config, "output_dir": self.output_dir, "folders": self.folders,
                "read_seconds": self.read_seconds, "notes": list(self.notes),
                "time_left": self.time_left(),
                "stages": [{**{k: v for k, v in asdict(s).items() if k != "runs"},
                            "counts": s.counts(), "runs": [asdict(r) for r in s.runs]}
                           for s in self.stages]}


# --- reading -------------------------------------------------------------------------------


def err_tail(folder: str, lines: int = ERR_LINES) -> tuple[str, ...] | None:
    """The last ``lines`` lines of ``err.txt`` when it ends in an error, else None."""
    path = os.path.join(folder, "err.txt")
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    tail = [line for line in text.splitlines() if line.strip()][-lines * 4:]
    errors = [i for i, line in enumerate(tail) if _ERROR.match(line)]
    if not errors:
        return None
    exception = [line for line in tail[errors[-1]:] if not line.startswith(" ")][-1]
    if exception.startswith("KeyboardInterrupt"):  # a person's Ctrl-C: stopped
        return None
    return tuple(tail[-lines:])


def read_runs(output_dir: str, progress: bool = True) -> list[RunFolder]:
    """The runs under ``output_dir``, their first and last records only
    (:func:`~domainbed_gaqat.experiments.results.read_run_ends`)."""
    return [read_run_ends(folder) for folder in track(run_folders([output_dir]),
                                                      "reading run folders", enabled=progress)]


def plan_with(config: SweepConfig, output_dir: str, data_dir: str,
              runs: list[RunFolder]) -> tuple[list[PlannedStage], Locator]:
    """The sweep planned over ``runs``, where every record of the done runs of the stages
    that later stages start from is read (the planner chooses among their checkpoints);
    repeated until no more such run is found (a chain of stages)."""
    sources = {ref.stage for s in config.stages for ref in (s.init_from, s.hparams_from) if ref}
    full: set[str] = set()
    while True:
        locator = Locator(runs)
        planned = plan(config, output_dir, data_dir, locator)
        wanted = {run.path for stage in planned if stage.name in sources for job in stage.jobs
                  if (run := locator.find(job)) is not None and run.done} - full
        if not wanted:
            return planned, locator
        full |= wanted
        runs = [read_run(run.path) if run.path in wanted else run for run in runs]


def run_state(stage: str, job: Job, run: RunFolder | None) -> RunState:
    """A planned job's state from its run (None: none found)."""
    args = job.train_args
    fields = {"stage": stage, "algorithm": args["algorithm"],
              "test_envs": tuple(args["test_envs"]), "trial": args["trial_seed"],
              "steps": args["steps"]}
    if run is None and os.path.isdir(job.output_dir):  # launched, no record yet
        run = read_run_ends(job.output_dir)
    if run is None:
        return RunState(state=NOT_LAUNCHED, **fields)
    last = run.records[-1] if run.records else {}
    fields.update(folder=run.path, step=last.get("step"), step_time=last.get("step_time"))
    if run.done:
        return RunState(state=DONE, seconds_left=0.0, **fields)
    left = (max(0, args["steps"] - 1 - fields["step"]) * fields["step_time"]
            if last.get("step_time") is not None else None)
    owner = holder(run.path)
    if owner is not None:
        return RunState(state=RUNNING, owner=owner, seconds_left=left, **fields)
    if not any(os.path.exists(os.path.join(run.path, f)) for f in TRAIN_FILES):
        return RunState(state=QUEUED, **fields)
    tail = err_tail(run.path)
    return RunState(state=FAILED if tail else STOPPED, err_tail=tail or (), seconds_left=left,
                    **fields)


def waiting_runs(config: SweepConfig, planned: PlannedStage) -> list[RunState]:
    """The runs a blocked stage will have: trials x test-env groups x algorithms x grid points
    x members (the grid is known; what the stage inherits is not)."""
    stage = planned.stage
    return [RunState(stage.name, algorithm, envs, trial, WAITING, stage.steps)
            for trial in range(config.trials) for envs in config.test_envs
            for algorithm in stage.algorithms for _ in stage.grid.points()
            for _ in range(stage.members)]


def step_times(runs: list[RunState]) -> dict[str, float]:
    """The mean latest step time of each algorithm's runs that have one."""
    found: dict[str, list[float]] = {}
    for run in runs:
        if run.step_time is not None:
            found.setdefault(run.algorithm, []).append(run.step_time)
    return {a: sum(v) / len(v) for a, v in found.items()}


def estimate(algorithm: str, measured: dict[str, float]) -> float | None:
    """Seconds per step of ``algorithm``: measured, else its baseline's (the registry's
    chain), else unknown."""
    while algorithm is not None:
        if algorithm in measured:
            return measured[algorithm]
        spec = ALGORITHMS.get(algorithm)
        algorithm = spec.baseline if spec is not None else None
    return None


def sweep_status(config: SweepConfig, output_dir: str, data_dir: str,
                 progress: bool = True) -> SweepStatus:
    """The state of every run of ``config`` under ``output_dir`` (nothing is written)."""
    output_dir = os.path.abspath(output_dir)
    if not os.path.isdir(output_dir):
        raise FileNotFoundError(f"--output_dir {output_dir!r}: no such directory")
    start = time.monotonic()
    runs = read_runs(output_dir, progress)
    planned, locator = plan_with(config, output_dir, data_dir, runs)
    read_seconds = time.monotonic() - start
    states = {s.name: (waiting_runs(config, s) if s.blocked else
                       [run_state(s.name, job, locator.find(job)) for job in s.jobs])
              for s in planned}
    measured = step_times([r for found in states.values() for r in found])
    stages = []
    for entry in planned:
        found = []
        for run in states[entry.name]:
            if run.state in (QUEUED, NOT_LAUNCHED, WAITING):
                per_step = estimate(run.algorithm, measured)
                if per_step is not None:
                    run = RunState(**{**asdict(run), "step_time": per_step,
                                      "seconds_left": run.steps * per_step})
            found.append(run)
        stages.append(StageStatus(entry.name, entry.folder, entry.stage.algorithms,
                                  entry.stage.steps, entry.blocked, tuple(found)))
    return SweepStatus(config.name, output_dir, len(runs), read_seconds, tuple(stages),
                       tuple(locator.duplicates))


# --- printing ------------------------------------------------------------------------------


def hours(seconds: float) -> str:
    """``'2.5 h'``, ``'12 min'`` or ``'40 s'``."""
    if seconds >= 5400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _run_line(run: RunState) -> str:
    where = f"{run.algorithm} test envs {list(run.test_envs)} trial {run.trial}: {run.folder}"
    if run.step is None:
        return f"  {run.state}: {where}, no record yet"
    percent = 100 * (run.step + 1) // run.steps
    line = f"  {run.state}: {where}, step {run.step}/{run.steps} ({percent}%)"
    if run.step_time is not None:
        line += f", {run.step_time:.3g} s/step, {hours(run.seconds_left)} left"
    if run.owner:
        line += f", process {run.owner.get('pid')} on {run.owner.get('host')}"
    return line


def render(status: SweepStatus) -> str:
    """The status as text: a block per stage, then the time left."""
    out = [f"{status.config}: {status.folders} run folders under {status.output_dir} "
           f"(read in {status.read_seconds:.1f} s)"]
    for stage in status.stages:
        out.append(f"== stage {stage.name}: {', '.join(stage.algorithms)}, {stage.steps} steps, "
                   f"{len(stage.runs)} runs; {stage.folder}")
        if stage.blocked:
            out.append(f"  waiting: {stage.blocked}")
        width = max(map(len, stage.algorithms))
        for algorithm, counts in stage.counts().items():
            out.append(f"  {algorithm:<{width}}  " + ", ".join(
                f"{counts[s]} {s}" for s in STATES if s in counts))
        for run in stage.runs:
            if run.state in (RUNNING, FAILED, STOPPED):
                out.append(_run_line(run))
                out += [f"      | {line}" for line in run.err_tail]
    left = status.time_left()
    parts = [f"{name} {hours(g['seconds'])} ({g['runs']} runs"
             + (f", {g['unknown']} without a step time yet" if g["unknown"] else "")
             + (f", the longest {hours(g['longest'])}" if name == "running" and g["runs"] else "")
             + ")" for name, g in left.items() if name != "serial_seconds" and g["runs"]]
    out.append(f"Time left, run after run (the launcher's parallelism is not known here): "
               f"{hours(left['serial_seconds'])}" + (f": {'; '.join(parts)}" if parts else ""))
    out += [f"note: {note}" for note in status.notes]
    return "\n".join(out)


def run_status(config_name: str, output_dir: str, data_dir: str, as_json: bool) -> int:
    """``gaqat sweep status``: print the status (text or JSON); returns 0."""
    status = sweep_status(load_config(config_name), output_dir, data_dir, progress=True)
    print(json.dumps(status.to_json(), indent=1) if as_json else render(status))
    return 0
