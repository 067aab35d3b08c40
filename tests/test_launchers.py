"""The submitit command launcher: settings, the request check, submitit's local executor, and a
real one-node Slurm cluster (``slurm_cluster.py``): the three-stage sweep, DomainBed's own
sweep, refused requests, failed and cancelled jobs, and a job requeued at its time limit."""

import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import fields, replace
from pathlib import Path

import pytest
from domainbed import command_launchers
from submitit.core.utils import DelayedSubmission
from support.helpers import PYTHON, gaqat, run
from support.references import assert_collect_results_row

from domainbed_gaqat.plugin import launchers

ENV = [prefix + f.name.upper() for f in fields(launchers.SlurmSettings)
       for prefix in (launchers.ENV_PREFIX, launchers.OLD_ENV_PREFIX)]
SMALL = {"DOMAINBED_GAQAT_SUBMITIT_CPUS": "1", "DOMAINBED_GAQAT_SUBMITIT_GPUS": "0",
         "DOMAINBED_GAQAT_SUBMITIT_MEM_GB": "1", "DOMAINBED_GAQAT_SUBMITIT_TIME_MIN": "20",
         "DOMAINBED_GAQAT_SUBMITIT_WAIT": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for variable in ENV:
        monkeypatch.delenv(variable, raising=False)


def test_registered_in_domainbed():
    assert command_launchers.REGISTRY["submitit"] is launchers.submitit_launcher


def settings(section: dict | None = None) -> launchers.SlurmSettings:
    return launchers.SlurmSettings().updated(section or {}).with_environment()


def test_settings_defaults_config_then_environment(monkeypatch):
    assert settings().time_min == 1440
    assert settings({"time_min": 90, "partition": "gpu"}).partition == "gpu"
    monkeypatch.setenv("DOMAINBED_GAQAT_SUBMITIT_TIME_MIN", "30")
    monkeypatch.setenv("DOMAINBED_GAQAT_SUBMITIT_WAIT", "1")
    given = settings({"time_min": 90, "cpus": 4})
    assert (given.time_min, given.cpus, given.wait, given.gpus) == (30, 4, True, 1)
    monkeypatch.setenv("DOMAINBED_GAQAT_SUBMITIT_GPUS", "two")
    with pytest.raises(ValueError,
                       match=r"\$DOMAINBED_GAQAT_SUBMITIT_GPUS='two': expected a non-negative"):
        settings()
    monkeypatch.delenv("DOMAINBED_GAQAT_SUBMITIT_GPUS")
    with pytest.raises(ValueError, match=r"slurm settings \['gpu'\]"):
        settings({"gpu": 1})
    with pytest.raises(ValueError, match="slurm setting time_min='1h': expected an integer >= 0"):
        settings({"time_min": "1h"})
    with pytest.raises(ValueError, match="cluster 'pbs'"):
        settings({"cluster": "pbs"})


def test_the_old_environment_names_still_work_with_a_warning(monkeypatch):
    monkeypatch.setenv("GAQAT_SUBMITIT_CPUS", "3")
    with pytest.warns(FutureWarning, match=r"\$GAQAT_SUBMITIT_CPUS is deprecated: use "
                                           r"\$DOMAINBED_GAQAT_SUBMITIT_CPUS"):
        assert settings().cpus == 3
    monkeypatch.setenv("DOMAINBED_GAQAT_SUBMITIT_CPUS", "5")  # the new name wins, silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert settings().cpus == 5
    monkeypatch.setenv("GAQAT_SUBMITIT_WAIT", "yes")
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match=r"\$GAQAT_SUBMITIT_WAIT"):
        settings()


def test_entry_command():
    python = shlex.quote(sys.executable)
    assert launchers.entry_command("python -m domainbed.scripts.train --steps 3") == (
        f"{python} -m domainbed_gaqat.train --steps 3")
    assert launchers.entry_command("python3 -m domainbed.scripts.train_extra --x 1") == (
        f"{python} -m domainbed.scripts.train_extra --x 1")
    assert launchers.entry_command("pythonista x") == "pythonista x"


