"""The submitit command launcher: settings, submitit's local executor, a Slurm job array."""

import os
import shlex
import sys

import pytest
from conftest import PYTHON, gaqat, run
from domainbed import command_launchers
from submitit.core.utils import DelayedSubmission

from domainbed_gaqat.plugin import launchers

ENV = [variable for variable, _, _ in launchers.SETTINGS.values()]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for variable in ENV:
        monkeypatch.delenv(variable, raising=False)


def test_registered_in_domainbed():
    assert command_launchers.REGISTRY["submitit"] is launchers.submitit_launcher


def test_settings_defaults_config_then_environment(monkeypatch):
    assert launchers.settings()["time_min"] == 1440
    assert launchers.settings({"time_min": 90, "partition": "gpu"})["partition"] == "gpu"
    monkeypatch.setenv("GAQAT_SUBMITIT_TIME_MIN", "30")
    monkeypatch.setenv("GAQAT_SUBMITIT_WAIT", "1")
    s = launchers.settings({"time_min": 90, "cpus": 4})
    assert (s["time_min"], s["cpus"], s["wait"], s["gpus"]) == (30, 4, True, 1)
    monkeypatch.setenv("GAQAT_SUBMITIT_GPUS", "two")
    with pytest.raises(ValueError, match=r"\$GAQAT_SUBMITIT_GPUS='two': expected a non-negative"):
        launchers.settings()
    monkeypatch.delenv("GAQAT_SUBMITIT_GPUS")
    with pytest.raises(ValueError, match=r"slurm settings \['gpu'\]"):
        launchers.settings({"gpu": 1})
    with pytest.raises(ValueError, match="slurm setting time_min='1h': expected an integer >= 0"):
        launchers.settings({"time_min": "1h"})
    with pytest.raises(ValueError, match="cluster 'pbs'"):
        launchers.settings({"cluster": "pbs"})


def test_with_this_python():
    assert launchers.with_this_python("python -m domainbed.scripts.train --steps 3") == (
        f"{shlex.quote(sys.executable)} -m domainbed.scripts.train --steps 3")
    assert launchers.with_this_python("pythonista x") == "pythonista x"


def _writes_interpreter(path) -> str:
    return f"python -c \"import sys; open('{path}', 'w').write(sys.executable)\""


@pytest.mark.slow
def test_local_executor_runs_real_commands(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GAQAT_SUBMITIT_CLUSTER", "local")
    monkeypatch.setenv("GAQAT_SUBMITIT_FOLDER", str(tmp_path / "logs"))
    monkeypatch.setenv("GAQAT_SUBMITIT_WAIT", "1")
    commands = [_writes_interpreter(tmp_path / name) for name in ("a", "b")]
    jobs = launchers.submitit_launcher(commands + ["python -c 'import sys; sys.exit(3)'"],
                                       {"time_min": 5, "gpus": 0})
    assert len(jobs) == 3 and all(j.done() for j in jobs)
    for name in ("a", "b"):  # run by this interpreter, not whatever `python` is on PATH
        assert (tmp_path / name).read_text() == sys.executable
    out = capsys.readouterr().out
    assert f"job {jobs[2].job_id} failed" in out and "2 of 3 jobs succeeded" in out


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """Stand-ins for sbatch (keeps the array script it is given) and srun; Slurm settings."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/array.sh\n'
                                    'echo "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\n")
    for tool in ("sbatch", "srun"):
        os.chmod(bin_dir / tool, 0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("GAQAT_SUBMITIT_CLUSTER", "slurm")
    monkeypatch.setenv("GAQAT_SUBMITIT_FOLDER", str(tmp_path / "logs"))
    monkeypatch.setenv("GAQAT_SUBMITIT_PARTITION", "gpu")
    return tmp_path / "array.sh"


def test_slurm_job_array(tmp_path, fake_slurm):
    """A Slurm job array as sbatch receives it."""
    jobs = launchers.submitit_launcher(["python -m domainbed.scripts.train --steps 1",
                                        "python3 -m domainbed.scripts.train --steps 2"],
                                       {"time_min": 90, "cpus": 6})
    assert [j.job_id for j in jobs] == ["4242_0", "4242_1"]
    script = fake_slurm.read_text()
    for line in ("--array=0-1%2", "--time=90", "--partition=gpu", "--gpus-per-node=1",
                 "--cpus-per-task=6", "--mem=32GB"):
        assert f"#SBATCH {line}\n" in script
    assert f"{sys.executable} -u -m submitit.core._submit" in script
    commands = [DelayedSubmission.load(tmp_path / "logs" / j / f"{j}_submitted.pkl").args[0]
                for j in ("4242_0", "4242_1")]
    assert commands == [f"{sys.executable} -m domainbed.scripts.train --steps {n}"
                        for n in (1, 2)]


def test_gaqat_sweep_uses_the_stage_time_limit(tmp_path, fake_slurm, monkeypatch):
    moco = tmp_path / "moco.pth.tar"
    moco.write_bytes(b"weights")
    monkeypatch.setenv("DOMAINBED_GAQAT_MOCO", str(moco))
    assert gaqat(*["sweep", "launch", "pacs_w4a4", "--output_dir", str(tmp_path / "out"),
                       "--data_dir", str(tmp_path), "--stage", "fp", "--command_launcher",
                       "submitit", "--skip_confirmation"]) == 0
    script = fake_slurm.read_text()  # 36 jobs, pacs_w4a4's fp stage: time_min 180
    assert "#SBATCH --array=0-35%36\n" in script and "#SBATCH --time=180\n" in script


@pytest.mark.slow
def test_domainbed_sweep_with_submitit(tmp_path, fake_slurm):
    run([PYTHON, "-m", "domainbed.scripts.sweep", "launch", "--datasets", "RotatedDigits",
         "--algorithms", "ERM_FP", "--n_hparams", "1", "--n_trials", "1", "--single_test_envs",
         "--command_launcher", "submitit", "--skip_confirmation", "--output_dir",
         str(tmp_path / "out"), "--data_dir", str(tmp_path)])
    assert "#SBATCH --array=0-5%6\n" in fake_slurm.read_text()  # one job per test env
