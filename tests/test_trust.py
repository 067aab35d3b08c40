"""Results you can trust: strict hyperparameters, the paper's grids per bit-width in DomainBed's
own sweep, DomainBed's ``collect_results`` on every protocol, config errors, declared
dependencies."""

import ast
import importlib.metadata
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tomllib
from domainbed import algorithms as db_algorithms
from domainbed import hparams_registry
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from support.helpers import PYTHON, gaqat, run, tiny_hparams
from support.image_folders import write_images

from domainbed_gaqat.experiments import configs
from domainbed_gaqat.plugin.hparams import domainbed_train_overrides, train_hparams

REPO = Path(__file__).resolve().parents[1]
PAPER_3BIT = {"PACS": ({0.28, 0.30, 0.32}, {100, 150, 200}),
              "DomainNet": ({0.02, 0.03}, {200, 300})}
PAPER_4BIT = {"PACS": ({0.28, 0.30, 0.32}, {300, 350, 400}),
              "DomainNet": ({0.20, 0.25}, {3000, 4000})}
# the cases: a typo'd key, and values out of their range or type
BAD = [({"wbits": 3}, "'wbits'", "did you mean 'w_bits'"),
       ({"gaqat_r": "abc"}, "gaqat_r", "'abc'"),
       ({"scale_lr": -1}, "scale_lr", "=-1"),
       ({"rho": -0.05}, "rho", "=-0.05")]
MORE_BAD = [({"w_bits": 9}, "w_bits", "an integer in 2..8"),
            ({"a_bits": 3.0}, "a_bits", "an integer in 2..8"),
            ({"gaqat_K": 1}, "gaqat_K", "an integer in 2..1000000000"),
            ({"gaqat_r": 1.5}, "gaqat_r", "a number in [0, 1]"),
            ({"lr": 0}, "lr", "a number in (0, 1]"),
            ({"alpha": float("nan")}, "alpha", "a number in [0, 1]"),
            ({"weight_decay": -1e-4}, "weight_decay", "a number in [0, 1]"),
            ({"resnet_dropout": 1.0}, "resnet_dropout", "a number in [0, 1)"),
            ({"init": "mocoo"}, "init", "one of ['none', 'torchvision', 'moco', 'domainbed']"),
            ({"lsq_grad_scale": 1}, "lsq_grad_scale", "true or false"),
            ({"batch_size": 0}, "batch_size", "an integer in 1..65536"),
            ({"data_augmentation": "yes"}, "data_augmentation", "true or false")]


# --- strict hyperparameters -----------------------------------------------------------------


@pytest.mark.parametrize("bad, key, detail", BAD + MORE_BAD)
def test_a_bad_hparam_is_an_error_naming_it(bad, key, detail):
    with pytest.raises(ValueError) as info:
        db_algorithms.GAQAT((3, 32, 32), 10, 5, tiny_hparams("GAQAT", **bad))
    assert key in str(info.value) and detail in str(info.value)


def test_each_algorithm_reads_only_its_families():
    with pytest.raises(ValueError, match=r"'gaqat_K' is not a hyperparameter of LSQ"):
        db_algorithms.LSQ((3, 32, 32), 10, 5, {**tiny_hparams("LSQ"), "gaqat_K": 10})
    with pytest.raises(ValueError, match=r"'w_bits' is not a hyperparameter of ERM_FP"):
        db_algorithms.ERM_FP((3, 32, 32), 10, 5, {**tiny_hparams("ERM_FP"), "w_bits": 4})
    missing = tiny_hparams("GAQAT")
    del missing["rho"]
    with pytest.raises(ValueError, match=r"lack \['rho'\]"):
        db_algorithms.GAQAT((3, 32, 32), 10, 5, missing)


def test_domainbeds_own_algorithms_are_untouched():
    hparams = {**hparams_registry.default_hparams("ERM", "RotatedMNIST"), "wbits": 3}
    db_algorithms.ERM((2, 28, 28), 10, 2, hparams)  # DomainBed ignores unknown keys


