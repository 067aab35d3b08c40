"""Robust reading of DomainBed run folders (``results.jsonl``, ``done``), and finding a planned
job's run by what the run recorded.

DomainBed's ``reporting.load_records`` stops at the first unreadable line (a job killed while
writing leaves a truncated last line). Here every line that is not a complete checkpoint record
is skipped and reported, and each run keeps its folder, so incomplete runs can be listed.

A DomainBed run folder is named by a hash of its train arguments, absolute paths included, so
a results tree that was moved, copied or merged from several machines no longer matches the
hashes a sweep computes. :class:`Locator` finds a job's run by what the run *is*, the
:attr:`~domainbed_gaqat.experiments.runs.RunSpec.identity` of its records.
"""

import json
import os
import re
from dataclasses import dataclass, field

from domainbed_gaqat.experiments.runs import RunSpec
from domainbed_gaqat.plugin.reporting import read_results
from domainbed_gaqat.progress import track

RUN_FILES = ("results.jsonl", "done", "out.txt", "err.txt")
JOB_HASH = re.compile(r"[0-9a-f]{32}")  # DomainBed's Job folder name: md5 of the train args


@dataclass
class RunFolder:
    """One DomainBed run folder: its valid checkpoint records, in file order."""

    path: str
    records: list[dict]
    done: bool
    problems: list[str] = field(default_factory=list)

    @property
    def args(self) -> dict:
        return self.records[0]["args"] if self.records else {}

    @property
    def hparams(self) -> dict:
        return self.records[0]["hparams"] if self.records else {}

    @property
    def spec(self) -> RunSpec | None:
        """What the run is, from its first record (None before it has one)."""
        return RunSpec.from_record(self.records[0]) if self.records else None

    def status(self) -> str:
        """One line for the list of incomplete runs."""
        if not self.records:
            return f"{self.path}: no checkpoint record yet (not started, running or crashed)"
        return (f"{self.path}: no 'done' file; last record at step {self.records[-1]['step']} "
                f"(running, or killed: see its err.txt)")


def _record_problem(record: object) -> str | None:
    """Why ``record`` is not a usable checkpoint record of train.py, or None."""
    if not isinstance(record, dict) or not isinstance(record.get("args"), dict):
        return "not a record of domainbed.scripts.train (no 'args')"
    missing = [k for k in ("step", "hparams") if k not in record]
    missing += [f"args.{k}" for k in ("dataset", "algorithm", "test_envs", "trial_seed")
                if k not in record["args"]]
    if not missing:
        missing = [f"env{i}_{split}_acc" for i in record["args"]["test_envs"]
                   for split in ("in", "out") if f"env{i}_{split}_acc" not in record]
    return f"missing {', '.join(missing)}" if missing else None


def _once(results: str, found: list[tuple[int, dict]], problems: list[str]) -> list[dict]:
    """Each checkpoint once: a line repeating the line before it is dropped; where the steps
    go back (a run restarted from scratch appended its records, as DomainBed's train.py does,
    or a file appended to itself), only the records from the last restart on are the run's.
    Both are reported."""
    kept: list[tuple[int, dict]] = []
    for number, record in found:
        if kept and record == kept[-1][1]:
            problems.append(f"{results}:{number}: repeats line {kept[-1][0]}, counted once")
            continue
        if kept and record["step"] <= kept[-1][1]["step"]:
            problems.append(f"{results}:{number}: step {record['step']} after step "
                            f"{kept[-1][1]['step']} (a restart): the {len(kept)} records "
                            f"before line {number} are not used")
            kept = []
        kept.append((number, record))
    return [record for _, record in kept]


def read_run(path: str) -> RunFolder:
    """Read one run folder; unreadable, incomplete and repeated lines are reported in
    ``problems``."""
    found, problems = [], []
    results = os.path.join(path, "results.jsonl")
    if os.path.isfile(results):
        lines, problems = read_results(results)
        for number, record in lines:
            why = _record_problem(record)
            if why:
                problems.append(f"{results}:{number}: {why}, skipped")
            else:
                found.append((number, record))
    records = _once(results, found, problems)
    return RunFolder(path, records, os.path.isfile(os.path.join(path, "done")), problems)


def _valid(line: bytes) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if _record_problem(record) is None else None


