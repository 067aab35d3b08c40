"""Score and surviving mutants of the last ``make mutation`` run, per module.

Reads mutmut's result files (``mutants/**/*.py.meta``). Killed: a test failed, or the mutant
ran past mutmut's time limit (an endless loop). Score: killed / checked. Survivors (and
mutants no selected test reaches) are listed with their diff (``mutmut show NAME``).

    python scripts/mutation_report.py [--diffs]
"""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

KILLED = {1, 3, 24, -24, 36, 152, 255, -9, -11}  # test failure, error, timeout, crash
SURVIVED = {0}
NO_TESTS = {5, 33}


def main(argv: list[str]) -> int:
    metas = sorted(Path("mutants").rglob("*.py.meta"))
    if not metas:
        print("no mutmut results under ./mutants: run `make mutation` first", file=sys.stderr)
        return 1
    total = Counter()
    survivors = []
    print(f"{'module':48} {'killed':>7} {'survived':>8} {'no test':>7} {'unchecked':>9} "
          f"{'score':>6}")
    for meta in metas:
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        module = str(meta.relative_to("mutants")).removesuffix(".meta")
        c = Counter("killed" if v in KILLED else "survived" if v in SURVIVED
                    else "no test" if v in NO_TESTS else "unchecked" for v in codes.values())
        total.update(c)
        checked = c["killed"] + c["survived"] + c["no test"]
        score = f"{100 * c['killed'] / checked:.1f}%" if checked else "-"
        print(f"{module:48} {c['killed']:7} {c['survived']:8} {c['no test']:7} "
              f"{c['unchecked']:9} {score:>6}")
        survivors += [k for k, v in codes.items() if v in SURVIVED | NO_TESTS]
    checked = total["killed"] + total["survived"] + total["no test"]
    print(f"{'all':48} {total['killed']:7} {total['survived']:8} {total['no test']:7} "
          f"{total['unchecked']:9} {100 * total['killed'] / max(checked, 1):5.1f}%")
    print(f"\nsurviving mutants ({len(survivors)}):")
    for name in survivors:
        print(f"  {name}")
        if "--diffs" in argv:
            diff = subprocess.run([sys.executable, "-m", "mutmut", "show", name],
                                  capture_output=True, text=True).stdout
            print("".join(f"      {line}\n" for line in diff.splitlines()
                          if line[:1] in "+-" and line[:3] not in ("+++", "---")), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
