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
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from domainbed import command_launchers, hparams_registry
from domainbed.lib import misc
from domainbed.scripts.sweep import Job, ask_for_confirmation

from domainbed_gaqat.experiments.configs import (
    BIT_KEYS,
    ConfigError,
    grid_points,
    load_config,
    quantized,
    reads_activation_bits,
)
from domainbed_gaqat.experiments.results import Locator
from domainbed_gaqat.experiments.selection import Choice, choose
from domainbed_gaqat.plugin import launchers
from domainbed_gaqat.plugin.checkpoints import MOCO_ENV, torchvision_path


class Blocked(Exception):
    """A stage whose jobs depend on runs of an earlier stage that are not all done."""


# --- planning ------------------------------------------------------------------------------


@dataclass
class Stage:
    """One stage of a planned sweep: its jobs, or why they cannot be known yet."""

    spec: dict
    folder: str
    jobs: list[Job] = field(default_factory=list)
    blocked: str = ""

    @property
    def name(self) -> str:
        return self.spec["name"]


def stage_folder(config: dict, spec: dict, output_dir: str) -> str:
    """``OUT/<dataset>/fp``, ``OUT/<dataset>/w<W>a<A>``, or ``OUT/<dataset>/w<W>`` (weights
    only)."""
    algorithm = spec["algorithms"][0]
    if not quantized(algorithm):
        return os.path.join(output_dir, config["dataset"], "fp")
    bits = config["bits"] if reads_activation_bits(algorithm, config["dataset"]) else [
        config["bits"][0]]
    return os.path.join(output_dir, config["dataset"], "".join(
        f"{kind}{b}" for kind, b in zip("wa", bits)))


def train_args(config: dict, spec: dict, algorithm: str, test_envs: list[int], trial: int,
               hparams: dict, data_dir: str, member: int = 0) -> dict:
    """Arguments of one run of ``domainbed_gaqat.train`` (DomainBed's train.py and
    ``--eval_from``); DomainBed hashes them into the run's folder."""
    steps = {"steps": spec["steps"], "checkpoint_freq": spec["checkpoint_freq"],
             "holdout_fraction": config["holdout_fraction"],
             **({"eval_from": spec["eval_from"]} if spec["eval_from"] else {})}
    identity = {"algorithm": algorithm, "dataset": config["dataset"], "hparams": hparams, **steps}
    if member:  # an ensemble member: the same run with another seed (and its own group)
        identity["member"] = member
    hparams_seed = misc.seed_hash(json.dumps(identity, sort_keys=True))
    return {"dataset": config["dataset"], "algorithm": algorithm, "test_envs": test_envs,
            "hparams_seed": hparams_seed, "data_dir": data_dir, "task": "domain_generalization",
            "trial_seed": trial, "hparams": json.dumps(hparams, sort_keys=True),
            "seed": misc.seed_hash(config["dataset"], algorithm, test_envs, hparams_seed, trial),
            **steps, **({"member": member} if member else {})}


def _hparams(config: dict, spec: dict, algorithm: str, inherited: dict, point: dict) -> dict:
    hparams = hparams_registry.default_hparams(algorithm, config["dataset"])
    hparams.update((k, v) for k, v in config["hparams"].items() if k in hparams)
    hparams.update(spec["hparams"])
    hparams.update((k, b) for k, b in zip(BIT_KEYS, config["bits"]) if k in hparams)
    return {**hparams, **inherited, **point}


def _launch_hint(config: dict, stage: str, output_dir: str, data_dir: str) -> str:
    return (f"gaqat sweep launch {config['name']} --stage {stage} --output_dir {output_dir} "
            f"--data_dir {data_dir} --command_launcher ...")


def _ready(dep: Stage, algorithm: str, hint: str, locator: Locator) -> list[Job]:
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


def _pick(config: dict, locator: Locator, dep: Stage, jobs: list[Job], test_envs: list[int],
          trial: int, last: bool) -> Choice:
    """The rule's choice among ``jobs`` (all done) of one test-env group and trial."""
    runs = [locator.run(j) for j in jobs
            if j.train_args["test_envs"] == test_envs and j.train_args["trial_seed"] == trial]
    choice = choose([(run, dep.spec["eval_from"]) for run in runs], config["selection"], last)
    if choice is None:
        raise Blocked(f"stage {dep.name!r} has no usable record for test envs {test_envs}, "
                      f"trial {trial} in {[r.path for r in runs]}")
    return choice