@pytest.mark.slow
def test_domainbed_train_exits_before_the_first_record(tmp_path):
    """DomainBed's real train.py with each bad hparam: non-zero exit, no record written, the
    key or value in the message."""
    def train(case: tuple) -> tuple:
        bad, key, detail = case
        out = tmp_path / key
        proc = run([PYTHON, "-m", "domainbed.scripts.train", "--dataset", "RotatedDigits",
                    "--algorithm", "GAQAT", "--steps", "2", "--output_dir", str(out),
                    "--hparams", json.dumps({"batch_size": 2, **bad})], check=False,
                   OMP_NUM_THREADS="1")
        return proc, out

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(train, BAD))
    for (_, key, detail), (proc, out) in zip(BAD, results):
        assert proc.returncode != 0
        assert not (out / "results.jsonl").exists()
        last = (out / "err.txt").read_text().strip().splitlines()[-1]  # train.py's Tee
        assert last.startswith("ValueError: ") and key in last and detail in last, last


# --- the paper's grids per bit-width -----------------------------------------------------


@pytest.mark.parametrize("dataset", ["PACS", "DomainNet"])
def test_random_draws_follow_the_bit_width(dataset):
    """A run's hparams are drawn for the bits of its overrides: 3 bits draw r and K from the
    3-bit grid (with the same seed), the rest unchanged; every grid value is drawn by some
    seed; at 4 bits the draw is the registry's (DomainBed's random_hparams)."""
    from domainbed.lib import misc

    grids = {3: PAPER_3BIT[dataset], 4: PAPER_4BIT[dataset]}
    seen = {3: set(), 4: set()}
    for seed in range(1, 40):
        four = train_hparams("GAQAT", dataset, seed, 0)
        assert four == hparams_registry.random_hparams("GAQAT", dataset, misc.seed_hash(seed, 0))
        three = train_hparams("GAQAT", dataset, seed, 0, {"w_bits": 3, "a_bits": 3})
        for bits, h in ((4, four), (3, three)):
            assert h["gaqat_r"] in grids[bits][0] and h["gaqat_K"] in grids[bits][1], (seed, h)
            seen[bits].add(h["gaqat_K"])
        assert {k: v for k, v in three.items() if k not in ("gaqat_r", "gaqat_K", "w_bits",
                                                            "a_bits")} == {
            k: v for k, v in four.items() if k not in ("gaqat_r", "gaqat_K", "w_bits", "a_bits")}
    assert seen[3] == grids[3][1] and seen[4] == grids[4][1]  # every grid value is drawn
    default = train_hparams("GAQAT", dataset, overrides='{"w_bits": 3, "a_bits": 3}')
    assert (default["gaqat_r"], default["gaqat_K"]) == {"PACS": (0.30, 150),
                                                         "DomainNet": (0.03, 300)}[dataset]


def test_explicit_r_and_k_win_over_the_bit_width():
    h = train_hparams("GAQAT", "PACS", 7, 0, {"gaqat_K": 77, "w_bits": 3, "a_bits": 3})
    assert h["gaqat_K"] == 77 and h["gaqat_r"] in PAPER_3BIT["PACS"][0]
    h = train_hparams("GAQAT", "PACS", 7, 0, {"w_bits": 3, "a_bits": 3, "gaqat_r": 0.5})
    assert h["gaqat_r"] == 0.5 and h["gaqat_K"] in PAPER_3BIT["PACS"][1]
    h = train_hparams("GAQAT", "PACS", 7, 0, {"w_bits": 3})  # A keeps its 4: the smaller is 3
    assert h["gaqat_K"] in PAPER_3BIT["PACS"][1]
    assert "gaqat_K" not in train_hparams("LSQ", "PACS", 7, 0, {"w_bits": 3, "a_bits": 3})


def test_the_registry_reads_the_bits_of_domainbed_trains_hparams():
    """Under DomainBed's train.py (``python -m domainbed.scripts.train`` or its file) the draw
    sees the bits of its ``--hparams``; in any other program, none."""
    from types import SimpleNamespace

    argv = ["--algorithm", "GAQAT", "--hparams", '{"w_bits": 3, "a_bits": 3}', "--steps", "1"]
    by_module = SimpleNamespace(__spec__=SimpleNamespace(name="domainbed.scripts.train"))
    by_file = SimpleNamespace(__spec__=None, __file__="/x/domainbed/scripts/train.py")
    for main in (by_module, by_file):
        assert domainbed_train_overrides(argv, main) == {"w_bits": 3, "a_bits": 3}
        assert domainbed_train_overrides(["--hparams", "[3]"], main) == {}  # train.py says so
        assert domainbed_train_overrides([], main) == {}
    other = SimpleNamespace(__spec__=SimpleNamespace(name="domainbed.scripts.sweep"))
    assert domainbed_train_overrides(argv, other) == {}
    mine = SimpleNamespace(__spec__=None, __file__="/x/mydomainbed/scripts/train.py")
    assert domainbed_train_overrides(argv, mine) == {}
    assert domainbed_train_overrides() == {}  # pytest is this process's program


