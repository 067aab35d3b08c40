"""Every paper config (``sweeps/pacs_*``, ``sweeps/domainnet_*``) runs end to end: all its
test-env groups and stages through DomainBed's ``train.py``, then its table.

Each config is extended (``extends``, as a user would) to one trial, one grid point, two steps,
ResNet-18 and one image per domain a step, on image folders in DomainBed's PACS and DomainNet
layouts written here, stage 1 starting from a MoCo-v2-format checkpoint written here. The
configs share one output folder, as in a real reproduction: their common runs are made once.
"""

import csv
import io
import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from domainbed import command_launchers, datasets
from support.helpers import PYTHON, gaqat, run, subprocess_env
from support.image_folders import write_images, write_moco

from domainbed_gaqat.experiments.configs import Stage, SweepConfig, load_config
from domainbed_gaqat.plugin import hparams as hparams_lib
from domainbed_gaqat.plugin.algorithms import ALGORITHMS

pytestmark = [pytest.mark.slow, pytest.mark.paper]
CONFIGS = ("pacs_w4a4", "pacs_w3a3", "pacs_ablation", "pacs_freeze_steps", "pacs_threshold",
           "domainnet_w4a4", "domainnet_w3a3")


def two_at_a_time(commands: list[str]) -> None:
    """A command launcher for this test only: DomainBed's ``local`` launcher runs one job after
    another; this one runs the same shell commands two at a time, one thread each."""
    env = subprocess_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda c: subprocess.run(c, shell=True, env=env, capture_output=True),
                      commands))


def one_point(config: SweepConfig, stage: Stage) -> dict:
    """The stage's grid reduced to one point: the registry's default where the grid has it."""
    spec = ALGORITHMS[stage.algorithms[0]]
    bits = min(config.bits) if spec.quantized else 4
    defaults = {k: p.default for k, p in hparams_lib.params(spec, config.dataset, bits).items()}
    return {k: [defaults[k] if defaults.get(k) in values else values[0]]
            for k, values in stage.grid.axes.items()}


def tiny(name: str, folder: Path) -> Path:
    """A config extending ``name`` to the test's size."""
    base = load_config(name)
    stages = [{"name": s.name, "steps": 2, "checkpoint_freq": 2,
               "eval_from": min(s.eval_from, 1), "grid": one_point(base, s)}
              for s in base.stages]
    path = folder / f"tiny_{name}.py"
    path.write_text("SWEEP = " + repr({
        "extends": name, "trials": 1, "hparams": {"resnet18": True, "batch_size": 1},
        "stages": stages}) + "\n")
    return path


@pytest.fixture(scope="module")
def reproduction(tmp_path_factory):
    """``(root, {config: path}, launch)``: one output folder for every config; ``launch(name)``
    runs a config's sweep there once (configs share their full-precision stage's jobs)."""
    root = tmp_path_factory.mktemp("paper")
    for dataset in ("PACS", "DomainNet"):
        write_images(root / "data", dataset, classes=2, per_class=3)
    moco = write_moco(root / "moco_v2_800ep_pretrain.pth.tar", resnet18=True)
    paths = {name: tiny(name, root) for name in CONFIGS}
    launched = set()
    mp = pytest.MonkeyPatch()
    mp.setenv("DOMAINBED_GAQAT_MOCO", str(moco))
    mp.setitem(command_launchers.REGISTRY, "two_at_a_time", two_at_a_time)

    def launch(name: str) -> None:
        if name not in launched:
            assert gaqat("sweep", "launch", str(paths[name]), "--output_dir", str(root / "out"),
                         "--data_dir", str(root / "data"), "--command_launcher",
                         "two_at_a_time", "--skip_confirmation") == 0, name
            launched.add(name)

    yield root, paths, launch
    mp.undo()


def records_by_run(folder: Path) -> dict[str, list[dict]]:
    runs = {}
    for run_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        assert (run_dir / "done").exists(), (run_dir / "err.txt").read_text()[-3000:]
        runs[run_dir.name] = [json.loads(line)
                              for line in (run_dir / "results.jsonl").read_text().splitlines()]
    return runs


