"""``scripts/gpu_check.sh`` in its CPU mode (tiny sizes, a few steps), every field of its JSON;
the synthetic PACS folder it trains on, read by DomainBed's own PACS loader."""

import datetime
import json
import subprocess
from pathlib import Path

import pytest
import torch
from support.helpers import PYTHON, run

from domainbed_gaqat import bench
from domainbed_gaqat.plugin.algorithms import ALGORITHMS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
BENCHES = {"fp32": (False, False, False), "bf16_channels_last": (True, True, False),
           "fp32_compiled": (False, False, True),
           "bf16_channels_last_compiled": (True, True, True)}  # bf16, channels_last, compile


def test_pacs_folder_is_read_by_domainbed(tmp_path):
    """DomainBed's PACS: four environments in its order, seven classes, every image; a second
    write into the same root is refused."""
    import sys

    from domainbed import datasets

    sys.path.insert(0, str(ROOT / "scripts"))
    import pacs_folder

    pacs_folder.write(tmp_path, per_class=2, size=16)
    pacs = datasets.PACS(str(tmp_path), [0], {"data_augmentation": True})
    assert [len(env) for env in pacs] == [14] * 4 and pacs.num_classes == 7
    assert pacs.input_shape == (3, 224, 224) and tuple(pacs[1][0][0].shape) == (3, 224, 224)
    assert [env.classes for env in pacs] == [sorted(pacs_folder.CLASSES)] * 4
    with pytest.raises(FileExistsError):
        pacs_folder.write(tmp_path)


def test_existing_output_and_bad_usage_are_refused(tmp_path):
    """Refused before any work (nothing installed, nothing written)."""
    out = tmp_path / "check.json"
    out.write_text("{}")
    proc = run(["bash", str(SCRIPT), "--cpu", str(out)], check=False)
    assert proc.returncode == 2 and "exists" in proc.stderr and out.read_text() == "{}"
    for argv in (["--cpu"], ["--cpu", "--python"], ["--cpu", "a.json", "b.json"],
                 ["--gpu", "a.json"]):
        proc = run(["bash", str(SCRIPT), *argv], check=False, cwd=tmp_path)
        assert proc.returncode == 2 and proc.stderr.startswith("usage: "), argv
    assert [p.name for p in tmp_path.iterdir()] == ["check.json"]


@pytest.mark.slow
def test_cpu_mode_writes_every_field(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run(["bash", str(SCRIPT), "--cpu", "--python", PYTHON, str(out)],
                          capture_output=True, text=True, timeout=2400,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert proc.returncode == (0 if data["ok"] else 1)
    assert set(data) == {"schema", "mode", "command", "started", "budget_s", "machine", "bench",
                         "sync_check", "train", "tests", "targets", "wall_s", "ok"}
    assert (data["schema"], data["mode"], data["ok"]) == (1, "cpu", True)
    assert data["command"] == f"scripts/gpu_check.sh --cpu --python {PYTHON} {out}"
    assert datetime.datetime.fromisoformat(data["started"]).tzinfo is not None
    assert 0 < data["wall_s"] and data["budget_s"] == 1500
    assert data["machine"] == {
        "gpu": None, "gpu_count": 0, "driver": None, "torch": torch.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "python": data["machine"]["python"], "platform": data["machine"]["platform"],
        "cpu_count": data["machine"]["cpu_count"]}

    assert set(data["bench"]) == set(BENCHES)
    variants = {*bench.STEPS, *bench.PREDICTS, *bench.QUANTIZERS}
    for name, (bf16, channels_last, compiled) in BENCHES.items():
        run_ = data["bench"][name]
        assert run_["returncode"] == 0 and run_["wall_s"] > 0
        assert run_["command"][:3] == ["-m", "domainbed_gaqat", "bench"]
        config = run_["config"]
        assert (config["bf16"], config["channels_last"], config["compile"]) == (
            bf16, channels_last, compiled)
        assert (config["device"], config["quick"]) == ("cpu", True)
        assert set(run_["variants"]) == variants
        for variant, row in run_["variants"].items():
            assert row["ms_median"] > 0
            assert (row["images_per_s"] is None) == (variant in bench.QUANTIZERS)
            if compiled or variant in bench.QUANTIZERS:
                assert row["peak_memory_mib"] is None
        assert set(run_["ratios"]) == set(bench.RATIOS)
        for ratio, row in run_["ratios"].items():
            goal = bench.TARGETS["cpu"].get(ratio, (None, None, None))
            assert (row["target_time"], row["target_memory"]) == goal[:2]
            assert row["time_q1"] <= row["time_median"] <= row["time_q3"]
            assert row["met"] is (None if goal[0] is None else row["met"])
            if goal[0] is not None and (compiled or goal[1] is None):
                assert row["met"] == (row["time_median"] <= goal[0])
    expected_targets = {(name, ratio, kind) for name, (_, _, compiled) in BENCHES.items()
                        for ratio, goal in bench.TARGETS["cpu"].items()
                        for kind, target in (("time", goal[0]), ("memory", goal[1]))
                        if target is not None and not (compiled and kind == "memory")}
    assert {(t["run"], t["ratio"], t["kind"]) for t in data["targets"]} == expected_targets
    for t in data["targets"]:
        measured = data["bench"][t["run"]]["ratios"][t["ratio"]][
            "time_median" if t["kind"] == "time" else "memory"]
        assert t["measured"] == measured and t["met"] == (measured <= t["target"])

    assert set(data["sync_check"]) == {"fp32", "bf16"}
    for check in data["sync_check"].values():
        assert check["ok"] and check["device"] == "cpu" and check["hparams"] == \
            bench.SYNC_HPARAMS
        assert check["results"] == {name: dict.fromkeys(bench.sync_phases(name).values(), "ok")
                                    for name in ALGORITHMS}

    train = data["train"]
    assert train["ok"] and (train["steps"], train["checkpoint_freq"]) == (6, 2)
    assert train["images"] == {"per_class": 2, "size": 32, "domains": 4, "classes": 7}
    assert train["command"][:3] == ["-m", "domainbed_gaqat", "train"]
    assert train["reference"]["returncode"] == 0
    stopped = train["stopped"]
    assert stopped["signalled"] and stopped["returncode"] == 143 and stopped["state_saved"]
    assert stopped["records_at_stop"] == 2 and stopped["resumed_returncode"] == 0
    assert stopped["finished"]
    records = train["records"]
    assert records["steps"] == records["expected_steps"] == [0, 2, 4, 5]
    assert records["each_once_in_order"] and records["all_finite"]
    assert records["equal_to_reference"] and set(records["max_abs_diff"].values()) == {0}
    accuracies = {f"env{e}_{s}_acc" for e in range(4) for s in ("in", "out")}
    assert {"loss", "disorder_mean", "frozen_frac", "epoch", "step", "hparams",
            *accuracies} <= set(records["compared_keys"])
    assert not {"step_time", "mem_gb", "args"} & set(records["compared_keys"])

    tests = data["tests"]
    assert tests["returncode"] == 0 and tests["command"][:4] == ["-m", "pytest", "-q", "-m"]
    assert (tests["passed"], tests["failed"], tests["errors"]) == (0, 0, 0)
    assert tests["skipped"] >= 4  # the cuda tests, skipped without a GPU
