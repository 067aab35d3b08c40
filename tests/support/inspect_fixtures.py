"""Tiny trained runs shared by the inspection tests (traces, probe, surface, export).

Each is made once per test session (cached here) on RotatedDigits with a ResNet-18 at 32x32,
batch 2 per domain, a few steps:

- ``gaqat_w4``: DomainBed's own ``train.py`` (a subprocess), GAQAT W4A4, test env 5, one step
  (so one evaluation); its ``results.jsonl`` holds train.py's accuracies of the saved model.
- ``lsq_w3``: ``gaqat traces`` (in process) with ``--save_model``,
  LSQ W3A3, test env 0, recording traces every 2 steps with K=2.
"""

import json
import os

from support.helpers import PYTHON, run

_RUNS: dict[str, str] = {}
TINY = {"batch_size": 2}


def gaqat_w4(tmp_path_factory) -> str:
    """Directory of a train.py run (model.pkl, results.jsonl)."""
    if "gaqat_w4" not in _RUNS:
        out = tmp_path_factory.mktemp("gaqat_w4")
        run([PYTHON, "-m", "domainbed.scripts.train", "--dataset", "RotatedDigits",
             "--algorithm", "GAQAT", "--test_envs", "5", "--steps", "1",
             "--checkpoint_freq", "100", "--hparams", json.dumps(TINY),
             "--output_dir", str(out)], timeout=900)
        _RUNS["gaqat_w4"] = str(out)
    return _RUNS["gaqat_w4"]


def lsq_w3(tmp_path_factory) -> str:
    """Directory of a traces run with --save_model (grads.*, disorder.*, figures, model.pkl)."""
    if "lsq_w3" not in _RUNS:
        from domainbed_gaqat import cli

        out = tmp_path_factory.mktemp("lsq_w3")
        status = cli.main(["traces", "--algorithm", "LSQ", "--dataset", "RotatedDigits",
                           "--test_envs", "0", "--steps", "5", "--every", "2", "--K", "2",
                           "--quiet", "--save_model", "--hparams",
                           json.dumps({**TINY, "w_bits": 3, "a_bits": 3}),
                           "--output_dir", str(out)])
        assert status == 0
        _RUNS["lsq_w3"] = str(out)
    return _RUNS["lsq_w3"]


def last_results(run_dir: str) -> dict:
    """The last record of a train.py run's results.jsonl."""
    with open(os.path.join(run_dir, "results.jsonl")) as f:
        return [json.loads(line) for line in f][-1]


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: str) -> None:
    assert os.path.getsize(path) > 1000, path
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC, path