def read_run_ends(path: str, tail_bytes: int = 65536) -> RunFolder:
    """:func:`read_run` keeping only the first and the last valid records (what a run is, and
    how far it got), read from the two ends of ``results.jsonl``: cheap on long runs."""
    results = os.path.join(path, "results.jsonl")
    done = os.path.isfile(os.path.join(path, "done"))
    if not os.path.isfile(results):
        return RunFolder(path, [], done)
    with open(results, "rb") as f:
        first = _valid(f.readline())
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - tail_bytes))
        tail = f.read().split(b"\n")
    last = next(filter(None, map(_valid, reversed(tail))), None)
    if first is None or last is None:  # a damaged end: read it all
        return read_run(path)
    return RunFolder(path, [first] if last == first else [first, last], done)


def _is_run(path: str, names: list[str]) -> bool:
    return (any(n in names for n in RUN_FILES)
            or (not names and JOB_HASH.fullmatch(os.path.basename(path)) is not None))


def run_folders(dirs: list[str]) -> list[str]:
    """The run folders under ``dirs`` (a run folder holds train.py's files, or is the empty
    folder DomainBed's ``Job.launch`` makes before the job starts), sorted."""
    paths, visited = {}, set()
    for top in dirs:
        if not os.path.isdir(top):
            raise FileNotFoundError(f"--input_dir {top!r}: no such directory")
        for here, subdirs, names in os.walk(top, followlinks=True):  # symlinked runs too
            real = os.path.realpath(here)
            if real in visited:  # a link loop, or a folder reached twice
                subdirs.clear()
                continue
            visited.add(real)
            if _is_run(here, subdirs + names):
                paths.setdefault(real, here)
                subdirs.clear()
    return sorted(paths.values())


def distinct(runs: list[RunFolder]) -> tuple[list[RunFolder], list[str]]:
    """The runs with each copy (same run, same seeds: a folder copied or merged twice) kept
    once, a finished one first, then the first by path; and a note per copy left out."""
    kept, notes = {}, []
    for run in sorted(runs, key=lambda r: (not r.done, r.path)):
        if run.spec is None:
            kept[run.path] = run
            continue
        first = kept.setdefault(run.spec.copy_key, run)
        if first is not run:
            notes.append(f"{run.path} is a copy of {first.path}: counted once")
    return sorted(kept.values(), key=lambda r: r.path), notes


def find_runs(dirs: list[str], progress: bool = True) -> list[RunFolder]:
    """Every run under ``dirs`` (:func:`run_folders`), read, sorted by path; progress on
    stderr for large trees (:func:`~domainbed_gaqat.progress.track`)."""
    return [read_run(p) for p in track(run_folders(dirs), "reading run folders",
                                       enabled=progress)]


class Locator:
    """Where a planned DomainBed ``Job``'s run is and how far it got.

    Without ``runs``: in the job's own folder, by DomainBed's rules (``Job.state``). With
    ``runs`` (those found on disk, e.g. by :func:`find_runs`): the run with the job's identity,
    wherever it is; of several, a finished one, then the first by path (``duplicates`` lists
    the others).
    """

    def __init__(self, runs: list[RunFolder] | None = None) -> None:
        self.by_identity: dict[str, RunFolder] | None = None
        self.duplicates: list[str] = []
        if runs is not None:
            self.by_identity = {}
            for run in sorted(runs, key=lambda r: (not r.done, r.path)):
                if run.spec is None:
                    continue
                first = self.by_identity.setdefault(run.spec.identity, run)
                if first is not run:
                    self.duplicates.append(f"{run.path} repeats {first.path} (the same job): "
                                           "not used")

    def find(self, job) -> RunFolder | None:
        """The job's run, or None where it has none (not launched, or no record yet)."""
        if self.by_identity is None:
            return read_run(job.output_dir) if os.path.isdir(job.output_dir) else None
        return self.by_identity.get(RunSpec.from_train_args(job.train_args).identity)

    def state(self, job) -> str:
        """DomainBed's ``Job.DONE`` / ``INCOMPLETE`` / ``NOT_LAUNCHED``."""
        if self.by_identity is None:
            return job.state
        run = self.find(job)
        return job.NOT_LAUNCHED if run is None else job.DONE if run.done else job.INCOMPLETE
