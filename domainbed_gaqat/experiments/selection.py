"""Model selection over checkpoints and grid points, for single and grouped test envs.

A *cell* is one (dataset, algorithm, bit-width, test envs, trial); its candidates are the runs
of the grid (one run per grid point). For a record (one checkpoint of a run) with test envs T:

- ``test acc`` of env ``i`` in T: ``env{i}_in_acc`` (as DomainBed);
- ``val``: the mean over the training envs (not in T) of ``env{i}_out_acc``, the tables' "val";
- the rule's *criterion*: ``test`` / ``test_last``: the mean over T of ``env{i}_out_acc``
  (test-domain validation; for a DomainNet group both test domains count equally); ``train``:
  ``val`` (training-domain validation).

A rule picks, in each run, the checkpoint with the best criterion (``test_last``: the last
checkpoint, as DomainBed's oracle), then the run whose picked checkpoint has the best criterion.
Only records with ``step >= eval_from`` count. Ties go to the earlier step, then to the first
run by folder path. DomainBed's own methods skip runs with two test envs; these do not.

>>> def record(step, test_out, train_out):
...     return {"step": step, "args": {"test_envs": [0]}, "env0_in_acc": 0.5,
...             "env0_out_acc": test_out, "env1_in_acc": 0.9, "env1_out_acc": train_out}
>>> run = RunFolder("run", [record(0, 0.6, 0.9), record(10, 0.8, 0.7)], done=True)
>>> [choose([(run, 0)], rule).record["step"] for rule in ("test", "train")]
[10, 0]
"""

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from domainbed_gaqat.experiments.results import RunFolder


@dataclass(frozen=True)
class SelectionRule:
    """A model-selection rule: its ``criterion`` (``test``: test-domain validation, ``train``:
    training-domain validation), whether only each run's ``last`` checkpoint counts, and the
    ``description`` the tables print."""

    name: str
    criterion: str
    last: bool
    description: str


SELECTION_RULES = {rule.name: rule for rule in (
    SelectionRule("test", "test", False, "test-domain validation (best checkpoint of each run "
                  "by test-domain out-split accuracy, then best run)"),
    SelectionRule("test_last", "test", True,
                  "test-domain validation at the last checkpoint (DomainBed's oracle)"),
    SelectionRule("train", "train", False, "training-domain validation (best checkpoint by "
                  "mean training-domain out-split accuracy, then best run)"),
)}


def selection_rule(name: str) -> SelectionRule:
    """The rule called ``name``; a ``ValueError`` naming the others if none is."""
    if name not in SELECTION_RULES:
        raise ValueError(f"selection rule {name!r}: expected one of {sorted(SELECTION_RULES)}")
    return SELECTION_RULES[name]


@dataclass(frozen=True)
class Choice:
    """The checkpoint a rule picked in a cell."""

    run: RunFolder
    record: dict
    criterion: float
    val: float
    tests: dict[int, float]


def n_envs(record: dict) -> int:
    """Number of environments of the dataset, from the record's ``env{i}_out_acc`` keys."""
    n = 0
    while f"env{n}_out_acc" in record:
        n += 1
    return n


def score(run: RunFolder, record: dict, rule: str) -> Choice:
    """Criterion, val and test accuracies of one checkpoint record under the rule ``rule``."""
    criterion = selection_rule(rule).criterion
    test_envs = record["args"]["test_envs"]
    train_envs = [i for i in range(n_envs(record)) if i not in test_envs]
    val = float(np.mean([record[f"env{i}_out_acc"] for i in train_envs]))
    test_val = float(np.mean([record[f"env{i}_out_acc"] for i in test_envs]))
    tests = {i: float(record[f"env{i}_in_acc"]) for i in test_envs}
    return Choice(run, record, val if criterion == "train" else test_val, val, tests)


def choose(candidates: Iterable[tuple[RunFolder, int]], rule: str,
           last: bool = False) -> Choice | None:
    """The rule's choice among ``(run, eval_from)`` candidates of one cell, or None if no run
    has a record at or after its ``eval_from``. ``last`` forces the last checkpoint of each run
    (the only one whose model train.py saves)."""
    last = last or selection_rule(rule).last
    best = None
    for run, eval_from in sorted(candidates, key=lambda c: c[0].path):
        records = sorted((r for r in run.records if r["step"] >= eval_from),
                         key=lambda r: r["step"])
        if not records:
            continue
        if last:
            records = records[-1:]
        picked = max((score(run, r, rule) for r in records), key=lambda c: c.criterion)
        if best is None or picked.criterion > best.criterion:
            best = picked
    return best
