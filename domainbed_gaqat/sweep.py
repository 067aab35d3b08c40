"""``gaqat-sweep``: run one experiment of ``sweeps/`` as DomainBed jobs, stage after stage.

    gaqat-sweep list|launch|delete_incomplete CONFIG --output_dir OUT --data_dir DATA
                [--stage NAME] [--command_launcher local|submitit|...] [--skip_confirmation]

A config (format: ``sweeps/README.md``) lists stages; each expands to DomainBed
``domainbed.scripts.sweep.Job`` objects (trials x test-env groups x algorithms x grid points),
launched with DomainBed's ``Job.launch`` and a ``command_launchers.REGISTRY`` launcher, so
DONE jobs are skipped and ``delete_incomplete`` removes what DomainBed would. On top of
DomainBed's sweep:

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

import argparse
import ast
import functools
import itertools
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from domainbed import algorithms as domainbed_algorithms
from domainbed import command_launchers, datasets, hparams_registry
from domainbed.lib import misc
from domainbed.scripts.sweep import Job, ask_for_confirmation

from domainbed_gaqat import launchers
from domainbed_gaqat.networks import MOCO_ENV
from domainbed_gaqat.results import read_run
from domainbed_gaqat.selection import RULES, Choice, choose

CONFIG_DIR = Path(__file__).resolve().parent.parent / "sweeps"
TOP_KEYS = {"paper", "dataset", "test_envs", "trials", "bits", "selection", "holdout_fraction",
            "hparams", "stages", "table", "slurm"}
STAGE_KEYS = {"name", "algorithms", "steps", "checkpoint_freq", "eval_from", "hparams", "grid",
              "init_from", "hparams_from", "slurm"}
BIT_KEYS = ("w_bits", "a_bits")


class ConfigError(ValueError):
    """A sweep config that is not what ``sweeps/README.md`` describes."""


class Blocked(Exception):
    """A stage whose jobs depend on runs of an earlier stage that are not all done."""


# --- configs -------------------------------------------------------------------------------


def config_path(name: str) -> Path:
    """``name`` as a file, else ``sweeps/<name>.py`` of this checkout."""
    for path in (Path(name), CONFIG_DIR / f"{name}.py"):
        if path.is_file():
            return path
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.py")) if CONFIG_DIR.is_dir() else []
    raise FileNotFoundError(f"sweep config {name!r}: no such file, and not one of {known} "
                            f"in {CONFIG_DIR}")


def load_config(name: str) -> dict:
    """Read and check a config: the literal ``SWEEP = {...}`` of a ``.py`` file (no code runs)."""
    path = config_path(name)
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    values = [node.value for node in tree.body if isinstance(node, ast.Assign)
              and [getattr(t, "id", None) for t in node.targets] == ["SWEEP"]]
    if len(values) != 1:
        raise ConfigError(f"{path}: expected exactly one assignment 'SWEEP = {{...}}'")
    try:
        config = ast.literal_eval(values[0])
    except ValueError as err:
        raise ConfigError(f"{path}: SWEEP must be a literal (dicts, lists, numbers, strings, "
                          f"booleans): {err}") from err
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: SWEEP must be a dict, got {type(config).__name__}")
    if set(config) - TOP_KEYS:
        raise ConfigError(f"{path}: unknown keys {sorted(set(config) - TOP_KEYS)}; expected "
                          f"some of {sorted(TOP_KEYS)}")
    config = {"selection": "test", "holdout_fraction": 0.2, "hparams": {}, "table": {},
              "slurm": {}, **config, "name": path.stem, "path": str(path)}
    validate(config)
    return config


def _int(value: object, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _check(ok: bool, config: dict, message: str) -> None:
    if not ok:
        raise ConfigError(f"{config['path']}: {message}")


def _known(algorithm: str, dataset: str) -> set[str]:
    return set(hparams_registry.default_hparams(algorithm, dataset))


def quantized(algorithm: str, dataset: str) -> bool:
    return "w_bits" in _known(algorithm, dataset)


def validate(config: dict) -> None:
    """Raise :class:`ConfigError` naming the first value that is not as expected."""
    missing = {"dataset", "test_envs", "trials", "stages"} - set(config)
    _check(not missing, config, f"missing keys {sorted(missing)}")
    dataset = config["dataset"]
    _check(dataset in datasets.DATASETS, config,
           f"dataset {dataset!r}: expected one of DomainBed's datasets {datasets.DATASETS}")
    n_envs = datasets.num_environments(dataset)
    groups = config["test_envs"]
    _check(isinstance(groups, list) and groups and all(
        isinstance(g, list) and g and all(_int(e, 0) and e < n_envs for e in g)
        and len(set(g)) == len(g) for g in groups), config,
        f"test_envs {groups!r}: expected a list of groups, each a list of distinct env indices "
        f"in 0..{n_envs - 1}")
    _check(_int(config["trials"], 1), config, f"trials {config['trials']!r}: expected an int >= 1")
    _check(config["selection"] in RULES, config,
           f"selection {config['selection']!r}: expected one of {sorted(RULES)}")
    fraction = config["holdout_fraction"]
    _check(isinstance(fraction, float) and 0 < fraction < 1, config,
           f"holdout_fraction {fraction!r}: expected a float in (0, 1)")
    bits = config.get("bits", [4, 4])
    _check(isinstance(bits, list) and len(bits) == 2 and all(_int(b, 2) and b <= 8 for b in bits),
           config, f"bits {bits!r}: expected [W, A], each an int in 2..8")
    _check(isinstance(config["hparams"], dict), config,
           f"hparams {config['hparams']!r}: expected a dict")
    _slurm(config, config["slurm"])
    stages = config["stages"]
    _check(isinstance(stages, list) and stages, config, "stages: expected a non-empty list")
    seen: dict[str, list[str]] = {}
    for spec in stages:
        _check(isinstance(spec, dict), config, f"stage {spec!r}: expected a dict")
        _validate_stage(config, spec, seen)
        seen[spec["name"]] = spec["algorithms"]
    every = [a for algorithms in seen.values() for a in algorithms]
    _check(len(every) == len(set(every)), config,
           f"an algorithm appears in two stages ({every}): each may appear once")
    for key in config["hparams"]:
        _check(key not in BIT_KEYS and any(key in _known(a, dataset) for a in every), config,
               f"hparams key {key!r}: not a hyperparameter of {every} (bits go in 'bits')")
    table = config["table"]
    _check(isinstance(table, dict) and set(table) <= {"algorithms", "split_by"}
           and isinstance(table.get("split_by", []), list)
           and set(table.get("algorithms", every)) <= set(every), config,
           f"table {table!r}: expected 'algorithms' (a subset of {every}) and 'split_by' "
           f"(a list of hparams)")


def _validate_stage(config: dict, spec: dict, seen: dict[str, list[str]]) -> None:
    name = spec.get("name")
    where = f"stage {name!r}"
    _check(isinstance(name, str) and name.isidentifier() and name not in seen, config,
           f"{where}: 'name' must be a new identifier (stages so far: {list(seen)})")
    _check(not set(spec) - STAGE_KEYS, config,
           f"{where}: unknown keys {sorted(set(spec) - STAGE_KEYS)}; expected some of "
           f"{sorted(STAGE_KEYS)}")
    algorithms = spec.get("algorithms")
    _check(isinstance(algorithms, list) and algorithms
           and all(a in domainbed_algorithms.ALGORITHMS for a in algorithms), config,
           f"{where}: algorithms {algorithms!r}: expected a list of registered algorithms")
    kinds = {quantized(a, config["dataset"]) for a in algorithms}
    _check(len(kinds) == 1, config, f"{where}: mixes quantized and full-precision algorithms")
    _check(not kinds.pop() or "bits" in config, config,
           f"{where} is quantized: the config needs bits = [W, A]")
    for key in ("steps", "checkpoint_freq"):
        _check(_int(spec.get(key), 1), config, f"{where}: {key} {spec.get(key)!r}: "
               f"expected an int >= 1")
    eval_from = spec.setdefault("eval_from", 0)
    _check(_int(eval_from, 0) and eval_from < spec["steps"], config,
           f"{where}: eval_from {eval_from!r}: expected an int in 0..steps-1")
    grid, fixed = spec.setdefault("grid", {}), spec.setdefault("hparams", {})
    _check(isinstance(grid, dict) and all(isinstance(v, list) and v for v in grid.values()),
           config, f"{where}: grid {grid!r}: expected {{name: [values, ...]}}")
    _check(isinstance(fixed, dict), config, f"{where}: hparams {fixed!r}: expected a dict")
    inherited = []
    for key in ("init_from", "hparams_from"):
        if key in spec:
            ref = spec[key]
            _check(isinstance(ref, dict) and ref.get("stage") in seen
                   and ref.get("algorithm") in seen[ref["stage"]], config,
                   f"{where}: {key} {ref!r}: expected {{'stage': an earlier stage, "
                   f"'algorithm': one of its algorithms}}")
    if "hparams_from" in spec:
        inherited = spec["hparams_from"].get("keys")
        source = spec["hparams_from"]["algorithm"]
        _check(isinstance(inherited, list) and inherited
               and set(inherited) <= _known(source, config["dataset"]), config,
               f"{where}: hparams_from needs 'keys', a list of hparams of {source} to copy")
    keys = list(grid) + list(fixed) + list(inherited)
    _check(len(keys) == len(set(keys)), config,
           f"{where}: a hyperparameter is set twice among grid, hparams and hparams_from: {keys}")
    for algorithm in algorithms:
        unknown = set(keys) - (_known(algorithm, config["dataset"]) - set(BIT_KEYS))
        _check(not unknown, config, f"{where}: {sorted(unknown)} are not hyperparameters of "
               f"{algorithm} (bits go in 'bits')")
    _slurm(config, spec.setdefault("slurm", {}))


def _slurm(config: dict, section: object) -> None:
    try:
        launchers.settings(section)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{config['path']}: {err}") from err


def grid_points(grid: dict[str, list]) -> list[dict]:
    """The exact grid: every combination, in the config's key and value order."""
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


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
    """``OUT/<dataset>/fp`` or ``OUT/<dataset>/w<W>a<A>``."""
    if quantized(spec["algorithms"][0], config["dataset"]):
        return os.path.join(output_dir, config["dataset"], "w{}a{}".format(*config["bits"]))
    return os.path.join(output_dir, config["dataset"], "fp")