NODES = [{"name": "a", "partition": "gpu", "default": True, "cpus": 16, "mem_mb": 64000,
          "gpus": 4, "time_min": 2880.0},
         {"name": "b", "partition": "gpu", "default": True, "cpus": 32, "mem_mb": 32000,
          "gpus": 0, "time_min": 2880.0},
         {"name": "c", "partition": "cpu", "default": False, "cpus": 64, "mem_mb": 256000,
          "gpus": 0, "time_min": float("inf")}]


@pytest.mark.parametrize("change, message", [
    ({"cpus": 40}, "the CPUs asked for: 40 requested per job, the largest node (b) has 32"),
    ({"mem_gb": 63}, "the memory asked for: 64512 MB requested per job, the largest node (a) "
                     "has 64000 MB"),
    ({"gpus": 8}, "the GPUs asked for: 8 requested per job, the largest node (a) has 4"),
    ({"time_min": 3000}, "time_min 3000 exceeds partition 'gpu''s limit of 2880 minutes"),
    ({"partition": "big"}, "partition 'big' is not one of the cluster's ['cpu', 'gpu']"),
    ({"partition": "cpu", "gpus": 1}, "partition 'cpu' has the GPUs asked for: 1 requested"),
])
def test_a_request_no_node_satisfies_is_refused(change, message):
    request = launchers.SlurmSettings(cpus=8, mem_gb=32, gpus=1, time_min=1440)
    launchers.check_request(request, NODES)  # fits node a of the default partition
    launchers.check_request(replace(request, partition="cpu", gpus=0, time_min=10**6), NODES)
    with pytest.raises(ValueError, match=re.escape(message)):
        launchers.check_request(replace(request, **change), NODES)


def test_slurm_time_limits():
    assert [launchers._minutes(t) for t in ("infinite", "30", "1:30", "2:00:00",
                                            "1-00:00:00")] == [float("inf"), 30, 1.5, 120,
                                                               1440]
    assert launchers._gpus("gpu:4(S:0-1)") == 4 and launchers._gpus("gpu:a100:2,gpu:v100:1") == 3
    assert launchers._gpus("(null)") == 0


def _writes_interpreter(path) -> str:
    return f"python -c \"import sys; open('{path}', 'w').write(sys.executable)\""


