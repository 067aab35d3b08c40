"""Robust reading of DomainBed run folders (``results.jsonl``, ``done``).

DomainBed's ``reporting.load_records`` stops at the first unreadable line (a job killed while
writing leaves a truncated last line). Here every line that is not a complete checkpoint record
is skipped and reported, and each run keeps its folder, so incomplete runs can be listed.
"""

import json
import os
import re
from dataclasses import dataclass, field

RUN_FILES = ("results.jsonl", "done", "out.txt", "err.txt")
JOB_HASH = re.compile(r"[0-9a-f]{32}")  # DomainBed's Job folder name: md5 of the train args


@dataclass
class Run:
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


def read_run(path: str) -> Run:
    """Read one run folder; unreadable or incomplete lines are reported in ``problems``."""
    records, problems = [], []
    results = os.path.join(path, "results.jsonl")
    if os.path.isfile(results):
        with open(results, encoding="utf-8", errors="replace") as f:
            text = f.read()
        lines = text.split("\n")
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                truncated = number == len(lines)  # the file does not end with a newline
                what = "truncated last line (a killed job?)" if truncated else "invalid JSON"
                problems.append(f"{results}:{number}: {what}, skipped ({err.msg})")
                continue
            why = _record_problem(record)
            if why:
                problems.append(f"{results}:{number}: {why}, skipped")
            else:
                records.append(record)
    return Run(path, records, os.path.isfile(os.path.join(path, "done")), problems)


def _is_run(path: str, names: list[str]) -> bool:
    return (any(n in names for n in RUN_FILES)
            or (not names and JOB_HASH.fullmatch(os.path.basename(path)) is not None))


def find_runs(dirs: list[str]) -> list[Run]:
    """All run folders under ``dirs`` (a run folder holds train.py's files, or is the empty
    folder DomainBed's ``Job.launch`` makes before the job starts), sorted by path."""
    paths = set()
    for top in dirs:
        if not os.path.isdir(top):
            raise FileNotFoundError(f"--input_dir {top!r}: no such directory")
        for here, subdirs, names in os.walk(top):
            if _is_run(here, subdirs + names):
                paths.add(here)
                subdirs.clear()
    return [read_run(p) for p in sorted(paths)]
