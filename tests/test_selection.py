"""Model selection and the tables against :mod:`references` (DomainBed's test-domain and
training-domain validation as ``experiments/selection.py`` states them, with its tie-break).

Random sweeps (hypothesis): runs of several algorithms, bit-widths, GAQAT ``r`` / ``K`` values,
trials and grid points, PACS's single test domains and DomainNet's pairs, unfinished runs,
``eval_from``. Accuracies are multiples of 1/16, so means are exact and ties frequent: the
tie-break (earlier step, then the first run by folder path) decides many cells.
"""

import io

import pandas as pd
import pytest
from domainbed import datasets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.helpers import gaqat, write_run
from support.references import choose_reference, swad_rows, table_reference

from domainbed_gaqat.experiments import tables
from domainbed_gaqat.experiments.results import RunFolder
from domainbed_gaqat.experiments.selection import SELECTION_RULES, choose

TEST_RULE = SELECTION_RULES["test"].description
SETTINGS = settings(max_examples=80, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
GROUPS = {"PACS": [[0], [1], [2], [3]], "DomainNet": [[0, 1], [2, 3], [4, 5]],
          "ColoredMNIST": [[0], [1], [2]]}  # an odd number of envs too
ALGORITHMS = {"ERM_FP": {}, "LSQ": {"w_bits": 4, "a_bits": 4},
              "GAQAT": {"w_bits": 4, "a_bits": 4, "gaqat_r": 0.3, "gaqat_K": 350}}
ACCURACY = st.integers(0, 16).map(lambda k: k / 16)


@st.composite
def runs(draw, dataset: str | None = None) -> list[tuple[RunFolder, int]]:
    """``(run, eval_from)`` entries of one random sweep."""
    dataset = dataset or draw(st.sampled_from(sorted(GROUPS)))
    n_envs = datasets.num_environments(dataset)
    names = draw(st.lists(st.text("abcdef", min_size=1, max_size=3), min_size=1, max_size=12,
                          unique=True))
    entries = []
    for name in names:
        algorithm = draw(st.sampled_from(sorted(ALGORITHMS)))
        hparams = {"lr": draw(st.sampled_from([1e-5, 3e-5])), **ALGORITHMS[algorithm]}
        if "w_bits" in hparams and draw(st.booleans()):
            hparams.update(w_bits=3, a_bits=3)
        if algorithm == "GAQAT":
            hparams.update(gaqat_K=draw(st.sampled_from([300, 350])),
                           gaqat_r=draw(st.sampled_from([0.3, 0.32])))
        args = {"dataset": dataset, "algorithm": algorithm, "trial_seed": draw(st.integers(0, 1)),
                "test_envs": draw(st.sampled_from(GROUPS[dataset])), "hparams_seed": 0}
        steps = draw(st.lists(st.sampled_from([0, 100, 200, 300]), min_size=1, max_size=4,
                              unique=True))
        records = [{"step": step, "args": args, "hparams": hparams,
                    **{f"env{e}_{split}_acc": draw(ACCURACY) for e in range(n_envs)
                       for split in ("in", "out")}} for step in steps]
        if draw(st.booleans()):  # trained with SWAD: the last record has the SWAD model's
            last = max(records, key=lambda r: r["step"])
            last.update({f"swad_env{e}_{split}_acc": draw(ACCURACY) for e in range(n_envs)
                         for split in ("in", "out")})
        run = RunFolder(f"/sweep/{name}", records, done=draw(st.integers(0, 5)) > 0)
        entries.append((run, draw(st.sampled_from([0, 0, 100]))))
    return entries


def _reference_runs(entries: list[tuple[RunFolder, int]]) -> list[tuple[str, list[dict], int]]:
    """What the reference sees: the finished runs (only those count), and their SWAD models
    as runs of the ``<algorithm> (SWAD)`` rows."""
    finished = [(run.path, run.records, eval_from) for run, eval_from in entries if run.done]
    return finished + swad_rows(finished)


def _table(entries: list[tuple[RunFolder, int]], rule: str, split_by: list[str]) -> dict:
    table, _ = tables.summarize(tables.select_cells(entries, rule, split_by), split_by)
    out = {}
    for line in table.to_dict("records"):
        names = list(datasets.get_dataset_class(line["dataset"]).ENVIRONMENTS)
        domain = "Avg" if line["domain"] == "Avg" else names.index(line["domain"])
        row = (line["algorithm"], line["bits"], *(line[k] for k in split_by))
        out[line["dataset"], row, domain] = (line["val_mean"], line["val_se"],
                                             line["test_mean"], line["test_se"],
                                             line["n_trials"])
    return out


@SETTINGS
@given(runs(), st.sampled_from(sorted(SELECTION_RULES)),
       st.sampled_from([[], ["gaqat_K"], ["gaqat_r", "gaqat_K"]]))
def test_tables_match_the_reference(entries, rule: str, split_by: list[str]) -> None:
    """Every cell (val/test mean and s.e., number of trials), Avg included, and no other."""
    got = _table(entries, rule, split_by)
    want = table_reference(_reference_runs(entries), rule, split_by)
    assert got.keys() == want.keys()
    for key, values in want.items():
        assert got[key][:4] == pytest.approx(values[:4], rel=1e-12, abs=1e-9), key
        assert got[key][4] == values[4], key


@SETTINGS
@given(runs(), st.sampled_from(sorted(SELECTION_RULES)), st.booleans())
def test_choice_matches_the_reference(entries, rule: str, last: bool) -> None:
    """One cell's candidates (whatever their order): the same run and checkpoint."""
    candidates = [(run, eval_from) for run, eval_from in entries if run.done][::-1]
    got = choose(candidates, rule, last)
    want = choose_reference([(r.path, r.records, e) for r, e in candidates], rule, last)
    if want is None:
        assert got is None
    else:
        assert (got.run.path, got.record["step"]) == (want[0], want[1]["step"])


def _record(step: int, test_out: float, train_out: float, test_in: float) -> dict:
    args = {"dataset": "PACS", "algorithm": "LSQ", "test_envs": [0], "trial_seed": 0}
    return {"step": step, "args": args, "hparams": {"w_bits": 4, "a_bits": 4},
            "env0_in_acc": test_in, "env0_out_acc": test_out,
            **{f"env{e}_{s}_acc": train_out for e in (1, 2, 3) for s in ("in", "out")}}


@pytest.mark.parametrize("rule", sorted(SELECTION_RULES))
def test_ties_go_to_the_earlier_step_then_the_first_run_by_path(rule: str) -> None:
    """Equal criteria everywhere: run ``/a`` (first by path, given last) at its first step
    for ``test`` / ``train``, its last step for ``test_last``."""
    b = RunFolder("/b", [_record(0, 0.5, 0.75, 0.1), _record(10, 0.5, 0.75, 0.2)], True)
    a = RunFolder("/a", [_record(10, 0.5, 0.75, 0.3), _record(0, 0.5, 0.75, 0.4)], True)
    choice = choose([(b, 0), (a, 0)], rule)
    assert choice.run is a
    assert choice.record["step"] == (10 if rule == "test_last" else 0)
    assert choice.tests == {0: 0.3 if rule == "test_last" else 0.4}
    better = RunFolder("/c", [_record(5, 0.5 + (rule != "train") / 16,
                                      0.75 + (rule == "train") / 16, 0.9)], True)
    assert choose([(b, 0), (a, 0), (better, 0)], rule).run is better  # not a tie: the best


def test_runs_without_a_usable_record_are_skipped() -> None:
    """A run (first by path) whose records all precede its ``eval_from`` does not stop the
    search: the later runs are still candidates."""
    early = RunFolder("/a", [_record(0, 1.0, 1.0, 1.0)], True)
    later = RunFolder("/b", [_record(10, 0.5, 0.5, 0.25)], True)
    for rule in sorted(SELECTION_RULES):
        assert choose([(early, 5), (later, 5)], rule).run is later
    assert choose([(early, 5)], "test") is None


def test_unknown_rule_is_a_clear_error() -> None:
    run = RunFolder("/a", [_record(0, 0.5, 0.5, 0.5)], True)
    with pytest.raises(ValueError, match=r"selection rule 'best': expected one of "
                                         r"\['test', 'test_last', 'train'\]"):
        choose([(run, 0)], "best")


def test_split_by_from_the_command_line(tmp_path, capsys) -> None:
    """``gaqat tables --split_by``: one row per value (paper Tables 5 and 6), each from its
    own runs; without it the runs of every value share one row."""
    entries = []
    for i, (K, r, test_out, test_in) in enumerate([(300, 0.3, 0.5, 0.25), (350, 0.3, 0.75, 0.5),
                                                   (350, 0.32, 0.625, 0.875)]):
        hparams = {"w_bits": 4, "a_bits": 4, "gaqat_K": K, "gaqat_r": r}
        outs = {0: test_out, 1: 0.5, 2: 0.5, 3: 0.5}
        write_run(tmp_path / f"run{i}", "GAQAT", 4, [0], 0, {0: ({0: test_in}, outs)}, hparams)
        entries.append(tables.find_runs([str(tmp_path / f"run{i}")])[0])
    for split_by in (["gaqat_K"], ["gaqat_r"], ["gaqat_K", "gaqat_r"], []):
        argv = ["tables", "--input_dir", str(tmp_path), "--format", "csv"]
        assert gaqat(*argv, *(["--split_by", *split_by] if split_by else [])) == 0
        frame = pd.read_csv(io.StringIO(capsys.readouterr().out))
        got = {(*(row[k] for k in split_by), row["domain"]): row["test_mean"]
               for row in frame.to_dict("records")}
        want = table_reference([(r.path, r.records, 0) for r in entries], "test", split_by)
        assert got == {(*row[2:], "A" if domain == 0 else domain): pytest.approx(v[2])
                       for (_, row, domain), v in want.items()}
        assert len(got) == 2 * len({row for _, row, _ in want})  # A and Avg per row


# --- the table's layout ------------------------------------------------------------------------


def _pacs_run(path: str, algorithm: str, hparams: dict, env: int, test_in: float,
              train_out: float, test_out: float = 0.5) -> RunFolder:
    args = {"dataset": "PACS", "algorithm": algorithm, "test_envs": [env], "trial_seed": 0}
    record = {"step": 0, "args": args, "hparams": hparams,
              **{f"env{e}_{s}_acc": train_out for e in range(4) for s in ("in", "out")},
              f"env{env}_in_acc": test_in, f"env{env}_out_acc": test_out}
    return RunFolder(path, [record], True)


W4, W3 = {"w_bits": 4, "a_bits": 4}, {"w_bits": 3, "a_bits": 3}
LAYOUT = [  # given in an order unlike the table's
    _pacs_run("/r/5", "LSQ", W3, 0, 0.125, 0.25),
    _pacs_run("/r/4", "GAQAT", {**W4, "gaqat_K": 300}, 1, 0.75, 0.625),
    _pacs_run("/r/3", "GAQAT", {**W4, "gaqat_K": 300}, 0, 0.375, 0.625),
    _pacs_run("/r/2", "LSQ", W4, 0, 0.25, 0.5),
    _pacs_run("/r/1", "ERM_FP", {}, 1, 0.625, 0.75),
    _pacs_run("/r/0", "ERM_FP", {}, 0, 0.5, 0.875),
]
# rows: full precision first, then W/A from high to low, in the registry's order (paper
# Tables 2 and 3); "-": no cell (LSQ has no run for C, so no Avg)
CELLS = [("ERM_FP", "Full", "-", ["87.50 ± 0.00 / 50.00 ± 0.00", "75.00 ± 0.00 / 62.50 ± 0.00",
                                  "81.25 ± 0.00 / 56.25 ± 0.00"]),
         ("LSQ", "4/4", "-", ["50.00 ± 0.00 / 25.00 ± 0.00", "-", "-"]),
         ("GAQAT", "4/4", "300", ["62.50 ± 0.00 / 37.50 ± 0.00", "62.50 ± 0.00 / 75.00 ± 0.00",
                                  "62.50 ± 0.00 / 56.25 ± 0.00"]),
         ("LSQ", "3/3", "-", ["25.00 ± 0.00 / 12.50 ± 0.00", "-", "-"])]


def _render(fmt: str, split_by: list[str]) -> str:
    cells = tables.select_cells([(run, 0) for run in LAYOUT], "test", split_by)
    table, _ = tables.summarize(cells, split_by)
    return tables.render(table, split_by, fmt, "test")


def test_markdown_layout() -> None:
    rows = [f"| {a} | {b} | " + " | ".join(cells) + " |" for a, b, _, cells in CELLS]
    assert _render("markdown", []) == "\n".join([
        f"### PACS, model selection: {TEST_RULE}", "",
        "| Algorithm | W/A | A (val/test) | C (val/test) | Avg (val/test) |",
        "|---|---|---|---|---|", *rows, ""])


def test_latex_layout_with_a_split_column() -> None:
    rows = [f"{a.replace('_', chr(92) + '_')} & {b} & {k} & "
            + " & ".join(c.replace("±", "$\\pm$") for c in cells) + r" \\"
            for a, b, k, cells in CELLS]
    assert _render("latex", ["gaqat_K"]) == "\n".join([
        f"% PACS, model selection: {TEST_RULE}", r"\begin{tabular}{lllccc}", r"\toprule",
        r"Algorithm & W/A & gaqat\_K & A (val/test) & C (val/test) & Avg (val/test) \\",
        r"\midrule", *rows, r"\bottomrule", r"\end{tabular}", ""])


@pytest.mark.parametrize("fmt, title", [("markdown", "### "), ("latex", "% ")])
def test_one_table_per_dataset_in_name_order(fmt: str, title: str) -> None:
    """A VLCS run next to the PACS ones: PACS's table unchanged, then VLCS's."""
    vlcs = _pacs_run("/v/0", "ERM_FP", {}, 0, 0.5, 0.75)
    for record in vlcs.records:
        record["args"] = {**record["args"], "dataset": "VLCS"}
    cells = tables.select_cells([(run, 0) for run in [vlcs, *LAYOUT]], "test", [])
    text = tables.render(tables.summarize(cells, [])[0], [], fmt, "test")
    assert text.startswith(_render(fmt, []))
    assert [line for line in text.splitlines() if line.startswith(title)] == [
        f"{title}{d}, model selection: {TEST_RULE}" for d in ("PACS", "VLCS")]


def test_csv_layout() -> None:
    lines = _render("csv", []).splitlines()
    assert lines[0] == "dataset,algorithm,bits,domain,val_mean,val_se,test_mean,test_se,n_trials"
    assert lines[1] == "PACS,ERM_FP,Full,A,87.5000,0.0000,50.0000,0.0000,1"
    assert len(lines) == 1 + 3 + 1 + 3 + 1


def test_rows_of_one_algorithm_with_and_without_a_split_value() -> None:
    """A run recorded without the split hparam (an older run) is its own "-" row, after the
    numbered ones; datasets DomainBed does not know get env<i> domain names."""
    runs = [_pacs_run("/a", "GAQAT", W4, 0, 0.5, 0.5), _pacs_run("/b", "GAQAT", {**W4,
                                                                                "gaqat_K": 350},
                                                                 0, 0.25, 0.5)]
    table, _ = tables.summarize(tables.select_cells([(r, 0) for r in runs], "test",
                                                    ["gaqat_K"]), ["gaqat_K"])
    assert list(table.gaqat_K) == [350, 350, "-", "-"] and list(table.domain) == ["A", "Avg"] * 2
    for run in runs:
        run.records[0]["args"]["dataset"] = "NotInDomainBed"
    table, _ = tables.summarize(tables.select_cells([(r, 0) for r in runs], "test", []), [])
    assert list(table.domain) == ["env0", "Avg"]


def test_print_tables_arguments(tmp_path, capsys) -> None:
    """Either configs or run folders; configs need --output_dir; by default every checkpoint
    counts and the table is Markdown. On the command line, unknown rules and formats are
    errors."""
    with pytest.raises(ValueError, match=r"^give either configs \(with --output_dir\) or "
                                         r"--input_dir$"):
        tables.print_tables([], None)
    with pytest.raises(ValueError, match=r"^configs need --output_dir \(the folder holding "
                                         r"the sweep's runs\)$"):
        tables.print_tables(["pacs_w4a4"])
    write_run(tmp_path / "run", "LSQ", 4, [0], 0, {0: ({0: 0.5}, {0: 0.5})}, W4)
    assert tables.print_tables([], [str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("### PACS, model selection: ")
    for bad in (["--selection", "best"], ["--format", "html"]):
        with pytest.raises(SystemExit) as exit_info:
            gaqat("tables", "--input_dir", str(tmp_path), *bad)
        assert exit_info.value.code == 2
        assert "invalid choice" in capsys.readouterr().err


def test_members_are_repetitions_and_redrawn_points_alternatives() -> None:
    """Two grid points x three ensemble members (``args.member``): each member is a trial of
    the row, chosen among its own grid points; the same runs without member indices (a random
    search that drew each point three times) make one choice among all six."""
    acc = {(0, 1e-5): (0.5, 0.25), (0, 3e-5): (0.75, 0.5), (1, 1e-5): (0.875, 1.0),
           (1, 3e-5): (0.625, 0.0), (2, 1e-5): (0.25, 0.125), (2, 3e-5): (0.375, 0.75)}

    def entries(marked: bool) -> list[tuple[RunFolder, int]]:
        out = []
        for (m, lr), (test_out, test_in) in acc.items():
            record = _record(0, test_out, 0.5, test_in)
            record["args"] = {**record["args"], "algorithm": "QTDoG", "seed": 10 * m + (lr > 2e-5),
                              **({"member": m} if marked and m else {})}
            record["hparams"] = {"w_bits": 7, "lr": lr}
            out.append((RunFolder(f"/sweep/{m}{lr}", [record], True), 0))
        return out

    cells = tables.select_cells(entries(True), "test", [])
    want = sorted(100 * max((acc[m, lr] for lr in (1e-5, 3e-5)), key=lambda a: a[0])[1]
                  for m in range(3))
    assert sorted(c["tests"][0] for c in cells) == want == [50.0, 75.0, 100.0]
    assert {c["row"] for c in cells} == {("QTDoG", "7/FP")}  # weight-only: W/FP
    assert len({c["trial"] for c in cells}) == 3
    [alone] = tables.select_cells(entries(False), "test", [])
    assert alone["tests"][0] == 100 * max(acc.values(), key=lambda a: a[0])[1]
