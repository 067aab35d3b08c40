"""The table of docs/coverage.md: every DomainBed algorithm (and the plugin's SAGM and SWAD)
x {FP, LSQ, QTDoG} on the shared featurizer, each trained for two steps on RotatedDigits
through DomainBed's own ``train.py`` (SWAD, which needs its loop hooks, and CORAL_LSQ once
more, through ``gaqat train``): works, refused when built (the plugin's reason), or fails
(DomainBed's error).

    python scripts/coverage.py --output_dir /tmp/coverage --write docs/coverage.md
    python scripts/coverage.py --output_dir /tmp/coverage --check docs/coverage.md  # exit 1
                                                                 # when they disagree

Runs go through ``runpy`` in worker processes, ``--jobs`` at a time, nine runs each (DomainBed
and torch imported once per worker), each run with ``--steps 2 --checkpoint_freq 2`` (records
at steps 0 and 1), test env 5, batch 4 per domain; QT-DoG's quantization starts at the second
update (``quant_start`` 1), so both its phases run. The table replaces the lines between the
markers ``<!-- coverage -->`` and ``<!-- /coverage -->`` of the page.
"""

import argparse
import json
import math
import os
import runpy
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

VARIANTS = ("FP", "LSQ", "QTDoG")
LOOP = ("SWAD",)  # need gaqat train's loop hooks
EXTRA = ("CORAL_LSQ",)  # also through gaqat train
BEGIN, END = "<!-- coverage -->", "<!-- /coverage -->"
MARK = "coverage: "  # a worker's result lines
CHUNK = 9  # runs per worker process (a process's memory grows with each run)


def train_args(name: str, data_dir: str, output_dir: str) -> list[str]:
    hparams = {"batch_size": 4, **({"quant_start": 1} if name.endswith("_QTDoG") else {})}
    return ["--dataset", "RotatedDigits", "--test_envs", "5", "--algorithm", name,
            "--data_dir", data_dir, "--output_dir", output_dir, "--steps", "2",
            "--checkpoint_freq", "2", "--hparams", json.dumps(hparams)]


def outcome(output_dir: str, error: BaseException | None) -> dict:
    """``{"status": works | refused | fails, "message": ...}`` of one run."""
    if error is None:
        path = os.path.join(output_dir, "results.jsonl")
        records = [json.loads(line) for line in open(path)] if os.path.isfile(path) else []
        finite = all(math.isfinite(v) for r in records for k, v in r.items()
                     if isinstance(v, float))
        if os.path.isfile(os.path.join(output_dir, "done")) and len(records) == 2 and finite:
            return {"status": "works", "message": ""}
        return {"status": "fails", "message": f"{len(records)} records, finite: {finite}"}
    message = str(error).splitlines()[0] if str(error) else ""
    refused = "is not supported:" in message or "needs the training-loop hooks" in message
    return {"status": "refused" if refused else "fails",
            "message": f"{type(error).__name__}: {message}"}


def worker(names: list[str], data_dir: str, output_dir: str) -> None:
    """Each run in this process through DomainBed's train.py (``runpy``); JSON lines out."""
    import domainbed_gaqat

    domainbed_gaqat.register()
    for name in names:
        folder = os.path.join(output_dir, "domainbed", name)
        argv, streams = sys.argv, (sys.stdout, sys.stderr)
        sys.argv = ["train.py", *train_args(name, data_dir, folder)]
        error = None
        try:
            runpy.run_module("domainbed.scripts.train", run_name="__main__", alter_sys=True)
        except Exception as err:  # a refusal or DomainBed's own error: what the table says
            error = err
        finally:
            sys.argv = argv
            sys.stdout, sys.stderr = streams  # train.py tees them into its run folder
        print(MARK + json.dumps({"name": name, **outcome(folder, error)}), flush=True)


def through_gaqat_train(name: str, data_dir: str, output_dir: str) -> dict:
    folder = os.path.join(output_dir, "gaqat_train", name)
    proc = subprocess.run([sys.executable, "-m", "domainbed_gaqat.train",
                           *train_args(name, data_dir, folder)], capture_output=True, text=True)
    if proc.returncode == 0:
        return {"name": name, **outcome(folder, None)}
    last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
    return {"name": name, "status": "fails", "message": last}