@pytest.mark.slow
def test_domainbed_train_draws_from_the_3bit_grid(tmp_path):
    """DomainBed's train.py on a PACS image folder, a random hparams seed and 3-bit
    overrides: out.txt, every record and model.pkl hold the 3-bit grid's r and K."""
    import torch

    data = write_images(tmp_path / "data", "PACS", classes=2, per_class=3)
    overrides = {"w_bits": 3, "a_bits": 3, "resnet18": True, "batch_size": 1, "init": "none"}
    out = tmp_path / "run"
    run([PYTHON, "-m", "domainbed.scripts.train", "--dataset", "PACS", "--data_dir", str(data),
         "--algorithm", "GAQAT", "--hparams_seed", "5", "--trial_seed", "0", "--steps", "1",
         "--output_dir", str(out), "--hparams", json.dumps(overrides)], timeout=600)
    expected = train_hparams("GAQAT", "PACS", 5, 0, overrides)  # the run's draw for 3 bits
    r, k = expected["gaqat_r"], expected["gaqat_K"]
    assert r in PAPER_3BIT["PACS"][0] and k in PAPER_3BIT["PACS"][1]
    text = (out / "out.txt").read_text()
    assert f"\tgaqat_K: {k}\n" in text and f"\tgaqat_r: {r}\n" in text
    for line in (out / "results.jsonl").read_text().splitlines():
        assert (json.loads(line)["hparams"]["gaqat_K"], json.loads(line)["hparams"]["gaqat_r"]
                ) == (k, r)
    saved = torch.load(out / "model.pkl", weights_only=True)
    assert saved["model_hparams"]["gaqat_K"] == k and dict(saved["model_hparams"]) == {
        **expected}


def test_configs_and_registry_share_the_grids():
    """The paper configs' grids come from the registry ('paper'): resolved, they are its."""
    for name, dataset, bits in (("pacs_w4a4", "PACS", 4), ("pacs_w3a3", "PACS", 3),
                                ("domainnet_w4a4", "DomainNet", 4),
                                ("domainnet_w3a3", "DomainNet", 3)):
        grid = configs.load_config(name).stage("gaqat").grid.axes
        expected = (PAPER_3BIT if bits == 3 else PAPER_4BIT)[dataset]
        assert (set(grid["gaqat_r"]), set(grid["gaqat_K"])) == expected, name


# --- DomainBed's collect_results ----------------------------------------------------------


def _record(step: int, test_envs: list[int], trial: int, hseed: int, ins: dict, outs: dict,
            n_envs: int = 6) -> dict:
    args = {"dataset": "DomainNet", "algorithm": "GAQAT", "test_envs": test_envs,
            "trial_seed": trial, "hparams_seed": hseed, "holdout_fraction": 0.2}
    return {"step": step, "args": args, "hparams": {"w_bits": 4},
            **{f"env{i}_in_acc": ins.get(i, 0.5) for i in range(n_envs)},
            **{f"env{i}_out_acc": outs.get(i, 0.5) for i in range(n_envs)}}


