"""gaqat-tables against hand-computed values from records written here, and on a real
two-stage sweep of the offline dataset."""

import io
import json
import math
import os
import shutil

import pandas as pd
import pytest
from domainbed.lib import reporting
from support.helpers import PYTHON, gaqat, run, write_run

from domainbed_gaqat.experiments import plots, tables

SE2 = 5 / math.sqrt(2)  # standard error of two values 5 apart (population std / sqrt(n))


def outs(test: float, train: float, test_env: int = 0) -> dict:
    return {e: (test if e == test_env else train) for e in range(4)}


LSQ = {"w_bits": 4, "a_bits": 4, "lr": 1e-5}


@pytest.fixture
def pacs(tmp_path):
    """PACS, LSQ 4/4: two grid points (a, b) for test env 0 and one run for test env 1, two
    trials; an ERM_FP run; a two-env LSQ run whose domains are covered by single-env runs."""
    for trial in (0, 1):
        shift = 0.1 * trial  # trial 1: test-domain accuracies 10 points higher
        write_run(tmp_path / f"a{trial}", "LSQ", 4, [0], trial, {
            0: ({0: 0.50 + shift}, outs(0.70, 0.85)),
            100: ({0: 0.55 + shift}, outs(0.65, 0.60))}, LSQ)
        write_run(tmp_path / f"b{trial}", "LSQ", 4, [0], trial, {
            0: ({0: 0.40 + shift}, outs(0.62, 0.95)),
            100: ({0: 0.45 + shift}, outs(0.66, 0.90))}, LSQ | {"lr": 3e-5})
        write_run(tmp_path / f"c{trial}", "LSQ", 4, [1], trial, {
            100: ({1: 0.70 + shift}, outs(0.50, 0.80 + shift, test_env=1))}, LSQ)
    write_run(tmp_path / "erm", "ERM_FP", 4, [0], 0, {50: ({0: 0.8}, outs(0.7, 0.9))}, {})
    write_run(tmp_path / "pair", "LSQ", 4, [0, 1], 0, {0: ({0: 1.0, 1: 1.0}, {})}, LSQ)
    return tmp_path


# rule -> hand-computed (val, test) of env 0 in trials 0 and 1:
# test: per run best test-domain out acc: a@0 (0.70) beats b@100 (0.66) -> a@0
# test_last: a@100 (0.65) vs b@100 (0.66) -> b@100; train: best val: b@0 (0.95)
ENV0 = {"test": [(85, 50), (85, 60)], "test_last": [(90, 45), (90, 55)],
        "train": [(95, 40), (95, 50)]}


@pytest.mark.parametrize("rule", sorted(ENV0))
def test_rules_single_env_trials(pacs, rule):
    entries = [(run, 0) for run in tables.find_runs([str(pacs)])]
    table, notes = tables.summarize(tables.select_cells(entries, rule, []), [])
    lsq = table[table.algorithm == "LSQ"].set_index("domain")
    (v0, t0), (v1, t1) = ENV0[rule]
    expected = {  # domain: val_mean, val_se, test_mean, test_se, n_trials
        "A": (v0, 0, (t0 + t1) / 2, SE2, 2),
        "C": (85, SE2, 75, SE2, 2),  # run c: val 80 / 90, test 70 / 80
        "Avg": ((v0 + 85) / 2, SE2 / 2, (t0 + t1) / 2 / 2 + 75 / 2, SE2, 2),
    }
    for domain, values in expected.items():
        got = lsq.loc[domain, ["val_mean", "val_se", "test_mean", "test_se", "n_trials"]]
        assert list(got) == pytest.approx(values), domain
    erm = table[table.algorithm == "ERM_FP"]
    assert list(erm.bits) == ["Full"] and list(erm.domain) == ["A"]  # no Avg: C missing
    assert list(erm[["val_mean", "test_mean", "val_se"]].iloc[0]) == pytest.approx([90, 80, 0])
    assert list(table.algorithm.drop_duplicates()) == ["ERM_FP", "LSQ"]
    assert notes == ["PACS ('LSQ', '4/4'): runs with test envs [0, 1] not shown (each of "
                     "their domains comes from a smaller group)"]