def measure(data_dir: str, output_dir: str, jobs: int) -> dict[str, dict]:
    from domainbed_gaqat.plugin import generic

    bases = generic.domainbed_bases()
    bases += [b for b in generic.PLUGIN_BASES if b not in bases]  # SAGM, SWAD
    names = [f"{b}_{v}" for b in bases if b not in LOOP for v in VARIANTS]
    chunks = [names[i:i + CHUNK] for i in range(0, len(names), CHUNK)]

    def run_chunk(chunk: list[str]) -> list[dict]:
        proc = subprocess.run([sys.executable, __file__, "--worker", *chunk, "--data_dir",
                               data_dir, "--output_dir", output_dir],
                              capture_output=True, text=True, env={**os.environ,
                                                                   "OMP_NUM_THREADS": "1"})
        found = [json.loads(line.removeprefix(MARK)) for line in proc.stdout.splitlines()
                 if line.startswith(MARK)]
        if len(found) != len(chunk):
            raise RuntimeError(f"a worker ended early ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return found

    with ThreadPoolExecutor(jobs) as pool:
        results = {r["name"]: r for chunk in pool.map(run_chunk, chunks) for r in chunk}
    for name in [f"{b}_{v}" for b in LOOP for v in VARIANTS] + list(EXTRA):
        key = name if name not in results else f"{name} (gaqat train)"
        results[key] = {**through_gaqat_train(name, data_dir, output_dir), "name": key}
    return {"bases": bases, "results": results}


def table(measured: dict) -> str:
    """The Markdown table and its notes (one per distinct reason)."""
    from domainbed_gaqat.plugin import generic

    notes: list[str] = []
    lines = ["| algorithm | `_FP` | `_LSQ` | `_QTDoG` |", "|---|---|---|---|"]
    for base in measured["bases"]:
        cells = []
        for variant in VARIANTS:
            name = f"{base}_{variant}"
            r = measured["results"][name]
            cell = r["status"]
            message = r["message"].replace(name, "<Name>")  # one note for a reason
            if message:
                if message not in notes:
                    notes.append(message)
                cell += f" [{notes.index(message) + 1}]"
            if base in LOOP:
                cell += " (gaqat train)"
            canonical = generic.ALIASES.get(name) or (generic.PLUGIN_BASES.get(base)
                                                      if variant == "FP" else None)
            if canonical and canonical != name:
                cell += f" (= `{canonical}`)"
            cells.append(cell)
        lines.append(f"| {base} | " + " | ".join(cells) + " |")
    for name in EXTRA:
        r = measured["results"][f"{name} (gaqat train)"]
        lines.append(f"\n`{name}` through `gaqat train` too: {r['status']}"
                     + (f" ({r['message']})" if r["message"] else "") + ".")
    lines.append("")
    lines += [f"[{i}] {note.replace('|', '/')}" + "  " for i, note in enumerate(notes, 1)]
    return "\n".join(lines).rstrip() + "\n"


def replace_block(page: str, block: str) -> str:
    head, rest = page.split(BEGIN + "\n", 1)
    return head + BEGIN + "\n" + block + END + rest.split(END, 1)[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--write", help="the page to write the table into")
    what.add_argument("--check", help="the page whose table must equal the measured one")
    args = parser.parse_args(argv)
    data_dir = args.data_dir or os.path.join(args.output_dir, "data")
    if args.worker:
        worker(args.worker, data_dir, args.output_dir)
        return 0
    if os.path.exists(args.output_dir) and os.listdir(args.output_dir):
        parser.error(f"--output_dir {args.output_dir!r} is not empty: expected a new folder")
    measured = table(measure(data_dir, args.output_dir, args.jobs))
    print(measured)
    if args.write:
        from domainbed_gaqat.experiments.outputs import write_text

        with open(args.write) as f:
            page = f.read()
        write_text(args.write, replace_block(page, measured), overwrite=True)  # atomic
    if args.check:
        with open(args.check) as f:
            written = f.read().split(BEGIN + "\n", 1)[1].split(END, 1)[0]
        if written != measured:
            print(f"{args.check}'s table differs from the runs above", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
