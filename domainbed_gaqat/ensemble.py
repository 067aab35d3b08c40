"""``gaqat ensemble`` / ``python -m domainbed_gaqat.ensemble``: QT-DoG's EoQ (ensemble of
quantized models).

    gaqat ensemble RUN_DIR [RUN_DIR ...] [--json FILE] [--selection train|test|test_last]
    gaqat ensemble --config NAME --output_dir OUT --json_dir DIR [--selection ...]

The ensemble's prediction is the sum of the members' logits (QT-DoG's EoQ, as EoA). Members
are DomainBed runs that differ only in their seed: the same
:class:`~domainbed_gaqat.experiments.runs.RunSpec` identity but for the member index
(:func:`cell`). Each member's model is its ``model.pkl``, or, when the run saved a model at
every checkpoint (``--save_model_every_checkpoint``), the one its selection rule picks
(default: training-domain validation, QT-DoG's). Every env's in and out splits are
DomainBed's (the runs' train.py splits); the result is a DomainBed-style record
(``env{i}_in_acc``, ``env{i}_out_acc``, ``args`` with algorithm ``<name>+EoQ``), printed as a
table and written to ``--json``; ``gaqat tables --ensembles FILE...`` shows it as a row. With
``--config``, every cell of the config's stages with ``members`` > 1 is ensembled, one file per
cell in ``--json_dir``.
"""

import json
import os
from dataclasses import replace

import torch

from domainbed_gaqat import options
from domainbed_gaqat.experiments import outputs
from domainbed_gaqat.experiments.results import RunFolder, read_run
from domainbed_gaqat.experiments.runs import RunSpec
from domainbed_gaqat.experiments.selection import SELECTION_RULES, choose
from domainbed_gaqat.plugin.data import Data, default_device
from domainbed_gaqat.plugin.model_files import algorithm_from_checkpoint, load_checkpoint
from domainbed_gaqat.progress import track

SUFFIX = "+EoQ"


def cell(spec: RunSpec) -> RunSpec:
    """What a run's ensemble is (its members share it): the run with the member index and the
    seeds left out."""
    return replace(spec, member=0, seed=0, hparams_seed=0)


def check_members(runs: list[RunFolder]) -> None:
    """Members must be finished runs that differ only in their seed."""
    if len(runs) < 2:
        raise ValueError(f"an ensemble needs two or more runs, got {len(runs)}")
    for run in runs:
        if not run.done or not run.records:
            raise ValueError(f"{run.path}: not a finished run (no 'done' file or no record)")
    first = runs[0]
    for run in runs[1:]:
        differ = cell(first.spec).differences(cell(run.spec))
        if differ:
            key, (theirs, mine) = next(iter(differ.items()))
            raise ValueError(f"members must share {key}: {first.path} has {theirs!r}, "
                             f"{run.path} {mine!r} (they differ in {sorted(differ)})")
    seeds = [run.spec.seed for run in runs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"members must differ in their seed, got seeds {seeds}")


def check_model_file(run: RunFolder, path: str, ckpt: dict) -> None:
    """A member's model file must record the run of its folder (a model.pkl copied into the
    wrong folder would make another ensemble)."""
    recorded = RunSpec.from_args(ckpt["args"], ckpt["model_hparams"])
    differ = recorded.differences(run.spec)
    if differ:
        detail = ", ".join(f"{k} {a!r} (folder: {b!r})" for k, (a, b) in differ.items())
        raise ValueError(f"{path} is not the model of the run in {run.path}: it records "
                         f"{detail}")


def member_model(run: RunFolder, rule: str) -> str:
    """The member's checkpoint: the one its rule picks if each checkpoint's model was saved."""
    choice = choose([(run, run.spec.eval_from)], rule)
    picked = os.path.join(run.path, f"model_step{choice.record['step']}.pkl")
    if os.path.isfile(picked):
        return picked
    final = os.path.join(run.path, "model.pkl")
    if not os.path.isfile(final):
        raise FileNotFoundError(f"{run.path} has no model.pkl (run with model saving on)")
    return final


@torch.no_grad()
def ensemble_accuracy(models: list, split, device: str) -> float:
    """Accuracy of the summed logits on a split, read in order in batches of 64 (counted on
    the device, read by the host once)."""
    loader = torch.utils.data.DataLoader(split, batch_size=64, shuffle=False)
    correct, total = 0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = sum(model.predict(x) for model in models)
        correct = correct + (logits.argmax(1) == y).sum()
        total += len(y)
    return int(correct) / total