def _stage_jobs(config: dict, spec: dict, stages: dict[str, Stage], output_dir: str,
                data_dir: str, folder: str, locator: Locator) -> list[Job]:
    deps = {}
    for key in ("init_from", "hparams_from"):
        if key in spec:
            dep = stages[spec[key]["stage"]]
            hint = _launch_hint(config, dep.name, output_dir, data_dir)
            deps[key] = dep, _ready(dep, spec[key]["algorithm"], hint, locator)
    jobs = []
    for trial in range(config["trials"]):
        for test_envs in config["test_envs"]:
            test_envs = sorted(test_envs)
            inherited = {}
            if "init_from" in deps:
                choice = _pick(config, locator, *deps["init_from"], test_envs, trial, last=True)
                model = os.path.join(choice.run.path, "model.pkl")
                if not os.path.isfile(model):
                    raise Blocked(f"{model} is missing (the run is done but saved no model)")
                inherited.update(init="domainbed", init_path=model)
            if "hparams_from" in deps:
                choice = _pick(config, locator, *deps["hparams_from"], test_envs, trial,
                               last=False)
                inherited.update((k, choice.record["hparams"][k])
                                 for k in spec["hparams_from"]["keys"])
            for algorithm in spec["algorithms"]:
                for point in grid_points(spec["grid"]):
                    hparams = _hparams(config, spec, algorithm, inherited, point)
                    for member in range(spec["members"]):
                        args = train_args(config, spec, algorithm, test_envs, trial, hparams,
                                          data_dir, member)
                        job = Job(args, folder)
                        job.command_str = launchers.entry_command(job.command_str)
                        jobs.append(job)
    return jobs


def plan(config: dict, output_dir: str, data_dir: str,
         locator: Locator | None = None) -> list[Stage]:
    """Every stage of ``config`` with its DomainBed jobs (or why they are not known yet); the
    earlier stages' runs are found by ``locator`` (default: in the jobs' own folders)."""
    output_dir, data_dir = os.path.abspath(output_dir), os.path.abspath(data_dir)
    locator = locator or Locator()
    stages: dict[str, Stage] = {}
    for spec in config["stages"]:
        stage = Stage(spec, stage_folder(config, spec, output_dir))
        try:
            stage.jobs = _stage_jobs(config, spec, stages, output_dir, data_dir, stage.folder,
                                     locator)
        except Blocked as why:
            stage.blocked = f"stage {stage.name!r} cannot be planned yet: {why}"
        stages[stage.name] = stage
    return list(stages.values())


# --- command -------------------------------------------------------------------------------


def describe(stage: Stage, job: Job) -> str:
    """DomainBed's job line plus what varies: grid point, copied hparams, initial model."""
    hparams = json.loads(job.train_args["hparams"])
    spec = stage.spec
    keys = list(spec["grid"]) + list(spec.get("hparams_from", {}).get("keys", []))
    extra = " ".join(f"{k}={hparams[k]}" for k in keys)
    if "init_from" in spec:
        extra += f" init={os.path.relpath(hparams['init_path'], os.path.dirname(stage.folder))}"
    return f"{job} {extra}".rstrip()


def print_stage(stage: Stage) -> None:
    spec = stage.spec
    print(f"== stage {stage.name}: {', '.join(spec['algorithms'])}, {spec['steps']} steps, "
          f"checkpoint every {spec['checkpoint_freq']}, tables from step {spec['eval_from']}; "
          f"{stage.folder}")
    if stage.blocked:
        print(stage.blocked)
        return
    for job in stage.jobs:
        print(describe(stage, job))
    states = [j.state for j in stage.jobs]
    print(f"{len(states)} jobs: {states.count(Job.DONE)} done, "
          f"{states.count(Job.INCOMPLETE)} incomplete, "
          f"{states.count(Job.NOT_LAUNCHED)} not launched.")


def _check_init(stage: Stage) -> None:
    """The pretrained weights a stage starts from must be there before it is launched."""
    for job in stage.jobs:
        hparams = json.loads(job.train_args["hparams"])
        if hparams.get("init") == "moco":
            path = hparams["init_path"] or os.environ.get(MOCO_ENV, "")
            if not os.path.isfile(path):
                raise Blocked(
                    f"stage {stage.name!r} starts from MoCo-v2 weights (init='moco'), but "
                    f"{'init_path' if hparams['init_path'] else '$' + MOCO_ENV}={path!r} is no "
                    f"file: export {MOCO_ENV}=/path/to/moco_v2_800ep_pretrain.pth.tar")
        if hparams.get("init") == "torchvision":
            path = torchvision_path(hparams["resnet18"])
            if not os.path.isfile(path):
                raise Blocked(f"stage {stage.name!r} starts from torchvision's ImageNet weights "
                              f"(init='torchvision'), but {path} is no file: download it there "
                              "(torch hub cache; $TORCH_HOME moves it)")


def _launcher(name: str | Callable, config: dict, spec: dict):
    if callable(name):  # a launcher function itself (the demo's)
        return name
    if name == "submitit":
        return functools.partial(launchers.submitit_launcher,
                                 config={**config["slurm"], **spec["slurm"]})
    return command_launchers.REGISTRY[name]


def run_config(command: str, config: dict, output_dir: str, data_dir: str,
               stage: str | None = None, launcher: str | Callable | None = None,
               confirm: bool = True) -> int:
    """Run ``list``, ``launch`` or ``delete_incomplete`` on the stages (all, in order, or one);
    returns the exit status. A stage waiting for an earlier one stops ``launch`` with 2."""
    names = [s["name"] for s in config["stages"]]
    if stage is not None and stage not in names:
        raise ConfigError(f"--stage {stage!r}: expected one of {names} of {config['path']}")
    for name in [stage] if stage else names:
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
            Job.launch(to_launch, _launcher(launcher, config, planned.spec))
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

