"""A ``submitit`` command launcher for DomainBed's ``command_launchers.REGISTRY``.

``--command_launcher submitit`` submits a sweep's commands as one Slurm job array (or runs them
through submitit's local executor), each with the Python interpreter that launched the sweep.
Settings come from the defaults below, then a sweep config's ``slurm`` sections (``gaqat-sweep``
only), then the environment, which wins:

===================  ================================  ==========================================
setting              environment variable              default
===================  ================================  ==========================================
cluster              GAQAT_SUBMITIT_CLUSTER            auto: ``slurm`` if sbatch exists, else
                                                       ``local`` (``debug``: in-process)
folder               GAQAT_SUBMITIT_FOLDER             ``submitit_logs`` (logs, pickled jobs)
partition            GAQAT_SUBMITIT_PARTITION          the cluster's default partition
time_min             GAQAT_SUBMITIT_TIME_MIN           ``1440``: explicit time limit per job
gpus                 GAQAT_SUBMITIT_GPUS               ``1`` per job
cpus                 GAQAT_SUBMITIT_CPUS               ``8`` per job
mem_gb               GAQAT_SUBMITIT_MEM_GB             ``32`` per job
array_parallelism    GAQAT_SUBMITIT_ARRAY_PARALLELISM  ``64`` jobs of the array at once
wait                 GAQAT_SUBMITIT_WAIT               ``0``; ``1``: return when all jobs ended
===================  ================================  ==========================================

submitit's local executor starts every job at once, on the same GPUs: it is for tests; on one
machine use DomainBed's ``local`` or ``multi_gpu`` launchers.
"""

import os
import re
import shlex
import subprocess
import sys

CLUSTERS = ("slurm", "local", "debug")
# name: (environment variable, default, type)
SETTINGS: dict[str, tuple[str, object, type]] = {
    "cluster": ("GAQAT_SUBMITIT_CLUSTER", None, str),
    "folder": ("GAQAT_SUBMITIT_FOLDER", "submitit_logs", str),
    "partition": ("GAQAT_SUBMITIT_PARTITION", None, str),
    "time_min": ("GAQAT_SUBMITIT_TIME_MIN", 1440, int),
    "gpus": ("GAQAT_SUBMITIT_GPUS", 1, int),
    "cpus": ("GAQAT_SUBMITIT_CPUS", 8, int),
    "mem_gb": ("GAQAT_SUBMITIT_MEM_GB", 32, int),
    "array_parallelism": ("GAQAT_SUBMITIT_ARRAY_PARALLELISM", 64, int),
    "wait": ("GAQAT_SUBMITIT_WAIT", False, bool),
}


def _from_env(name: str, kind: type, text: str) -> object:
    if kind is str:
        return text
    pattern = r"[01]" if kind is bool else r"\d+"
    if not re.fullmatch(pattern, text.strip()):
        expected = "0 or 1" if kind is bool else "a non-negative integer"
        raise ValueError(f"${name}={text!r}: expected {expected}")
    return kind(int(text))


def settings(config: dict | None = None) -> dict:
    """Launcher settings: defaults, then ``config`` (a sweep's ``slurm`` section), then env."""
    config = {} if config is None else config
    if not isinstance(config, dict):
        raise ValueError(f"slurm settings {config!r}: expected a dict")
    unknown = set(config) - set(SETTINGS)
    if unknown:
        raise ValueError(f"slurm settings {sorted(unknown)}: expected some of {sorted(SETTINGS)}")
    result = {}
    for name, (variable, default, kind) in SETTINGS.items():
        value = config.get(name, default)
        if value is not None and (type(value) is not kind or (kind is int and value < 0)):
            expected = {int: "an integer >= 0", str: "a string", bool: "true or false"}[kind]
            raise ValueError(f"slurm setting {name}={value!r}: expected {expected}")
        if os.environ.get(variable):
            value = _from_env(variable, kind, os.environ[variable])
        result[name] = value
    if result["cluster"] not in (None, *CLUSTERS):
        raise ValueError(f"cluster {result['cluster']!r}: expected one of {CLUSTERS}")
    return result


def with_this_python(command: str) -> str:
    """Run DomainBed's ``python -m ...`` commands with the interpreter of this process."""
    return re.sub(r"^python3?(?=\s)", shlex.quote(sys.executable), command.strip())


def run_command(command: str) -> None:
    """Run one sweep command in a shell (the body of each submitit job)."""
    subprocess.run(command, shell=True, check=True)


def make_executor(config: dict | None = None):
    """A submitit executor configured by :func:`settings`."""
    import submitit

    s = settings(config)
    executor = submitit.AutoExecutor(folder=os.path.join(s["folder"], "%j"), cluster=s["cluster"])
    params = {"name": "domainbed", "timeout_min": s["time_min"], "gpus_per_node": s["gpus"],
              "cpus_per_task": s["cpus"], "mem_gb": s["mem_gb"],
              "slurm_array_parallelism": s["array_parallelism"]}
    if s["partition"]:
        params["slurm_partition"] = s["partition"]
    executor.update_parameters(**params)
    return executor


def submitit_launcher(commands: list[str], config: dict | None = None) -> list:
    """DomainBed launcher: submit ``commands`` as one job array; returns the submitit jobs.
    With ``wait``, blocks until all ended and reports the failed ones."""
    if not commands:
        return []
    executor = make_executor(config)
    jobs = executor.map_array(run_command, [with_this_python(c) for c in commands])
    print(f"submitit: {len(jobs)} jobs submitted to {executor.cluster}, first id "
          f"{jobs[0].job_id}, logs in {jobs[0].paths.folder.parent}")
    if settings(config)["wait"]:
        failed = [job for job in jobs if job.exception() is not None]
        for job in failed:
            print(f"submitit: job {job.job_id} failed, see {job.paths.stderr}")
        print(f"submitit: {len(jobs) - len(failed)} of {len(jobs)} jobs succeeded")
    return jobs


REGISTRY = {"submitit": submitit_launcher}