def evaluate(run_dirs: list[str], rule: str = "train", device: str | None = None,
             progress: bool = True) -> dict:
    """The ensemble record of ``run_dirs`` (see the module docstring)."""
    runs = [read_run(os.path.abspath(d)) for d in run_dirs]
    check_members(runs)
    device = device or default_device()
    paths = [member_model(run, rule) for run in runs]
    checkpoints = [load_checkpoint(p) for p in paths]
    for run, path, ckpt in zip(runs, paths, checkpoints):
        check_model_file(run, path, ckpt)
    args = runs[0].args
    data = Data(args["dataset"], args.get("data_dir"), args["test_envs"], runs[0].hparams,
                args.get("holdout_fraction", 0.2), args.get("trial_seed", 0))
    for ckpt in checkpoints:
        data.check_model(ckpt)
    models = [algorithm_from_checkpoint(c, device) for c in checkpoints]
    record = {"step": runs[0].records[-1]["step"], "members": paths,
              "seeds": [run.args.get("seed") for run in runs], "hparams": runs[0].hparams,
              "args": {**args, "algorithm": args["algorithm"] + SUFFIX, "output_dir": None}}
    splits = [(env, which) for env in range(len(data.dataset)) for which in ("in", "out")]
    for env, which in track(splits, f"EoQ of {len(models)} members, splits", enabled=progress):
        record[f"env{env}_{which}_acc"] = ensemble_accuracy(models, data.split(env, which),
                                                            device)
    return record


def describe(record: dict) -> str:
    """A table of the record: a line per env, in and out split accuracies (%)."""
    lines = [f"{record['args']['algorithm']} of {len(record['members'])} members, test envs "
             f"{record['args']['test_envs']}, trial {record['args']['trial_seed']}",
             f"{'env':>5} {'in':>8} {'out':>8}"]
    env = 0
    while f"env{env}_in_acc" in record:
        mark = " (test)" if env in record["args"]["test_envs"] else ""
        lines.append(f"{env:>5} {100 * record[f'env{env}_in_acc']:8.2f} "
                     f"{100 * record[f'env{env}_out_acc']:8.2f}{mark}")
        env += 1
    return "\n".join(lines)


def config_cells(name: str, output_dir: str) -> list[tuple[str, list[str]]]:
    """``(file name, member run folders)`` of every ensembled cell of a config's stages."""
    from domainbed_gaqat.experiments.configs import load_config
    from domainbed_gaqat.experiments.results import Locator, find_runs
    from domainbed_gaqat.experiments.sweep import plan

    config = load_config(name)
    locator = Locator(find_runs([output_dir]))
    cells = []
    for planned in plan(config, output_dir, output_dir, locator):
        if planned.stage.members < 2:
            continue
        if planned.blocked:
            raise ValueError(planned.blocked)
        groups: dict[str, tuple[RunSpec, list[str]]] = {}
        for job in planned.jobs:
            run = locator.find(job)
            if run is None or not run.done:
                raise ValueError(f"stage {planned.name!r}: a member is not finished: "
                                 f"{job.train_args['algorithm']} test envs "
                                 f"{job.train_args['test_envs']} ({job.output_dir})")
            spec = cell(run.spec)
            groups.setdefault(spec.identity, (spec, []))[1].append(run.path)
        for spec, members in groups.values():
            envs = "-".join(map(str, spec.test_envs))
            cells.append((f"{planned.name}_{len(cells)}_{spec.algorithm}_env{envs}_trial"
                          f"{spec.trial_seed}.json", members))
    return cells


def add_arguments(parser) -> None:
    parser.add_argument("runs", nargs="*", help="member run folders (DomainBed's)")
    parser.add_argument("--json", help="write the record here (refused if it exists)")
    parser.add_argument("--config", help="instead of runs: ensemble every cell of a config")
    parser.add_argument("--output_dir", help="with --config: the sweep's output folder")
    parser.add_argument("--json_dir", help="with --config: one record file per cell here")
    parser.add_argument("--selection", choices=sorted(SELECTION_RULES), default="train",
                        help="the rule picking each member's checkpoint (when saved)")
    parser.add_argument("--overwrite", action="store_true")
    options.device(parser)
    options.quiet(parser)


def run(args) -> int:
    if bool(args.runs) == bool(args.config):
        raise ValueError("give either member run folders or --config")
    if args.config:
        if not (args.output_dir and args.json_dir):
            raise ValueError("--config needs --output_dir and --json_dir")
        jobs = [(os.path.join(args.json_dir, f), members)
                for f, members in config_cells(args.config, args.output_dir)]
        if not jobs:
            raise ValueError(f"config {args.config!r} has no stage with members > 1")
    else:
        jobs = [(args.json, args.runs)]
    outputs.check_new([path for path, _ in jobs if path], args.overwrite)
    for path, members in track(jobs, "EoQ cells", enabled=not args.quiet and len(jobs) > 1):
        record = evaluate(members, args.selection, args.device, not args.quiet)
        print(describe(record))
        if path:
            outputs.write_text(path, json.dumps(record, indent=1), args.overwrite)
    return 0


if __name__ == "__main__":
    from domainbed_gaqat.cli import run_as_module

    run_as_module("ensemble")
