"""A ``submitit`` command launcher for DomainBed's ``command_launchers.REGISTRY``.

``--command_launcher submitit`` submits the sweep's commands as one Slurm job array (or runs
them through submitit's local executor), each with the Python interpreter that launched the
sweep. Settings come from the environment:

==============================  ==========================================  =============
variable                        meaning                                     default
==============================  ==========================================  =============
GAQAT_SUBMITIT_CLUSTER          ``slurm``, ``local`` or ``debug``            auto-detect
GAQAT_SUBMITIT_FOLDER           logs and pickles of the jobs                ``submitit_logs``
GAQAT_SLURM_PARTITION           Slurm partition                             (cluster default)
GAQAT_SLURM_TIME                time limit per job, minutes (explicit)      ``1440``
GAQAT_SLURM_GPUS                GPUs per job                                ``1``
GAQAT_SLURM_CPUS                CPUs per job                                ``8``
GAQAT_SLURM_MEM_GB              memory per job, GB                          ``32``
GAQAT_SLURM_ARRAY_PARALLELISM   jobs of the array running at once           ``64``
GAQAT_SUBMITIT_WAIT             ``1``: block until every job finished       ``0``
==============================  ==========================================  =============
"""

import os
import re
import shlex
import subprocess
import sys


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if not value:
        return default
    if not re.fullmatch(r"\d+", value.strip()):
        raise ValueError(f"${name}={value!r}: expected a non-negative integer")
    return int(value)


def with_this_python(command: str) -> str:
    """Run DomainBed's ``python -m ...`` commands with the interpreter of this process."""
    return re.sub(r"^python3?(?=\s)", shlex.quote(sys.executable), command.strip())


def run_command(command: str) -> None:
    """Run one sweep command in a shell (the body of each submitit job)."""
    subprocess.run(command, shell=True, check=True)


def make_executor():
    """A submitit executor configured from the environment (see the module docstring)."""
    import submitit

    cluster = os.environ.get("GAQAT_SUBMITIT_CLUSTER") or None
    if cluster not in (None, "slurm", "local", "debug"):
        raise ValueError(f"$GAQAT_SUBMITIT_CLUSTER={cluster!r}: expected slurm, local or debug")
    folder = os.environ.get("GAQAT_SUBMITIT_FOLDER", "submitit_logs")
    executor = submitit.AutoExecutor(folder=os.path.join(folder, "%j"), cluster=cluster)
    params = {
        "timeout_min": _env_int("GAQAT_SLURM_TIME", 1440),
        "gpus_per_node": _env_int("GAQAT_SLURM_GPUS", 1),
        "cpus_per_task": _env_int("GAQAT_SLURM_CPUS", 8),
        "mem_gb": _env_int("GAQAT_SLURM_MEM_GB", 32),
        "slurm_array_parallelism": _env_int("GAQAT_SLURM_ARRAY_PARALLELISM", 64),
    }
    if os.environ.get("GAQAT_SLURM_PARTITION"):
        params["slurm_partition"] = os.environ["GAQAT_SLURM_PARTITION"]
    if executor.cluster != "slurm":
        params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
        params["gpus_per_node"] = 0 if executor.cluster == "local" else params["gpus_per_node"]
    executor.update_parameters(**params)
    return executor


def submitit_launcher(commands: list[str]) -> list:
    """DomainBed launcher: submit ``commands`` as one job array; returns the submitit jobs."""
    if not commands:
        return []
    executor = make_executor()
    jobs = executor.map_array(run_command, [with_this_python(c) for c in commands])
    print(f"submitit: {len(jobs)} jobs submitted ({executor.cluster}), "
          f"first id {jobs[0].job_id}, logs in {os.environ.get('GAQAT_SUBMITIT_FOLDER', 'submitit_logs')}")
    if os.environ.get("GAQAT_SUBMITIT_WAIT", "0") == "1":
        for job in jobs:
            job.result()
    return jobs


REGISTRY = {"submitit": submitit_launcher}
