"""gaqat-sweep: configs -> DomainBed jobs, stages, refusals (no training: stage outputs are
written by the tests as train.py would)."""

import dataclasses
import json
import os
import re
from collections import Counter

import pytest
from domainbed.scripts.sweep import Job
from support.helpers import gaqat

from domainbed_gaqat.experiments import configs, sweep
from domainbed_gaqat.plugin.hparams import GAQAT_GRIDS, LR_GRID

LRS = [1e-5, 3e-5, 5e-5]
PACS_ENVS = 4


def hp(job: Job) -> dict:
    return json.loads(job.train_args["hparams"])


def finish(job: Job, test_out: list[float], test_in: float = 0.5, done: bool = True) -> None:
    """Write ``job``'s run as train.py would: one record per entry of ``test_out`` (the test
    env's out-split accuracy at steps 0, 10, 20...), ``done`` and a ``model.pkl``."""
    os.makedirs(job.output_dir, exist_ok=True)
    args = {k: v for k, v in job.train_args.items() if k != "hparams"}
    with open(os.path.join(job.output_dir, "results.jsonl"), "w") as f:
        for i, acc in enumerate(test_out):
            record = {"step": 10 * i, "args": args, "hparams": hp(job)}
            for env in range(PACS_ENVS):
                test = env in args["test_envs"]
                record[f"env{env}_in_acc"] = test_in if test else 0.9
                record[f"env{env}_out_acc"] = acc if test else 0.8
            f.write(json.dumps(record) + "\n")
    if done:
        for name in ("done", "model.pkl"):
            with open(os.path.join(job.output_dir, name), "w") as f:
                f.write(name)


def cell(jobs: list[Job], algorithm: str, test_envs: list[int], trial: int) -> list[Job]:
    return [j for j in jobs if j.train_args["algorithm"] == algorithm
            and j.train_args["test_envs"] == test_envs and j.train_args["trial_seed"] == trial]


def test_pacs_stage1_jobs(tmp_path):
    config = configs.load_config("pacs_w4a4")
    fp, qat, gaqat = sweep.plan(config, tmp_path / "out", tmp_path / "data")
    # 3 trials x 4 test domains x 3 lr
    assert len(fp.jobs) == 36 and fp.folder == str(tmp_path / "out" / "PACS" / "fp")
    assert Counter(tuple(j.train_args["test_envs"]) for j in fp.jobs) == {
        (0,): 9, (1,): 9, (2,): 9, (3,): 9}
    for trial in range(3):
        for env in range(4):
            jobs = cell(fp.jobs, "ERM_FP", [env], trial)
            assert sorted(hp(j)["lr"] for j in jobs) == LRS
            assert len({j.train_args["hparams_seed"] for j in jobs}) == 3
            assert all(hp(j)["init"] == "moco" and hp(j)["weight_decay"] == 1e-4
                       and hp(j)["batch_size"] == 32 and hp(j)["resnet_dropout"] == 0.0
                       for j in jobs)
    assert {j.train_args["steps"] for j in fp.jobs} == {5000}
    assert all(j.state == Job.NOT_LAUNCHED and "--hparams '{" in j.command_str for j in fp.jobs)
    assert "rho" not in hp(fp.jobs[0])  # global hparams reach only the algorithms that have them
    for later in (qat, gaqat):
        assert not later.jobs and "stage 'fp'" in later.blocked
        assert "gaqat sweep launch pacs_w4a4 --stage fp" in later.blocked


def test_domainnet_groups_and_eval_window(tmp_path):
    config = configs.load_config("domainnet_w4a4")
    fp = sweep.plan(config, tmp_path, tmp_path)[0]
    assert len(fp.jobs) == 27  # 3 trials x 3 groups x 3 lr
    assert {tuple(j.train_args["test_envs"]) for j in fp.jobs} == {(0, 1), (2, 3), (4, 5)}
    assert all("--test_envs 0 1 " in j.command_str for j in cell(fp.jobs, "ERM_FP", [0, 1], 0))
    qat = config.stage("qat")
    assert (qat.steps, qat.checkpoint_freq, qat.eval_from) == (50000, 1000, 45000)
    qat_jobs = sweep.plan(config, tmp_path, tmp_path)[1]  # blocked until stage 1 is done
    assert qat_jobs.blocked and not qat_jobs.jobs
    assert all("-m domainbed_gaqat.train " in j.command_str and "--eval_from" not in
               j.command_str for j in fp.jobs)  # stage 1 evaluates every checkpoint


