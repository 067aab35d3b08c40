"""DomainBed's ``collect_results`` on every run the plugin makes.

Two additions to DomainBed's reporting, installed by the start-up hook like the algorithms:

- records are read line by line: a truncated or corrupt ``results.jsonl`` line (a job killed
  while writing) is skipped with one warning naming the file and line, instead of stopping
  ``collect_results``;
- runs with several test envs (DomainNet's leave-one-group-out, paper sec. 4.1) are reported
  per test env: in the group of test env ``e`` a run's records list ``e`` first, a group
  without single-test-env runs selects among its multi-env runs, and the training-domain
  validation averages the domains that are not test envs of the run. Where single-env runs
  exist (DomainBed's own sweeps) every result is DomainBed's. Leave-one-domain-out
  cross-validation needs runs leaving out each other domain, which a group sweep does not make:
  it stays "X" there.
"""

import itertools
import json
import os
import sys
from collections import defaultdict

import numpy as np


def read_results(path: str) -> tuple[list[tuple[int, dict]], list[str]]:
    """``(line number, record)`` of each record of one ``results.jsonl`` and, for each line
    skipped, why (``file:line: ...``)."""
    records, problems = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            what = ("truncated last line (a killed job?)" if number == len(lines)
                    else "invalid JSON")
            problems.append(f"{path}:{number}: {what}, skipped ({err.msg})")
            continue
        if isinstance(record, dict) and isinstance(record.get("args"), dict):
            records.append((number, record))
        else:
            problems.append(f"{path}:{number}: not a record of a training run, skipped")
    return records, problems


def load_records(path: str):
    """``reporting.load_records``: every run folder's records, unreadable lines skipped."""
    from domainbed.lib.query import Q

    records = []
    for subdir in sorted(os.listdir(path)):
        results = os.path.join(path, subdir, "results.jsonl")
        if os.path.isfile(results):
            found, problems = read_results(results)
            records += [record for _, record in found]
            for problem in problems:
                print(f"warning: {problem}", file=sys.stderr)
    return Q(records)


def get_grouped_records(records):
    """``reporting.get_grouped_records``, with the group's test env first in each record."""
    from domainbed.lib.query import Q

    groups = defaultdict(list)
    for r in records:
        envs = r["args"]["test_envs"]
        for env in envs:
            view = r if envs[0] == env else {
                **r, "args": {**r["args"], "test_envs": [env, *(e for e in envs if e != env)]}}
            groups[r["args"]["trial_seed"], r["args"]["dataset"], r["args"]["algorithm"],
                   env].append(view)
    return Q([{"trial_seed": t, "dataset": d, "algorithm": a, "test_env": e, "records": Q(r)}
              for (t, d, a, e), r in groups.items()])


def get_test_records(records):
    """``model_selection.get_test_records``: the records with only the group's test env, or,
    where there are none, the records of the runs that have it among theirs."""
    single = records.filter(lambda r: len(r["args"]["test_envs"]) == 1)
    return single if len(single) else records


def _step_acc(record: dict, prefix: str = "") -> dict:
    """Training-domain validation of one record: the mean out-split accuracy of the domains
    that are not test envs; test accuracy of the first test env."""
    test_envs = record["args"]["test_envs"]
    val = [record[f"env{i}_out_acc"] for i in itertools.takewhile(
        lambda i: f"env{i}_out_acc" in record, itertools.count()) if i not in test_envs]
    return {"val_acc": np.mean(val), "test_acc": record[f"{prefix}env{test_envs[0]}_in_acc"]}


def _iid_step_acc(cls, record: dict) -> dict:
    return _step_acc(record)


def _auto_lr_step_acc(cls, record: dict) -> dict:
    return _step_acc(record, "fd_")


def _oracle_run_acc(cls, run_records):
    """``OracleSelectionMethod.run_acc`` over :func:`get_test_records`."""
    run_records = get_test_records(run_records)
    if not len(run_records):
        return None
    test_env = run_records[0]["args"]["test_envs"][0]
    chosen = run_records.sorted(lambda r: r["step"])[-1]
    return {"val_acc": chosen[f"env{test_env}_out_acc"],
            "test_acc": chosen[f"env{test_env}_in_acc"]}


def patch_reporting(module) -> None:
    """Install :func:`load_records` and :func:`get_grouped_records` (idempotent)."""
    module.load_records = load_records
    module.get_grouped_records = get_grouped_records


def patch_model_selection(module) -> None:
    """Install :func:`get_test_records` and the multi-env-aware step accuracies (idempotent);
    classes a DomainBed version lacks are skipped."""
    module.get_test_records = get_test_records
    module.OracleSelectionMethod.run_acc = classmethod(_oracle_run_acc)
    module.IIDAccuracySelectionMethod._step_acc = classmethod(_iid_step_acc)
    if hasattr(module, "IIDAutoLRAccuracySelectionMethod"):
        module.IIDAutoLRAccuracySelectionMethod._step_acc = classmethod(_auto_lr_step_acc)
