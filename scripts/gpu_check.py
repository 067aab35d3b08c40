"""The GPU check's driver (run by ``scripts/gpu_check.sh``, which sets up the environment).

    python scripts/gpu_check.py OUTPUT.json [--mode gpu|cpu] [--budget_s S] [--command TEXT]

On one CUDA GPU, in under 8 minutes, it runs and writes into one JSON (atomically, with the GPU
model, the torch / CUDA / cuDNN versions and the command):

1. ``bench``: ``gaqat bench`` at the paper's shapes (ResNet-50, 224 px, 3 x 32) for ERM_FP,
   LSQ, SAGM_LSQ and GAQAT, in fp32 and in bf16 autocast + channels_last, eager kernels (with
   peak memory), then compiled kernels (time only); each ratio beside its target (issue 17);
2. ``sync_check``: every plugin algorithm's ``update_tensors`` at step 0, a plain step, a GAQAT
   K boundary and QT-DoG's ``quant_start`` under CUDA's sync debug mode, fp32 and bf16;
3. ``train``: GAQAT for 200 steps at 224 px through ``gaqat train`` on a synthetic PACS folder
   (``scripts/pacs_folder.py``): one run uninterrupted, beside it one stopped by SIGTERM once
   (``gaqat train`` saves its state and exits 143) and continued by the same command; the
   records are checked: each checkpoint once, in order, all finite, and equal to the
   uninterrupted run's (timing keys aside; see ``EXACT``);
4. ``tests``: the test suite's tests marked ``cuda``.

Each part records its own result (an error does not stop the others); a part that would not
fit in ``--budget_s`` is skipped and says so. ``--mode cpu`` runs the same parts at tiny sizes
on the CPU (the test suite runs it): the sync check then only runs the phases (nothing to
detect), and the cuda tests are skipped. Exit status 0 when every part ran and passed.
"""

import argparse
import datetime
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = 1
# What a resumed run's records must equal in the uninterrupted run's: every key but the
# wall-clock ones (TIMING) and "args" (the output folders differ). Exact, on the CPU and on CUDA
# alike: gaqat train sets cuDNN's deterministic mode, the step's other kernels (ResNet-50's
# 7 -> 1 average pool, max pool, the reductions) are deterministic on one GPU, and the loaders'
# sampling and augmentation are seeded per batch (plugin/loaders.py), evaluation's included.
TIMING = ("step_time", "mem_gb")
SETTINGS = {
    "gpu": {
        "device": "cuda",
        "bench": ["--device", "cuda", "--repeats", "6", "--warmup", "2"],
        "sync": ["--device", "cuda", "--arch", "resnet50", "--resolution", "64", "--batch", "4"],
        "steps": 200, "checkpoint_freq": 50, "stop_after_records": 3,
        "images": {"per_class": 12, "size": 256},
        "hparams": {"init": "none"},
        "budget_s": 450,
    },
    "cpu": {
        "device": "cpu",
        "bench": ["--device", "cpu", "--quick", "--threads", "1"],
        "sync": ["--device", "cpu", "--quick"],
        "steps": 6, "checkpoint_freq": 2, "stop_after_records": 2,
        "images": {"per_class": 2, "size": 32},
        "hparams": {"init": "none", "resnet18": True, "batch_size": 2},
        "budget_s": 1500,
    },
}
# the bench runs, by name: eager kernels with peak memory first, compiled kernels (time only)
# last, since their first calls compile
EAGER = {"fp32": [], "bf16_channels_last": ["--bf16", "--channels_last"]}
COMPILED = {f"{name}_compiled": [*options, "--compile", "--no_memory"]
            for name, options in EAGER.items()}
# rough seconds each part needs on the GPU (skipped if less remains)
NEEDS_S = {"bench": 45, "bench_compiled": 100, "sync_check": 60, "train": 150, "tests": 40}


class Budget:
    def __init__(self, seconds: float) -> None:
        self.start, self.seconds = time.monotonic(), seconds

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)

    def allows(self, part: str, mode: str) -> bool:
        return mode == "cpu" or self.left() >= NEEDS_S[part]


def machine() -> dict:
    import torch

    info = {"gpu": None, "gpu_count": torch.cuda.device_count(), "driver": None,
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "python": platform.python_version(),
            "platform": platform.platform(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                                  "--format=csv,noheader"], capture_output=True, text=True,
                                 timeout=30)
            info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
    return info


