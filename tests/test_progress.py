"""The one progress helper: a bar on a terminal, plain periodic lines in a log, nothing when
disabled or for work shorter than the interval."""

import doctest
import io
import re

from domainbed_gaqat import progress
from domainbed_gaqat.progress import track


class Terminal(io.StringIO):
    """A stub stream that says it is a terminal (to see which branch the helper takes)."""

    def isatty(self) -> bool:
        return True


def test_docstring_example():
    assert doctest.testmod(progress).failed == 0


def test_log_gets_one_plain_line_an_interval_and_no_carriage_return():
    log = io.StringIO()
    assert list(track(iter(range(4)), "runs", total=4, stream=log, interval=0)) == [0, 1, 2, 3]
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert [re.match(r"runs: (\d)/4 \((\d+)%\)", line).groups() for line in lines] == [
        ("1", "25"), ("2", "50"), ("3", "75"), ("4", "100")]
    assert all("left" in line for line in lines[:-1]) and "left" not in lines[-1]


def test_an_item_counts_once_the_next_one_is_asked_for():
    log = io.StringIO()
    items = track([1, 2], "x", stream=log, interval=0)
    next(items)
    assert log.getvalue() == ""  # the first item is still being worked on
    next(items)
    assert log.getvalue().startswith("x: 1/2 (50%)")


def test_short_work_and_disabled_progress_write_nothing():
    for kwargs in ({"interval": 3600}, {"enabled": False, "interval": 0}):
        log = io.StringIO()
        assert sum(track(range(5), "quick", stream=log, **kwargs)) == 10
        assert log.getvalue() == ""


def test_without_a_total_the_lines_count_items():
    log = io.StringIO()
    list(track((i for i in range(2)), "gen", stream=log, interval=0))
    assert log.getvalue().splitlines() == ["gen: 1 done, 00:00 elapsed",
                                           "gen: 2 done, 00:00 elapsed"]


def test_terminal_gets_tqdm_bar():
    term = Terminal()
    assert list(track(range(3), "bar", stream=term, delay=0)) == [0, 1, 2]
    out = term.getvalue()
    assert "\r" in out and "bar: 100%" in out and "3/3" in out
