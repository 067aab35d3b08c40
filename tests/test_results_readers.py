"""Reading results you can trust: records missing fields skipped, repeated lines and restarts
counted once, run folders reached through symbolic links (loops ended), copied runs counted
once, a model checked against the data it is scored on and against its run folder."""

import json
import os
import shutil

import pytest
from support.helpers import gaqat, write_run

from domainbed_gaqat.ensemble import check_model_file
from domainbed_gaqat.experiments.results import distinct, find_runs, read_run, run_folders
from domainbed_gaqat.plugin.data import Data

HPARAMS = {"lr": 5e-5, "w_bits": 4, "a_bits": 4}
ACCS = {0: ({0: 0.5}, {0: 0.5, 1: 0.6}), 10: ({0: 0.7}, {0: 0.7, 1: 0.8})}


def test_records_missing_fields_are_skipped_naming_them(tmp_path):
    write_run(tmp_path / "r", "LSQ", 4, [0], 0, ACCS, HPARAMS)
    lines = (tmp_path / "r" / "results.jsonl").read_text().splitlines()
    broken = [json.loads(line) for line in lines]
    del broken[0]["env0_out_acc"]
    del broken[1]["args"]["dataset"]
    (tmp_path / "r" / "results.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in broken) + lines[1] + "\n")
    run = read_run(str(tmp_path / "r"))
    assert [r["step"] for r in run.records] == [10]  # only the complete line
    assert any(":1: missing env0_out_acc, skipped" in p for p in run.problems)
    assert any(":2: missing args.dataset, skipped" in p for p in run.problems)


def test_repeated_lines_and_a_restart_count_once(tmp_path):
    folder = tmp_path / "r"
    write_run(folder, "LSQ", 4, [0], 0, {**ACCS, 20: ({0: 0.9}, {0: 0.9, 1: 0.9})}, HPARAMS)
    lines = (folder / "results.jsonl").read_text().splitlines(keepends=True)
    (folder / "results.jsonl").write_text("".join(lines[:2] + lines[1:2] + lines[2:]))
    run = read_run(str(folder))
    assert [r["step"] for r in run.records] == [0, 10, 20]
    assert any(":3: repeats line 2, counted once" in p for p in run.problems)
    restarted = lines[:3] + lines[:1] + [lines[1].replace("0.7", "0.75")]  # 0,10,20 then 0,10
    (folder / "results.jsonl").write_text("".join(restarted))
    run = read_run(str(folder))
    assert [r["step"] for r in run.records] == [0, 10]
    assert run.records[1]["env0_in_acc"] == 0.75  # the restarted run's records
    (folder / "results.jsonl").write_text("".join(lines + lines))  # a file appended to itself
    assert [r["step"] for r in read_run(str(folder)).records] == [0, 10, 20]
    assert any("step 0 after step 20 (a restart)" in p for p in run.problems)


def test_symlinked_run_folders_are_followed_and_loops_end(tmp_path):
    write_run(tmp_path / "elsewhere" / "a", "LSQ", 4, [0], 0, ACCS, HPARAMS)
    write_run(tmp_path / "tree" / "b", "LSQ", 4, [1], 0, ACCS, HPARAMS)
    os.symlink(tmp_path / "elsewhere" / "a", tmp_path / "tree" / "a")
    os.symlink(tmp_path / "tree", tmp_path / "tree" / "loop")  # a cycle
    os.symlink(tmp_path / "tree" / "b", tmp_path / "tree" / "b_again")  # b twice
    found = run_folders([str(tmp_path / "tree")])
    assert sorted(os.path.basename(p) for p in found) == ["a", "b"]


def test_a_copied_run_counts_once_in_tables(tmp_path, capsys):
    for trial in (0, 1):
        write_run(tmp_path / "tree" / f"t{trial}", "LSQ", 4, [0], trial,
                  {0: ({0: 0.5 + trial / 10}, {0: 0.5, 1: 0.6})}, HPARAMS)
    shutil.copytree(tmp_path / "tree" / "t0", tmp_path / "tree" / "t0_copy")
    runs, notes = distinct(find_runs([str(tmp_path / "tree")], progress=False))
    assert [os.path.basename(r.path) for r in runs] == ["t0", "t1"]
    assert notes == [f"{tmp_path / 'tree' / 't0_copy'} is a copy of {tmp_path / 'tree' / 't0'}: "
                     "counted once"]
    assert gaqat("tables", "--input_dir", str(tmp_path / "tree"), "--format", "csv") == 0
    out, err = capsys.readouterr()
    assert "is a copy of" in err
    avg = [line.split(",") for line in out.splitlines() if ",Avg," in line]
    assert avg and avg[0][-1] == "2"  # two trials, not three


def test_a_model_of_another_dataset_is_refused():
    data = Data("RotatedDigits", None, [0], {"data_augmentation": False,
                                             "class_balanced": False})
    ckpt = {"args": {"dataset": "Debug28"}, "model_num_classes": 2,
            "model_input_shape": [3, 28, 28]}
    with pytest.raises(ValueError, match=r"trained on 'Debug28' \(2 classes, input "
                                         r"\(3, 28, 28\)\); 'RotatedDigits' has 10 classes, "
                                         r"input \(3, 32, 32\)"):
        data.check_model(ckpt)
    data.check_model({**ckpt, "model_num_classes": 10, "model_input_shape": [3, 32, 32]})


def test_an_ensemble_member_model_must_record_its_folders_run(tmp_path):
    write_run(tmp_path / "m", "LSQ", 4, [0], 0, ACCS, HPARAMS)
    run = read_run(str(tmp_path / "m"))
    ckpt = {"args": dict(run.args), "model_hparams": dict(HPARAMS)}
    check_model_file(run, "model.pkl", ckpt)  # its own
    with pytest.raises(ValueError, match=r"not the model of the run in .*: it records "
                                         r"seed 7 \(folder: 0\)"):
        check_model_file(run, "model.pkl", {**ckpt, "args": {**ckpt["args"], "seed": 7}})
    with pytest.raises(ValueError, match=r"test_envs \[1\] \(folder: \[0\]\)"):
        check_model_file(run, "model.pkl", {**ckpt, "args": {**ckpt["args"], "test_envs": [1]}})
