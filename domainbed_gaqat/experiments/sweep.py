"""``gaqat sweep`` (also ``gaqat-sweep``): run a ``sweeps/`` config as DomainBed jobs, stage
after stage.

    gaqat sweep list|launch|delete_incomplete CONFIG --output_dir OUT --data_dir DATA
                [--stage NAME] [--command_launcher local|submitit|...] [--skip_confirmation]
    gaqat sweep status CONFIG --output_dir OUT --data_dir DATA [--json]   # how far it is

Each stage expands to DomainBed ``domainbed.scripts.sweep.Job`` objects (trials x test-env
groups x algorithms x grid points), launched with DomainBed's ``Job.launch`` and a
``command_launchers.REGISTRY`` launcher, so DONE jobs are skipped and ``delete_incomplete``
removes what DomainBed would. On top of DomainBed's sweep:

- test envs are the config's groups (DomainNet: leave-one-*group*-out);
- the grid is exact and every run gets the full hparams dict in ``--hparams``; its
  ``hparams_seed`` is a hash of those hparams and the step settings, so runs that differ get
  different seeds (DomainBed's model selection groups runs by ``hparams_seed``) and identical
  runs of different configs are the same job (same folder, run once);
- runs are written to ``OUT/<dataset>/fp`` (full precision) or ``OUT/<dataset>/w<W>a<A>``
  (quantized): a bit-width never shares a folder with another;
- ``init_from``: a stage starts from the model of an earlier stage with the same test envs
  and trial, picked by the config's selection rule at the last checkpoint (train.py saves only
  the final ``model.pkl``); ``hparams_from`` copies hparams (the paper's base lr) from the run
  the rule picks. Until those runs are all done the stage cannot be listed or launched, and
  ``launch`` says which stage to run first.
"""

import functools
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from domainbed import command_launchers
from domainbed.scripts.sweep import Job, ask_for_confirmation

from domainbed_gaqat.experiments.configs import (
    BIT_KEYS,
    Stage,
    SweepConfig,
    load_config,
)
from domainbed_gaqat.experiments.results import Locator
from domainbed_gaqat.experiments.runs import RunSpec
from domainbed_gaqat.experiments.selection import Choice, choose
from domainbed_gaqat.plugin import launchers
from domainbed_gaqat.plugin.hparams import train_hparams
from domainbed_gaqat.plugin.initial_weights import MOCO_ENV, torchvision_path


class Blocked(Exception):
    """A stage whose jobs depend on runs of an earlier stage that are not all done."""


# --- planning ------------------------------------------------------------------------------


@dataclass
class PlannedStage:
    """One stage of a config with its DomainBed jobs, or why they cannot be known yet."""

    stage: Stage
    folder: str
    jobs: list[Job] = field(default_factory=list)
    blocked: str = ""

    @property
    def name(self) -> str:
        return self.stage.name


def run_hparams(config: SweepConfig, stage: Stage, algorithm: str) -> dict:
    """An algorithm's hparams in a stage, before what it inherits and its grid point: the
    registry's defaults for the config's bits, then the config's and the stage's fixed
    hparams and the bits."""
    known = train_hparams(algorithm, config.dataset)
    overrides = {k: v for k, v in config.hparams.items() if k in known}
    overrides.update(stage.hparams)
    overrides.update((k, b) for k, b in zip(BIT_KEYS, config.bits or ()) if k in known)
    return train_hparams(algorithm, config.dataset, overrides=overrides)


def stage_folder(config: SweepConfig, stage: Stage, output_dir: str) -> str:
    """``OUT/<dataset>/fp``, ``OUT/<dataset>/w<W>a<A>``, or ``OUT/<dataset>/w<W>`` (weights
    only): the folder of the bit-width of the stage's runs."""
    algorithm = stage.algorithms[0]
    spec = RunSpec(algorithm, config.dataset, (), run_hparams(config, stage, algorithm))
    return os.path.join(output_dir, config.dataset, spec.bits_name)


def _launch_hint(config: SweepConfig, stage: str, output_dir: str, data_dir: str) -> str:
    return (f"gaqat sweep launch {config.name} --stage {stage} --output_dir {output_dir} "
            f"--data_dir {data_dir} --command_launcher ...")


def _ready(dep: PlannedStage, algorithm: str, hint: str, locator: Locator) -> list[Job]:
    """The ``algorithm`` jobs of stage ``dep``, which must all be done."""
    if dep.blocked:
        raise Blocked(f"stage {dep.name!r} must be launched and finished first ({dep.blocked})")
    jobs = [j for j in dep.jobs if j.train_args["algorithm"] == algorithm]
    waiting = [j for j in jobs if locator.state(j) != Job.DONE]
    if waiting:
        incomplete = sum(locator.state(j) == Job.INCOMPLETE for j in waiting)
        raise Blocked(
            f"it starts from the {algorithm} runs of stage {dep.name!r}, and {len(waiting)} of "
            f"{len(jobs)} are not done ({incomplete} incomplete: running, or crashed - see "
            f"their err.txt and `gaqat sweep delete_incomplete`; {len(waiting) - incomplete} "
            f"not launched). Run first, and wait until its jobs are done: {hint}")
    return jobs