def test_group_test_envs_and_eval_from(tmp_path, capsys):
    """DomainNet groups: one choice per group (both test domains), so both share the val."""
    gaqat_hp = {"w_bits": 3, "a_bits": 3, "gaqat_r": 0.02}
    train = {2: 0.7, 3: 0.7, 4: 0.7, 5: 0.7}
    write_run(tmp_path / "p", "GAQAT", 6, [0, 1], 0, {
        0: ({0: 0.10, 1: 0.10}, {0: 0.99, 1: 0.99, **train}),  # before eval_from
        45000: ({0: 0.55, 1: 0.20}, {0: 0.50, 1: 0.30, **train})}, gaqat_hp)
    write_run(tmp_path / "q", "GAQAT", 6, [0, 1], 0, {
        45000: ({0: 0.25, 1: 0.65}, {0: 0.20, 1: 0.70, 2: 0.6, 3: 0.6, 4: 0.6, 5: 0.6})},
        gaqat_hp | {"gaqat_r": 0.03})
    write_run(tmp_path / "r", "GAQAT", 6, [2, 3], 0, {
        45000: ({2: 0.33, 3: 0.44}, {0: 0.5, 1: 0.5, 4: 0.5, 5: 0.5})}, gaqat_hp)
    argv = ["--input_dir", str(tmp_path), "--format", "csv", "--eval_from", "45000"]

    def table(*extra: str) -> dict:
        assert gaqat("tables", *argv, *extra) == 0
        frame = pd.read_csv(io.StringIO(capsys.readouterr().out))
        return {d: [v, t] for d, v, t in frame[["domain", "val_mean", "test_mean"]].values}

    # test-domain validation: q (mean test-domain out 0.45) beats p (0.40)
    expected = {"clip": [60, 25], "info": [60, 65], "paint": [50, 33], "quick": [50, 44],
                "Avg": [55, 41.75]}
    got = table()
    assert got.keys() == expected.keys()
    assert all(got[d] == pytest.approx(expected[d]) for d in expected)
    assert table("--selection", "train")["clip"] == pytest.approx([70, 55])  # p: val 0.70
    argv[-1] = "0"  # p's step 0 counts: test-domain out 0.99
    assert table()["info"] == pytest.approx([70, 10])


def test_truncated_line_and_incomplete_runs_are_reported(pacs, capsys):
    write_run(pacs / "killed", "LSQ", 4, [2], 0, {0: ({2: 0.3}, outs(0.3, 0.3, 2))}, LSQ,
              done=False, tail='{"step": 300, "args": {"dataset": "PA')
    write_run(pacs / "done_but_cut", "LSQ", 4, [3], 0, {0: ({3: 0.4}, outs(0.6, 0.7, 3))}, LSQ,
              tail='{"step": 300, "env')
    os.makedirs(pacs / ("0" * 32))  # launched by DomainBed's Job.launch, not started yet
    # DomainBed's reader, as the plugin installs it: the cut lines are skipped, with a warning
    records = reporting.load_records(str(pacs))
    assert len(records) == 2 * (2 + 2 + 1) + 4  # two trials of a, b, c; erm, pair, killed, cut
    warned = capsys.readouterr().err
    for folder in ("killed", "done_but_cut"):
        assert f"warning: {pacs / folder / 'results.jsonl'}:2: truncated last line" in warned
    assert gaqat("tables", "--input_dir", str(pacs)) == 0
    captured = capsys.readouterr()
    for folder in ("killed", "done_but_cut"):
        assert f"{pacs / folder / 'results.jsonl'}:2: truncated last line" in captured.err
    assert f"incomplete run, not used: {pacs / 'killed'}: no 'done' file; last record at " \
           f"step 0" in captured.err
    assert f"incomplete run, not used: {pacs / ('0' * 32)}: no checkpoint record yet" \
           in captured.err
    # P: only the killed run; S: the cut run's first record; Avg: trial 0 has A, C and S
    assert "| A (val/test) | C (val/test) | S (val/test) | Avg (val/test) |" in captured.out
    assert "| LSQ | 4/4 | 85.00 ± 0.00 / 55.00 ± 3.54 | 85.00 ± 3.54 / 75.00 ± 3.54 | " \
           "70.00 ± 0.00 / 40.00 ± 0.00 | 78.33 ± 0.00 / 53.33 ± 0.00 |" in captured.out


