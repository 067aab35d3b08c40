"""``gaqat list`` names every algorithm DomainBed resolves with the plugin, every sweep config
and the plugin's dataset; ``gaqat --help`` lists them without importing torch."""

import json
import subprocess

from domainbed import algorithms as db_algorithms
from domainbed import datasets as db_datasets
from domainbed import hparams_registry
from support.helpers import PYTHON, gaqat

from domainbed_gaqat import listing
from domainbed_gaqat.experiments.configs import config_names, load_config
from domainbed_gaqat.plugin import datasets as plugin_datasets
from domainbed_gaqat.plugin.algorithms import ALGORITHMS


def _listed(capsys, *argv: str) -> dict:
    assert gaqat("list", *argv, "--json") == 0
    return json.loads(capsys.readouterr().out)


def test_algorithms_are_the_registry_as_domainbed_resolves_it(capsys):
    rows = _listed(capsys, "algorithms")["algorithms"]
    assert [r["name"] for r in rows] == list(ALGORITHMS)
    for row in rows:
        cls = db_algorithms.get_algorithm_class(row["name"])
        assert issubclass(cls, db_algorithms.Algorithm)
        assert row["domainbed_class"] == f"{cls.__module__}.{cls.__qualname__}"
        first = cls.__doc__.strip().split("\n\n")[0]  # the docstring's first paragraph
        assert row["summary"] == " ".join(first.split())
        assert row["summary"].startswith(ALGORITHMS[row["name"]].summary)
        assert row["quantized"] == ALGORITHMS[row["name"]].quantized
    by_name = {r["name"]: r["quantization"] for r in rows}
    # written out from the README's algorithm table
    assert by_name["ERM_FP"] == by_name["SAGM"] == "full precision"
    assert by_name["GAQAT"] == by_name["LSQ"] == by_name["SAQ"] == "W/A (default W4A4)"
    assert by_name["QTDoG"] == "W, weights only (default W7, per channel)"


def test_quantization_follows_the_hparams():
    assert listing.quantization({"lr": 1e-3}) == "full precision"
    assert listing.quantization({"w_bits": 3, "a_bits": 2}) == "W/A (default W3A2)"
    assert listing.quantization({"w_bits": 5}) == "W, weights only (default W5)"


def test_configs_with_paper_table_dataset_stages_and_runs(capsys):
    rows = _listed(capsys, "configs")["configs"]
    assert [r["name"] for r in rows] == config_names()
    for row in rows:
        config = load_config(row["name"])
        assert row["paper"] == config.paper and row["dataset"] == config.dataset
        assert row["stages"] == [s.name for s in config.stages]
    demo, w4a4 = (next(r for r in rows if r["name"] == n) for n in ("demo", "pacs_w4a4"))
    # by hand from sweeps/: demo 1 trial x 1 env x (1 + 2 + 1) runs; pacs_w4a4 3 trials x 4
    # envs x (3 lr + 2 x 3 lr + 3 r x 3 K)
    assert demo["runs"] == 4 and w4a4["runs"] == 3 * 4 * (3 + 6 + 9)
    assert w4a4["paper"].startswith("Table 2 (PACS)")
    qtdog = next(r for r in rows if r["name"] == "qtdog_pacs")
    # QTDoG and SWAD_QTDoG with 5 members each, SWAD_FP once
    assert qtdog["runs"] == 3 * 4 * (2 * 5 + 1) and qtdog["stages"] == ["qtdog", "swad"]


def test_datasets_and_the_text_listing(capsys):
    [row] = _listed(capsys, "datasets")["datasets"]
    assert row["name"] == "RotatedDigits" and row["registered"]
    assert row["environments"] == plugin_datasets.RotatedDigits.ENVIRONMENTS
    assert db_datasets.num_environments("RotatedDigits") == len(row["environments"])
    assert gaqat("list") == 0
    text = capsys.readouterr().out
    assert text.startswith(f"algorithms ({len(ALGORITHMS)}):\n")
    for name in [*ALGORITHMS, *config_names(), "RotatedDigits"]:
        assert f"\n{name} " in text
    assert "2 stages, 132 runs" in text and "3 stages, 216 runs" in text  # qtdog_pacs, pacs_w4a4


def test_static_names_match_the_imported_registries():
    assert listing.names() == {"algorithms": list(ALGORITHMS), "configs": config_names(),
                               "datasets": plugin_datasets.DATASETS}
    assert set(ALGORITHMS) <= set(db_algorithms.ALGORITHMS)
    assert all("lr" in hparams_registry.default_hparams(n, "PACS") for n in ALGORITHMS)


def test_top_help_lists_them_without_importing_torch():
    code = ("import sys, contextlib, io\nfrom domainbed_gaqat import cli\n"
            "out = io.StringIO()\nwith contextlib.redirect_stdout(out):\n"
            "    try:\n        cli.main(['--help'])\n    except SystemExit:\n        pass\n"
            "print(out.getvalue())\nprint(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'domainbed', 'numpy')))")
    proc = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, check=True)
    *help_text, modules = proc.stdout.strip().splitlines()
    assert modules == "[]"
    flat = " ".join(" ".join(help_text).split())
    for name in [*ALGORITHMS, *config_names(), "RotatedDigits"]:
        assert name in flat.replace(",", " ").split()
    assert "list" in flat
