"""The step benchmark in its reduced mode: it runs and writes valid JSON with every
ratio. No timing is asserted; the sync check needs CUDA."""

import json
import math
import re

import pytest
import torch
from support.helpers import PYTHON, gaqat, run

from domainbed_gaqat import bench, cli
from domainbed_gaqat.experiments import outputs


@pytest.mark.slow
def test_quick_benchmark_writes_every_ratio(tmp_path):
    proc = run([PYTHON, "-m", "domainbed_gaqat.bench", "--quick", "--threads", "1",
                "--output_dir", str(tmp_path)], timeout=600)
    [out] = tmp_path.iterdir()  # <device>-<arch>-<time>.json, no temporary left
    assert re.fullmatch(r"cpu-resnet18-\d{8}-\d{6}\.json", out.name), out.name
    data = json.loads(out.read_text())
    assert set(data["variants"]) == {"ERM_FP", "LSQ", "SAGM_LSQ", "GAQAT", "predict_FP",
                                     "predict_LSQ", "quantizer", "quantizer_fused"}
    assert set(data["ratios"]) == {"LSQ/FP", "SAGM_LSQ/LSQ", "GAQAT/SAGM_LSQ",
                                   "predict_LSQ/predict_FP", "quantizer/fused"}
    for name, ratio in data["ratios"].items():
        assert name in proc.stdout
        assert math.isfinite(ratio["time"]["median"]) and ratio["time"]["median"] > 0
        assert ratio["time"]["min"] <= ratio["time"]["median"] <= ratio["time"]["max"]
    memory = [row["peak_memory_mib"] for name, row in data["variants"].items()
              if name not in bench.QUANTIZERS]
    if memory[0] is not None:  # Linux with glibc: every model variant is measured
        assert all(m > 0 for m in memory)
        assert data["ratios"]["LSQ/FP"]["memory"] > 0
    assert data["config"]["quick"] and data["config"]["repeats"] == 1


def test_write_json_is_atomic_and_keeps_existing_files(tmp_path):
    path = tmp_path / "sub" / "r.json"
    outputs.write_text(str(path), json.dumps({"a": 1}), overwrite=False)
    with pytest.raises(FileExistsError):
        outputs.write_text(str(path), json.dumps({"a": 2}), overwrite=False)
    assert json.loads(path.read_text()) == {"a": 1}
    outputs.write_text(str(path), json.dumps({"a": 3}), overwrite=True)
    assert json.loads(path.read_text()) == {"a": 3}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]


def test_existing_output_is_refused_before_running(tmp_path, capsys):
    out = tmp_path / "bench.json"
    out.write_text("{}")
    assert gaqat("bench", "--quick", "--out", str(out)) == 2  # the former spelling: the file
    err = capsys.readouterr().err
    assert "--out is deprecated: use --output_dir" in err and f"{out} exists" in err
    assert out.read_text() == "{}"


def test_former_option_spellings_still_work_with_a_message(capsys):
    parser = cli.command_parser("bench")[0]
    flags = ("channels_last", "no_memory", "sync_check")
    old = parser.parse_args(["--channels-last", "--no-memory", "--sync-check"])
    err = capsys.readouterr().err
    for flag in flags:
        assert f"--{flag.replace('_', '-')} is deprecated: use --{flag}" in err
    new = parser.parse_args([f"--{flag}" for flag in flags])
    assert capsys.readouterr().err == ""
    assert all(getattr(old, f) and getattr(new, f) for f in flags)
    assert not any(getattr(parser.parse_args([]), f) for f in flags)


def test_summary_and_ratios_are_per_repeat():
    times = {name: [1.0, 2.0, 4.0] for name in {n for r in bench.RATIOS.values() for n in r[:2]}}
    times["LSQ"] = [1.2, 2.0, 6.0]
    ratios = bench.ratios(times, {"LSQ": 3.0, "ERM_FP": 2.0})
    assert ratios["LSQ/FP"]["time"]["median"] == pytest.approx(1.2)
    assert ratios["LSQ/FP"]["time"]["max"] == pytest.approx(1.5)
    assert ratios["LSQ/FP"]["memory"] == pytest.approx(1.5)
    assert ratios["SAGM_LSQ/LSQ"]["memory"] is None
    assert bench.summary([3.0]) == {"median": 3.0, "q1": 3.0, "q3": 3.0, "min": 3.0,
                                    "max": 3.0, "n": 1}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gaqat_step_does_not_synchronise_with_the_host():
    args = bench.resolve(cli.command_parser("bench")[0].parse_args(["--quick", "--device",
                                                                    "cuda"]))
    device = torch.device("cuda")
    alg = bench.build("GAQAT", args, device)
    batch = bench.make_batch(args, device)
    for _ in range(2):  # warm-up: range calibration synchronises, once
        alg.update(batch)
    bench.check_sync_free(alg, batch)  # K = 350: no window closes here