def chosen_test_accuracy(records: list[dict], eval_from: int) -> dict[int, float]:
    """Test-domain validation, written here from the paper's rule: the checkpoint (at or after
    ``eval_from``) with the best mean test-env out-split accuracy, the first on ties; its
    test-env in-split accuracies."""
    test_envs = records[0]["args"]["test_envs"]
    usable = [r for r in records if r["step"] >= eval_from]
    best = max(usable, key=lambda r: np.mean([r[f"env{e}_out_acc"] for e in test_envs]))
    return {e: best[f"env{e}_in_acc"] for e in test_envs}


@pytest.mark.parametrize("name", CONFIGS)
def test_config_runs_every_group_and_stage_then_its_table(reproduction, name, capsys):
    root, paths, launch = reproduction
    launch(name)
    config = load_config(str(paths[name]))
    dataset, bits = config.dataset, config.bits
    n_envs = datasets.num_environments(dataset)
    names = datasets.get_dataset_class(dataset).ENVIRONMENTS
    out = root / "out" / dataset
    runs = {**records_by_run(out / "fp"), **records_by_run(out / "w{}a{}".format(*bits))}

    # every planned job of every stage is a finished run, with the config's settings
    assert gaqat("sweep", "list", str(paths[name]), "--output_dir", str(root / "out"),
                 "--data_dir", str(root / "data")) == 0
    listing = capsys.readouterr().out
    for stage in config.stages:
        n_jobs = len(stage.algorithms) * len(config.test_envs)
        assert f"{n_jobs} jobs: {n_jobs} done, 0 incomplete, 0 not launched." in listing
    for records in runs.values():  # steps 0 and 1, the first skipped under --eval_from 1
        eval_from = records[0]["args"].get("eval_from", 0)
        assert [r["step"] for r in records] == [s for s in (0, 1) if s >= eval_from or s == 1]
        assert records[0]["hparams"]["resnet18"] and records[0]["hparams"]["batch_size"] == 1
        assert len(records[0]["args"]["test_envs"]) == len(config.test_envs[0])
    fp = [r for r in runs.values() if r[0]["args"]["algorithm"] == "ERM_FP"]
    assert {tuple(r[0]["args"]["test_envs"]) for r in fp} == set(config.test_envs)
    assert all(r[0]["hparams"]["init"] == "moco" for r in fp)

    # the table: one row per shown algorithm (and split value), the rule's numbers
    assert gaqat("tables", str(paths[name]), "--output_dir", str(root / "out"),
                 "--data_dir", str(root / "data"), "--format", "csv") == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    shown = config.table.algorithms or config.algorithms
    split = config.table.split_by
    domains = [names[e] for g in config.test_envs for e in g]
    assert {row["algorithm"] for row in rows} == set(shown)
    eval_from = {a: s.eval_from for s in config.stages for a in s.algorithms}
    for algorithm in shown:
        quantized = ALGORITHMS[algorithm].quantized
        cells = {}
        for records in runs.values():
            args, hp = records[0]["args"], records[0]["hparams"]
            if args["algorithm"] == algorithm and (not quantized
                                                   or (hp["w_bits"], hp["a_bits"]) == bits):
                key = tuple(float(hp[k]) for k in split)
                for env, acc in chosen_test_accuracy(records, eval_from[algorithm]).items():
                    assert (key, env) not in cells  # one run per cell: one grid point
                    cells[key, env] = acc
        for row in (r for r in rows if r["algorithm"] == algorithm):
            key = tuple(float(row[k]) for k in split)
            assert row["bits"] == ("{}/{}".format(*bits) if quantized else "Full")
            if row["domain"] == "Avg":
                expected = np.mean([cells[key, e] for e in range(n_envs) if (key, e) in cells])
            else:
                expected = cells[key, names.index(row["domain"])]
            assert float(row["test_mean"]) == pytest.approx(100 * expected, abs=1e-3), row
        assert {r["domain"] for r in rows if r["algorithm"] == algorithm} == {*domains, "Avg"}

    # DomainBed's own collect_results reads both folders
    for folder in ("fp", "w{}a{}".format(*bits)):
        proc = run([PYTHON, "-m", "domainbed.scripts.collect_results", "--input_dir",
                    str(out / folder)])
        total = sum(map(len, records_by_run(out / folder).values()))
        assert f"Total records: {total}" in proc.stdout
    assert os.path.isfile(out / "fp" / next(iter(records_by_run(out / "fp"))) / "model.pkl")
