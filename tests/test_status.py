"""``gaqat sweep status`` on generated trees of the demo config (``status_tree``): a half-run
sweep (one stage done, the next running, the last waiting for it), a tree with a failed, a
stopped and a queued run, a moved tree; read-only. Expected values are worked out by hand from
what each test writes (steps, checkpoint frequency, step times)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.helpers import gaqat
from support.status_tree import fill_stage

from domainbed_gaqat.experiments import status
from domainbed_gaqat.experiments.configs import load_config

CONFIG = "demo"  # fp: ERM_FP 150 steps; qat: LSQ, SAGM_LSQ 30 steps (checkpoints every 15);
# gaqat: GAQAT 30 steps, lr from SAGM_LSQ; 1 trial, test env 5, one grid point
TRACEBACK = ("Traceback (most recent call last):\n  File \"train.py\", line 9, in <module>\n"
             "    main()\nRuntimeError: CUDA out of memory\n")


@pytest.fixture
def config():
    return load_config(CONFIG)


def _qat(config, out, states, step_time=0.2):
    """fp done (0.1 s/step), then the qat stage's runs by algorithm."""
    fill_stage(config, str(out), str(out), "fp", step_time=0.1)
    return {j.train_args["algorithm"]: j for j in fill_stage(
        config, str(out), str(out), "qat", lambda j: states[j.train_args["algorithm"]],
        step_time)}