def train_args(config: dict, spec: dict, algorithm: str, test_envs: list[int], trial: int,
               hparams: dict, data_dir: str) -> dict:
    """Arguments of one ``domainbed.scripts.train`` run (DomainBed hashes them into its folder)."""
    steps = {"steps": spec["steps"], "checkpoint_freq": spec["checkpoint_freq"],
             "holdout_fraction": config["holdout_fraction"]}
    hparams_seed = misc.seed_hash(json.dumps(
        {"algorithm": algorithm, "dataset": config["dataset"], "hparams": hparams, **steps},
        sort_keys=True))
    return {"dataset": config["dataset"], "algorithm": algorithm, "test_envs": test_envs,
            "hparams_seed": hparams_seed, "data_dir": data_dir, "task": "domain_generalization",
            "trial_seed": trial, "hparams": json.dumps(hparams, sort_keys=True),
            "seed": misc.seed_hash(config["dataset"], algorithm, test_envs, hparams_seed, trial),
            **steps}


def _hparams(config: dict, spec: dict, algorithm: str, inherited: dict, point: dict) -> dict:
    hparams = hparams_registry.default_hparams(algorithm, config["dataset"])
    hparams.update((k, v) for k, v in config["hparams"].items() if k in hparams)
    hparams.update(spec["hparams"])
    if "w_bits" in hparams:
        hparams.update(zip(BIT_KEYS, config["bits"]))
    return {**hparams, **inherited, **point}


