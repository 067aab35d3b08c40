"""The package's layers, its one command line, and its old command names.

Layers, bottom up: the command-line parts (``options``, and ``progress`` for long work), the
quantization core (``quant``), the optimisation core (``optim``), the DomainBed-facing plugin
(``plugin``), the experiments (``experiments``), the tools (the package's top-level modules),
the ``gaqat`` command and the start-up hook. A module imports only its own layer and the ones
below; the two cores import no DomainBed. Imports inside ``if __name__ == "__main__":`` (a
module run as a command) are entries, not dependencies.
"""

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from support.helpers import PYTHON, gaqat, run

from domainbed_gaqat import cli
from domainbed_gaqat.plugin.algorithms import ALGORITHMS

PACKAGE = Path(__file__).resolve().parents[1] / "domainbed_gaqat"
LAYERS = {"options": 0, "progress": 0, "quant": 1, "optim": 2, "plugin": 3, "experiments": 4,
          "sweeps": 4, "cli": 6, "__main__": 6, "__init__": 6, "_startup": 6}
TOOLS = 5  # every other top-level module
CORES = ("quant", "optim")


def layer(module: str) -> int:
    """Layer of ``domainbed_gaqat.<...>``."""
    parts = module.split(".")
    return LAYERS.get(parts[1], TOOLS) if len(parts) > 1 else LAYERS["__init__"]


def imports(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """``(line, imported module)`` of every import outside a ``__main__`` block, relative
    imports resolved against ``module``."""
    tree = ast.parse(source)
    skip = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
                and getattr(node.test.left, "id", None) == "__name__"):
            skip.update(id(n) for n in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".")[:len(module.split(".")) - node.level + is_package]
                base = ".".join(parent + ([base] if base else []))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return found


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """What ``module``'s imports break of the layering."""
    own, problems = layer(module), []
    for line, name in imports(source, module, is_package):
        if name.split(".")[0] == "domainbed" and module.split(".")[1] in CORES:
            problems.append(f"{module}:{line} imports DomainBed ({name})")
        if name.startswith("domainbed_gaqat."):
            target = ".".join(name.split(".")[:2])
            if (PACKAGE / f"{target.split('.')[1]}.py").exists() or (
                    PACKAGE / target.split(".")[1]).is_dir():
                if layer(target) > own:
                    problems.append(f"{module}:{line} imports {name} (layer {layer(target)} "
                                    f"above {own})")
    return problems


def modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found.append((".".join(parts).removesuffix(".__init__"), path))
    return found


def test_no_module_imports_a_higher_layer():
    assert len(modules()) > 20
    problems = [p for name, path in modules()
                for p in violations(path.read_text(), name, path.name == "__init__.py")]
    assert not problems, "\n".join(problems)


def test_the_checker_sees_upward_and_domainbed_imports():
    """The layering check on sources written here: it is not vacuous."""
    assert violations("from domainbed_gaqat.plugin import hparams\n",
                      "domainbed_gaqat.quant.lsq") == [
        "domainbed_gaqat.quant.lsq:1 imports domainbed_gaqat.plugin (layer 3 above 1)",
        "domainbed_gaqat.quant.lsq:1 imports domainbed_gaqat.plugin.hparams (layer 3 above 1)"]
    assert violations("def f():\n    import domainbed.algorithms\n",
                      "domainbed_gaqat.optim.sagm") == [
        "domainbed_gaqat.optim.sagm:2 imports DomainBed (domainbed.algorithms)"]
    lazy = "def f():\n    from .. import traces\n"
    assert violations(lazy, "domainbed_gaqat.experiments.tables") == [
        "domainbed_gaqat.experiments.tables:2 imports domainbed_gaqat.traces (layer 5 above 4)"]
    main = "if __name__ == '__main__':\n    from domainbed_gaqat.cli import main\n"
    assert violations(main, "domainbed_gaqat.traces") == []
    module = "domainbed_gaqat.optim.x"  # name made up
    assert violations("from domainbed_gaqat.quant import lsq\n", module) == []


def test_cores_import_only_torch_and_the_standard_library():
    for name, path in modules():
        if name.split(".")[1:2] and name.split(".")[1] in CORES:
            for _, imported in imports(path.read_text(), name, path.name == "__init__.py"):
                top = imported.split(".")[0]
                assert top in sys.stdlib_module_names or top in ("torch", "domainbed_gaqat"), (
                    name, imported)


def test_help_lists_every_command_and_each_command_has_help():
    proc = run([PYTHON, "-m", "domainbed_gaqat", "--help"])
    for name, (_, summary) in cli.COMMANDS.items():
        assert f"  {name:<10}{summary}" in proc.stdout
    for name in cli.COMMANDS:
        parser, module = cli.command_parser(name)
        text = parser.format_help()
        assert text.startswith(f"usage: gaqat {name}") and module.__doc__.split()[0] in text


def test_bad_input_is_one_line_and_status_2(tmp_path, capsys):
    assert gaqat("probe", str(tmp_path / "missing.pkl"), "--output_dir", str(tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gaqat probe: error: ") and "missing.pkl" in err[0]
    with pytest.raises(SystemExit) as exit_info:  # argparse's own errors: status 2 as well
        gaqat("traces", "--steps", "0", "--output_dir", str(tmp_path))
    assert exit_info.value.code == 2
    assert "gaqat traces: error: argument --steps: '0': expected an integer >= 1" in (
        capsys.readouterr().err)
    proc = subprocess.run([PYTHON, "-m", "domainbed_gaqat", "nope"], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "invalid choice: 'nope'" in proc.stderr


@pytest.mark.slow
def test_old_command_names_still_work(tmp_path):
    """``gaqat-sweep`` / ``gaqat-tables`` and the ``python -m domainbed_gaqat.<tool>`` forms."""
    bin_dir = Path(PYTHON).parent
    proc = run([str(bin_dir / "gaqat-sweep"), "list", "demo", "--output_dir", str(tmp_path),
                "--data_dir", str(tmp_path)])
    assert "== stage fp: ERM_FP" in proc.stdout
    proc = run([str(bin_dir / "gaqat-tables"), "--input_dir", str(tmp_path)], check=False)
    assert proc.returncode == 1 and "gaqat tables: no finished run" in proc.stderr
    tools = ("traces", "probe", "surface", "export", "bench", "demo")
    with ThreadPoolExecutor(2) as pool:  # each imports torch: two at a time
        helps = pool.map(lambda t: run([PYTHON, "-m", f"domainbed_gaqat.{t}", "--help"]), tools)
    for tool, proc in zip(tools, helps):
        assert proc.stdout.startswith(f"usage: python -m domainbed_gaqat.{tool}")
    assert run([str(bin_dir / "gaqat"), "--help"]).stdout.startswith("usage: gaqat")


def test_tables_iterate_over_the_registry():
    """Rows come in registry order: the order DomainBed's ALGORITHMS lists them."""
    from domainbed import algorithms

    names = list(ALGORITHMS)
    assert [a for a in algorithms.ALGORITHMS if a in names] == names
    assert all(algorithms.get_algorithm_class(n) is s.cls for n, s in ALGORITHMS.items())
