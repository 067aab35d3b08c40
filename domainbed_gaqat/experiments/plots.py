"""``gaqat tables ... --plots DIR``: the curves behind each table cell.

One PNG per table cell (dataset x test-env group): accuracy over training steps, the
training-domain validation (the tables' "val": mean out-split accuracy of the training domains)
and the test-domain accuracy (in-split, the mean over the group's test domains), one line per
table row (algorithm, bits, split values): the mean over trials of the run the selection chose
in each trial, with a band from the trials' minimum to maximum, and each trial's chosen
checkpoint marked (a star). Where a row's runs record GAQAT's step statistics, two more panels
show the fraction of frozen scales (``frozen_frac``) and their mean gradient disorder
(``disorder_mean``, paper Eq. 4) over steps. Written atomically (``outputs.save_figure``).
"""

import os
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure

from domainbed_gaqat.experiments import outputs
from domainbed_gaqat.experiments.results import RunFolder
from domainbed_gaqat.experiments.selection import SELECTION_RULES, score

GAQAT_KEYS = {"frozen_frac": "fraction of frozen scales", "disorder_mean": "mean disorder"}


@dataclass(frozen=True)
class Curve:
    """One trial of one row: a run's values at its checkpoints, and the chosen step."""

    steps: tuple[int, ...]
    values: dict[str, tuple[float, ...]]  # "val", "test" (in %), GAQAT_KEYS when recorded
    chosen: int


def curve(run: RunFolder, test_envs: tuple[int, ...], chosen: int, rule: str) -> Curve:
    """The values of ``run``'s records (by step)."""
    records = sorted(run.records, key=lambda r: r["step"])
    values: dict[str, list[float]] = defaultdict(list)
    for record in records:
        scored = score(run, record, rule)
        values["val"].append(100 * scored.val)
        values["test"].append(100 * float(np.mean([scored.tests[e] for e in test_envs])))
    for key in GAQAT_KEYS:
        if all(key in r for r in records):
            values[key] = [float(r[key]) for r in records]
    return Curve(tuple(r["step"] for r in records), {k: tuple(v) for k, v in values.items()},
                 chosen)


def cell_curves(entries: list[tuple[RunFolder, int]], cells: list[dict],
                rule: str) -> dict[tuple, dict[tuple, list[Curve]]]:
    """``{(dataset, test_envs): {row: [Curve per trial]}}`` from the tables' chosen cells
    (:func:`~domainbed_gaqat.experiments.tables.select_cells`)."""
    runs = {run.path: run for run, _ in entries}
    found: dict[tuple, dict[tuple, list[Curve]]] = defaultdict(lambda: defaultdict(list))
    for cell in cells:
        found[cell["dataset"], cell["test_envs"]][cell["row"]].append(
            curve(runs[cell["run"]], cell["test_envs"], cell["step"], rule))
    return found


def _label(row: tuple, split_by: list[str]) -> str:
    algorithm, bits, *split = row
    return " ".join([algorithm, bits, *(f"{k}={v}" for k, v in zip(split_by, split))])


def _band(curves: list[Curve], key: str) -> tuple[np.ndarray, ...]:
    """Steps, mean, min and max over the trials that recorded each step."""
    by_step: dict[int, list[float]] = defaultdict(list)
    for c in curves:
        for step, value in zip(c.steps, c.values[key]):
            by_step[step].append(value)
    steps = np.array(sorted(by_step))
    stacked = [np.array(by_step[s]) for s in steps]
    return (steps, np.array([v.mean() for v in stacked]), np.array([v.min() for v in stacked]),
            np.array([v.max() for v in stacked]))


def figure(title: str, rows: dict[tuple, list[Curve]], split_by: list[str],
           test_label: str) -> Figure:
    """The cell's figure: accuracy panels, and GAQAT's panels when a row recorded them."""
    panels = {"val": "training-domain validation accuracy (%)",
              "test": f"test-domain accuracy (%), {test_label}"}
    panels.update((k, v) for k, v in GAQAT_KEYS.items()
                  if any(k in c.values for curves in rows.values() for c in curves))
    fig = Figure(figsize=(11, 4 * ((len(panels) + 1) // 2)), layout="constrained")
    axes = fig.subplots((len(panels) + 1) // 2, 2, squeeze=False).ravel()
    colors = {row: f"C{i % 10}" for i, row in enumerate(rows)}
    for ax, (key, ylabel) in zip(axes, panels.items()):
        for row, curves in rows.items():
            if not all(key in c.values for c in curves):
                continue
            steps, mean, low, high = _band(curves, key)
            ax.plot(steps, mean, color=colors[row], label=_label(row, split_by))
            ax.fill_between(steps, low, high, color=colors[row], alpha=0.2, linewidth=0)
            chosen = [(c.chosen, c.values[key][c.steps.index(c.chosen)]) for c in curves]
            ax.scatter(*zip(*chosen), marker="*", s=80, color=colors[row], zorder=3,
                       edgecolors="black", linewidths=0.5)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if key in GAQAT_KEYS:
            ax.legend(fontsize=8)
    axes[0].scatter([], [], marker="*", s=80, color="white", edgecolors="black",
                    label="chosen checkpoint (each trial)")
    axes[0].legend(fontsize=8)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig


def paths(cells: list[dict], directory: str) -> dict[tuple, str]:
    """``{(dataset, test_envs): PNG path}`` of the cells' plots."""
    keys = sorted({(c["dataset"], c["test_envs"]) for c in cells})
    return {key: os.path.join(directory, f"{key[0]}_env{'-'.join(map(str, key[1]))}.png")
            for key in keys}


def write_plots(entries: list[tuple[RunFolder, int]], cells: list[dict], directory: str, rule: str,
                split_by: list[str], env_names: dict[str, list[str] | None],
                overwrite: bool = False) -> list[str]:
    """A PNG per table cell in ``directory`` (:func:`paths`; existing files refused unless
    ``overwrite``); returns the paths."""
    found = cell_curves(entries, cells, rule)
    targets = paths(cells, directory)
    outputs.check_new(list(targets.values()), overwrite)
    trials = "band: min-max over trials"
    for (dataset, test_envs), path in targets.items():
        names = env_names.get(dataset)
        domains = ", ".join(f"{names[e]} (env {e})" if names else f"env {e}" for e in test_envs)
        title = (f"{dataset}, test domain{'s' if len(test_envs) > 1 else ''} {domains}\n"
                 f"selection: {SELECTION_RULES[rule].description.split(' (')[0]}; {trials}")
        fig = figure(title, found[dataset, test_envs], split_by,
                     "mean of the test domains" if len(test_envs) > 1 else domains)
        outputs.save_figure(fig, path, overwrite)
    return list(targets.values())
