"""Registration into DomainBed without editing it, in fresh interpreters.

Throwaway venvs get the plugin by ``pip install .`` and ``pip install -e .`` (from a copy of
the project) and see torch and DomainBed through a plain path ``.pth`` (path entries only, so
the project venv's own ``.pth`` hooks do not run there). A third venv has only the plugin,
installed from a wheel built from its sdist: no torch, no DomainBed.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import domainbed
import pytest
from support.helpers import run

from domainbed_gaqat.plugin import datasets as plugin_datasets
from domainbed_gaqat.plugin.algorithms import ALGORITHMS

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = ["pyproject.toml", "build_hooks.py", "domainbed_gaqat.pth",
                 "MANIFEST.in", "README.md"]
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
NO_BUILD = ["--no-deps", "--no-build-isolation", "--no-index", "--quiet"]

CHECK = r'''
"""Run in a fresh interpreter of the venv under test; prints JSON."""
import json, subprocess, sys

mode, names = sys.argv[1], json.loads(sys.argv[2])  # the plugin's registry, from the test
out = {"torch_at_startup": "torch" in sys.modules,
       "domainbed_at_startup": any(m.startswith("domainbed") and not m.startswith("domainbed_gaqat")
                                   for m in sys.modules),
       "hook_ran": "domainbed_gaqat._startup" in sys.modules,
       "executable": sys.executable}
hook = sys.modules.get("domainbed_gaqat._startup")
out["finder_installed"] = bool(hook) and any(isinstance(f, hook._Finder) for f in sys.meta_path)
import domainbed_gaqat
out["plugin_file"] = domainbed_gaqat.__file__

from domainbed import algorithms, command_launchers, datasets, hparams_registry


def snapshot():
    return {
        "algorithms": {n: n in algorithms.ALGORITHMS and hasattr(algorithms, n)
                       and issubclass(algorithms.get_algorithm_class(n), algorithms.Algorithm)
                       for n in names},
        "counts": {n: algorithms.ALGORITHMS.count(n) for n in names},
        "hparams": {n: hparams_registry.default_hparams(n, "RotatedDigits") for n in names},
        "random_hparams": hparams_registry.random_hparams("GAQAT", "PACS", 3),
        "erm_hparams": hparams_registry.default_hparams("ERM", "PACS"),
        "datasets": datasets.DATASETS.count("RotatedDigits"),
        "n_envs": ("RotatedDigits" in datasets.DATASETS
                   and datasets.num_environments("RotatedDigits")),
        "launchers": sorted(command_launchers.REGISTRY),
    }


out["before_register"] = snapshot()
if mode == "parent":  # a child started through the shell, as DomainBed's sweep does
    child = subprocess.run(f"python {sys.argv[0]} child '{sys.argv[2]}'", shell=True,
                           capture_output=True, text=True)
    out["child"] = json.loads(child.stdout) if child.returncode == 0 else child.stderr
domainbed_gaqat.register()
domainbed_gaqat.register()
out["after_register"] = snapshot()
print(json.dumps(out))
'''


def _copy_project(dest: Path) -> Path:
    """The files a build needs, copied from the project (its venv and build dirs left out)."""
    dest.mkdir(parents=True)
    for name in PROJECT_FILES:
        shutil.copy2(REPO / name, dest / name)
    for folder in ("domainbed_gaqat", "sweeps"):
        shutil.copytree(REPO / folder, dest / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def _venv(path: Path, paths: list[str]) -> Path:
    """A venv whose ``site-packages`` gets a ``.pth`` with ``paths`` (path lines only); pip is
    the project venv's (importable through that path, or used with ``--python``)."""
    run([sys.executable, "-m", "venv", "--without-pip", str(path)])
    python = path / "bin" / "python"
    purelib = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    if paths:
        Path(purelib.stdout.strip(), "_test_paths.pth").write_text("\n".join(paths) + "\n")
    return python


def _env(python: Path, **extra: str) -> dict:
    """Environment of the venv's processes: its ``bin`` first on PATH, nothing injected."""
    return {"PATH": f"{python.parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": "", "PYTHONSTARTUP": "", "DOMAINBED_GAQAT_DISABLE": "", **extra}


def _python(python: Path, args: list[str], cwd: Path, check: bool = True,
            **extra: str) -> subprocess.CompletedProcess:
    return run([str(python), *args], cwd=cwd, check=check, **_env(python, **extra))


@pytest.fixture(scope="module")
def shared_paths() -> list[str]:
    """torch & co. (the project venv's site-packages) and the DomainBed clone."""
    return [sysconfig.get_paths()["purelib"], str(Path(domainbed.__file__).parents[1])]


