"""A ``submitit`` command launcher for DomainBed's ``command_launchers.REGISTRY``.

``--command_launcher submitit`` submits a sweep's commands as one Slurm job array (or runs them
through submitit's local executor), each with the Python interpreter that launched the sweep
and, for DomainBed's ``domainbed.scripts.train``, through its resumable drop-in
``domainbed_gaqat.train``. The jobs are checkpointable: on the time limit or a preemption
(submitit's SIGUSR2) the training saves its state, submitit requeues the job, and the requeued
job continues from the saved state.

Before submitting, the request (partition, GPUs, CPUs, memory, time) is checked against what
the cluster's nodes offer (``sinfo``): a request no node can satisfy is refused, naming the
resource, the request and the largest node, instead of pending forever. With ``wait`` the
launcher reports the jobs' states as they change, up to ``wait_max_min`` minutes, and then
names every job that did not complete, with its state and log.

Settings (:class:`SlurmSettings`) come from the defaults below, then a sweep config's ``slurm``
sections (``gaqat sweep`` only), then the environment, which wins. The variables are
``DOMAINBED_GAQAT_SUBMITIT_<SETTING>`` (the first spelling, ``GAQAT_SUBMITIT_<SETTING>``, is still
read, with a deprecation warning, for one release):

===================  ==========================================================================
setting              default
===================  ==========================================================================
cluster              auto: ``slurm`` if sbatch exists, else ``local`` (``debug``: in-process)
folder               ``submitit_logs`` (logs, pickled jobs)
partition            the cluster's default partition
time_min             ``1440``: time limit per job
gpus                 ``1`` per job
cpus                 ``8`` per job
mem_gb               ``32`` per job
array_parallelism    ``64`` jobs of the array at once
signal_delay_s       ``90``: SIGUSR2 this long before the limit
max_timeouts         ``50``: requeues at the time limit before a job is given up (submitit's
                     default, 3, would end a 50,000-step run on a 4-hour partition)
wait                 ``0``; ``1``: return when all jobs ended
wait_max_min         ``0``: the time limit x array rounds + 60
===================  ==========================================================================

submitit's local executor starts every job at once, on the same GPUs: it is for tests; on one
machine use DomainBed's ``local`` or ``multi_gpu`` launchers.
"""

import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

CLUSTERS = ("slurm", "local", "debug")
ENV_PREFIX = "DOMAINBED_GAQAT_SUBMITIT_"
OLD_ENV_PREFIX = "GAQAT_SUBMITIT_"  # read until the next release, with a deprecation warning
POLL_S = 5
SETTLE_S = 120  # at most this long for the accounting to catch up with finished jobs
ENTRY = "domainbed_gaqat.train"
EXPECTED = {int: "an integer >= 0", str: "a string", bool: "true or false"}


@dataclass(frozen=True)
class SlurmSettings:
    """The launcher's settings (the module docstring's table); checked when made.

    >>> SlurmSettings().updated({"time_min": 90}).time_min
    90
    >>> SlurmSettings(cpus="8")
    Traceback (most recent call last):
    ...
    ValueError: slurm setting cpus='8': expected an integer >= 0
    """

    cluster: str | None = None
    folder: str = "submitit_logs"
    partition: str | None = None
    time_min: int = 1440
    gpus: int = 1
    cpus: int = 8
    mem_gb: int = 32
    array_parallelism: int = 64
    signal_delay_s: int = 90
    max_timeouts: int = 50
    wait: bool = False
    wait_max_min: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            kind = _kind(f)
            value = getattr(self, f.name)
            if value is not None and (type(value) is not kind or (kind is int and value < 0)):
                raise ValueError(f"slurm setting {f.name}={value!r}: expected {EXPECTED[kind]}")
        if self.cluster not in (None, *CLUSTERS):
            raise ValueError(f"cluster {self.cluster!r}: expected one of {CLUSTERS}")

    def updated(self, section: Mapping[str, object]) -> "SlurmSettings":
        """These settings with a sweep config's ``slurm`` section on top."""
        if not isinstance(section, Mapping):
            raise ValueError(f"slurm settings {section!r}: expected a dict")
        names = [f.name for f in fields(self)]
        unknown = set(section) - set(names)
        if unknown:
            raise ValueError(f"slurm settings {sorted(unknown)}: expected some of {sorted(names)}")
        return replace(self, **section)

    def with_environment(self) -> "SlurmSettings":
        """These settings with the environment's ``DOMAINBED_GAQAT_SUBMITIT_*`` on top."""
        given = {}
        for f in fields(self):
            variable, text = _from_env(f.name.upper())
            if text:
                given[f.name] = _parse(variable, _kind(f), text)
        return replace(self, **given)


