"""The files of one run folder, as ``gaqat train`` keeps them through any stop.

DomainBed's files (``results.jsonl``, ``out.txt``, ``err.txt``, ``model.pkl``, ``done``) plus:

- ``.lock``: the owner (:mod:`~domainbed_gaqat.experiments.ownership`); nothing else is touched
  before it is held;
- ``resume.pt``: the saved training state (weights-only; it names the run it belongs to and how
  many records were written when it was saved);
- ``results.rolled_back.jsonl``: records written after the last saved state by a run that was
  then stopped (and a torn last line), moved there before the run continues, so that
  ``results.jsonl`` ends as an uninterrupted run's: nothing is silently deleted.

Every file but the appended records and logs is written whole to a temporary name and moved
into place (a kill leaves the old file or the new one); temporary files of a killed write are
removed by the next owner. OS faults (a full disk, a read-only folder, a permission) end the run
with one plain line naming the path.
"""

import errno
import io
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from domainbed_gaqat.experiments import outputs
from domainbed_gaqat.experiments.ownership import RunLock
from domainbed_gaqat.experiments.runs import RunSpec
from domainbed_gaqat.options import CommandFailed

RESULTS, DONE, MODEL, RESUME = "results.jsonl", "done", "model.pkl", "resume.pt"
ROLLED_BACK = "results.rolled_back.jsonl"
STATE_VERSION = 2
# temporary names of outputs.atomic_write: ".<name>.<random><suffix>"
_TEMPORARY = re.compile(r"\.(resume\.pt|model(_step\d+)?\.pkl|done|results\.jsonl)\.\w+"
                        r"(\.pt|\.pkl|\.jsonl)?")
_FAULTS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
           errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
           errno.EPERM: "operation not permitted", errno.EFBIG: "file too large (a size limit)",
           errno.EIO: "input/output error"}


@contextmanager
def os_faults(path: str, doing: str) -> Iterator[None]:
    """Turn an ``OSError`` while ``doing`` something to ``path`` into one plain line."""
    try:
        yield
    except OSError as err:
        what = _FAULTS.get(err.errno, err.strerror or str(err))
        raise CommandFailed(f"{doing} {path}: {what}") from err


class RunFiles:
    """One run folder (``--output_dir``) and its files; :meth:`own` before anything else."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = RunLock(path)

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @contextmanager
    def owned(self) -> Iterator["RunFiles"]:
        """Own the folder (refused with :class:`~.ownership.RunFolderBusy` naming the owner),
        remove temporary files left by a killed write, release at the end."""
        with os_faults(self.path, "cannot create the run folder"):
            self.lock.acquire()
        try:
            for name in os.listdir(self.path):
                if _TEMPORARY.fullmatch(name):
                    os.remove(self.file(name))
            yield self
        finally:
            self.lock.release()

    # --- what the folder holds -------------------------------------------------------------

    @property
    def done(self) -> bool:
        return os.path.isfile(self.file(DONE))

    def record_lines(self) -> list[str]:
        """The lines of ``results.jsonl`` (the last one torn if it has no newline)."""
        try:
            with open(self.file(RESULTS), encoding="utf-8", errors="replace", newline="") as f:
                return f.read().splitlines(keepends=True)
        except FileNotFoundError:
            return []

    def records_written(self) -> int:
        return sum(line.endswith("\n") for line in self.record_lines())

    def recorded_spec(self) -> RunSpec | None:
        """The run the folder's first complete record belongs to (None: no record)."""
        import json

        for line in self.record_lines():
            try:
                record = json.loads(line)
                return RunSpec.from_record(record)
            except (ValueError, KeyError, TypeError):
                continue
        return None

    def load_state(self) -> dict | None:
        """The saved state (read weights-only: an output folder can be shared or tampered
        with), or None."""
        from domainbed_gaqat.plugin.model_files import read_weights

        if not os.path.exists(self.file(RESUME)):
            return None
        state = read_weights(self.file(RESUME), "resume state of gaqat train")
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            found = state.get("version") if isinstance(state, dict) else None
            raise ValueError(f"{self.file(RESUME)} is a version-{found} resume state, this "
                             f"gaqat train reads version {STATE_VERSION} (written by another "
                             "release): delete it to start the run again")
        return state

    def check_holds(self, spec: RunSpec, state: dict | None) -> None:
        """Refuse (``ValueError``) when the folder holds another run, naming what differs."""
        held = RunSpec(**state["spec"]) if state is not None else self.recorded_spec()
        if held is None:
            return
        differ = held.differences(spec)
        if differ:
            detail = ", ".join(f"{k} {a!r} (now {b!r})" for k, (a, b) in differ.items())
            raise ValueError(f"{self.path} holds another run: it differs in {detail}; run "
                             "that command again, or use another --output_dir")

    # --- writing ---------------------------------------------------------------------------

    def roll_back(self, keep: int) -> int:
        """Keep the first ``keep`` complete records; move the rest (a torn line too) to
        ``results.rolled_back.jsonl``. Returns how many lines moved."""
        lines = self.record_lines()
        complete = [line for line in lines if line.endswith("\n")]
        if len(complete) < keep:
            raise ValueError(f"{self.file(RESULTS)} holds {len(complete)} records but the saved "
                             f"state was written after {keep}: the file was changed; restore "
                             f"it, or delete {self.file(RESUME)} to start the run again")
        extra = lines[keep:]
        if not extra:
            return 0
        aside = "".join(line if line.endswith("\n") else line + "\n" for line in extra)
        with os_faults(self.file(ROLLED_BACK), "cannot keep rolled-back records in"):
            with open(self.file(ROLLED_BACK), "a", encoding="utf-8") as f:
                f.write(aside)
                f.flush()
                os.fsync(f.fileno())
            outputs.write_text(self.file(RESULTS), "".join(lines[:keep]), overwrite=True)
        return len(extra)

    def append_record(self, line: str) -> None:
        """Append one JSON line (a kill can tear it: :meth:`roll_back` moves it aside)."""
        with os_faults(self.file(RESULTS), "cannot write the record to"):
            with open(self.file(RESULTS), "a", encoding="utf-8") as f:
                f.write(line + "\n")
                f.flush()

    def write(self, name: str, write: Callable[[io.BytesIO], None]) -> str:
        """Serialise with ``write`` in memory, then put the bytes into place atomically."""
        buffer = io.BytesIO()
        write(buffer)

        def put(tmp: str) -> None:
            with open(tmp, "wb") as f:
                f.write(buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())

        with os_faults(self.file(name), "cannot write"):
            return outputs.atomic_write(self.file(name), put, overwrite=True)

    def save_state(self, state: dict) -> None:
        self.write(RESUME, lambda f: torch.save({"version": STATE_VERSION, **state}, f))

    def save_model(self, name: str, checkpoint: dict) -> None:
        self.write(name, lambda f: torch.save(checkpoint, f))

    def finish(self) -> None:
        """Mark the run done, then drop its resume state."""
        if not self.done:
            self.write(DONE, lambda f: f.write(b"done"))
        if os.path.exists(self.file(RESUME)):
            os.remove(self.file(RESUME))
