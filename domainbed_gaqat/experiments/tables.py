"""``gaqat tables`` (also ``gaqat-tables``): the paper's tables from sweep outputs.

    gaqat tables CONFIG [CONFIG ...] --output_dir OUT --data_dir DATA   # the runs of sweeps/
    gaqat tables --input_dir DIR [DIR ...] [--eval_from STEP]           # any run folders
        [--selection test|test_last|train] [--split_by HPARAM ...] [--format markdown|latex|csv]
        [--plots DIR [--overwrite]]   # and the curves behind each cell (experiments/plots.py)

Rows: algorithm and W/A bit-width ("Full" for full precision), optionally split by hparams
(Tables 5 and 6); a run trained with SWAD adds its averaged model as the row ``<algorithm>
(SWAD)`` (from the ``swad_`` accuracies of its last record). Columns: the test domains, each
"val/test", and Avg. A cell is the mean +- standard error over trials of the chosen checkpoint's
accuracies (in %, DomainBed's convention: population std / sqrt(n)); the choice is made per
(row, test-env group, trial) by :mod:`domainbed_gaqat.experiments.selection`; "val" is the mean
training-domain validation accuracy and "test" the test-domain accuracy at that checkpoint (both
domains of a DomainNet group share the group's run, so their val is the same, as in the paper's
Table 3). Avg: per trial the mean over the domain columns, then mean +- standard error over the
trials that have them all. Only finished runs count; unfinished ones, unreadable lines and jobs
not launched are listed on stderr. Run folders are found through symbolic links too; a copied
run folder and a repeated record line count once, with a note.
"""

import json
import os
import sys
from collections import defaultdict

import numpy as np
import pandas as pd

from domainbed_gaqat.experiments import outputs
from domainbed_gaqat.experiments.configs import load_config
from domainbed_gaqat.experiments.plots import paths as plot_paths
from domainbed_gaqat.experiments.plots import write_plots
from domainbed_gaqat.experiments.results import Locator, RunFolder, distinct, find_runs
from domainbed_gaqat.experiments.selection import SELECTION_RULES, choose
from domainbed_gaqat.experiments.sweep import plan
from domainbed_gaqat.plugin.algorithms import ALGORITHMS

FORMATS = ("markdown", "latex", "csv")


def row_of(run: RunFolder, split_by: list[str]) -> tuple:
    """``(algorithm, "W/A" or "Full", split values...)`` of a run (``W/FP``: weights only)."""
    spec = run.spec
    bits = spec.quantized_bits
    label = "Full" if bits is None else "/".join(map(str, bits)) + ("/FP" if len(bits) == 1
                                                                     else "")
    return (spec.algorithm, label, *(spec.hparams.get(k, "-") for k in split_by))


SWAD_PREFIX, SWAD_ROW = "swad_", " (SWAD)"


def swad_run(run: RunFolder) -> RunFolder | None:
    """A run's SWAD model as a run of its own (None where it has none): one record, its last
    record with the ``swad_env{i}_{in,out}_acc`` accuracies (the averaged model's, which
    ``gaqat train`` adds to the last record) as ``env{i}_*_acc``, and the algorithm
    ``<algorithm> (SWAD)``, the path the run's with `` (SWAD)`` (the plots tell them apart): a
    row of the tables, selected like any other (among the grid's runs by the rule's criterion;
    its one checkpoint is the final model)."""
    if not run.records:
        return None
    last = max(run.records, key=lambda r: r["step"])
    swad = {k.removeprefix(SWAD_PREFIX): v for k, v in last.items()
            if k.startswith(SWAD_PREFIX + "env") and k.endswith("_acc")}
    if not swad:
        return None
    plain = {k: v for k, v in last.items()
             if not (k.startswith("env") and k.endswith("_acc")) and not k.startswith(SWAD_PREFIX)}
    args = {**last["args"], "algorithm": last["args"]["algorithm"] + SWAD_ROW}
    return RunFolder(run.path + SWAD_ROW, [{**plain, **swad, "args": args}], run.done)


def with_swad(entries: list[tuple[RunFolder, int]]) -> list[tuple[RunFolder, int]]:
    """``entries`` and their runs' SWAD models (:func:`swad_run`; every step counts)."""
    return [*entries, *((model, 0) for model in map(swad_run, (run for run, _ in entries))
                        if model)]


