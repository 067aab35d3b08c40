"""``gaqat tables ... --plots DIR``: a PNG per table cell, read back; the figure's lines, bands
and chosen checkpoints against values worked out by hand from the curves the test writes."""

import json

import numpy as np
import pytest
from matplotlib.collections import PathCollection, PolyCollection
from PIL import Image
from support.helpers import gaqat
from support.status_tree import fill_stage

from domainbed_gaqat.experiments import plots, tables
from domainbed_gaqat.experiments.configs import load_config

# demo, two trials: fp (ERM_FP, records at 0, 50, 100, 149), qat (LSQ, SAGM_LSQ, records at
# 0, 15, 29), gaqat (GAQAT, 0, 15, 29); the only test env is 5
ROWS = {"ERM_FP": 0.50, "LSQ": 0.60, "SAGM_LSQ": 0.62, "GAQAT": 0.64}  # base accuracy
PEAK = {"ERM_FP": 100, "LSQ": 15, "SAGM_LSQ": 15, "GAQAT": 29}  # step of the best test-env val
STEPS = {"ERM_FP": [0, 50, 100, 149], "LSQ": [0, 15, 29], "SAGM_LSQ": [0, 15, 29],
         "GAQAT": [0, 15, 29]}


def accuracy(algorithm: str, trial: int, step: int, env: int, split: str = "out") -> float:
    """The curves written: training domains rise with the step, a trial 0.1 above the other;
    the test domain's out split peaks at PEAK (what selection 'test' chooses)."""
    base = ROWS[algorithm] + 0.1 * trial
    if env == 5:
        return base + (0.2 if step == PEAK[algorithm] else 0.0) + (0.01 if split == "in" else 0)
    return base + 0.001 * step


@pytest.fixture
def sweep(tmp_path):
    path = tmp_path / "demo2.py"
    path.write_text('SWEEP = {"extends": "demo", "trials": 2}\n')
    config = load_config(str(path))
    out = tmp_path / "out"

    def curve(job):
        a, trial = job.train_args["algorithm"], job.train_args["trial_seed"]
        return lambda step, env, split: accuracy(a, trial, step, env, split)

    for stage in ("fp", "qat", "gaqat"):
        fill_stage(config, str(out), str(out), stage, curve=curve)
    return str(path), str(out)


def test_figure_lines_bands_and_chosen_steps(sweep):
    config, out = sweep
    entries, _, _ = tables.config_entries([config], out, out, [])
    cells = tables.select_cells(entries, "test", [])
    found = plots.cell_curves(entries, cells, "test")
    assert list(found) == [("RotatedDigits", (5,))]
    rows = found["RotatedDigits", (5,)]
    fig = plots.figure("t", rows, [], "75 (env 5)")
    val, test, frozen, disorder = fig.axes
    assert [len(ax.get_lines()) for ax in fig.axes] == [4, 4, 1, 1]  # a line per row
    assert [line.get_label() for line in val.get_lines()] == [
        "ERM_FP Full", "LSQ 4/4", "SAGM_LSQ 4/4", "GAQAT 4/4"]
    for ax, split, env in ((val, "out", 0), (test, "in", 5)):
        for line, algorithm in zip(ax.get_lines(), ROWS):
            steps = STEPS[algorithm]
            assert list(line.get_xdata()) == steps
            expected = [100 * np.mean([accuracy(algorithm, t, s, env, split) for t in (0, 1)])
                        for s in steps]
            assert line.get_ydata() == pytest.approx(expected)
        bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
        assert len(bands) == 4
        for band, algorithm in zip(bands, ROWS):  # min-max over the two trials
            ys = band.get_paths()[0].vertices[:, 1]
            low = min(100 * accuracy(algorithm, 0, s, env, split) for s in STEPS[algorithm])
            high = max(100 * accuracy(algorithm, 1, s, env, split) for s in STEPS[algorithm])
            assert ys.min() == pytest.approx(low) and ys.max() == pytest.approx(high)
    stars = [c for c in val.collections if isinstance(c, PathCollection)]
    for star, algorithm in zip(stars, ROWS):  # each trial's chosen checkpoint
        expected = [(PEAK[algorithm], 100 * accuracy(algorithm, t, PEAK[algorithm], 0))
                    for t in (0, 1)]
        np.testing.assert_allclose(np.sort(np.asarray(star.get_offsets()), axis=0), expected)
    # GAQAT's recorded statistics (status_tree: frozen_frac = step / steps)
    assert list(frozen.get_lines()[0].get_ydata()) == pytest.approx([0, 15 / 30, 29 / 30])
    assert list(disorder.get_lines()[0].get_ydata()) == pytest.approx(
        [0.5 - 0.2 * s / 30 for s in (0, 15, 29)])
    assert val.get_xlabel() == "step" and "validation" in val.get_ylabel()
    assert frozen.get_legend() is not None and val.get_legend() is not None


def test_command_writes_png_per_cell_and_refuses_to_overwrite(sweep, tmp_path, capsys):
    config, out = sweep
    plots_dir = tmp_path / "plots"
    assert gaqat("tables", config, "--output_dir", out, "--plots", str(plots_dir)) == 0
    captured = capsys.readouterr()
    assert "| GAQAT | 4/4 |" in captured.out
    assert "Wrote 1 plots to" in captured.err
    [png] = list(plots_dir.iterdir())
    assert png.name == "RotatedDigits_env5.png"
    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        assert image.format == "PNG"
        width, height = image.size
    # 11 x 8 inches at 120 dpi, fitted to the drawing (bbox_inches="tight")
    assert 0.9 * 1320 < width < 1.1 * 1320 and 0.9 * 960 < height < 1.1 * 960
    assert gaqat("tables", config, "--output_dir", out, "--plots", str(plots_dir)) == 2
    [line] = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith("gaqat tables: error: refusing to overwrite")
    assert gaqat("tables", config, "--output_dir", out, "--plots", str(plots_dir),
                 "--overwrite") == 0
    assert json.loads(json.dumps(sorted(p.name for p in plots_dir.iterdir()))) == [png.name]
