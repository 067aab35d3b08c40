"""Progress where a person waits: one helper for every long command.

On a terminal, a tqdm bar on stderr (shown once the work has taken ``delay`` seconds); where
stderr is not a terminal (a log file, a Slurm job's output), plain lines instead of a bar's
carriage returns: one every ``interval`` seconds and a last one when done, none at all for work
that ends within ``interval``. ``enabled=False`` (a command's ``--quiet``) shows nothing.

>>> import io
>>> log = io.StringIO()  # not a terminal
>>> sum(track(range(3), "adding", stream=log, interval=0))
3
>>> print(log.getvalue().strip().splitlines()[-1])
adding: 3/3 (100%), 00:00 elapsed
"""

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def _line(desc: str, n: int, total: int | None, elapsed: float) -> str:
    spent = tqdm.format_interval(elapsed)
    if not total:
        return f"{desc}: {n} done, {spent} elapsed"
    line = f"{desc}: {n}/{total} ({100 * n // total}%), {spent} elapsed"
    if 0 < n < total:
        line += f", about {tqdm.format_interval(elapsed / n * (total - n))} left"
    return line


def track(items: Iterable[T], desc: str, total: int | None = None, enabled: bool = True,
          stream: TextIO | None = None, interval: float = 30.0,
          delay: float = 0.5) -> Iterator[T]:
    """Yield ``items``, showing how many are done (an item counts once the caller asks for the
    next one) on ``stream`` (default: stderr)."""
    stream = stream or sys.stderr
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    if not enabled:
        yield from items
        return
    if stream.isatty():
        yield from tqdm(items, desc=desc, total=total, file=stream, delay=delay,
                        dynamic_ncols=True)
        return
    start = last = time.monotonic()
    n = shown = 0
    for item in items:
        yield item
        n += 1
        now = time.monotonic()
        if now - last >= interval:
            stream.write(_line(desc, n, total, now - start) + "\n")
            stream.flush()
            last, shown = now, n
    if shown and shown != n:
        stream.write(_line(desc, n, total, time.monotonic() - start) + "\n")
        stream.flush()
