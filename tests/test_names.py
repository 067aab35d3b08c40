"""Every ``domainbed_gaqat.*`` dotted name and every repository path written in the code (the
package, its configs, scripts and tests), the docs and the README resolves: the name to a module
or an attribute of one, the path to a file or folder. The changelog is history (it names what
no longer exists); a test line that makes a name up says so (``# name made up``)."""

import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOTTED = re.compile(r"\bdomainbed_gaqat(?:\.[A-Za-z_]\w*)+")
PATHS = re.compile(r"(?<![\w/.])(?:domainbed_gaqat|tests|scripts|sweeps|docs)/[\w./*-]*[\w*]")
FILES = ("domainbed_gaqat.pth",)  # dotted names that are files
MADE_UP = "# name made up"


def sources() -> list[Path]:
    """The code, tests, docs, README, configs and build files."""
    found = [REPO / n for n in ("README.md", "Makefile", "pyproject.toml", "setup.cfg",
                                "MANIFEST.in", "build_hooks.py")]
    for folder, pattern in (("domainbed_gaqat", "**/*.py"), ("docs", "*.md"),
                            ("sweeps", "*"), ("scripts", "*"), ("tests", "**/*.py")):
        found += sorted((REPO / folder).glob(pattern))
    return [p for p in found if p.is_file()]


def resolves(name: str) -> bool:
    """``name`` is a module, or attributes down from the longest importable module."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:n]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[n:]:
            if not hasattr(found, attribute):
                return False
            found = getattr(found, attribute)
        return True
    return False


def written(pattern: re.Pattern) -> dict[str, list[str]]:
    """``{text: [file:line, ...]}`` of every match of ``pattern`` in the sources."""
    out: dict[str, list[str]] = {}
    for path in sources():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for match in [] if MADE_UP in line else pattern.findall(line):
                out.setdefault(match, []).append(f"{path.relative_to(REPO)}:{number}")
    return out


def test_every_dotted_name_resolves():
    names = written(DOTTED)
    assert "domainbed_gaqat.plugin.hparams" in names  # the scan sees the code
    stale = {name: where for name, where in names.items()
             if name not in FILES and not resolves(name)}
    assert not stale, stale


def test_every_repository_path_exists():
    paths = written(PATHS)
    assert "domainbed_gaqat/quant" in paths  # the scan sees the README
    missing = {path: where for path, where in paths.items()
               if not any(REPO.glob(path)) and not (REPO / path).exists()}
    assert not missing, missing


STALE = ["domainbed_gaqat.algorithms", "domainbed_gaqat.selection",  # name made up
         "domainbed_gaqat.quant.quantizer", "domainbed_gaqat.x.y"]  # name made up


@pytest.mark.parametrize("stale", STALE)
def test_a_stale_name_is_caught(stale):
    assert not resolves(stale)
    assert resolves("domainbed_gaqat.experiments.runs.RunSpec.identity")