@pytest.mark.slow
def test_local_executor_runs_real_commands(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DOMAINBED_GAQAT_SUBMITIT_CLUSTER", "local")
    monkeypatch.setenv("DOMAINBED_GAQAT_SUBMITIT_FOLDER", str(tmp_path / "logs"))
    monkeypatch.setenv("DOMAINBED_GAQAT_SUBMITIT_WAIT", "1")
    commands = [_writes_interpreter(tmp_path / name) for name in ("a", "b")]
    jobs = launchers.submitit_launcher(commands + ["python -c 'import sys; sys.exit(3)'"],
                                       launchers.SlurmSettings(time_min=5, gpus=0))
    assert len(jobs) == 3 and all(j.done() for j in jobs)
    for name in ("a", "b"):  # run by this interpreter, not whatever `python` is on PATH
        assert (tmp_path / name).read_text() == sys.executable
    out = capsys.readouterr().out
    assert f"job {jobs[2].job_id} " in out and "2 of 3 jobs completed" in out


# --- a real Slurm cluster -------------------------------------------------------------------


def tiny_demo(folder: Path) -> Path:
    """The demo's three stages (fp, then qat, then gaqat) at a few steps."""
    path = folder / "tiny_demo.py"
    stages = [{"name": n, "steps": 3, "checkpoint_freq": 2} for n in ("fp", "qat", "gaqat")]
    path.write_text("SWEEP = " + repr({"extends": "demo", "hparams": {"batch_size": 8},
                                      "stages": stages}) + "\n")
    return path


@pytest.mark.slow
def test_unsatisfiable_request_is_refused_at_once(slurm, tmp_path, monkeypatch, capsys):
    for name, value in {**SMALL, "DOMAINBED_GAQAT_SUBMITIT_CPUS": "64"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DOMAINBED_GAQAT_SUBMITIT_FOLDER", str(tmp_path / "logs"))
    start = time.time()
    assert gaqat("sweep", "launch", "demo", "--stage", "fp", "--output_dir", str(tmp_path),
                 "--data_dir", str(tmp_path), "--command_launcher", "submitit",
                 "--skip_confirmation") == 2
    assert time.time() - start < 30
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no node of partition 'debug' has the CPUs asked for: 64 requested per job" in err
    assert "the largest node (localhost) has" in err
    queue = subprocess.run(["squeue", "-h"], capture_output=True, text=True, check=True)
    assert queue.stdout.strip() == ""


@pytest.mark.slow
def test_three_stage_sweep_and_domainbeds_sweep_on_slurm(slurm, tmp_path):
    env = {**SMALL, "DOMAINBED_GAQAT_SUBMITIT_FOLDER": str(tmp_path / "logs")}
    config = tiny_demo(tmp_path)
    common = [str(config), "--output_dir", str(tmp_path / "out"), "--data_dir", str(tmp_path)]
    proc = run([PYTHON, "-m", "domainbed_gaqat", "sweep", "launch", *common,
                "--command_launcher", "submitit", "--skip_confirmation"], timeout=1200, **env)
    for n in (1, 2, 1):  # fp, qat (LSQ and SAGM_LSQ), gaqat: one array each, after the other
        assert f"submitit: {n} of {n} jobs completed" in proc.stdout
    assert proc.stdout.count("jobs submitted to slurm") == 3
    listed = run([PYTHON, "-m", "domainbed_gaqat", "sweep", "list", *common]).stdout
    assert listed.count("0 incomplete, 0 not launched.") == 3
    for folder in (tmp_path / "out" / "RotatedDigits").glob("*/*"):
        assert (folder / "done").exists() and (folder / "model.pkl").exists()
    table = run([PYTHON, "-m", "domainbed_gaqat", "tables", *common, "--format", "csv"]).stdout
    assert {line.split(",")[1] for line in table.splitlines()[1:] if line} == {
        "ERM_FP", "LSQ", "SAGM_LSQ", "GAQAT"}

    # DomainBed's own sweep, its commands through the resumable entry: QTDoG (quantized from
    # step 1) and SAQ on Debug28 (three envs), then DomainBed's collect_results
    out = tmp_path / "domainbed"
    for algorithm, hparams in (("QTDoG", {"quant_start": 1}), ("SAQ", {})):
        proc = run([PYTHON, "-m", "domainbed.scripts.sweep", "launch", "--datasets", "Debug28",
                    "--algorithms", algorithm, "--n_hparams", "1", "--n_trials", "1",
                    "--single_test_envs", "--steps", "3", "--hparams", json.dumps(hparams),
                    "--command_launcher", "submitit", "--skip_confirmation", "--output_dir",
                    str(out), "--data_dir", str(tmp_path)], timeout=1200, **env)
        assert "submitit: 3 of 3 jobs completed" in proc.stdout
    report = run([PYTHON, "-m", "domainbed.scripts.collect_results", "--input_dir",
                  str(out)]).stdout
    assert "Total records: 12" in report  # 6 runs, steps 0 and 2
    assert "Dataset: Debug28, model selection method: training-domain" in report
    for algorithm in ("QTDoG", "SAQ"):
        assert_collect_results_row(report, algorithm, [p for p in out.iterdir() if p.is_dir()],
                                   3)
    accounting = subprocess.run(["sacct", "-n", "-X", "-o", "State"], capture_output=True,
                                text=True, check=True).stdout.split()
    assert accounting.count("COMPLETED") >= 10
    submitted = [DelayedSubmission.load(p).args[0]
                 for p in (tmp_path / "logs").glob("*/*_submitted.pkl")]
    assert len(submitted) >= 10 and all(f"{sys.executable} -m domainbed_gaqat.train " in c
                                        for c in submitted)


@pytest.mark.slow
def test_failed_and_cancelled_jobs_are_reported(slurm, tmp_path, monkeypatch, capsys):
    for name, value in SMALL.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DOMAINBED_GAQAT_SUBMITIT_FOLDER", str(tmp_path / "logs"))
    commands = ["python -c 'import sys; sys.exit(3)'", "python -c 'import time; time.sleep(600)'"]

    def cancel_the_sleeper() -> None:
        for _ in range(600):
            queue = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%i"],
                                   capture_output=True, text=True).stdout.split()
            sleeper = [j for j in queue if j.endswith("_1")]
            if sleeper:
                subprocess.run(["scancel", sleeper[0]], check=True)
                return
            time.sleep(0.5)

    canceller = threading.Thread(target=cancel_the_sleeper)
    canceller.start()
    jobs = launchers.submitit_launcher(commands)
    canceller.join()
    out = capsys.readouterr().out
    failed, cancelled = jobs
    assert f"submitit: job {failed.job_id} FAILED: see {failed.paths.stderr}" in out
    assert f"submitit: job {cancelled.job_id} CANCELLED" in out
    assert str(cancelled.paths.stderr) in out and "0 of 2 jobs completed" in out


@pytest.mark.slow
def test_a_job_at_its_time_limit_is_requeued_and_resumes(slurm, tmp_path):
    """A two-minute limit, SIGUSR2 30 s before it (Slurm checks every 30 s) to every process of
    the job step, two loader workers included: they ignore it, the training saves its state,
    submitit requeues the job, the requeued job continues; the records are an uninterrupted
    run's (loaded without workers). 160 steps take longer than one run's 60-90 s."""
    args = ["--dataset", "RotatedDigits", "--algorithm", "GAQAT", "--test_envs", "0", "--steps",
            "160", "--checkpoint_freq", "40", "--save_every", "0", "--hparams",
            json.dumps({"batch_size": 8, "gaqat_K": 5})]
    reference = tmp_path / "reference"
    local = subprocess.Popen([PYTHON, "-m", "domainbed_gaqat.train", *args, "--output_dir",
                              str(reference)], env={**os.environ, **SMALL},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {**SMALL, "DOMAINBED_GAQAT_SUBMITIT_FOLDER": str(tmp_path / "logs"),
           "DOMAINBED_GAQAT_SUBMITIT_TIME_MIN": "2",
           "DOMAINBED_GAQAT_SUBMITIT_SIGNAL_DELAY_S": "30",
           "DOMAINBED_GAQAT_SUBMITIT_WAIT_MAX_MIN": "10"}
    out = tmp_path / "slurm_run"
    # two loader workers: Slurm's SIGUSR2 reaches every process of the job step, workers too
    command = shlex.join(["python", "-m", "domainbed.scripts.train", *args, "--workers", "2",
                          "--output_dir", str(out)])
    code = ("import sys; from domainbed_gaqat.plugin import launchers\n"
            f"launchers.submitit_launcher([{command!r}])")
    proc = run([PYTHON, "-c", code], timeout=900, **env)
    assert local.wait(timeout=900) == 0
    assert "submitit: 1 of 1 jobs completed" in proc.stdout, proc.stdout
    text = (out / "out.txt").read_text()
    assert "Stopped by signal 12" in text and "Resuming from step" in text
    restarts = subprocess.run(["sacct", "-n", "-X", "-D", "-o", "State"], capture_output=True,
                              text=True, check=True).stdout.split()
    assert "REQUEUED" in restarts

    def records(folder: Path) -> list[dict]:
        found = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
        for record in found:
            record.pop("step_time")
            record["args"].pop("output_dir")
        return found

    assert [r["step"] for r in records(out)] == [0, 40, 80, 120, 159]
    executor = launchers.make_executor(launchers.SlurmSettings(cluster="slurm",
                                                               folder=str(tmp_path / "e")))
    assert executor._executor.max_num_timeout == 50  # not submitit's 3
    assert records(out) == records(reference)