def _kind(f) -> type:
    return str if f.type == str | None else f.type


def _from_env(name: str) -> tuple[str, str]:
    """``(variable, value)`` of a setting in the environment: the new name's, else the old
    one's (with a deprecation warning), else ``(new name, "")``."""
    new, old = ENV_PREFIX + name, OLD_ENV_PREFIX + name
    if os.environ.get(new) or not os.environ.get(old):
        return new, os.environ.get(new, "")
    warnings.warn(f"${old} is deprecated: use ${new} (the old name is read until the next "
                  "release)", FutureWarning, stacklevel=3)
    return old, os.environ[old]


def _parse(variable: str, kind: type, text: str) -> object:
    if kind is str:
        return text
    pattern = r"[01]" if kind is bool else r"\d+"
    if not re.fullmatch(pattern, text.strip()):
        expected = "0 or 1" if kind is bool else "a non-negative integer"
        raise ValueError(f"${variable}={text!r}: expected {expected}")
    return kind(int(text))


def entry_command(command: str) -> str:
    """A sweep command with this process's interpreter, and DomainBed's train script replaced
    by its resumable drop-in (same arguments, same outputs)."""
    command = re.sub(r"^python3?(?=\s)", shlex.quote(sys.executable), command.strip())
    return re.sub(r"(\s-m\s+)domainbed\.scripts\.train(?=\s|$)", rf"\g<1>{ENTRY}", command)


class SweepCommand:
    """One sweep command as a checkpointable submitit job (submitit calls :meth:`checkpoint` on
    SIGUSR2: the time limit or a preemption)."""

    def __init__(self) -> None:
        self._process: subprocess.Popen | None = None

    def __call__(self, command: str) -> None:
        self._process = process = subprocess.Popen(shlex.split(command))
        while process.poll() is None:  # not wait(): it would hold the lock checkpoint needs
            time.sleep(1)
        if process.returncode:
            raise subprocess.CalledProcessError(process.returncode, command)

    def checkpoint(self, command: str):
        """Let the command (signalled too) save its state, then requeue the same command."""
        from submitit.helpers import DelayedSubmission

        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGUSR2)
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                pass
        return DelayedSubmission(self, command)

    def __getstate__(self) -> dict:  # pickled for the requeue: no process handle
        return {"_process": None}


# --- what the cluster offers ---------------------------------------------------------------


def _minutes(text: str) -> float:
    """A Slurm time limit (``infinite``, ``D-HH:MM:SS``, ``HH:MM:SS``, ``MM:SS``, ``MM``)."""
    if text.strip() in ("infinite", "UNLIMITED", "n/a"):
        return math.inf
    days, _, rest = text.strip().rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    hours, minutes, seconds = ([0] * (3 - len(parts)) + parts) if len(parts) > 1 else (
        0, parts[0], 0)
    return int(days or 0) * 1440 + hours * 60 + minutes + seconds / 60


def _gpus(gres: str) -> int:
    return sum(int(m[1]) for m in re.finditer(r"gpu(?::[^:,()]+)?:(\d+)", gres))


def cluster_nodes() -> list[dict]:
    """One entry per node and partition from ``sinfo``: name, partition (default marked),
    CPUs, memory in MB, GPUs, the partition's time limit in minutes."""
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N|%P|%c|%m|%G|%l"], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    nodes = []
    for line in out.splitlines():
        name, partition, cpus, memory, gres, limit = line.strip().split("|")
        nodes.append({"name": name, "partition": partition.rstrip("*"),
                      "default": partition.endswith("*"), "cpus": int(cpus.rstrip("+")),
                      "mem_mb": int(re.sub(r"\D", "", memory) or 0), "gpus": _gpus(gres),
                      "time_min": _minutes(limit)})
    return nodes


