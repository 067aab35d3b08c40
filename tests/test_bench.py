"""The step benchmark in its reduced mode: it runs and writes valid JSON with every
ratio beside its targets. No timing is asserted. The sync check's phases run on the CPU; its
detection on the meta device (here) and CUDA (tests/test_device.py)."""

import json
import math
import re

import pytest
import torch
from support.helpers import PYTHON, gaqat, run

from domainbed_gaqat import bench, cli
from domainbed_gaqat.experiments import outputs
from domainbed_gaqat.plugin.algorithms import ALGORITHMS
from domainbed_gaqat.quant.modules import quantizers


@pytest.mark.slow
def test_quick_benchmark_writes_every_ratio(tmp_path):
    proc = run([PYTHON, "-m", "domainbed_gaqat.bench", "--quick", "--threads", "1",
                "--output_dir", str(tmp_path)], timeout=600)
    [out] = tmp_path.iterdir()  # <device>-<arch>-<time>.json, no temporary left
    assert re.fullmatch(r"cpu-resnet18-\d{8}-\d{6}\.json", out.name), out.name
    data = json.loads(out.read_text())
    assert set(data["variants"]) == {"ERM_FP", "LSQ", "SAGM_LSQ", "GAQAT", "predict_FP",
                                     "predict_LSQ", "quantizer", "quantizer_fused"}
    assert set(data["ratios"]) == {"LSQ/FP", "SAGM_LSQ/LSQ", "GAQAT/SAGM_LSQ", "GAQAT/FP",
                                   "predict_LSQ/predict_FP", "quantizer/fused"}
    assert data["ratios"]["LSQ/FP"]["target_time"] == 1.3 and data["sync_check"] is None
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
    times = {name: [1.0, 2.0, 4.0] for name in {n for r in bench.RATIOS.values() for n in r}}
    times["LSQ"] = [1.2, 2.0, 6.0]
    goals = {"LSQ/FP": (1.25, 1.4, None), "SAGM_LSQ/LSQ": (0.8, None, None)}
    ratios = bench.ratios(times, {"LSQ": 3.0, "ERM_FP": 2.0}, goals)
    assert ratios["LSQ/FP"]["time"]["median"] == pytest.approx(1.2)
    assert ratios["LSQ/FP"]["time"]["max"] == pytest.approx(1.5)
    assert ratios["LSQ/FP"]["memory"] == pytest.approx(1.5)
    assert ratios["LSQ/FP"]["met"] is False  # time 1.2 <= 1.25, memory 1.5 > 1.4
    assert ratios["SAGM_LSQ/LSQ"]["memory"] is None
    assert ratios["SAGM_LSQ/LSQ"]["met"] is False  # median 1 / 1.2 > 0.8
    assert ratios["GAQAT/SAGM_LSQ"]["met"] is None  # no target
    assert bench.ratios(times, {"LSQ": 2.0, "ERM_FP": 2.0}, goals)["LSQ/FP"]["met"] is True
    assert bench.summary([3.0]) == {"median": 3.0, "q1": 3.0, "q3": 3.0, "min": 3.0,
                                    "max": 3.0, "n": 1}


def test_targets_follow_the_setting():
    """Issue 17's GPU targets on CUDA (the img/s one in bf16 only), the first ones on CPU."""
    args = bench.resolve(cli.command_parser("bench")[0].parse_args(["--quick"]))
    assert bench.targets(args)["LSQ/FP"] == (1.3, 1.5, None)
    args.device = "cuda:0"
    assert bench.targets(args)["LSQ/FP"] == (1.25, 1.3, None) and "GAQAT/FP" not in \
        bench.targets(args)
    args.bf16 = True
    assert bench.targets(args)["GAQAT/FP"][0] == pytest.approx(1 / 0.45)
    assert bench.targets(args)["GAQAT/SAGM_LSQ"] == (1.02, None, None)


def test_sync_check_runs_the_algorithms_through_their_phases():
    """On the CPU the check's steps run (nothing to detect): step 0 (range initialisation),
    a plain step, a GAQAT K boundary (the third update with K = 2), QT-DoG's quant_start; each
    does what it stands for (GAQAT's K boundary: tests/test_freezing.py). One algorithm of
    each set of phases here (MSE initialisation of every weight costs seconds on the CPU);
    scripts/gpu_check.sh's CPU mode runs them all."""
    assert {name: bench.sync_phases(name) for name in ALGORITHMS} == {
        name: {0: "step0", 1: "steady", **({2: "K_boundary"} if "gaqat" in spec.families else
                                            {2: "quant_start"} if "qtdog" in spec.families
                                            else {})}
        for name, spec in ALGORITHMS.items()}
    assert bench.sync_phases("GAQAT_NoUnfreeze")[2] == "K_boundary"
    assert bench.sync_phases("QTDoG")[2] == "quant_start" and 2 not in bench.sync_phases("SAQ")
    args = bench.resolve(cli.command_parser("bench")[0].parse_args(["--quick"]))
    names = ["ERM_FP", "GAQAT", "QTDoG"]
    results = bench.sync_check(args, torch.device("cpu"), names)
    assert results == {name: dict.fromkeys(bench.sync_phases(name).values(), "ok")
                       for name in names}
    qtdog = bench.build("QTDoG", args, torch.device("cpu"), **bench.SYNC_HPARAMS)
    batch = bench.make_batch(args, torch.device("cpu"))
    for _ in range(3):
        assert not any(q.initialized for _, q in quantizers(qtdog))
        stats = qtdog.update_tensors(batch)
    assert all(q.initialized for _, q in quantizers(qtdog))  # at quant_start
    assert all(v.dim() == 0 for v in stats.values())


def test_sync_check_reports_a_host_read_on_meta(monkeypatch):
    """A step that reads a device value on the host (an injected ``.item()``: a stub of the
    mechanism) fails its phase on the meta device, and the later phases are not run."""
    cls = ALGORITHMS["ERM_FP"].cls
    loss = cls.loss
    monkeypatch.setattr(cls, "loss", lambda self, x, y: loss(self, x, y) * loss(self, x, y).item())
    args = bench.resolve(cli.command_parser("bench")[0].parse_args(["--quick"]))
    results = bench.sync_check(args, torch.device("meta"), ["ERM_FP"])
    assert results["ERM_FP"]["step0"].startswith("RuntimeError: Tensor.item() cannot be called")
    assert results["ERM_FP"]["steady"] == "not run: step0 failed"
    result = {"sync_check": {"device": "meta", "method": "", "results": results}}
    assert bench.sync_check_failed(result)
    result["sync_check"]["results"] = {"ERM_FP": {"step0": "ok", "steady": "ok"}}
    assert not bench.sync_check_failed(result)