@pytest.fixture(scope="module", params=["regular", "editable"])
def installed(request, tmp_path_factory, shared_paths) -> tuple[Path, Path, str]:
    """``(python, project copy, mode)`` of a venv with the plugin installed in that mode."""
    root = tmp_path_factory.mktemp(request.param)
    project = _copy_project(root / "project")
    python = _venv(root / "venv", shared_paths)
    editable = ["-e"] if request.param == "editable" else []
    _python(python, ["-m", "pip", "install", *NO_BUILD, *editable, str(project)], cwd=root)
    return python, project, request.param


def _check(python: Path, cwd: Path, mode: str, **extra: str) -> dict:
    (cwd / "check.py").write_text(CHECK)
    proc = _python(python, ["check.py", mode, json.dumps(list(ALGORITHMS))], cwd=cwd, **extra)
    return json.loads(proc.stdout)


def test_fresh_interpreter_and_its_children_see_the_plugin(installed, tmp_path):
    python, project, mode = installed
    out = _check(python, tmp_path, "parent")
    site = Path(python).parents[1]
    plugin = Path(out["plugin_file"]).resolve()
    assert plugin.is_relative_to(project.resolve() if mode == "editable" else site.resolve())
    assert out["hook_ran"] and out["finder_installed"]
    assert not out["torch_at_startup"] and not out["domainbed_at_startup"]

    names = list(ALGORITHMS)
    assert {"LSQ", "SAGM_LSQ", "GAQAT", "ERM_FP"} <= set(names)
    for view in (out["before_register"], out["child"]["before_register"],
                 out["after_register"]):
        assert all(view["algorithms"][n] for n in names)
        assert all(view["counts"][n] == 1 for n in names)  # register() is idempotent
        assert view["datasets"] == 1 and view["n_envs"] == len(plugin_datasets.RotatedDigits
                                                                .ENVIRONMENTS)
        assert {"local", "dummy", "multi_gpu", "submitit"} <= set(view["launchers"])
        assert view["hparams"]["GAQAT"]["gaqat_K"] > 0 and view["hparams"]["LSQ"]["w_bits"] == 4
        assert "w_bits" not in view["hparams"]["ERM_FP"]
        assert "w_bits" not in view["erm_hparams"]  # DomainBed's own algorithms untouched
        assert view == out["before_register"]
    assert Path(out["child"]["executable"]).parent == Path(python).parent
    assert not out["child"]["torch_at_startup"] and out["child"]["hook_ran"]


def test_startup_is_cheap_and_imports_no_torch(installed, tmp_path):
    python, _, _ = installed
    proc = _python(python, ["-X", "importtime", "-c",
                            "import json, sys; print(json.dumps(sorted(sys.modules)))"],
                   cwd=tmp_path)
    modules = set(json.loads(proc.stdout))
    assert "domainbed_gaqat._startup" in modules
    assert not {"torch", "numpy", "domainbed", "domainbed_gaqat.plugin"} & modules

    # The hook's import subtree in -X importtime: only the plugin's two modules and stdlib.
    rows = []
    for line in proc.stderr.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( +)(\S+)$", line)
        if match:
            rows.append((int(match[2]), len(match[3]), match[4]))
    [at] = [i for i, row in enumerate(rows) if row[2] == "domainbed_gaqat._startup"]
    cumulative_us, depth, _ = rows[at]
    subtree = {rows[at][2]}
    for _, d, name in reversed(rows[:at]):
        if d <= depth:
            break
        subtree.add(name)
    foreign = {m for m in subtree
               if not m.startswith("domainbed_gaqat") and m.split(".")[0]
               not in sys.stdlib_module_names}
    assert not foreign, foreign
    print(f"start-up hook import time: {cumulative_us} us, modules {sorted(subtree)}")


def test_installed_package_finds_the_sweep_configs(installed, tmp_path):
    """From any directory, with the copy the package was installed from gone: the configs are
    package data (``pip install .`` builds and installs a wheel)."""
    python, project, mode = installed
    if mode == "editable":
        pytest.skip("an editable install reads the checkout's sweeps/ by design")
    hidden = project.with_name("moved_away")
    project.rename(hidden)  # nothing of the checkout left to find
    try:
        gaqat = str(python.parent / "gaqat")
        where = _python(python, ["-c", "import domainbed_gaqat.sweeps as s; print(s.__file__)"],
                        cwd=tmp_path).stdout.strip()
        assert Path(where).is_relative_to(python.parents[1].resolve())
        common = ["demo", "--output_dir", str(tmp_path / "out"), "--data_dir", str(tmp_path)]
        listed = run([gaqat, "sweep", "list", *common], cwd=tmp_path, **_env(python))
        assert "== stage fp: ERM_FP, 150 steps" in listed.stdout
        assert "1 jobs: 0 done, 0 incomplete, 1 not launched." in listed.stdout
        launched = run([gaqat, "sweep", "launch", *common, "--stage", "fp",
                        "--command_launcher", "dummy", "--skip_confirmation"], cwd=tmp_path,
                       **_env(python))
        assert launched.stdout.count("Dummy launcher: ") == 1
        assert len(list((tmp_path / "out" / "RotatedDigits" / "fp").iterdir())) == 1
    finally:
        hidden.rename(project)


