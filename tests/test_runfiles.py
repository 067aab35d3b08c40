"""A run folder's files through stops: one owner, records rolled back aside (never deleted),
temporary files of killed writes removed, a folder of another run refused by what differs."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from support.helpers import subprocess_env

from domainbed_gaqat.experiments.ownership import RunFolderBusy, RunLock, holder
from domainbed_gaqat.experiments.runfiles import RunFiles
from domainbed_gaqat.experiments.runs import RunSpec
from domainbed_gaqat.options import CommandFailed

SPEC = RunSpec("GAQAT", "PACS", (0,), {"lr": 5e-5, "gaqat_K": 350, "init_path": "/a/m.pkl"},
               seed=3, steps=100)


def _record(step: int, spec: RunSpec = SPEC) -> str:
    args = {**spec.to_dict(), "output_dir": "/x", "data_dir": "/d"}
    args.pop("hparams")
    return json.dumps({"step": step, "args": args, "hparams": dict(spec.hparams)})


def test_roll_back_keeps_the_first_records_and_moves_the_rest_aside(tmp_path):
    folder = RunFiles(str(tmp_path))
    lines = [_record(s) + "\n" for s in (0, 10, 20)] + ['{"step": 30, "to']
    (tmp_path / "results.jsonl").write_text("".join(lines))
    with folder.owned():
        assert folder.records_written() == 3
        assert folder.roll_back(1) == 3
        assert (tmp_path / "results.jsonl").read_text() == lines[0]
        assert (tmp_path / "results.rolled_back.jsonl").read_text().splitlines() == [
            line.rstrip("\n") for line in lines[1:]]
        assert folder.roll_back(1) == 0  # nothing more
        with pytest.raises(ValueError, match="holds 1 records but the saved state was written "
                                             "after 2"):
            folder.roll_back(2)


def test_temporary_files_of_killed_writes_are_removed(tmp_path):
    names = [".resume.pt.abc123_x.pt", ".model.pkl.k2j3h4.pkl", ".done.zz9",
             ".model_step40.pkl.q.pkl", ".results.jsonl.a1b2.jsonl"]
    kept = [".lock_not_ours", "resume.pt", ".hidden_user_file", "model.pkl"]
    for name in names + kept:
        (tmp_path / name).write_text("x")
    with RunFiles(str(tmp_path)).owned():
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + [".lock"])


def test_a_folder_of_another_run_is_refused_by_what_differs(tmp_path):
    folder = RunFiles(str(tmp_path))
    (tmp_path / "results.jsonl").write_text(_record(0) + "\n")
    moved = RunSpec("GAQAT", "PACS", [0], {"gaqat_K": 350.0, "lr": 0.00005,
                                           "init_path": "/elsewhere/m.pkl"}, seed=3, steps=100)
    folder.check_holds(moved, None)  # the same run: paths and spelling do not count
    other = RunSpec("GAQAT", "PACS", (0,), {**SPEC.hparams, "gaqat_K": 300}, seed=4, steps=100)
    with pytest.raises(ValueError) as info:
        folder.check_holds(other, None)
    assert "hparams.gaqat_K 350 (now 300), seed 3 (now 4)" in str(info.value)
    state = {"spec": other.to_dict()}
    folder.check_holds(other, state)  # the saved state names the run first
    assert RunSpec(**other.to_dict()) == other


def test_one_owner_per_folder(tmp_path):
    lock = RunLock(str(tmp_path))
    lock.acquire()
    with pytest.raises(RunFolderBusy, match="in use by this process already"):
        RunLock(str(tmp_path)).acquire()
    code = textwrap.dedent(f"""
        import sys
        from domainbed_gaqat.experiments.ownership import RunLock, holder
        print(holder({str(tmp_path)!r})["pid"])
        try:
            RunLock({str(tmp_path)!r}).acquire()
        except ValueError as err:
            print(err)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=subprocess_env(), timeout=120).stdout.splitlines()
    assert out[0] == str(os.getpid())
    assert f"is in use by process {os.getpid()} on host" in out[1]
    lock.release()
    assert holder(str(tmp_path)) is None
    RunLock(str(tmp_path)).acquire()  # free again


def test_os_faults_become_one_plain_line(tmp_path):
    os.chmod(tmp_path, 0o500)
    try:
        folder = RunFiles(str(tmp_path / "run"))
        if os.geteuid() == 0:  # root writes anywhere: make the parent a file instead
            os.chmod(tmp_path, 0o700)
            (tmp_path / "file").write_text("")
            folder = RunFiles(str(tmp_path / "file" / "run"))
        with pytest.raises(CommandFailed, match=r"cannot create the run folder .*run: "):
            with folder.owned():
                pass
    finally:
        os.chmod(tmp_path, 0o700)
    good = RunFiles(str(tmp_path / "ok"))
    with good.owned():
        good.save_model("model.pkl", {"a": torch.ones(2)})
    assert torch.equal(torch.load(tmp_path / "ok" / "model.pkl", weights_only=True)["a"],
                       torch.ones(2))