def repetitions(candidates: list[tuple[RunFolder, int]]) -> list[list[tuple[RunFolder, int]]]:
    """A cell's candidates as repetitions: ensemble members (runs recorded with ``--member``,
    a sweep stage's ``members``) are repetitions of the cell, the m-th holding every grid
    point's member m. Runs with equal hparams but no member index (a random search drew a
    point twice) stay alternatives of one choice."""
    by_member: dict[int, list] = defaultdict(list)
    for run, eval_from in candidates:
        by_member[run.spec.member].append((run, eval_from))
    return [by_member[m] for m in sorted(by_member)]


def select_cells(entries: list[tuple[RunFolder, int]], rule: str,
                 split_by: list[str]) -> list[dict]:
    """One chosen checkpoint per (dataset, row, test envs, trial) among finished runs; a run
    with a SWAD model (:func:`swad_run`) adds it to the ``<algorithm> (SWAD)`` row."""
    groups = defaultdict(list)
    for run, eval_from in with_swad(entries):
        if run.done and run.records:
            spec = run.spec
            key = (spec.dataset, row_of(run, split_by), tuple(sorted(spec.test_envs)),
                   spec.trial_seed)
            groups[key].append((run, eval_from))
    cells = []
    for (dataset, row, test_envs, trial), candidates in groups.items():
        repeated = repetitions(candidates)
        for m, repetition in enumerate(repeated):
            choice = choose(repetition, rule)
            if choice is not None:  # repetitions count as trials of the row
                cells.append({"dataset": dataset, "row": row, "test_envs": test_envs,
                              "trial": trial if len(repeated) == 1 else (trial, m),
                              "val": 100 * choice.val, "run": choice.run.path,
                              "step": choice.record["step"],
                              "tests": {e: 100 * a for e, a in choice.tests.items()}})
    return cells


def _mean_se(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values) / np.sqrt(len(values)))


def _env_names(dataset: str) -> list[str] | None:
    try:
        from domainbed import datasets

        return list(datasets.get_dataset_class(dataset).ENVIRONMENTS)
    except (ImportError, NotImplementedError):
        return None


def _row_order(row: tuple) -> tuple:
    """Full precision first, then by bits; then registry order, a SWAD row after its
    algorithm's."""
    algorithm, bits, *split = row
    order = list(ALGORITHMS)
    rank = (0, 0, 0) if bits == "Full" else (1, *(-int(b) if b != "FP" else -32
                                                   for b in bits.split("/")))
    base = algorithm.removesuffix(SWAD_ROW)
    return (rank, order.index(base) if base in order else len(order), algorithm,
            *((str(type(v)), v) for v in split))