def _pick(config: SweepConfig, locator: Locator, dep: PlannedStage, jobs: list[Job],
          test_envs: tuple[int, ...], trial: int, last: bool) -> Choice:
    """The rule's choice among ``jobs`` (all done) of one test-env group and trial."""
    runs = [locator.find(j) for j in jobs
            if tuple(j.train_args["test_envs"]) == test_envs
            and j.train_args["trial_seed"] == trial]
    choice = choose([(run, dep.stage.eval_from) for run in runs], config.selection, last)
    if choice is None:
        raise Blocked(f"stage {dep.name!r} has no usable record for test envs "
                      f"{list(test_envs)}, trial {trial} in {[r.path for r in runs]}")
    return choice


def _inherited(config: SweepConfig, stage: Stage, deps: dict, locator: Locator,
               test_envs: tuple[int, ...], trial: int) -> dict:
    """What a run of ``stage`` takes from earlier stages: the initial model, copied hparams."""
    inherited = {}
    if stage.init_from:
        choice = _pick(config, locator, *deps["init_from"], test_envs, trial, last=True)
        model = os.path.join(choice.run.path, "model.pkl")
        if not os.path.isfile(model):
            raise Blocked(f"{model} is missing (the run is done but saved no model)")
        inherited.update(init="domainbed", init_path=model)
    if stage.hparams_from:
        choice = _pick(config, locator, *deps["hparams_from"], test_envs, trial, last=False)
        inherited.update((k, choice.record["hparams"][k]) for k in stage.hparams_from.keys)
    return inherited


def stage_runs(config: SweepConfig, stage: Stage, planned: dict[str, PlannedStage],
               output_dir: str, data_dir: str, locator: Locator) -> list[RunSpec]:
    """The runs of ``stage`` (trials x test-env groups x algorithms x grid points x
    members), with their sweep seeds; the earlier stages they depend on must be done."""
    deps = {}
    for key in ("init_from", "hparams_from"):
        ref = getattr(stage, key)
        if ref is not None:
            dep = planned[ref.stage]
            hint = _launch_hint(config, dep.name, output_dir, data_dir)
            deps[key] = dep, _ready(dep, ref.algorithm, hint, locator)
    specs = []
    for trial in range(config.trials):
        for test_envs in config.test_envs:
            inherited = _inherited(config, stage, deps, locator, test_envs, trial)
            for algorithm in stage.algorithms:
                hparams = run_hparams(config, stage, algorithm)
                for point in stage.grid.points():
                    specs += [RunSpec(algorithm, config.dataset, test_envs,
                                      {**hparams, **inherited, **point}, trial_seed=trial,
                                      holdout_fraction=config.holdout_fraction,
                                      steps=stage.steps, checkpoint_freq=stage.checkpoint_freq,
                                      eval_from=stage.eval_from, member=member
                                      ).with_sweep_seeds() for member in range(stage.members)]
    return specs


def job(spec: RunSpec, output_dir: str, data_dir: str) -> Job:
    """DomainBed's ``Job`` of a run: in the folder of its bit-width, through
    ``domainbed_gaqat.train``."""
    planned = Job(spec.train_args(data_dir), os.path.join(output_dir, spec.dataset,
                                                           spec.bits_name))
    planned.command_str = launchers.entry_command(planned.command_str)
    return planned


def plan(config: SweepConfig, output_dir: str, data_dir: str,
         locator: Locator | None = None) -> list[PlannedStage]:
    """Every stage of ``config`` with its DomainBed jobs (or why they are not known yet); the
    earlier stages' runs are found by ``locator`` (default: in the jobs' own folders)."""
    output_dir, data_dir = os.path.abspath(output_dir), os.path.abspath(data_dir)
    locator = locator or Locator()
    planned: dict[str, PlannedStage] = {}
    for stage in config.stages:
        entry = PlannedStage(stage, stage_folder(config, stage, output_dir))
        try:
            entry.jobs = [job(spec, output_dir, data_dir) for spec in stage_runs(
                config, stage, planned, output_dir, data_dir, locator)]
        except Blocked as why:
            entry.blocked = f"stage {stage.name!r} cannot be planned yet: {why}"
        planned[stage.name] = entry
    return list(planned.values())


# --- command -------------------------------------------------------------------------------


def describe(planned: PlannedStage, job: Job) -> str:
    """DomainBed's job line plus what varies: grid point, copied hparams, initial model."""
    stage = planned.stage
    hparams = RunSpec.from_train_args(job.train_args).hparams
    keys = [*stage.grid.axes, *(stage.hparams_from.keys if stage.hparams_from else ())]
    extra = " ".join(f"{k}={hparams[k]}" for k in keys)
    if stage.init_from:
        extra += f" init={os.path.relpath(hparams['init_path'], os.path.dirname(planned.folder))}"
    return f"{job} {extra}".rstrip()