def test_opt_out_and_explicit_register(installed, tmp_path):
    python, _, mode = installed
    if mode == "editable":
        pytest.skip("the opt-out lives in the start-up module, the same in both modes")
    out = _check(python, tmp_path, "single", DOMAINBED_GAQAT_DISABLE="1")
    assert not out["finder_installed"]
    before = out["before_register"]
    assert not any(before["algorithms"].values())
    assert before["datasets"] == 0 and "submitit" not in before["launchers"]
    assert "w_bits" not in before["hparams"]["LSQ"]
    after = out["after_register"]  # explicit registration still works, once
    assert all(after["algorithms"].values()) and set(after["counts"].values()) == {1}
    assert after["hparams"]["LSQ"]["w_bits"] == 4 and "submitit" in after["launchers"]


def test_plugin_modules_imported_before_domainbed(installed, tmp_path):
    """``from domainbed_gaqat.plugin.algorithms import ...`` first: the plugin module is still
    executing when it imports DomainBed's registry, which is patched once it finishes."""
    python, _, mode = installed
    if mode == "editable":
        pytest.skip("import order is handled by the start-up module, the same in both modes")
    code = ("import domainbed_gaqat.plugin.algorithms, domainbed_gaqat.plugin.datasets\n"
            "from domainbed import algorithms, datasets\n"
            "print(algorithms.ALGORITHMS.count('LSQ'), datasets.DATASETS.count('RotatedDigits'),"
            " algorithms.get_algorithm_class('GAQAT') is domainbed_gaqat.plugin.algorithms.GAQAT)")
    proc = _python(python, ["-W", "error::UserWarning", "-c", code], cwd=tmp_path)
    assert proc.stdout.split() == ["1", "1", "True"]
    assert proc.stderr == ""


def test_interpreter_without_torch_or_domainbed_starts_cleanly(tmp_path):
    """Plugin only (``--no-deps``), from a wheel built out of its sdist."""
    project = _copy_project(tmp_path / "project")
    run([sys.executable, "-c", "from setuptools import build_meta as b; b.build_sdist('dist')"],
        cwd=project)
    [sdist] = (project / "dist").glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        members = {Path(m).name for m in tar.getnames()}
    assert {"build_hooks.py", "domainbed_gaqat.pth", "_startup.py", "pacs_w4a4.py",
            "demo.py"} <= members
    run([*PIP, "wheel", *NO_BUILD, "-w", str(tmp_path / "wheels"), str(sdist)], cwd=tmp_path)
    [wheel] = (tmp_path / "wheels").glob("*.whl")

    python = _venv(tmp_path / "bare", [])
    run([*PIP, "--python", str(python), "install", *NO_BUILD, str(wheel)], cwd=tmp_path)
    code = ("import importlib.util, sys; "
            "print(int('domainbed_gaqat._startup' in sys.modules), "
            "int(importlib.util.find_spec('torch') is None), "
            "int(importlib.util.find_spec('domainbed') is None))")
    for extra in ({}, {"DOMAINBED_GAQAT_DISABLE": "1"}):
        proc = _python(python, ["-c", code], cwd=tmp_path, **extra)
        assert proc.stderr == ""
        assert proc.stdout.split() == ["1", "1", "1"]
    proc = _python(python, ["-c", "import domainbed.algorithms"], cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().endswith("ModuleNotFoundError: No module named 'domainbed'")


def test_debug_datasets_get_a_batch_their_loader_can_fill():
    """DomainBed's Debug datasets have 13 training images per env: a larger batch never comes
    out of its infinite loader (``drop_last=True``)."""
    from domainbed import hparams_registry

    for name in list(ALGORITHMS):
        for dataset in ("Debug28", "Debug224"):
            assert hparams_registry.default_hparams(name, dataset)["batch_size"] <= 13
            assert hparams_registry.random_hparams(name, dataset, 1)["batch_size"] <= 13
