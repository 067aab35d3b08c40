"""Packaging: one version, PyTorch with lower bounds only, and a wheel that leaves a newer
PyTorch alone.

pip runs with no configuration file (``PIP_CONFIG_FILE=/dev/null``, no ``PIP_*`` variables):
a machine's own cap (here ``/etc/xdg/pip``) is that machine's business, not the package's. The
resolver sees only a local folder of stub distributions (``stub_wheel``) standing in for
torch, torchvision and the other requirements, so the test runs offline; a copy of the wheel
with today's cap written into its metadata shows that the checks catch a cap.
"""

import email
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from support.helpers import run

import domainbed_gaqat

REPO = Path(__file__).resolve().parents[1]
PYTORCH = ("torch", "torchvision")
CAP = {"torch": "2.14.1", "torchvision": "0.29.1"}  # this machine's cap (/etc/xdg/pip)
NEWER = "99.0.0"


def upper_bounds(requirements: list[str]) -> dict[str, list[str]]:
    """The specifiers of torch / torchvision that cap them (``<``, ``<=``, ``==``, ``~=``)."""
    found = {}
    for text in requirements:
        req = Requirement(text)
        if req.name in PYTORCH and not req.marker:
            found[req.name] = [str(s) for s in req.specifier
                               if s.operator in ("<", "<=", "==", "~=", "===")]
    return found


def test_installed_metadata_has_lower_bounds_only_and_one_version():
    site = sysconfig.get_paths()["purelib"]  # not a stale egg-info in the checkout
    [dist] = [d for d in importlib.metadata.distributions(path=[site])
              if d.metadata["Name"] == "domainbed-gaqat"]
    requires = dist.requires
    assert upper_bounds(requires) == {"torch": [], "torchvision": []}
    lower = {Requirement(r).name: Requirement(r).specifier for r in requires
             if Requirement(r).name in PYTORCH}
    assert all(any(s.operator == ">=" for s in spec) for spec in lower.values())
    # the oldest release the fast suite passed on (docs/testing.md), and none older
    assert "2.4.1" in lower["torch"] and "0.19.1" in lower["torchvision"]
    assert "2.3.1" not in lower["torch"] and NEWER in lower["torch"]
    assert dist.version == domainbed_gaqat.__version__
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "version" not in project and project["dynamic"] == ["version"]
    assert not (REPO / "setup.cfg").exists()


def test_upper_bounds_sees_a_cap():
    assert upper_bounds(["torch>=2.4,<=2.14.1", "torchvision==0.19", "numpy<2"]) == {
        "torch": ["<=2.14.1"], "torchvision": ["==0.19"]}


# --- the resolver against a stub index -------------------------------------------------------


def stub_wheel(directory: Path, name: str, version: str) -> Path:
    """A stub distribution: an empty module under a real name and version, so that pip's
    resolver can be asked what it would install, offline. Installs nothing usable."""
    module = name.replace("-", "_")
    info = f"{module}-{version}.dist-info"
    path = directory / f"{module}-{version}-py3-none-any.whl"
    files = {f"{module}/__init__.py": "",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: stub\nRoot-Is-Purelib: true\n"
                              "Tag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as z:
        for f, text in files.items():
            z.writestr(f, text)
    return path


def capped_copy(wheel: Path, dest: Path) -> Path:
    """The wheel with today's cap added to its torch / torchvision requirements."""
    out = dest / wheel.name
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith(".dist-info/METADATA"):
                text = data.decode()
                for name in PYTORCH:
                    text = re.sub(rf"^Requires-Dist: {name}>=", f"Requires-Dist: {name}"
                                  f"<={CAP[name]},>=", text, flags=re.M)
                data = text.encode()
            dst.writestr(item, data)
    return out


def _pip_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def _pip(python: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), *args],
                          cwd=cwd, env=_pip_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def planned(python: Path, wheel: Path, stubs: Path, tmp: Path) -> dict[str, str]:
    """``{name: version}`` pip would install for ``wheel`` into the venv of ``python``."""
    report = tmp / f"report-{len(list(tmp.glob('report-*')))}.json"
    _pip(python, "install", "--dry-run", "--quiet", "--report", str(report), "--no-index",
         "--find-links", str(stubs), str(wheel), cwd=tmp)
    return {i["metadata"]["name"]: i["metadata"]["version"]
            for i in json.loads(report.read_text())["install"]}


@pytest.mark.slow
def test_wheel_accepts_and_keeps_a_torch_above_todays_cap(tmp_path):
    from test_registration import _copy_project

    project = _copy_project(tmp_path / "project")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--quiet", "-w", str(tmp_path / "wheels"), str(project)], cwd=tmp_path)
    [wheel] = (tmp_path / "wheels").glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        [meta] = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        requires = email.message_from_bytes(z.read(meta)).get_all("Requires-Dist")
    assert upper_bounds(requires) == {"torch": [], "torchvision": []}

    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for text in requires:
        req = Requirement(text)
        if not req.marker:  # the install requirements, at a version above any lower bound
            stub_wheel(stubs, req.name, NEWER)
    for name, version in CAP.items():
        stub_wheel(stubs, name, version)
    (tmp_path / "capped").mkdir()
    capped = capped_copy(wheel, tmp_path / "capped")

    fresh = tmp_path / "fresh"
    newer = tmp_path / "newer"
    for venv in (fresh, newer):
        run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    _pip(newer / "bin" / "python", "install", "--quiet", "--no-index", "--no-deps",
         *(str(stubs / f"{n}-{NEWER}-py3-none-any.whl") for n in PYTORCH), cwd=tmp_path)

    # a fresh venv: the resolver takes the newest torch it is offered, above today's cap
    got = planned(fresh / "bin" / "python", wheel, stubs, tmp_path)
    assert got["torch"] == got["torchvision"] == NEWER and "domainbed-gaqat" in got
    # a venv with a newer torch: pip keeps it (nothing of torch's to install)
    got = planned(newer / "bin" / "python", wheel, stubs, tmp_path)
    assert not set(PYTORCH) & set(got) and "domainbed-gaqat" in got

    # the same checks on a capped wheel fail: pip picks, or downgrades to, the capped release
    assert planned(fresh / "bin" / "python", capped, stubs, tmp_path)["torch"] == CAP["torch"]
    got = planned(newer / "bin" / "python", capped, stubs, tmp_path)
    assert (got["torch"], got["torchvision"]) == (CAP["torch"], CAP["torchvision"])
