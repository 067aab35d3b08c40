"""``gaqat demo`` / ``make demo``: the ``sweeps/demo.py`` sweep end to end on the offline dataset,
on CPU.

Stage after stage (full-precision ERM, then LSQ and SAGM+LSQ, then GAQAT), DomainBed's ``Job``
machinery runs ``domainbed.scripts.train`` with DomainBed's ``local`` launcher (with progress);
then the plugin's table and DomainBed's own ``collect_results`` are printed. Runs already done
in ``--output_dir`` are kept and reused (DomainBed skips them), leftovers of an interrupted demo
are deleted first.
"""

import os
import subprocess
import sys
import time

from domainbed.scripts.sweep import Job

from domainbed_gaqat.experiments import sweep, tables
from domainbed_gaqat.experiments.configs import load_config
from domainbed_gaqat.progress import track


def add_arguments(parser) -> None:
    parser.add_argument("--output_dir", default="demo_output")
    parser.add_argument("--data_dir", default="data", help="unused by RotatedDigits")
    parser.add_argument("--config", default="demo", help="a sweeps/ config (default: demo)")


def local_launcher(commands: list[str]) -> None:
    """DomainBed's ``local`` launcher (the commands one after the other, through the shell)
    with progress (:func:`~domainbed_gaqat.progress.track`)."""
    for command in track(commands, "demo: runs of this stage", delay=0):
        subprocess.call(command, shell=True)


def run(args) -> int:
    start = time.time()
    config = load_config(args.config)
    out, data = os.path.abspath(args.output_dir), os.path.abspath(args.data_dir)
    leftovers = [j for s in sweep.plan(config, out, data) for j in s.jobs
                 if j.state == Job.INCOMPLETE]
    if leftovers:
        print(f"Deleting {len(leftovers)} unfinished runs of an interrupted demo.")
        Job.delete(leftovers)
    status = sweep.run_config("launch", config, out, data, launcher=local_launcher,
                              confirm=False)
    if status:
        return status
    print(f"\n=== the plugin's table (gaqat tables {args.config} --output_dir {out} "
          f"--data_dir {data})\n", flush=True)
    status = tables.print_tables([args.config], output_dir=out, data_dir=data)
    folders = sorted({s.folder for s in sweep.plan(config, out, data)})
    for folder in folders:
        print(f"\n=== DomainBed's collect_results --input_dir {folder}\n", flush=True)
        subprocess.run([sys.executable, "-m", "domainbed.scripts.collect_results",
                        "--input_dir", folder], check=True)
    print(f"\nDemo finished in {time.time() - start:.0f} s. Results: one folder per run "
          f"(results.jsonl, out.txt, model.pkl) under {', '.join(folders)}; DomainBed's "
          f"tables in results.txt there.")
    return status


if __name__ == "__main__":
    from domainbed_gaqat.cli import run_as_module

    run_as_module("demo")