def _launch_hint(config: dict, stage: str, output_dir: str, data_dir: str) -> str:
    return (f"gaqat-sweep launch {config['name']} --stage {stage} --output_dir {output_dir} "
            f"--data_dir {data_dir} --command_launcher ...")


def _ready(dep: Stage, algorithm: str, hint: str) -> list[Job]:
    """The ``algorithm`` jobs of stage ``dep``, which must all be done."""
    if dep.blocked:
        raise Blocked(f"stage {dep.name!r} must be launched and finished first ({dep.blocked})")
    jobs = [j for j in dep.jobs if j.train_args["algorithm"] == algorithm]
    waiting = [j for j in jobs if j.state != Job.DONE]
    if waiting:
        incomplete = sum(j.state == Job.INCOMPLETE for j in waiting)
        raise Blocked(
            f"it starts from the {algorithm} runs of stage {dep.name!r}, and {len(waiting)} of "
            f"{len(jobs)} are not done ({incomplete} incomplete: running, or crashed - see "
            f"their err.txt and `gaqat-sweep delete_incomplete`; {len(waiting) - incomplete} "
            f"not launched). Run first, and wait until its jobs are done: {hint}")
    return jobs


def _pick(config: dict, dep: Stage, jobs: list[Job], test_envs: list[int], trial: int,
          last: bool) -> Choice:
    """The rule's choice among ``jobs`` (all done) of one test-env group and trial."""
    runs = [read_run(j.output_dir) for j in jobs
            if j.train_args["test_envs"] == test_envs and j.train_args["trial_seed"] == trial]
    choice = choose([(run, dep.spec["eval_from"]) for run in runs], config["selection"], last)
    if choice is None:
        raise Blocked(f"stage {dep.name!r} has no usable record for test envs {test_envs}, "
                      f"trial {trial} in {[r.path for r in runs]}")
    return choice


