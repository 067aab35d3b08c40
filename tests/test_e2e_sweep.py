"""End to end: DomainBed's real ``sweep`` with the ``local`` launcher runs LSQ on the offline
dataset, then ``collect_results`` prints its row (SPEC sections 6 and 8)."""

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import run, tiny_hparams
from domainbed import algorithms as db_algorithms

from domainbed_gaqat.plugin.datasets import RotatedDigits

N_ENVS = len(RotatedDigits.ENVIRONMENTS)


def _training_domain_validation(records: list[dict], test_env: int) -> float:
    """DomainBed's "training-domain validation set" choice for one run, recomputed here: the
    checkpoint with the best mean out-split accuracy of the training domains (first on ties),
    reported by its test domain's in-split accuracy."""
    def val(r: dict) -> float:
        accs = [r[f"env{i}_out_acc"] for i in range(N_ENVS) if i != test_env]
        return sum(accs) / len(accs)

    best = max(records, key=val)
    return best[f"env{test_env}_in_acc"]


@pytest.mark.slow
def test_sweep_then_collect_results_shows_the_lsq_row(tmp_path):
    out = tmp_path / "sweep"
    run([sys.executable, "-m", "domainbed.scripts.sweep", "launch",
         "--algorithms", "LSQ", "--datasets", "RotatedDigits", "--command_launcher", "local",
         "--steps", "3", "--n_hparams", "1", "--n_trials", "1", "--single_test_envs",
         "--skip_confirmation", "--data_dir", str(tmp_path / "data"), "--output_dir", str(out),
         "--hparams", json.dumps({"batch_size": 8})],
        # One thread per job: the jobs run one after another, and on a busy 2-core machine
        # two OpenMP threads each spin-wait for the other (the MSE calibration of the first
        # step took 25x longer that way).
        cwd=tmp_path, timeout=1200, OMP_NUM_THREADS="1")

    # The local launcher ignores failures: every job must have finished.
    jobs = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(jobs) == N_ENVS
    expected = {}
    for job in jobs:
        assert (job / "done").exists(), (job / "err.txt").read_text()[-3000:]
        records = [json.loads(line) for line in (job / "results.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [0, 2]
        assert all(type(r["loss"]) is float for r in records)
        args, hparams = records[0]["args"], records[0]["hparams"]
        assert args["algorithm"] == "LSQ" and args["dataset"] == "RotatedDigits"
        assert hparams["batch_size"] == 8 and hparams["w_bits"] == hparams["a_bits"] == 4
        [test_env] = args["test_envs"]
        expected[test_env] = _training_domain_validation(records, test_env)
    assert sorted(expected) == list(range(N_ENVS))

    report = run([sys.executable, "-m", "domainbed.scripts.collect_results",
                  "--input_dir", str(out)], cwd=tmp_path, timeout=600).stdout
    assert f"Total records: {2 * N_ENVS}" in report
    section = report.split("Dataset: RotatedDigits, model selection method: "
                           "training-domain validation set")[1].split("--------")[0]
    [row] = [line.split() for line in section.splitlines() if line.startswith("LSQ ")]
    # "LSQ  7.9 +/- 0.0  12.9 +/- 0.0 ... avg": one trial, so every +/- is 0.0
    cells = [float(row[i]) for i in range(1, 3 * N_ENVS, 3)]
    assert cells == [round(100 * expected[e], 1) for e in range(N_ENVS)]
    assert float(row[-1]) == pytest.approx(sum(cells) / N_ENVS, abs=0.051)
    averages = report.split("Averages, model selection method: training-domain validation set")[1]
    assert re.search(r"^LSQ\s+\d+\.\d \+/- 0\.0\s+\d+\.\d", averages, re.MULTILINE)

    # The model.pkl that train.py wrote is weights-only loadable and restores the model.
    model_pkl = jobs[0] / "model.pkl"
    saved = torch.load(model_pkl, map_location="cpu", weights_only=True)
    restored = db_algorithms.LSQ((3, 32, 32), 10, N_ENVS - 1,
                                 tiny_hparams("LSQ", init="domainbed", init_path=str(model_pkl)))
    state = restored.state_dict()
    assert set(state) == set(saved["model_dict"])
    for k, v in saved["model_dict"].items():
        assert torch.equal(state[k], v), k
    assert all(bool(v) for k, v in state.items() if k.endswith("initialized"))
    assert Path(saved["args"]["output_dir"]) == jobs[0]
