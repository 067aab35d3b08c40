"""DomainBed's own CPU-runnable tests still pass with the plugin installed."""

import re
import sys
from pathlib import Path

import domainbed
import pytest
from support.helpers import run

from domainbed_gaqat.plugin import datasets as plugin_datasets
from domainbed_gaqat.plugin.algorithms import ALGORITHMS

MODULES = [
    "domainbed.test.test_hparams_registry",
    "domainbed.test.lib.test_misc",
    "domainbed.test.lib.test_query",
    "domainbed.test.test_model_selection",
    "domainbed.test.scripts.test_collect_results",
]


@pytest.mark.slow
def test_domainbed_cpu_test_modules_pass_with_the_plugin():
    clone = Path(domainbed.__file__).resolve().parents[1]  # some tests read files from here
    proc = run([sys.executable, "-m", "unittest", "-v", *MODULES], cwd=clone, timeout=900)
    log = proc.stderr  # unittest reports on stderr
    assert re.search(r"^OK\b", log, re.MULTILINE), log[-3000:]
    assert int(re.search(r"^Ran (\d+) tests", log, re.MULTILINE)[1]) > 0

    # test_hparams_registry is parameterized over ALGORITHMS x DATASETS: the plugin's
    # algorithms and dataset were part of that product, and each case passed.
    case = re.compile(r"\[with algorithm_name='(\w+)', dataset_name='(\w+)'\] \.\.\. ok$",
                      re.MULTILINE)
    passed = set(case.findall(log))
    for algorithm in list(ALGORITHMS):
        for dataset in ("RotatedDigits", "PACS", "DomainNet"):
            assert (algorithm, dataset) in passed
    assert set(plugin_datasets.DATASETS) <= {d for _, d in passed}
    assert ("ERM", "RotatedDigits") in passed