def _stage_jobs(config: dict, spec: dict, stages: dict[str, Stage], output_dir: str,
                data_dir: str, folder: str) -> list[Job]:
    deps = {}
    for key in ("init_from", "hparams_from"):
        if key in spec:
            dep = stages[spec[key]["stage"]]
            hint = _launch_hint(config, dep.name, output_dir, data_dir)
            deps[key] = dep, _ready(dep, spec[key]["algorithm"], hint)
    jobs = []
    for trial in range(config["trials"]):
        for test_envs in config["test_envs"]:
            test_envs = sorted(test_envs)
            inherited = {}
            if "init_from" in deps:
                choice = _pick(config, *deps["init_from"], test_envs, trial, last=True)
                model = os.path.join(choice.run.path, "model.pkl")
                if not os.path.isfile(model):
                    raise Blocked(f"{model} is missing (the run is done but saved no model)")
                inherited.update(init="domainbed", init_path=model)
            if "hparams_from" in deps:
                choice = _pick(config, *deps["hparams_from"], test_envs, trial, last=False)
                inherited.update((k, choice.record["hparams"][k])
                                 for k in spec["hparams_from"]["keys"])
            for algorithm in spec["algorithms"]:
                for point in grid_points(spec["grid"]):
                    hparams = _hparams(config, spec, algorithm, inherited, point)
                    args = train_args(config, spec, algorithm, test_envs, trial, hparams,
                                      data_dir)
                    job = Job(args, folder)
                    job.command_str = launchers.with_this_python(job.command_str)
                    jobs.append(job)
    return jobs


def plan(config: dict, output_dir: str, data_dir: str) -> list[Stage]:
    """Every stage of ``config`` with its DomainBed jobs (or why they are not known yet)."""
    output_dir, data_dir = os.path.abspath(output_dir), os.path.abspath(data_dir)
    stages: dict[str, Stage] = {}
    for spec in config["stages"]:
        stage = Stage(spec, stage_folder(config, spec, output_dir))
        try:
            stage.jobs = _stage_jobs(config, spec, stages, output_dir, data_dir, stage.folder)
        except Blocked as why:
            stage.blocked = f"stage {stage.name!r} cannot be planned yet: {why}"
        stages[stage.name] = stage
    return list(stages.values())


# --- command line --------------------------------------------------------------------------


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


def _check_moco(stage: Stage) -> None:
    for job in stage.jobs:
        hparams = json.loads(job.train_args["hparams"])
        path = hparams["init_path"] or os.environ.get(MOCO_ENV, "")
        if hparams.get("init") == "moco" and not os.path.isfile(path):
            raise Blocked(
                f"stage {stage.name!r} starts from MoCo-v2 weights (init='moco'), but "
                f"{'init_path' if hparams['init_path'] else '$' + MOCO_ENV}={path!r} is no file: "
                f"export {MOCO_ENV}=/path/to/moco_v2_800ep_pretrain.pth.tar")


def _launcher(name: str, config: dict, spec: dict):
    if name == "submitit":
        return functools.partial(launchers.submitit_launcher,
                                 config={**config["slurm"], **spec["slurm"]})
    return command_launchers.REGISTRY[name]


def run(command: str, config: dict, output_dir: str, data_dir: str, stage: str | None = None,
        launcher: str | None = None, confirm: bool = True) -> int:
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
            _check_moco(planned)
        except Blocked as why:
            print(f"gaqat-sweep: not launching: {why}", file=sys.stderr)
            return 2
        to_launch = [j for j in planned.jobs if j.state == Job.NOT_LAUNCHED]
        print(f"About to launch {len(to_launch)} jobs.")
        if to_launch:
            if confirm:
                ask_for_confirmation()
            Job.launch(to_launch, _launcher(launcher, config, planned.spec))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gaqat-sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["list", "launch", "delete_incomplete"])
    parser.add_argument("config", help="a sweeps/ config name (e.g. pacs_w4a4) or a file")
    parser.add_argument("--output_dir", required=True, help="root of all sweep outputs")
    parser.add_argument("--data_dir", required=True, help="DomainBed's data folder")
    parser.add_argument("--stage", help="only this stage (default: all, in order)")
    parser.add_argument("--command_launcher", choices=sorted(command_launchers.REGISTRY))
    parser.add_argument("--skip_confirmation", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "launch" and not args.command_launcher:
        parser.error("launch needs --command_launcher")
    try:
        config = load_config(args.config)
        return run(args.command, config, args.output_dir, args.data_dir, args.stage,
                   args.command_launcher, not args.skip_confirmation)
    except (ConfigError, FileNotFoundError) as err:
        print(f"gaqat-sweep: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