def test_swad_model_row(tmp_path, capsys):
    """A run whose last record holds the SWAD model's accuracies adds the row
    ``<algorithm> (SWAD)`` right after its own, built from them (selection ``train``: the
    plain row picks step 0, val 90; the SWAD row has one model: val 80, test 66)."""
    qtdog = {"w_bits": 7}
    write_run(tmp_path / "r", "SWAD_QTDoG", 4, [0], 0, {
        0: ({0: 0.5}, outs(0.6, 0.9)), 200: ({0: 0.55}, outs(0.7, 0.7))}, qtdog)
    write_run(tmp_path / "q", "QTDoG", 4, [0], 0, {200: ({0: 0.4}, outs(0.5, 0.5))}, qtdog)
    results = tmp_path / "r" / "results.jsonl"
    lines = results.read_text().splitlines()
    last = json.loads(lines[-1])
    last.update({f"swad_env{e}_{s}_acc": v for e in range(4)
                 for s, v in (("in", 0.66 if e == 0 else 0.1), ("out", 0.8))})
    results.write_text("\n".join([*lines[:-1], json.dumps(last)]) + "\n")
    assert gaqat("tables", "--input_dir", str(tmp_path), "--format", "csv", "--selection",
                 "train") == 0
    table = pd.read_csv(io.StringIO(capsys.readouterr().out))
    rows = table[table.domain == "A"].set_index("algorithm")
    assert list(rows.index) == ["QTDoG", "SWAD_QTDoG", "SWAD_QTDoG (SWAD)"]
    assert list(rows.loc["SWAD_QTDoG", ["val_mean", "test_mean"]]) == pytest.approx([90, 50])
    assert list(rows.loc["SWAD_QTDoG (SWAD)", ["val_mean", "test_mean"]]) == pytest.approx(
        [80, 66])
    assert rows.loc["SWAD_QTDoG (SWAD)", "bits"] == "7/FP"
    # the plots: the SWAD row is its one model at the last step, the plain row the run's curve
    entries = [(run, 0) for run in tables.find_runs([str(tmp_path)])]
    found = plots.cell_curves(tables.with_swad(entries),
                              tables.select_cells(entries, "train", []), "train")
    [curves] = found.values()
    swad, plain = curves["SWAD_QTDoG (SWAD)", "7/FP"], curves["SWAD_QTDoG", "7/FP"]
    assert [(c.steps, c.values["test"], c.chosen) for c in swad] == [((200,), (66.0,), 200)]
    assert [(c.steps, c.chosen) for c in plain] == [((0, 200), 0)]


def test_latex_and_errors(pacs, capsys):
    assert gaqat("tables", *["--input_dir", str(pacs), "--format", "latex",
                        "--selection", "train"]) == 0
    out = capsys.readouterr().out
    assert r"LSQ & 4/4 & 95.00 $\pm$ 0.00 / 45.00 $\pm$ 3.54 &" in out
    assert r"\begin{tabular}{llccc}" in out and r"ERM\_FP & Full" in out
    assert gaqat("tables", "--input_dir", str(pacs / "nope")) == 2
    assert "--input_dir" in capsys.readouterr().err
    empty = pacs / "empty"
    empty.mkdir()
    assert gaqat("tables", "--input_dir", str(empty)) == 1


E2E_CONFIG = {
    "dataset": "RotatedDigits", "test_envs": [[5]], "trials": 1, "bits": [4, 4],
    "hparams": {"batch_size": 8},
    "stages": [
        {"name": "fp", "algorithms": ["ERM_FP"], "steps": 3, "checkpoint_freq": 2,
         "grid": {"lr": [1e-3, 3e-3]}},
        {"name": "qat", "algorithms": ["LSQ"], "steps": 3, "checkpoint_freq": 2,
         "init_from": {"stage": "fp", "algorithm": "ERM_FP"}, "grid": {"lr": [1e-4]}},
        {"name": "gaqat", "algorithms": ["GAQAT"], "steps": 3, "checkpoint_freq": 2,
         "init_from": {"stage": "fp", "algorithm": "ERM_FP"},
         "hparams_from": {"stage": "qat", "algorithm": "LSQ", "keys": ["lr"]},
         "hparams": {"gaqat_r": 0.3, "gaqat_K": 2}},
    ],
}


def read_folder(folder) -> list[list[dict]]:
    runs = []
    for name in sorted(os.listdir(folder)):
        if os.path.isdir(folder / name):
            with open(folder / name / "results.jsonl") as f:
                runs.append([json.loads(line) for line in f])
    return runs


