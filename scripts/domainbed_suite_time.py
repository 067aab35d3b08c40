"""What listing the generic names in DomainBed's ``ALGORITHMS`` would cost DomainBed's own test
suite: its CPU test modules (those ``tests/test_domainbed_suite.py`` runs) timed side by side
without the plugin, with it (the generic names resolved on demand, not listed), and with every
``<Name>_FP`` / ``_LSQ`` / ``_QTDoG`` appended to ``ALGORITHMS`` (DomainBed's
``test_hparams_registry`` is parameterised over ``ALGORITHMS x DATASETS``).

    python scripts/domainbed_suite_time.py --repeats 3

Prints, per setting, the test cases run and the median seconds of interleaved repeats, and the
ratios to the plugin's setting (docs/coverage.md).
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODULES = ["domainbed.test.test_hparams_registry", "domainbed.test.lib.test_misc",
           "domainbed.test.lib.test_query", "domainbed.test.test_model_selection",
           "domainbed.test.scripts.test_collect_results"]
LISTED = """
import sys, unittest
from domainbed import algorithms
from domainbed_gaqat.plugin import generic
names = [f"{b}_{v}" for b in generic.domainbed_bases() + ["SAGM", "SWAD"]
         for v in generic.VARIANTS]
algorithms.ALGORITHMS += [n for n in names if n not in algorithms.ALGORITHMS
                          and generic.resolve(n) is not None]
unittest.main(module=None, argv=["unittest", *sys.argv[1:]])
"""
SETTINGS = {  # name -> (command, environment)
    "DomainBed alone": (["-m", "unittest"], {"DOMAINBED_GAQAT_DISABLE": "1"}),
    "with the plugin (generic names on demand)": (["-m", "unittest"], {}),
    "with every generic name listed": (["-c", LISTED], {}),
}


def run_once(args: list[str], env: dict, cwd: Path) -> tuple[int, float]:
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    start = time.perf_counter()  # (DomainBed's collect_results test runs `python -m ...`)
    proc = subprocess.run([sys.executable, *args, *MODULES], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, "PATH": path, **env})
    seconds = time.perf_counter() - start
    if not re.search(r"^OK\b", proc.stderr, re.MULTILINE):
        raise RuntimeError(proc.stderr[-3000:])
    return int(re.search(r"^Ran (\d+) tests", proc.stderr, re.MULTILINE)[1]), seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import domainbed

    clone = Path(domainbed.__file__).resolve().parents[1]  # some tests read files from here
    times = {name: [] for name in SETTINGS}
    cases = {}
    for _ in range(args.repeats):  # interleaved: the machine's load hits every setting alike
        for name, (command, env) in SETTINGS.items():
            cases[name], seconds = run_once(command, env, clone)
            times[name].append(seconds)
    base = statistics.median(times["with the plugin (generic names on demand)"])
    print("| setting | test cases | seconds (median) | ratio to the plugin's |")
    print("|---|---:|---:|---:|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {cases[name]} | {median:.1f} | {median / base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