def summarize(cells: list[dict], split_by: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """Long table (one line per dataset, row and domain or Avg) and notes on skipped groups."""
    by_row = defaultdict(lambda: defaultdict(dict))  # (dataset, row) -> test_envs -> trial -> cell
    for cell in cells:
        by_row[cell["dataset"], cell["row"]][cell["test_envs"]][cell["trial"]] = cell
    lines, notes = [], []
    for dataset in sorted({d for d, _ in by_row}):
        columns = sorted({e for c in cells if c["dataset"] == dataset for e in c["test_envs"]})
        names = _env_names(dataset) or [f"env{i}" for i in range(max(columns) + 1)]
        for row in sorted((r for d, r in by_row if d == dataset), key=_row_order):
            groups = by_row[dataset, row]
            source = {}  # domain -> the test-env group it is read from: the smallest one
            for group in sorted(groups, key=lambda g: (len(g), g)):
                used = [e for e in group if e not in source]
                source.update((e, group) for e in used)
                if not used:
                    notes.append(f"{dataset} {row}: runs with test envs {list(group)} not shown "
                                 f"(each of their domains comes from a smaller group)")
            per_trial = defaultdict(dict)  # trial -> domain -> (val, test)
            for env in columns:
                for trial, cell in groups.get(source.get(env), {}).items():
                    per_trial[trial][env] = cell["val"], cell["tests"][env]
            for env in [*columns, "Avg"]:
                if env == "Avg":
                    pairs = [np.mean(list(v.values()), axis=0) for v in per_trial.values()
                             if len(v) == len(columns)]
                else:
                    pairs = [v[env] for v in per_trial.values() if env in v]
                if pairs:
                    (vm, vs), (tm, ts) = (_mean_se([p[i] for p in pairs]) for i in (0, 1))
                    lines.append({"dataset": dataset, "algorithm": row[0], "bits": row[1],
                                  **dict(zip(split_by, row[2:])),
                                  "domain": env if env == "Avg" else names[env],
                                  "val_mean": vm, "val_se": vs, "test_mean": tm, "test_se": ts,
                                  "n_trials": len(pairs)})
    return pd.DataFrame(lines), notes


def _cell(line: pd.Series, pm: str) -> str:
    return (f"{line.val_mean:.2f} {pm} {line.val_se:.2f} / "
            f"{line.test_mean:.2f} {pm} {line.test_se:.2f}")


def render(table: pd.DataFrame, split_by: list[str], fmt: str, rule: str) -> str:
    """The long table as CSV, or as one wide Markdown / LaTeX table per dataset."""
    if fmt == "csv":
        return table.to_csv(index=False, float_format="%.4f")
    pm = r"$\pm$" if fmt == "latex" else "±"
    out = []
    for dataset, part in table.groupby("dataset", sort=False):
        keys = ["algorithm", "bits", *split_by]
        wide = (part.assign(cell=part.apply(_cell, axis=1, pm=pm))
                .pivot(index=keys, columns="domain", values="cell"))
        domains = list(dict.fromkeys(part["domain"]))
        wide = wide.reindex(index=list(dict.fromkeys(map(tuple, part[keys].values))),
                            columns=domains).fillna("-")
        header = ["Algorithm", "W/A", *split_by, *(f"{d} (val/test)" for d in domains)]
        rows = [[*map(str, index), *values] for index, values in zip(wide.index, wide.values)]
        title = f"{dataset}, model selection: {SELECTION_RULES[rule].description}"
        if fmt == "markdown":
            out += [f"### {title}", "", "| " + " | ".join(header) + " |",
                    "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows), ""]
        else:
            esc = [[c.replace("_", r"\_") for c in r] for r in [header, *rows]]
            out += [f"% {title}", r"\begin{tabular}{" + "l" * (2 + len(split_by))
                    + "c" * len(domains) + "}", r"\toprule", " & ".join(esc[0]) + r" \\",
                    r"\midrule", *(" & ".join(r) + r" \\" for r in esc[1:]), r"\bottomrule",
                    r"\end{tabular}", ""]
    return "\n".join(out)


def config_entries(names: list[str], output_dir: str, data_dir: str | None,
                   notes: list[str]) -> tuple[list[tuple[RunFolder, int]], list[str], list[str]]:
    """The runs under ``output_dir`` that the configs' planned jobs are (found by what they
    recorded, wherever the tree was moved: :class:`~.results.Locator`), each with its stage's
    ``eval_from``; the configs' ``split_by`` and selection rules. Jobs not found, and stages
    that cannot be planned yet, go to ``notes``."""
    found = find_runs([output_dir])
    locator = Locator(found)
    notes += locator.duplicates
    entries, split_by, rules, seen = [], [], [], set()
    for name in names:
        config = load_config(name)
        rules.append(config.selection)
        split_by += [k for k in config.table.split_by if k not in split_by]
        shown = config.table.algorithms
        for planned in plan(config, output_dir, data_dir or output_dir, locator):
            if planned.blocked:
                notes.append(f"{config.name}: {planned.blocked}")
            jobs = [j for j in planned.jobs
                    if shown is None or j.train_args["algorithm"] in shown]
            runs = [locator.find(j) for j in jobs]
            missing = sum(run is None for run in runs)
            if missing:
                notes.append(f"{config.name}: stage {planned.name!r}: {missing} of {len(jobs)} "
                             f"jobs have no run under {output_dir} (not launched, or not copied "
                             f"there)")
            for run in runs:
                if run is not None and run.path not in seen:
                    seen.add(run.path)
                    entries.append((run, planned.stage.eval_from))
    return entries, split_by, rules


def add_arguments(parser) -> None:
    parser.add_argument("--output_dir", help="with configs: the folder holding the sweep's "
                        "runs (moved or merged trees too: runs are found by what they recorded)")
    parser.add_argument("--data_dir", help="not needed: accepted for the commands of gaqat sweep")
    parser.add_argument("configs", nargs="*", help="sweeps/ config names or files")
    parser.add_argument("--input_dir", nargs="+", help="instead of configs: run folders")
    parser.add_argument("--eval_from", type=int, default=0,
                        help="with --input_dir: ignore checkpoints before this step")
    parser.add_argument("--selection", choices=sorted(SELECTION_RULES),
                        help="default: the configs' rule, else 'test'")
    parser.add_argument("--split_by", nargs="+", help="hparams that split rows (Tables 5, 6)")
    parser.add_argument("--format", choices=FORMATS, default="markdown")
    parser.add_argument("--ensembles", nargs="+", default=[],
                        help="records of gaqat ensemble (JSON files): EoQ rows")
    parser.add_argument("--plots", metavar="DIR", help="also a PNG per table cell here: accuracy "
                        "over steps (and GAQAT's frozen fraction and disorder)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing plots")


def run(args) -> int:
    return print_tables(args.configs, args.input_dir, args.output_dir, args.data_dir,
                        args.eval_from, args.selection, args.split_by, args.format,
                        args.ensembles, args.plots, args.overwrite)


def ensemble_entries(paths: list[str]) -> list[tuple[RunFolder, int]]:
    """``gaqat ensemble`` records as one-checkpoint finished runs."""
    entries = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"--ensembles {path!r}: not a record of gaqat ensemble ({err})"
                             ) from None
        if not isinstance(record, dict) or "members" not in record:
            raise ValueError(f"--ensembles {path!r}: not a record of gaqat ensemble")
        entries.append((RunFolder(path, [record], True), 0))
    return entries


def print_tables(configs: list[str], input_dirs: list[str] | None = None,
                 output_dir: str | None = None, data_dir: str | None = None, eval_from: int = 0,
                 selection: str | None = None, split_by: list[str] | None = None,
                 fmt: str = "markdown", ensembles: list[str] = (), plots: str | None = None,
                 overwrite: bool = False) -> int:
    """Print the tables of ``configs`` (their runs under ``output_dir``) or of the runs under
    ``input_dirs``, with EoQ rows from ``ensembles``, and write their curves to ``plots``
    (:mod:`~domainbed_gaqat.experiments.plots`); notes go to stderr. Returns 1 when no run is
    finished, else 0."""
    if bool(configs) == bool(input_dirs):
        raise ValueError("give either configs (with --output_dir) or --input_dir")
    notes: list[str] = []
    if configs:
        if not output_dir:
            raise ValueError("configs need --output_dir (the folder holding the sweep's runs)")
        entries, config_split, rules = config_entries(configs, output_dir, data_dir, notes)
    else:
        runs, copies = distinct(find_runs(input_dirs))
        notes += copies
        entries = [(run, eval_from) for run in runs]
        config_split, rules = [], ["test"]
    entries += ensemble_entries(list(ensembles))
    if len(set(rules)) > 1 and not selection:
        raise ValueError(f"the configs use different selection rules {rules}: pass --selection")
    rule = selection or rules[0]
    split_by = split_by or config_split
    runs = [run for run, _ in entries]
    notes += [p for run in runs for p in run.problems]
    notes += [f"incomplete run, not used: {run.status()}" for run in runs if not run.done]
    cells = select_cells(entries, rule, split_by)
    table, skipped = summarize(cells, split_by)
    for note in notes + skipped:
        print(f"note: {note}", file=sys.stderr)
    if table.empty:
        print("gaqat tables: no finished run to tabulate", file=sys.stderr)
        return 1
    if plots:
        outputs.check_new(list(plot_paths(cells, plots).values()), overwrite)
    print(render(table, split_by, fmt, rule))
    if plots:
        names = {d: _env_names(d) for d in {c["dataset"] for c in cells}}
        written = write_plots(with_swad(entries), cells, plots, rule, split_by, names,
                              overwrite)
        print(f"Wrote {len(written)} plots to {plots}: {', '.join(map(os.path.basename, written))}",
              file=sys.stderr)
    return 0

