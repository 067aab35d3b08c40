"""One owner per run folder: an advisory lock held for the owning process's lifetime.

The owner holds a POSIX record lock (``fcntl.lockf``) on ``<run>/.lock`` and writes who it is
into the file (host, pid, start time). The kernel releases the lock when the process ends,
however it ends (SIGKILL included), so a lock is never stale; the file's text stays and only
describes the last owner. POSIX locks work across the machines of a cluster on NFS (lockd,
NFSv4). :func:`holder` tells, without taking the lock, whether a process owns a folder now.
"""

import datetime
import errno
import fcntl
import json
import os
import socket
import struct

LOCK_FILE = ".lock"
# struct flock on 64-bit Linux: l_type, l_whence, l_start, l_len, l_pid (32 bytes)
_FLOCK = "hhqqi4x"
# folders this process owns: POSIX locks belong to the process, so a second lock of the same
# file here would succeed, and closing it would release the first
_OWNED: set[str] = set()


class RunFolderBusy(ValueError):
    """Another process owns the run folder."""


def _describe(info: dict | None) -> str:
    if not info:
        return "another process (no owner recorded yet)"
    return f"process {info.get('pid')} on host {info.get('host')} (since {info.get('since')})"


def _read(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            info = json.loads(f.read() or "null")
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


class RunLock:
    """The lock of one run folder; :meth:`acquire` before touching any other file of it.

    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> lock = RunLock(folder)
    >>> lock.acquire()
    >>> holder(folder)["pid"] == os.getpid()
    True
    >>> lock.release()
    >>> holder(folder) is None
    True
    """

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.path = os.path.join(folder, LOCK_FILE)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Own the folder (created if missing), or raise :class:`RunFolderBusy` naming the
        owner."""
        os.makedirs(self.folder, exist_ok=True)
        key = os.path.realpath(self.folder)
        if key in _OWNED:
            raise RunFolderBusy(f"{self.folder} is in use by this process already")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise RunFolderBusy(f"{self.folder} is in use by {_describe(_read(self.path))}: "
                                "one process per run folder; wait for it to end, or use "
                                "another --output_dir") from None
        info = {"host": socket.gethostname(), "pid": os.getpid(),
                "since": datetime.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        _OWNED.add(key)

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def release(self) -> None:
        """Give the folder up (the process's end does it too)."""
        if self._fd is not None:
            os.close(self._fd)  # closing releases the process's POSIX locks on the file
            self._fd = None
            _OWNED.discard(os.path.realpath(self.folder))

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def holder(folder: str) -> dict | None:
    """Who owns ``folder`` now (``{"host", "pid", "since"}``), or None where no process does.

    Asks the kernel (``F_GETLK``) without taking the lock, so it never gets in an owner's way;
    where that query is not available it falls back to the recorded owner, alive on this host.
    """
    path = os.path.join(folder, LOCK_FILE)
    if os.path.realpath(folder) in _OWNED:  # the kernel does not report a process's own locks
        return _read(path) or {}
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        try:
            answer = fcntl.fcntl(fd, fcntl.F_GETLK, query)
            held = struct.unpack(_FLOCK, answer)[0] != fcntl.F_UNLCK
        except OSError:
            info = _read(path)
            held = bool(info) and info.get("host") == socket.gethostname() and _alive(
                info.get("pid"))
    finally:
        os.close(fd)
    return (_read(path) or {}) if held else None


def _alive(pid: object) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