def print_stage(planned: PlannedStage) -> None:
    stage = planned.stage
    print(f"== stage {stage.name}: {', '.join(stage.algorithms)}, {stage.steps} steps, "
          f"checkpoint every {stage.checkpoint_freq}, tables from step {stage.eval_from}; "
          f"{planned.folder}")
    if planned.blocked:
        print(planned.blocked)
        return
    for job in planned.jobs:
        print(describe(planned, job))
    states = [j.state for j in planned.jobs]
    print(f"{len(states)} jobs: {states.count(Job.DONE)} done, "
          f"{states.count(Job.INCOMPLETE)} incomplete, "
          f"{states.count(Job.NOT_LAUNCHED)} not launched.")


def _check_init(planned: PlannedStage) -> None:
    """The pretrained weights a stage starts from must be there before it is launched."""
    for job in planned.jobs:
        hparams = RunSpec.from_train_args(job.train_args).hparams
        if hparams.get("init") == "moco":
            path = hparams["init_path"] or os.environ.get(MOCO_ENV, "")
            if not os.path.isfile(path):
                raise Blocked(
                    f"stage {planned.name!r} starts from MoCo-v2 weights (init='moco'), but "
                    f"{'init_path' if hparams['init_path'] else '$' + MOCO_ENV}={path!r} is no "
                    f"file: export {MOCO_ENV}=/path/to/moco_v2_800ep_pretrain.pth.tar")
        if hparams.get("init") == "torchvision":
            path = torchvision_path(hparams["resnet18"])
            if not os.path.isfile(path):
                raise Blocked(f"stage {planned.name!r} starts from torchvision's ImageNet "
                              f"weights (init='torchvision'), but {path} is no file: download "
                              "it there (torch hub cache; $TORCH_HOME moves it)")


def _launcher(name: str | Callable, stage: Stage):
    if callable(name):  # a launcher function itself (the demo's)
        return name
    if name == "submitit":
        return functools.partial(launchers.submitit_launcher, settings=stage.slurm)
    return command_launchers.REGISTRY[name]


def run_config(command: str, config: SweepConfig, output_dir: str, data_dir: str,
               stage: str | None = None, launcher: str | Callable | None = None,
               confirm: bool = True) -> int:
    """Run ``list``, ``launch`` or ``delete_incomplete`` on the stages (all, in order, or one);
    returns the exit status. A stage waiting for an earlier one stops ``launch`` with 2."""
    names = [config.stage(stage).name] if stage else [s.name for s in config.stages]
    for name in names:
        planned = next(s for s in plan(config, output_dir, data_dir) if s.name == name)
        print_stage(planned)
        if command == "list":
            continue
        if command == "delete_incomplete":
            to_delete = [j for j in planned.jobs if j.state == Job.INCOMPLETE]
            print(f"About to delete {len(to_delete)} jobs.")
            if to_delete and confirm:
                ask_for_confirmation()
            Job.delete(to_delete)
            continue
        try:
            if planned.blocked:
                raise Blocked(planned.blocked)
            _check_init(planned)
        except Blocked as why:
            print(f"gaqat sweep: not launching: {why}", file=sys.stderr)
            return 2
        to_launch = [j for j in planned.jobs if j.state == Job.NOT_LAUNCHED]
        print(f"About to launch {len(to_launch)} jobs.")
        if to_launch:
            if confirm:
                ask_for_confirmation()
            Job.launch(to_launch, _launcher(launcher, planned.stage))
    return 0


def add_arguments(parser) -> None:
    parser.add_argument("--output_dir", required=True, help="root of all sweep outputs")
    parser.add_argument("--data_dir", required=True, help="DomainBed's data folder")
    parser.add_argument("command", choices=["list", "launch", "delete_incomplete", "status"],
                        help="status: how far the sweep is (read-only; see "
                        "domainbed_gaqat.experiments.status)")
    parser.add_argument("config", help="a sweeps/ config name (e.g. pacs_w4a4) or a file")
    parser.add_argument("--stage", help="only this stage (default: all, in order)")
    parser.add_argument("--command_launcher", choices=sorted(command_launchers.REGISTRY),
                        help="needed by launch")
    parser.add_argument("--skip_confirmation", action="store_true")
    parser.add_argument("--json", action="store_true", help="status: as one JSON object")


def run(args) -> int:
    if args.command == "status":
        from domainbed_gaqat.experiments.status import run_status

        return run_status(args.config, args.output_dir, args.data_dir, args.json)
    if args.command == "launch" and not args.command_launcher:
        raise ValueError("launch needs --command_launcher")
    return run_config(args.command, load_config(args.config), args.output_dir, args.data_dir,
                      args.stage, args.command_launcher, not args.skip_confirmation)