def gaqat(*argv: str) -> list[str]:
    return [sys.executable, "-m", "domainbed_gaqat", *argv]


def run_logged(cmd: list[str], log: Path, timeout: float) -> tuple[int, float]:
    """Run ``cmd`` with its output in ``log``; ``(exit status, seconds)``."""
    start = time.monotonic()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                                cwd=ROOT).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.monotonic() - start


def tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


# --- 1. the step benchmark ------------------------------------------------------------------


def bench(name: str, options: list[str], settings: dict, work: Path, timeout: float) -> dict:
    folder = work / f"bench_{name}"
    cmd = gaqat("bench", *settings["bench"], *options, "--output_dir", str(folder))
    rc, seconds = run_logged(cmd, work / f"bench_{name}.log", timeout)
    result = {"command": cmd[1:], "returncode": rc, "wall_s": round(seconds, 1)}
    written = sorted(folder.glob("*.json"))
    if len(written) != 1:
        return {**result, "error": tail(work / f"bench_{name}.log")}
    data = json.loads(written[0].read_text())
    result["config"] = data["config"]
    result["variants"] = {v: {"ms_median": 1e3 * row["time_s"]["median"],
                              "images_per_s": row["images_per_s"],
                              "peak_memory_mib": row["peak_memory_mib"]}
                          for v, row in data["variants"].items()}
    result["ratios"] = {r: {"time_median": row["time"]["median"], "time_q1": row["time"]["q1"],
                            "time_q3": row["time"]["q3"], "memory": row["memory"],
                            "target_time": row["target_time"],
                            "target_memory": row["target_memory"], "met": row["met"]}
                        for r, row in data["ratios"].items()}
    return result


def targets(benches: dict) -> list[dict]:
    """Every target of the runs beside its measured figure (issue 17's on CUDA)."""
    rows = []
    for run, result in benches.items():
        for ratio, row in result.get("ratios", {}).items():
            for kind, key in (("time", "time_median"), ("memory", "memory")):
                target = row[f"target_{kind}"]
                if target is not None and row[key] is not None:
                    rows.append({"run": run, "ratio": ratio, "kind": kind,
                                 "target": round(target, 4), "measured": row[key],
                                 "met": row[key] <= target})
    return rows


# --- 2. the sync check ----------------------------------------------------------------------


def sync_check(settings: dict) -> dict:
    import torch

    from domainbed_gaqat import bench as bench_module
    from domainbed_gaqat import cli

    out = {}
    for name, extra in (("fp32", []), ("bf16", ["--bf16", "--channels_last"])):
        args = bench_module.resolve(cli.command_parser("bench")[0].parse_args(
            [*settings["sync"], *extra]))
        device = torch.device(args.device)
        start = time.monotonic()
        results = bench_module.sync_check(args, device)
        out[name] = {"device": device.type,
                     "method": ("CUDA sync debug mode 'error'" if device.type == "cuda" else
                                "CPU: the phases run, nothing is detected"),
                     "hparams": bench_module.SYNC_HPARAMS, "results": results,
                     "ok": all(v == "ok" for r in results.values() for v in r.values()),
                     "wall_s": round(time.monotonic() - start, 1)}
    return out


# --- 3. training, stopped and resumed -------------------------------------------------------


def records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_command(settings: dict, data: Path, output: Path) -> list[str]:
    """The ``gaqat train`` command: fp32, loader workers at train's default (within the CPUs
    where ``--workers`` exists); on the CPU without loader workers where it does."""
    from domainbed_gaqat import cli

    options = cli.command_parser("train")[0].format_help()
    workers = ["--workers", "0"] if settings["device"] == "cpu" and "--workers" in options else []
    return gaqat("train", "--dataset", "PACS", "--data_dir", str(data), "--test_envs", "0",
                 "--algorithm", "GAQAT", "--hparams", json.dumps(settings["hparams"]),
                 "--steps", str(settings["steps"]),
                 "--checkpoint_freq", str(settings["checkpoint_freq"]),
                 "--output_dir", str(output), *workers)