def test_two_stages_init_paths_and_base_lr(tmp_path):
    """Stage 2 starts from the stage-1 run of its test env and trial that the rule picks at its
    last checkpoint; GAQAT takes the lr chosen for SAGM_LSQ. Bit-widths get their own folder."""
    out = tmp_path / "out"
    fp = sweep.plan(configs.load_config("pacs_w4a4"), out, tmp_path)[0]
    for job in fp.jobs:
        lr = hp(job)["lr"]
        # lr 1e-5 is best at step 0 (0.95) but worst at its last checkpoint: init uses the last
        finish(job, {1e-5: [0.95, 0.50], 3e-5: [0.60, 0.70], 5e-5: [0.60, 0.65]}[lr])
    for bits in ("w4a4", "w3a3"):
        config = configs.load_config(f"pacs_{bits}")
        _, qat, gaqat = sweep.plan(config, out, tmp_path)
        assert len(qat.jobs) == 72 and qat.folder == str(out / "PACS" / bits)
        assert {(hp(j)["w_bits"], hp(j)["a_bits"]) for j in qat.jobs} == {
            (int(bits[1]), int(bits[3]))}
        for job in qat.jobs:
            (source,) = [j for j in cell(fp.jobs, "ERM_FP", job.train_args["test_envs"],
                                         job.train_args["trial_seed"]) if hp(j)["lr"] == 3e-5]
            assert hp(job)["init"] == "domainbed"
            assert hp(job)["init_path"] == os.path.join(source.output_dir, "model.pkl")
        assert "SAGM_LSQ runs of stage 'qat', and 36 of 36 are not done" in gaqat.blocked
        for job in qat.jobs:  # SAGM_LSQ: lr 5e-5 best for trial 1, 1e-5 otherwise
            best = 5e-5 if job.train_args["trial_seed"] == 1 else 1e-5
            finish(job, [0.7] if hp(job)["lr"] == best else [0.6])
        gaqat = sweep.plan(config, out, tmp_path)[2]
        assert len(gaqat.jobs) == 108  # 3 trials x 4 domains x 3 r x 3 K
        grid_k = [300, 350, 400] if bits == "w4a4" else [100, 150, 200]
        for trial in range(3):
            for env in range(4):
                jobs = cell(gaqat.jobs, "GAQAT", [env], trial)
                assert sorted((hp(j)["gaqat_r"], hp(j)["gaqat_K"]) for j in jobs) == [
                    (r, k) for r in (0.28, 0.30, 0.32) for k in grid_k]
                assert {hp(j)["lr"] for j in jobs} == {5e-5 if trial == 1 else 1e-5}
                assert len({j.train_args["hparams_seed"] for j in jobs}) == 9
    # Tables 5 and 6 reuse Table 2's runs: the same DomainBed jobs, hence the same folders
    config = configs.load_config("pacs_w4a4")
    table2 = {j.output_dir for j in sweep.plan(config, out, tmp_path)[2].jobs}
    for name in ("pacs_freeze_steps", "pacs_threshold"):
        jobs = sweep.plan(configs.load_config(name), out, tmp_path)[2].jobs
        assert len(jobs) == 36 and {j.output_dir for j in jobs} <= table2


def test_launch_refuses_until_stage1_is_done(tmp_path, capsys, monkeypatch):
    out, data = str(tmp_path / "out"), str(tmp_path)
    argv = ["launch", "pacs_w4a4", "--output_dir", out, "--data_dir", data,
            "--command_launcher", "dummy", "--skip_confirmation"]
    assert gaqat("sweep", *argv + ["--stage", "qat"]) == 2
    err = capsys.readouterr().err
    assert "36 of 36 are not done" in err and "36 not launched" in err
    assert f"gaqat sweep launch pacs_w4a4 --stage fp --output_dir {out}" in err
    assert not os.path.exists(os.path.join(out, "PACS", "w4a4"))
    # the MoCo-v2 file must exist before stage 1 is launched
    monkeypatch.delenv("DOMAINBED_GAQAT_MOCO", raising=False)
    assert gaqat("sweep", *argv + ["--stage", "fp"]) == 2
    assert "export DOMAINBED_GAQAT_MOCO=" in capsys.readouterr().err
    moco = tmp_path / "moco.pth.tar"
    moco.write_bytes(b"weights")
    monkeypatch.setenv("DOMAINBED_GAQAT_MOCO", str(moco))
    assert gaqat("sweep", *argv + ["--stage", "fp"]) == 0  # the dummy launcher prints the commands
    assert capsys.readouterr().out.count("Dummy launcher: ") == 36
    fp = sweep.plan(configs.load_config("pacs_w4a4"), out, data)[0]
    assert {j.state for j in fp.jobs} == {Job.INCOMPLETE}  # launched, not finished
    for job in fp.jobs[1:]:
        finish(job, [0.5])
    finish(fp.jobs[0], [0.5], done=False)  # one run still running, or crashed
    assert gaqat("sweep", *argv) == 2  # all stages: fp has nothing left to launch, qat refuses
    captured = capsys.readouterr()
    assert "About to launch 0 jobs." in captured.out
    assert "1 of 36 are not done (1 incomplete" in captured.err
    assert gaqat(*["sweep", "delete_incomplete", "pacs_w4a4", "--output_dir", out, "--data_dir",
                       data, "--stage", "fp", "--skip_confirmation"]) == 0
    assert not os.path.exists(fp.jobs[0].output_dir)


