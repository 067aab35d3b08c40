"""``gaqat list``: what the plugin adds to DomainBed, as DomainBed resolves it.

    gaqat list [algorithms|configs|datasets] [--json]

- algorithms: every algorithm of the plugin's registry that ``domainbed.algorithms`` resolves,
  with its summary (its docstring's first paragraph) and its quantization (``W/A``: weights and
  activations, ``W``: weights only, with the default bits; ``full precision``);
- configs: every sweep config of ``sweeps/`` with the paper table it reproduces, its dataset,
  its stages and the number of runs it plans;
- datasets: the plugin's datasets (the offline ``RotatedDigits``).

:func:`names` reads the same declarations without importing torch or DomainBed (the sources'
syntax trees and the ``sweeps/`` folder), for ``gaqat --help``.
"""

import ast
import importlib.util
import json
from pathlib import Path

KINDS = ("algorithms", "configs", "datasets")
PACKAGE = Path(__file__).resolve().parent


def _declared(source: Path, is_declaration) -> list[str]:
    tree = ast.parse(source.read_text(encoding="utf-8"))
    return [name for node in tree.body for name in is_declaration(node)]


def _decorated(node: ast.AST) -> list[str]:
    """A class declared with ``@algorithm(...)``, or a quantized variant made by
    ``NAME = variant_of(...)`` (which registers it so)."""
    if isinstance(node, ast.ClassDef) and any(
            isinstance(d, ast.Call) and getattr(d.func, "id", None) == "algorithm"
            for d in node.decorator_list):
        return [node.name]
    if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
            and getattr(node.value.func, "id", None) == "variant_of"):
        return [t.id for t in node.targets if isinstance(t, ast.Name)]
    return []


def _datasets_literal(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [
            "DATASETS"]:
        return list(ast.literal_eval(node.value))
    return []


def names() -> dict[str, list[str]]:
    """``{kind: names}`` read from the sources, cheaply (no torch, no DomainBed imported)."""
    sweeps = Path(importlib.util.find_spec("domainbed_gaqat.sweeps").submodule_search_locations[0])
    return {
        "algorithms": _declared(PACKAGE / "plugin" / "algorithms.py", _decorated),
        "configs": sorted(p.stem for p in sweeps.glob("*.py") if not p.stem.startswith("_")),
        "datasets": _declared(PACKAGE / "plugin" / "datasets.py", _datasets_literal),
    }


def epilog(width: int = 92) -> str:
    """The names for ``gaqat --help``, wrapped to ``width`` columns."""
    import textwrap

    lines = []
    for kind, found in names().items():
        lines += textwrap.wrap(", ".join(found), width, initial_indent=f"  {kind + ':':<12}",
                               subsequent_indent=" " * 14)
        if kind == "algorithms":
            lines.append(" " * 14 + "and <Name>_FP, <Name>_LSQ, <Name>_QTDoG of DomainBed's "
                         "algorithms (docs/coverage.md)")
    return "\n".join(lines)


# --- the full listing (imports DomainBed and torch) ------------------------------------------


def quantization(hparams: dict) -> str:
    """``W/A`` (with the default ``W4A4``), ``W`` (weights only, ``W7``) or full precision, from
    an algorithm's default hparams."""
    if "w_bits" not in hparams:
        return "full precision"
    if "a_bits" in hparams:
        return f"W/A (default W{hparams['w_bits']}A{hparams['a_bits']})"
    per_channel = ", per channel" if hparams.get("w_per_channel") else ""
    return f"W, weights only (default W{hparams['w_bits']}{per_channel})"


def algorithms() -> list[dict]:
    """The plugin's algorithms as DomainBed resolves them (``get_algorithm_class``)."""
    from domainbed import algorithms as domainbed_algorithms
    from domainbed import hparams_registry

    from domainbed_gaqat.plugin.algorithms import ALGORITHMS

    rows = []
    for name, spec in ALGORITHMS.items():
        resolved = domainbed_algorithms.get_algorithm_class(name)
        hparams = hparams_registry.default_hparams(name, "PACS")
        summary = " ".join((spec.cls.__doc__ or "").strip().split("\n\n")[0].split())
        rows.append({"name": name, "summary": summary, "quantized": spec.quantized,
                     "quantization": quantization(hparams),
                     "domainbed_class": f"{resolved.__module__}.{resolved.__qualname__}"})
    return rows


def planned_runs(config) -> int:
    """How many runs a parsed config's stages plan (trials x test-env groups x algorithms x
    grid points x members)."""
    per_job = config.trials * len(config.test_envs)
    return sum(per_job * len(s.algorithms) * len(s.grid.points()) * s.members
               for s in config.stages)


def configs() -> list[dict]:
    """Every config of ``sweeps/``, read and checked."""
    from domainbed_gaqat.experiments.configs import config_names, load_config

    rows = []
    for name in config_names():
        config = load_config(name)
        rows.append({"name": name, "paper": config.paper, "dataset": config.dataset,
                     "bits": list(config.bits) if config.bits else None,
                     "trials": config.trials, "test_envs": [list(g) for g in config.test_envs],
                     "stages": [s.name for s in config.stages], "runs": planned_runs(config)})
    return rows


def datasets() -> list[dict]:
    """The plugin's datasets (registered into ``domainbed.datasets``)."""
    from domainbed import datasets as domainbed_datasets

    from domainbed_gaqat.plugin import datasets as plugin_datasets

    rows = []
    for name in plugin_datasets.DATASETS:
        cls = domainbed_datasets.get_dataset_class(name)
        rows.append({"name": name, "environments": list(cls.ENVIRONMENTS),
                     "input_shape": list(cls.INPUT_SHAPE), "registered": name in
                     domainbed_datasets.DATASETS,
                     "summary": (plugin_datasets.__doc__ or "").strip().splitlines()[0]})
    return rows


LISTERS = {"algorithms": algorithms, "configs": configs, "datasets": datasets}


def render(kind: str, rows: list[dict]) -> str:
    """One aligned line a row."""
    if kind == "algorithms":
        cells = [(r["name"], r["quantization"], r["summary"]) for r in rows]
    elif kind == "configs":
        cells = [(r["name"], r["dataset"], f"{len(r['stages'])} stage"
                  f"{'s' * (len(r['stages']) > 1)}, {r['runs']} runs", r["paper"]) for r in rows]
    else:
        cells = [(r["name"], f"{len(r['environments'])} domains {r['environments']}",
                  r["summary"]) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]) - 1)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(row, widths)), row[-1]])
                     for row in cells)


def add_arguments(parser) -> None:
    parser.add_argument("kind", nargs="?", choices=KINDS, help="default: all three")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")


def run(args) -> int:
    kinds = [args.kind] if args.kind else list(KINDS)
    found = {kind: LISTERS[kind]() for kind in kinds}
    if args.json:
        print(json.dumps(found, indent=1))
        return 0
    print("\n\n".join(f"{kind} ({len(rows)}):\n{render(kind, rows)}"
                      for kind, rows in found.items()))
    return 0