def stopped_once(cmd: list[str], output: Path, after: int, log: Path,
                 timeout: float) -> dict:
    """Start ``cmd``, send SIGTERM once ``after`` records are written; then run it again."""
    start = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            while proc.poll() is None and len(records(output / "results.jsonl")) < after:
                if time.monotonic() - start > timeout:
                    proc.kill()
                    break
                time.sleep(0.2)
            signalled = proc.poll() is None
            if signalled:
                proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=max(timeout - (time.monotonic() - start), 60))
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = 124
    stopped_s = time.monotonic() - start
    state_saved = (output / "resume.pt").exists()
    stopped_records = len(records(output / "results.jsonl"))
    rc2, resumed_s = run_logged(cmd, log.with_suffix(".resumed.log"), timeout)
    return {"signalled": signalled, "returncode": rc, "wall_s": round(stopped_s, 1),
            "records_at_stop": stopped_records, "state_saved": state_saved,
            "resumed_returncode": rc2, "resumed_wall_s": round(resumed_s, 1),
            "finished": (output / "done").exists()}


def check_records(got: list[dict], reference: list[dict], expected_steps: list[int]) -> dict:
    """Each checkpoint once and in order, every number finite, equal to the reference on every
    key but ``TIMING`` and ``args``."""
    steps = [r.get("step") for r in got]
    numbers = [v for r in got for v in r.values()
               if isinstance(v, (int, float)) and not isinstance(v, bool)]
    compared = sorted({k for r in got for k in r} - set(TIMING) - {"args"})
    diffs = {}
    for k in compared:
        pairs = [(a.get(k), b.get(k)) for a, b in zip(got, reference)]
        if all(isinstance(a, (int, float)) and isinstance(b, (int, float)) for a, b in pairs):
            diffs[k] = max((abs(a - b) for a, b in pairs), default=0.0)
    equal = len(got) == len(reference) and all(
        {k: a.get(k) for k in compared} == {k: b.get(k) for k in compared}
        for a, b in zip(got, reference))
    return {"steps": steps, "expected_steps": expected_steps,
            "each_once_in_order": steps == expected_steps,
            "all_finite": bool(numbers) and all(math.isfinite(v) for v in numbers),
            "compared_keys": compared, "equal_to_reference": equal, "max_abs_diff": diffs}


def train(settings: dict, work: Path, timeout: float) -> dict:
    sys.path.insert(0, str(ROOT / "scripts"))
    import pacs_folder

    data = work / "data"
    pacs_folder.write(data, **settings["images"])
    steps, freq = settings["steps"], settings["checkpoint_freq"]
    expected = sorted(set(range(0, steps, freq)) | {steps - 1})
    reference_dir, resumed_dir = work / "train_reference", work / "train_resumed"
    result = {"command": train_command(settings, data, Path("OUTPUT"))[1:],
              "steps": steps, "checkpoint_freq": freq,
              "images": {**settings["images"], "domains": 4, "classes": 7}}
    start = time.monotonic()
    with open(work / "train_reference.log", "w") as log:
        # the uninterrupted run beside the stopped one (one GPU holds both): half the time
        reference = subprocess.Popen(train_command(settings, data, reference_dir), stdout=log,
                                     stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            result["stopped"] = stopped_once(train_command(settings, data, resumed_dir),
                                             resumed_dir, settings["stop_after_records"],
                                             work / "train_resumed.log", timeout)
            rc = reference.wait(timeout=max(timeout - (time.monotonic() - start), 60))
        except subprocess.TimeoutExpired:
            rc = 124
        finally:
            if reference.poll() is None:
                reference.kill()
    result["reference"] = {"returncode": rc, "wall_s": round(time.monotonic() - start, 1)}
    result["records"] = check_records(records(resumed_dir / "results.jsonl"),
                                      records(reference_dir / "results.jsonl"), expected)
    stopped = result["stopped"]
    result["ok"] = (rc == 0 and stopped["signalled"] and stopped["returncode"] == 143
                    and stopped["state_saved"] and stopped["resumed_returncode"] == 0
                    and stopped["finished"] and result["records"]["each_once_in_order"]
                    and result["records"]["all_finite"]
                    and result["records"]["equal_to_reference"])
    if not result["ok"]:
        result["log_tail"] = tail(work / "train_resumed.log") + "\n" + tail(
            work / "train_resumed.resumed.log")
    return result


# --- 4. the CUDA tests ----------------------------------------------------------------------


def tests(work: Path, timeout: float) -> dict:
    import xml.etree.ElementTree as ET

    report = work / "tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
           f"--junitxml={report}", "tests/"]
    rc, seconds = run_logged(cmd, work / "tests.log", timeout)
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    if report.exists():
        suite = ET.parse(report).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        total = int(suite.get("tests", 0))
        counts.update(failed=int(suite.get("failures", 0)), errors=int(suite.get("errors", 0)),
                      skipped=int(suite.get("skipped", 0)))
        counts["passed"] = total - counts["failed"] - counts["errors"] - counts["skipped"]
    result = {"command": cmd[1:-1] + ["tests/"], "returncode": rc, "wall_s": round(seconds, 1),
              **counts}
    if rc not in (0, 5) or counts["failed"] or counts["errors"]:
        result["log_tail"] = tail(work / "tests.log", 40)
    return result