def check_request(request: SlurmSettings, nodes: list[dict]) -> None:
    """Refuse a request no node can satisfy (see the module docstring)."""
    partitions = sorted({n["partition"] for n in nodes})
    partition = request.partition or next((n["partition"] for n in nodes if n["default"]),
                                          None)
    if partition not in partitions:
        raise ValueError(f"submitit: partition {request.partition or '(default)'!r} is not one "
                         f"of the cluster's {partitions}")
    candidates = [n for n in nodes if n["partition"] == partition]
    for resource, wanted, have, unit in (("CPUs", request.cpus, "cpus", ""),
                                         ("memory", request.mem_gb * 1024, "mem_mb", " MB"),
                                         ("GPUs", request.gpus, "gpus", "")):
        largest = max(candidates, key=lambda n: n[have])
        if wanted > largest[have]:
            raise ValueError(
                f"submitit: no node of partition {partition!r} has the {resource} asked for: "
                f"{wanted}{unit} requested per job, the largest node ({largest['name']}) has "
                f"{largest[have]}{unit}; lower the setting ({ENV_PREFIX}*, or the config's "
                f"slurm section)")
    limit = max(n["time_min"] for n in candidates)
    if request.time_min > limit:
        raise ValueError(f"submitit: time_min {request.time_min} exceeds partition "
                         f"{partition!r}'s limit of {limit:g} minutes")


# --- submitting and waiting ----------------------------------------------------------------


def make_executor(settings: SlurmSettings):
    """A submitit executor configured by ``settings``."""
    import submitit

    executor = submitit.AutoExecutor(folder=os.path.join(settings.folder, "%j"),
                                     cluster=settings.cluster,
                                     slurm_max_num_timeout=settings.max_timeouts)
    params = {"name": "domainbed", "timeout_min": settings.time_min,
              "gpus_per_node": settings.gpus, "cpus_per_task": settings.cpus,
              "mem_gb": settings.mem_gb, "slurm_array_parallelism": settings.array_parallelism,
              "slurm_signal_delay_s": settings.signal_delay_s}
    if settings.partition:
        params["slurm_partition"] = settings.partition
    executor.update_parameters(**params)
    return executor


def _completed(job) -> bool:
    """Done without an error (a cancelled Slurm job's ``exception()`` raises instead)."""
    if not job.done():
        return False
    try:
        return job.exception() is None
    except Exception:  # submitit.core.utils.UncompletedJobError: cancelled, timed out
        return False


def _settle(jobs: list, deadline: float) -> None:
    """Wait until Slurm's accounting shows every finished job in a final state: submitit calls
    a job done as soon as its result file exists, while ``sacct`` may still say RUNNING or
    COMPLETING (the states reported must be the accounting's, not a race with it)."""
    from submitit.slurm.slurm import SlurmJob

    pending = [job for job in jobs if isinstance(job, SlurmJob) and job.done()]
    while pending and time.time() < deadline:
        pending = [job for job in pending if not job.watcher.is_done(job.job_id, mode="force")]
        if pending:
            time.sleep(1)


def wait(jobs: list, max_minutes: float) -> list:
    """Report the jobs' states as they change until all ended or ``max_minutes`` passed;
    returns the jobs that did not complete (each reported by id, state and log)."""
    deadline, last = time.time() + 60 * max_minutes, None
    while True:
        states = Counter(job.state.split(" ")[0] for job in jobs)
        if states != last:
            print("submitit: " + ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())),
                  flush=True)
            last = states
        if all(job.done() for job in jobs) or time.time() > deadline:
            break
        time.sleep(POLL_S)
    _settle(jobs, deadline=time.time() + SETTLE_S)
    unfinished = [job for job in jobs if not _completed(job)]
    for job in unfinished:
        state = job.state if job.done() else f"{job.state}, still not done after waiting " \
                                             f"{max_minutes:g} min"
        print(f"submitit: job {job.job_id} {state}: see {job.paths.stderr}", flush=True)
    print(f"submitit: {len(jobs) - len(unfinished)} of {len(jobs)} jobs completed", flush=True)
    return unfinished


def submitit_launcher(commands: list[str], settings: SlurmSettings | None = None) -> list:
    """DomainBed launcher: submit ``commands`` as one job array with ``settings`` (default:
    the defaults; the environment wins over both); returns the submitit jobs. With ``wait``,
    blocks until all ended (bounded) and reports the ones that did not complete."""
    if not commands:
        return []
    settings = (settings or SlurmSettings()).with_environment()
    if settings.cluster == "slurm" or (settings.cluster is None and shutil.which("sbatch")):
        check_request(settings, cluster_nodes())
    executor = make_executor(settings)
    jobs = executor.map_array(SweepCommand(), [entry_command(c) for c in commands])
    print(f"submitit: {len(jobs)} jobs submitted to {executor.cluster}, first id "
          f"{jobs[0].job_id}, logs in {jobs[0].paths.folder.parent}", flush=True)
    if settings.wait:
        rounds = math.ceil(len(jobs) / max(settings.array_parallelism, 1))
        wait(jobs, settings.wait_max_min or settings.time_min * rounds + 60)
    return jobs


REGISTRY = {"submitit": submitit_launcher}
