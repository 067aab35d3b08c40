"""``python -m domainbed_gaqat.train``: DomainBed's train.py records, and resumption after
SIGTERM and SIGKILL that ends with the records of an uninterrupted run."""

import json
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from support.helpers import PYTHON, gaqat, run, subprocess_env

from domainbed_gaqat.train import rng_state, set_rng_state

# 24 steps, batch 16: a pass over a RotatedDigits training split is 15 batches, so the loaders
# start a new pass (drawing from torch's global random state) at step 15
ARGS = ["--dataset", "RotatedDigits", "--test_envs", "0", "--steps", "24",
        "--checkpoint_freq", "8", "--seed", "3"]
STEPS = [0, 8, 16, 23]
HPARAMS = {"LSQ": {"batch_size": 16}, "GAQAT": {"batch_size": 16, "gaqat_K": 4}}
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def command(module: str, algorithm: str, out: Path, *extra: str) -> list[str]:
    return [PYTHON, "-m", module, *ARGS, "--algorithm", algorithm, "--hparams",
            json.dumps(HPARAMS[algorithm]), "--output_dir", str(out), *extra]


def records(out: Path) -> list[dict]:
    """results.jsonl without the timing and the output folder."""
    found = []
    for line in (out / "results.jsonl").read_text().splitlines():
        record = json.loads(line)
        record.pop("step_time")
        record["args"].pop("output_dir")
        found.append(record)
    return found


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """DomainBed's train.py and this entry, for LSQ and GAQAT, two runs at a time."""
    root = tmp_path_factory.mktemp("entry")
    jobs = [(module, algorithm) for algorithm in HPARAMS
            for module in ("domainbed.scripts.train", "domainbed_gaqat.train")]

    def launch(job: tuple[str, str]) -> Path:
        module, algorithm = job
        out = root / f"{module.split('.')[0]}_{algorithm}"
        run(command(module, algorithm, out), timeout=900, **ENV)
        return out

    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(launch, jobs))
    found: dict[str, dict[str, Path]] = {}
    for (module, algorithm), out in zip(jobs, outs):
        found.setdefault(algorithm, {})[module] = out
    return found


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", list(HPARAMS))
def test_records_equal_domainbeds_train(uninterrupted, algorithm):
    ours, theirs = (uninterrupted[algorithm][m] for m in ("domainbed_gaqat.train",
                                                          "domainbed.scripts.train"))
    assert [r["step"] for r in records(ours)] == STEPS
    assert records(ours) == records(theirs)
    for name in ("done", "model.pkl", "out.txt", "err.txt"):
        assert (ours / name).exists()
    assert not (ours / "resume.pt").exists()
    mine = torch.load(ours / "model.pkl", weights_only=True)
    reference = torch.load(theirs / "model.pkl", weights_only=True)
    assert mine["args"] | {"output_dir": None} == reference["args"] | {"output_dir": None}
    for key, value in reference["model_dict"].items():
        assert torch.equal(mine["model_dict"][key], value), key


def _interrupt(out: Path, algorithm: str, how: signal.Signals, after_records: int) -> int:
    """Start the entry (state saved every 4 steps), send ``how`` once ``after_records``
    records are written; returns its exit status."""
    proc = subprocess.Popen(command("domainbed_gaqat.train", algorithm, out, "--save_every", "4"),
                            env=subprocess_env(**ENV), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    results = out / "results.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if results.exists() and results.read_text().count("\n") >= after_records:
            break
        time.sleep(0.05)
    proc.send_signal(how)
    return proc.wait(timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("how, after_records, status", [
    (signal.SIGTERM, 1, 128 + signal.SIGTERM),  # saves after the current step, then exits
    (signal.SIGKILL, 3, -signal.SIGKILL),  # after step 16: resumes from the last saved state
])
def test_interrupted_then_resumed_equals_uninterrupted(uninterrupted, tmp_path, capsys, how,
                                                       after_records, status):
    out = tmp_path / "run"
    assert _interrupt(out, "GAQAT", how, after_records) == status
    assert (out / "resume.pt").exists() and not (out / "done").exists()
    saved = torch.load(out / "resume.pt", weights_only=True)
    if how == signal.SIGKILL:
        assert saved["step"] in (16, 20)  # a periodic save after step 15: the new pass drawn
        assert {s for s, _, _ in saved["draws"]} == {0, 15}
    else:  # another command is refused, in one line
        argv = ["train", *ARGS, "--algorithm", "GAQAT", "--output_dir", str(out)]
        assert gaqat(*argv, "--hparams", json.dumps({"batch_size": 8})) == 2
        [line] = capsys.readouterr().err.strip().splitlines()
        assert "was written by another command" in line and "--hparams" in line
    run(command("domainbed_gaqat.train", "GAQAT", out, "--save_every", "4"), timeout=900, **ENV)
    resumed = records(out)
    assert [r["step"] for r in resumed] == STEPS  # each record once
    assert resumed == records(uninterrupted["GAQAT"]["domainbed_gaqat.train"])
    assert (out / "done").exists() and not (out / "resume.pt").exists()
    text = (out / "out.txt").read_text()
    assert f"Resuming from step {saved['step']}" in text
    reference = torch.load(uninterrupted["GAQAT"]["domainbed_gaqat.train"] / "model.pkl",
                           weights_only=True)["model_dict"]
    final = torch.load(out / "model.pkl", weights_only=True)["model_dict"]
    for key, value in reference.items():
        assert torch.equal(final[key], value), key


@pytest.mark.slow
def test_a_finished_run_is_not_rerun(uninterrupted, capsys):
    done = uninterrupted["LSQ"]["domainbed_gaqat.train"]
    before = (done / "results.jsonl").read_text()
    assert gaqat("train", *ARGS, "--algorithm", "LSQ", "--hparams",
                 json.dumps(HPARAMS["LSQ"]), "--output_dir", str(done)) == 0
    assert "holds a finished run" in capsys.readouterr().out
    assert (done / "results.jsonl").read_text() == before


@pytest.mark.slow
def test_eval_from_skips_earlier_evaluations(tmp_path):
    out = tmp_path / "run"
    run(command("domainbed_gaqat.train", "LSQ", out, "--eval_from", "6", "--steps", "12",
                "--checkpoint_freq", "4"), timeout=900, **ENV)
    found = records(out)
    assert [r["step"] for r in found] == [8, 11]
    assert all(r["args"]["eval_from"] == 6 for r in found)


def test_random_states_round_trip_weights_only(tmp_path):
    import random

    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.normal()  # a cached Gaussian in NumPy's state
    state = rng_state()
    torch.save(state, tmp_path / "s.pt")
    expected = (torch.rand(3), np.random.rand(3), np.random.normal(), random.random())
    torch.manual_seed(9)
    np.random.seed(9)
    random.seed(9)
    set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True))
    got = (torch.rand(3), np.random.rand(3), np.random.normal(), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2:] == expected[2:]
    assert os.path.getsize(tmp_path / "s.pt") > 0