# --- the check ------------------------------------------------------------------------------


def guarded(part, *args) -> dict:
    """A part's result, or its error."""
    try:
        return part(*args)
    except Exception as err:  # noqa: BLE001 (recorded in the JSON; the other parts go on)
        return {"error": f"{type(err).__name__}: {err}"}


def check(mode: str, budget_s: float, command: str) -> dict:
    settings = SETTINGS[mode]
    budget = Budget(budget_s)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    result = {"schema": SCHEMA, "mode": mode, "command": command, "started": started,
              "budget_s": budget_s, "machine": machine(), "bench": {}}

    def part(name: str, function, *args) -> dict:
        if not budget.allows(name, mode):
            return {"skipped": "time budget"}
        return guarded(function, *args)

    with tempfile.TemporaryDirectory(prefix="gaqat-gpu-check-") as tmp:
        work = Path(tmp)
        for name, options in EAGER.items():
            result["bench"][name] = part("bench", bench, name, options, settings, work,
                                         max(budget.left(), 60))
        result["sync_check"] = part("sync_check", sync_check, settings)
        result["train"] = part("train", train, settings, work, max(budget.left(), 60))
        result["tests"] = part("tests", tests, work, max(budget.left(), 60))
        for name, options in COMPILED.items():
            result["bench"][name] = part("bench_compiled", bench, name, options, settings,
                                         work, max(budget.left(), 60))
    result["targets"] = targets(result["bench"])
    result["wall_s"] = round(time.monotonic() - budget.start, 1)
    result["ok"] = passed(result)
    return result


def passed(result: dict) -> bool:
    """Every part ran without error; the sync checks, training and tests passed."""
    benches_ok = all(b.get("returncode") == 0 for b in result["bench"].values())
    sync_ok = "error" not in result["sync_check"] and "skipped" not in result["sync_check"] \
        and all(r["ok"] for r in result["sync_check"].values())
    tests_ok = result["tests"].get("returncode") in (0, 5) and not result["tests"].get("failed") \
        and not result["tests"].get("errors")
    return benches_ok and sync_ok and result["train"].get("ok") is True and tests_ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="the JSON to write (refused if it exists)")
    parser.add_argument("--mode", choices=list(SETTINGS), default="gpu")
    parser.add_argument("--budget_s", type=float, default=None,
                        help="seconds for all parts (default: 450 on the GPU, 1500 on the CPU)")
    parser.add_argument("--command", default=None, help="the command line to record")
    args = parser.parse_args(argv)
    if os.path.exists(args.output):
        parser.error(f"{args.output} exists: remove it or choose another path")
    if args.mode == "gpu":
        import torch

        if not torch.cuda.is_available():
            parser.error("--mode gpu: PyTorch sees no CUDA device (use --mode cpu)")
    sys.path.insert(0, str(ROOT))
    from domainbed_gaqat.experiments import outputs

    result = check(args.mode, args.budget_s or SETTINGS[args.mode]["budget_s"],
                   args.command or " ".join(sys.argv))
    outputs.write_text(args.output, json.dumps(result, indent=1), overwrite=False)
    print(json.dumps({k: result[k] for k in ("machine", "targets", "ok", "wall_s")}, indent=1))
    print(f"wrote {args.output}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