@pytest.fixture
def owner():
    """A process holding a run folder's lock, as the train entry does (the kernel's lock, seen
    through F_GETLK from this process)."""
    procs = []

    def own(folder: str) -> subprocess.Popen:
        code = ("import sys, time\nfrom domainbed_gaqat.experiments.ownership import RunLock\n"
                "RunLock(sys.argv[1]).acquire()\nprint('owned', flush=True)\ntime.sleep(600)")
        proc = subprocess.Popen([sys.executable, "-c", code, folder], stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout.readline().strip() == "owned"
        procs.append(proc)
        return proc

    yield own
    for proc in procs:
        proc.kill()
        proc.wait()


def _snapshot(root: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_half_run_sweep_one_stage_done_next_running_last_waiting(config, tmp_path, owner,
                                                                  capsys):
    jobs = _qat(config, tmp_path, {"LSQ": (10**9, True), "SAGM_LSQ": (15, False)})
    proc = owner(jobs["SAGM_LSQ"].output_dir)
    before = _snapshot(tmp_path)
    found = status.sweep_status(config, str(tmp_path), str(tmp_path), progress=False)
    assert _snapshot(tmp_path) == before  # read-only
    fp, qat, gaqat_stage = found.stages
    assert fp.counts() == {"ERM_FP": {"done": 1}}
    assert qat.counts() == {"LSQ": {"done": 1}, "SAGM_LSQ": {"running": 1}}
    assert gaqat_stage.counts() == {"GAQAT": {"waiting": 1}}
    assert "stage 'qat'" in gaqat_stage.blocked and not fp.blocked and not qat.blocked
    [running] = [r for r in qat.runs if r.state == "running"]
    assert running.folder == jobs["SAGM_LSQ"].output_dir
    assert running.owner["pid"] == proc.pid
    assert (running.step, running.steps) == (15, 30)  # records at steps 0 and 15
    assert running.seconds_left == pytest.approx((30 - 1 - 15) * 0.2)
    [waiting] = gaqat_stage.runs
    # GAQAT has no run yet: its baseline SAGM_LSQ's step time, for all of its 30 steps
    assert waiting.step_time == pytest.approx(0.2)
    assert waiting.seconds_left == pytest.approx(30 * 0.2)
    left = found.time_left()
    assert left["running"] == {"runs": 1, "seconds": pytest.approx(2.8), "unknown": 0,
                               "longest": pytest.approx(2.8)}
    assert left["waiting"]["seconds"] == pytest.approx(6.0)
    assert left["serial_seconds"] == pytest.approx(8.8)

    assert gaqat("sweep", "status", CONFIG, "--output_dir", str(tmp_path), "--data_dir",
                 str(tmp_path)) == 0
    text = capsys.readouterr().out
    assert "  SAGM_LSQ  1 running" in text and "  GAQAT  1 waiting" in text
    assert (f"running: SAGM_LSQ test envs [5] trial 0: {jobs['SAGM_LSQ'].output_dir}, step 15/30"
            f" (53%), 0.2 s/step, 3 s left, process {proc.pid}") in text
    assert "Time left, run after run" in text and ": 9 s: running 3 s" in text


def test_failed_stopped_and_queued_runs(config, tmp_path, capsys):
    jobs = _qat(config, tmp_path, {"LSQ": (15, False), "SAGM_LSQ": (0, False)})
    lsq, sagm = jobs["LSQ"].output_dir, jobs["SAGM_LSQ"].output_dir
    Path(lsq, "err.txt").write_text("/x/y.py:3: UserWarning: something\n  warn()\n")
    Path(sagm, "err.txt").write_text("noise\n" * 20 + TRACEBACK)
    found = status.sweep_status(config, str(tmp_path), str(tmp_path), progress=False)
    runs = {r.algorithm: r for r in found.stages[1].runs}
    assert runs["LSQ"].state == "stopped" and runs["LSQ"].err_tail == ()
    assert runs["LSQ"].seconds_left == pytest.approx(14 * 0.2)
    assert runs["SAGM_LSQ"].state == "failed"
    assert runs["SAGM_LSQ"].err_tail == (*["noise"] * 4, *TRACEBACK.splitlines())
    assert runs["SAGM_LSQ"].seconds_left == pytest.approx(29 * 0.2)
    assert found.time_left()["to resume"]["runs"] == 2

    assert gaqat("sweep", "status", CONFIG, "--output_dir", str(tmp_path), "--data_dir",
                 str(tmp_path), "--json") == 0
    record = json.loads(capsys.readouterr().out)
    [failed] = [r for s in record["stages"] for r in s["runs"] if r["state"] == "failed"]
    assert failed["folder"] == sagm and failed["err_tail"][-1] == "RuntimeError: CUDA out of memory"
    assert record["stages"][1]["counts"] == {"LSQ": {"stopped": 1}, "SAGM_LSQ": {"failed": 1}}

    # the train entry's own line for what ended the run (docs/runs.md) is a failure too
    diverged = "gaqat train: the run diverged: a non-finite loss at step 15\n"
    Path(lsq, "err.txt").write_text("/x/y.py:3: UserWarning: something\n" + diverged)
    found = status.sweep_status(config, str(tmp_path), str(tmp_path), progress=False)
    assert found.stages[1].counts()["LSQ"] == {"failed": 1}
    assert found.stages[1].runs[0].err_tail[-1] == diverged.strip()

    # a Ctrl-C is a stop, not a failure; a folder made by Job.launch with no file is queued
    Path(sagm, "err.txt").write_text(TRACEBACK.replace("RuntimeError: CUDA out of memory",
                                                       "KeyboardInterrupt"))
    for name in os.listdir(lsq):
        os.remove(os.path.join(lsq, name))
    found = status.sweep_status(config, str(tmp_path), str(tmp_path), progress=False)
    assert found.stages[1].counts() == {"LSQ": {"queued": 1}, "SAGM_LSQ": {"stopped": 1}}
    [queued] = [r for r in found.stages[1].runs if r.state == "queued"]
    # no LSQ record left: its baseline ERM_FP's 0.1 s a step (not SAGM_LSQ's 0.2)
    assert queued.step is None and queued.seconds_left == pytest.approx(30 * 0.1)


def test_not_launched_runs_estimated_from_the_baselines_and_a_moved_tree(config, tmp_path):
    fill_stage(config, str(tmp_path / "a"), str(tmp_path / "a"), "fp", step_time=0.1)
    shutil.move(tmp_path / "a", tmp_path / "b")  # found by what the runs recorded
    found = status.sweep_status(config, str(tmp_path / "b"), str(tmp_path), progress=False)
    assert [s.counts() for s in found.stages] == [
        {"ERM_FP": {"done": 1}}, {"LSQ": {"not launched": 1}, "SAGM_LSQ": {"not launched": 1}},
        {"GAQAT": {"waiting": 1}}]
    # LSQ -> ERM_FP, SAGM_LSQ -> LSQ -> ERM_FP, GAQAT -> ... -> ERM_FP: 0.1 s a step, 30 steps
    assert [r.seconds_left for r in found.runs()] == pytest.approx([0, 3.0, 3.0, 3.0])
    assert found.time_left()["not started"]["runs"] == 2
    assert found.folders == 1


def test_bad_output_dir_is_a_one_line_error(tmp_path, capsys):
    assert gaqat("sweep", "status", CONFIG, "--output_dir", str(tmp_path / "none"),
                 "--data_dir", str(tmp_path)) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("gaqat sweep: error: --output_dir") and "no such directory" in line


def test_ends_reader_equals_the_full_reader_at_both_ends(config, tmp_path):
    """The first and last records of a long ``results.jsonl`` read from its two ends, a
    truncated last line (a killed job) skipped as the full reader skips it."""
    from domainbed_gaqat.experiments.results import read_run, read_run_ends

    [job] = fill_stage(config, str(tmp_path), str(tmp_path), "fp", step_time=0.1)
    with open(Path(job.output_dir, "results.jsonl"), "a") as f:
        f.write('{"step": 99, "trunc')
    full = read_run(job.output_dir)
    assert len(full.records) == 150 // 50 + 1
    ends = read_run_ends(job.output_dir, tail_bytes=4000)  # the last two lines, about
    assert ends.records == [full.records[0], full.records[-1]] and ends.done == full.done
    # a tail shorter than a record: everything is read, the ends are the same
    ends = read_run_ends(job.output_dir, tail_bytes=600)
    assert [ends.records[0], ends.records[-1]] == [full.records[0], full.records[-1]]


def test_a_stage_inheriting_the_best_checkpoints_lr_is_found(tmp_path):
    """GAQAT takes the lr of SAGM_LSQ's best checkpoint (any step): with lr 1e-4 best at step
    15 only and 2e-4 better at both ends, reading only the ends would plan GAQAT with 2e-4 and
    miss its run."""
    path = tmp_path / "two_lr.py"
    path.write_text('SWEEP = {"extends": "demo", "stages": [{"name": "fp"}, '
                    '{"name": "qat", "grid": {"lr": [1e-4, 2e-4]}}, {"name": "gaqat"}]}\n')
    config = load_config(str(path))
    out = str(tmp_path / "out")

    def curve(job):
        lr = json.loads(job.train_args["hparams"])["lr"]
        return lambda step, env, split: (0.9 if lr == 1e-4 and step == 15 and env == 5
                                         and split == "out" else 0.5 if lr == 1e-4 else 0.6)

    for stage in ("fp", "qat", "gaqat"):
        jobs = fill_stage(config, out, out, stage, curve=curve)
    [gaqat_job] = jobs
    assert json.loads(gaqat_job.train_args["hparams"])["lr"] == 1e-4
    found = status.sweep_status(config, out, out, progress=False)
    assert found.stages[2].counts() == {"GAQAT": {"done": 1}}
    assert found.stages[1].counts() == {"LSQ": {"done": 2}, "SAGM_LSQ": {"done": 2}}
