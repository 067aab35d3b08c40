"""Stored plans: every paper config's DomainBed jobs and the tables of fabricated runs.

``python tests/support/plan_snapshot.py`` writes ``tests/data/plans.json``; ``test_plans.py``
checks that the code still plans the same jobs (train args, run folders, commands) and prints
the same tables.
Stages that start from earlier ones are planned after the earlier stage's runs were fabricated
here (deterministic accuracies from each run's hparams, test envs and trial, no training).
Run folders are hashes of the train args, which hold absolute paths: the plans use a fixed root.
"""

import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = "/tmp/domainbed-gaqat-plan-snapshot"
CONFIGS = ("demo", "pacs_w4a4", "pacs_w3a3", "domainnet_w4a4", "domainnet_w3a3",
           "pacs_ablation", "pacs_freeze_steps", "pacs_threshold", "pacs_qat_w4a4", "qtdog_pacs",
           "qtdog_dg_methods", "pacs_dg_methods_w4a4")
TABLES = ("demo", "pacs_w4a4", "domainnet_w4a4", "pacs_freeze_steps", "qtdog_pacs",
          "qtdog_dg_methods", "pacs_dg_methods_w4a4")
STORED = Path(__file__).resolve().parents[1] / "data" / "plans.json"


def _unit(*parts: object) -> float:
    """A deterministic number in [0, 1) from ``parts``."""
    digest = hashlib.md5(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return int(digest[:8], 16) / 2**32


def fabricate(job, n_envs: int) -> None:
    """Write ``job``'s run as train.py would (records at step 0 and its last step, ``done``,
    a ``model.pkl`` placeholder; a run with SWAD's hparams has its averaged model's
    ``swad_env*`` accuracies in the last record); accuracies depend on what the run is, not
    where it is."""
    from domainbed_gaqat.experiments.runs import RunSpec

    args = {k: v for k, v in job.train_args.items() if k != "hparams"}
    hparams = json.loads(job.train_args["hparams"])
    identity = RunSpec.from_args(args, hparams).meaning()["hparams"]  # paths left out
    key = (args["algorithm"], identity, args["test_envs"], args["trial_seed"])
    os.makedirs(job.output_dir, exist_ok=True)
    with open(os.path.join(job.output_dir, "results.jsonl"), "w") as f:
        for step in (0, args["steps"] - 1):
            record = {"step": step, "args": args, "hparams": hparams}
            for env in range(n_envs):
                for split in ("in", "out"):
                    record[f"env{env}_{split}_acc"] = round(_unit(*key, step, env, split), 4)
                    if "swad_n_converge" in hparams and step > 0:
                        record[f"swad_env{env}_{split}_acc"] = round(
                            _unit(*key, "swad", env, split), 4)
            f.write(json.dumps(record) + "\n")
    for name in ("done", "model.pkl"):
        with open(os.path.join(job.output_dir, name), "w") as f:
            f.write(name)


def _plain(value: object, python: str) -> object:
    """Paths and the interpreter as placeholders."""
    if isinstance(value, str):
        return value.replace(python, "PYTHON").replace(ROOT, "{ROOT}")
    if isinstance(value, dict):
        return {k: _plain(v, python) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v, python) for v in value]
    return value


def snapshot(api) -> dict:
    """``{config: {"stages": {stage: [job, ...]}, "tables": {format: text}}}``. ``api`` has
    ``load_config``, ``plan``, ``n_envs(dataset)`` and ``tables_main(argv)``."""
    import shlex

    python = shlex.quote(sys.executable)
    result = {}
    for name in CONFIGS:
        shutil.rmtree(ROOT, ignore_errors=True)
        out, data = f"{ROOT}/out", f"{ROOT}/data"
        config = api.load_config(name)
        stages = {}
        for i, stage in enumerate(config.stages):
            planned = api.plan(config, out, data)[i]
            assert not planned.blocked, planned.blocked
            # the command holds every train arg, the run folder (a hash of them) included
            stages[stage.name] = [_plain(j.command_str, python) for j in planned.jobs]
            for job in planned.jobs:
                fabricate(job, api.n_envs(config.dataset))
        entry = {"stages": stages, "tables": {}}
        if name in TABLES:
            for fmt in ("markdown", "csv"):
                buffer = io.StringIO()
                with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(io.StringIO()):
                    status = api.tables_main([name, "--output_dir", out, "--data_dir", data,
                                              "--format", fmt])
                assert status == 0
                entry["tables"][fmt] = _plain(buffer.getvalue(), python)
        result[name] = entry
    shutil.rmtree(ROOT, ignore_errors=True)
    return result


class CurrentAPI:
    """The package's planning and table functions (where they live now)."""

    @staticmethod
    def load_config(name):
        from domainbed_gaqat.experiments.configs import load_config

        return load_config(name)

    @staticmethod
    def plan(config, out, data):
        from domainbed_gaqat.experiments.sweep import plan

        return plan(config, out, data)

    @staticmethod
    def n_envs(dataset):
        from domainbed import datasets

        return datasets.num_environments(dataset)

    @staticmethod
    def tables_main(argv):
        from domainbed_gaqat.cli import main

        return main(["tables", *argv])


if __name__ == "__main__":
    import domainbed_gaqat

    domainbed_gaqat.register()
    STORED.parent.mkdir(exist_ok=True)
    STORED.write_text(json.dumps(snapshot(CurrentAPI), indent=1, sort_keys=True) + "\n")
    print(f"wrote {STORED}")