@pytest.mark.parametrize("change, message", [
    ({"dataset": "PACSS"}, "dataset 'PACSS'"),
    ({"name": "x"}, "unknown keys ['name']"),
    ({"test_envs": [[0], [6]]}, "test_envs [[0], [6]]"),
    ({"trials": 0}, "trials 0"),
    ({"bits": [4, 1]}, "bits [4, 1]"),
    ({"selection": "oracle"}, "selection 'oracle'"),
    ({"hparams": {"w_bits": 4}}, "hparams key 'w_bits'"),
    ({"slurm": {"gpu": 1}}, "slurm settings ['gpu']"),
    ({"stages": [{"name": "fp", "algorithms": ["ERM_FP"], "steps": 10, "checkpoint_freq": 5,
                  "grid": {"gaqat_r": [0.3]}}]}, "['gaqat_r'] are not hyperparameters of ERM_FP"),
    ({"stages": [{"name": "fp", "algorithms": ["ERMM"], "steps": 10, "checkpoint_freq": 5}]},
     "algorithms ['ERMM']"),
    ({"stages": [{"name": "fp", "algorithms": ["ERM_FP"], "steps": 10, "checkpoint_freq": 5,
                  "eval_from": 10}]}, "eval_from 10"),
    ({"stages": [{"name": "q", "algorithms": ["LSQ"], "steps": 10, "checkpoint_freq": 5,
                  "init_from": {"stage": "fp", "algorithm": "ERM_FP"}}]}, "init_from"),
])
def test_bad_configs_name_the_value(tmp_path, change, message):
    config = {"dataset": "RotatedDigits", "test_envs": [[5]], "trials": 1, "bits": [4, 4],
              "stages": [{"name": "fp", "algorithms": ["ERM_FP"], "steps": 10,
                          "checkpoint_freq": 5}]}
    path = tmp_path / "bad.py"
    path.write_text(f"SWEEP = {config | change!r}\n")
    with pytest.raises(configs.ConfigError, match=r"bad.py:\d+: .*" + re.escape(message)):
        configs.load_config(str(path))


def test_config_must_be_a_literal(tmp_path):
    path = tmp_path / "code.py"
    path.write_text("LR = [1e-3]\nSWEEP = {'dataset': 'RotatedDigits', 'lr': LR}\n")
    with pytest.raises(configs.ConfigError, match="SWEEP must be a literal"):
        configs.load_config(str(path))
    with pytest.raises(FileNotFoundError, match="'nope'.*pacs_w4a4"):
        configs.load_config("nope")


@pytest.mark.parametrize("name, dataset, bits, steps", [
    ("pacs_w4a4", "PACS", 4, (5000, 20000)), ("pacs_w3a3", "PACS", 3, (5000, 20000)),
    ("domainnet_w4a4", "DomainNet", 4, (15000, 50000)),
    ("domainnet_w3a3", "DomainNet", 3, (15000, 50000))])
def test_configs_agree_with_the_hparams_registry(name, dataset, bits, steps):
    """The configs' grids are the paper's as transcribed in hparams.py (sec. 4.1)."""
    fp, qat, gaqat = configs.load_config(name).stages
    assert sorted(fp.grid.axes["lr"]) == sorted(qat.grid.axes["lr"]) == sorted(LR_GRID)
    assert {k: sorted(v) for k, v in gaqat.grid.axes.items()} == {
        k: sorted(v) for k, v in GAQAT_GRIDS[dataset, bits].items()}
    assert (fp.steps, qat.steps, gaqat.steps) == (*steps, steps[1])


def test_configs_parse_once_into_frozen_objects():
    """The parse makes each object whole (defaults from the dataclasses, "paper" grids
    resolved, slurm sections merged); nothing can change it afterwards."""
    config = configs.load_config("pacs_w4a4")
    fp, gaqat = config.stage("fp"), config.stage("gaqat")
    assert (fp.members, fp.eval_from, fp.init_from, fp.hparams_from) == (1, 0, None, None)
    assert gaqat.grid.axes["gaqat_K"] == (300, 350, 400)  # "paper" at W4A4, sorted
    assert gaqat.hparams_from == configs.StageRef("qat", "SAGM_LSQ", ("lr",))
    assert (fp.slurm.time_min, gaqat.slurm.time_min, fp.slurm.cpus) == (180, 720, 8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fp.steps = 1
    for mapping in (fp.hparams, gaqat.grid.axes, config.hparams):
        with pytest.raises(TypeError):
            mapping["lr"] = (1e-3,)
    assert configs.load_config("pacs_w4a4") == config  # the same parse, the same object
    with pytest.raises(configs.ConfigError, match=r"--stage 'x': expected one of \['fp', 'qat'"):
        config.stage("x")