@pytest.mark.slow
def test_collect_results_on_group_runs_and_a_truncated_line(tmp_path):
    """Leave-one-group-out runs (two test envs each) get numbers from DomainBed's training-
    domain validation and oracle (hand-computed here); a truncated line is skipped with one
    warning naming it."""
    rng = np.random.default_rng(0)
    expected_iid, expected_oracle = {}, {}
    for group in ([0, 1], [2, 3], [4, 5]):
        runs = []
        for hseed in (11, 12):
            recs = [_record(step, group, 0, hseed,
                            {i: round(float(rng.uniform(0, 1)), 4) for i in range(6)},
                            {i: round(float(rng.uniform(0, 1)), 4) for i in range(6)})
                    for step in (0, 100)]
            runs.append(recs)
            folder = tmp_path / f"g{group[0]}_{hseed}"
            folder.mkdir()
            lines = [json.dumps(r) for r in recs]
            tail = '{"step": 200, "args": {"dat' if hseed == 12 else ""
            (folder / "results.jsonl").write_text("\n".join(lines) + "\n" + tail)
        for env in group:
            # training-domain validation: per run the checkpoint with the best mean out-split
            # accuracy of the four other domains, then the run with the best such value
            def val(r, group=group):
                return np.mean([r[f"env{i}_out_acc"] for i in range(6) if i not in group])
            best = max((max(recs, key=val) for recs in runs), key=val)
            expected_iid[env] = 100 * best[f"env{env}_in_acc"]
            # oracle: per run the last checkpoint, the run with the best test-env out acc
            last = max((recs[-1] for recs in runs), key=lambda r: r[f"env{env}_out_acc"])
            expected_oracle[env] = 100 * last[f"env{env}_in_acc"]
    proc = run([PYTHON, "-m", "domainbed.scripts.collect_results", "--input_dir",
                str(tmp_path)])
    assert "Total records: 12" in proc.stdout
    warnings = sorted(line for line in proc.stderr.splitlines() if line.startswith("warning: "))
    assert [w.split(", skipped")[0] for w in warnings] == [
        f"warning: {tmp_path / f'g{g}_12' / 'results.jsonl'}:3: truncated last line (a killed "
        "job?)" for g in (0, 2, 4)]

    def row(method: str) -> list[str]:
        section = proc.stdout.split(f"Dataset: DomainNet, model selection method: {method}")[1]
        return next(line.split() for line in section.splitlines() if line.startswith("GAQAT"))

    for method, expected in (("training-domain validation set", expected_iid),
                             ("test-domain validation set (oracle)", expected_oracle)):
        cells = row(method)
        values = [float(cells[1 + 3 * e]) for e in range(6)]
        assert values == [round(expected[e], 1) for e in range(6)], method
        assert float(cells[-1]) == pytest.approx(np.mean(values), abs=0.051)
    assert row("leave-one-domain-out cross-validation")[1:] == ["X"] * 7  # needs LOO runs


# --- config errors --------------------------------------------------------------------------


def test_config_errors_are_one_line_with_file_and_line(tmp_path, capsys):
    syntax = tmp_path / "syntax.py"
    syntax.write_text('SWEEP = {\n    "dataset": "PACS",\n    "trials": 1,,\n}\n')
    key = tmp_path / "key.py"
    key.write_text('SWEEP = {\n    "extends": "demo",\n    "stages": [\n        {"name": "fp",'
                   '\n         "stepz": 3},\n    ],\n}\n')
    value = tmp_path / "value.py"
    value.write_text('SWEEP = {\n    "extends": "pacs_w4a4",\n    "hparams": {\n'
                     '        "rho": -1.0,\n    },\n}\n')
    for path, line, message in (
            (syntax, 3, "invalid Python syntax"),
            (key, 5, "stage 'fp': unknown keys ['stepz']"),
            (value, 4, "rho -1.0 for SAGM_LSQ: expected a number in [0, 10]")):
        assert gaqat("sweep", "list", str(path), "--output_dir", str(tmp_path),
                     "--data_dir", str(tmp_path)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"gaqat sweep: error: {path}:{line}: "), err
        assert message in err[0]
    cycle = tmp_path / "cycle.py"
    cycle.write_text(f"SWEEP = {{'extends': {str(cycle)!r}}}\n")
    with pytest.raises(configs.ConfigError, match="'extends' makes a cycle"):
        configs.load_config(str(cycle))


# --- declared dependencies ------------------------------------------------------------------


def _requirements() -> dict[str, set[str]]:
    """pyproject.toml's requirements: ``{"": base, extra: names}``, as normalised names."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {canonicalize_name(Requirement(r).name) for r in requirements}

    out = {"": names(project["dependencies"])}
    out.update({k: names(v) for k, v in project["optional-dependencies"].items()})
    return out


def test_every_imported_module_is_a_declared_dependency():
    """Each third-party module the package imports belongs to a distribution named in
    install_requires or an extra (DomainBed itself is cloned, not installed)."""
    distributions = importlib.metadata.packages_distributions()
    required = set().union(*_requirements().values())
    missing = {}
    for path in (REPO / "domainbed_gaqat").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and not node.level
                     else [])
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in ("domainbed", "domainbed_gaqat"):
                    continue
                dists = {d.lower().replace("_", "-") for d in distributions.get(top, [top])}
                if not dists & required:
                    missing[top] = f"{path.relative_to(REPO)} (distributions {sorted(dists)})"
    assert not missing, missing


def test_a_missing_extra_is_a_one_line_error():
    code = ("import sys; sys.modules['ml_dtypes'] = None\n"
            "from domainbed_gaqat import cli\n"
            "sys.exit(cli.main(['export', '--help']))")
    proc = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("gaqat export: error: ") and "domainbed-gaqat[export]" in line