@pytest.mark.slow
def test_real_two_stage_sweep(tmp_path, capsys):
    """gaqat-sweep (local launcher, DomainBed's train.py) -> gaqat-tables -> collect_results."""
    config = tmp_path / "tiny.py"
    config.write_text(f"SWEEP = {E2E_CONFIG!r}\n")
    common = [str(config), "--output_dir", str(tmp_path / "out"), "--data_dir", str(tmp_path)]
    run([PYTHON, "-m", "domainbed_gaqat", "sweep", "launch", *common, "--command_launcher",
         "local", "--skip_confirmation"], timeout=900)
    fp_dir, q_dir = (tmp_path / "out" / "RotatedDigits" / f for f in ("fp", "w4a4"))
    fp_runs, q_runs = read_folder(fp_dir), read_folder(q_dir)
    assert len(fp_runs) == 2 and len(q_runs) == 2
    assert all(len(r) == 2 and [x["step"] for x in r] == [0, 2] for r in fp_runs + q_runs)
    # stage 2 starts from the fp run whose last checkpoint has the best test-domain out acc
    best_fp = max(fp_runs, key=lambda r: r[-1]["env5_out_acc"])
    init = {r[0]["args"]["algorithm"]: r[0]["hparams"]["init_path"] for r in q_runs}
    assert init["LSQ"] == init["GAQAT"] == os.path.join(best_fp[0]["args"]["output_dir"],
                                                        "model.pkl")
    assert {r[0]["hparams"]["lr"] for r in q_runs} == {1e-4}  # GAQAT: LSQ's chosen lr

    proc = run([PYTHON, "-m", "domainbed_gaqat", "tables", *common, "--format", "csv"])
    frame = pd.read_csv(io.StringIO(proc.stdout)).set_index(["algorithm", "domain"])
    for algorithm, runs in (("ERM_FP", fp_runs), ("LSQ", q_runs), ("GAQAT", q_runs)):
        records = [x for r in runs if r[0]["args"]["algorithm"] == algorithm for x in r]
        best = max(records, key=lambda x: x["env5_out_acc"])  # first one on ties, as the rule
        assert frame.loc[(algorithm, "75"), "test_mean"] == pytest.approx(
            100 * best["env5_in_acc"], abs=1e-4)
        assert frame.loc[(algorithm, "Avg"), "test_mean"] == frame.loc[
            (algorithm, "75"), "test_mean"]
    assert list(frame.bits) == ["Full", "Full", "4/4", "4/4", "4/4", "4/4"]

    # the same table from a copy elsewhere, read with another --data_dir, and from a tree
    # merged from two "clusters"; a run that was not copied is listed, not silently dropped
    moved = tmp_path / "laptop" / "results"
    shutil.copytree(tmp_path / "out", moved)
    for folder, cluster in ((fp_dir, "a"), (q_dir, "b")):
        shutil.copytree(folder, tmp_path / "merged" / cluster / folder.name)
    for root in (moved, tmp_path / "merged"):
        again = run([PYTHON, "-m", "domainbed_gaqat", "tables", str(config), "--output_dir",
                     str(root), "--data_dir", str(tmp_path / "elsewhere"), "--format", "csv"])
        assert again.stdout == proc.stdout
    shutil.rmtree(next(p for p in (moved / "RotatedDigits" / "w4a4").iterdir()
                       if json.loads((p / "results.jsonl").read_text().splitlines()[0])
                       ["args"]["algorithm"] == "GAQAT"))
    partial = run([PYTHON, "-m", "domainbed_gaqat", "tables", str(config), "--output_dir",
                   str(moved), "--format", "csv"])
    assert "stage 'gaqat': 1 of 1 jobs have no run under" in partial.stderr
    assert "GAQAT" not in partial.stdout and "LSQ" in partial.stdout

    # DomainBed's collect_results runs on both folders; its training-domain validation equals
    # ours where one run per cell (no ties between runs to break differently)
    assert gaqat("tables", *common, "--format", "csv", "--selection", "train") == 0
    ours = pd.read_csv(io.StringIO(capsys.readouterr().out)).set_index(["algorithm", "domain"])
    for folder, names in ((fp_dir, ["ERM_FP"]), (q_dir, ["LSQ", "GAQAT"])):
        proc = run([PYTHON, "-m", "domainbed.scripts.collect_results", "--input_dir",
                    str(folder)])
        assert f"Total records: {2 * len(read_folder(folder))}" in proc.stdout
        iid = proc.stdout.split("model selection method: training-domain")[1]
        for name in names:
            row = next(line.split() for line in iid.splitlines() if line.split()[:1] == [name])
            assert row[1:6] == ["X"] * 5 and row[7] == "+/-"  # test env 5 only
            if name != "ERM_FP":
                assert row[6] == f"{ours.loc[(name, '75'), 'test_mean']:.1f}"
