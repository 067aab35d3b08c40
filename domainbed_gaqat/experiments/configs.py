"""Sweep configs (``sweeps/``): read without running code, resolved, checked.

A config is a ``.py`` file whose one statement that matters is ``SWEEP = {...}``, a literal read
with ``ast.literal_eval``; the format is in ``sweeps/README.md``. ``extends`` builds on another
config; a grid value ``"paper"`` is the paper's grid as the hparams registry holds it (the values
DomainBed's random sweep draws from, for the config's dataset and bits). Every error names the
file and line and what was expected.
"""

import ast
import itertools
from importlib import resources
from pathlib import Path

from domainbed import algorithms as domainbed_algorithms
from domainbed import datasets

from domainbed_gaqat.experiments.selection import RULES
from domainbed_gaqat.plugin import hparams as hparams_lib
from domainbed_gaqat.plugin import launchers
from domainbed_gaqat.plugin.algorithms import ALGORITHMS

TOP_KEYS = {"paper", "extends", "dataset", "test_envs", "trials", "bits", "selection",
            "holdout_fraction", "hparams", "stages", "table", "slurm"}
MERGED_KEYS = ("hparams", "table", "slurm")  # merged key by key under ``extends``
STAGE_KEYS = {"name", "from", "algorithms", "steps", "checkpoint_freq", "eval_from", "members",
              "hparams",
              "grid", "init_from", "hparams_from", "slurm"}
BIT_KEYS = hparams_lib.BIT_KEYS
PAPER = "paper"


class ConfigError(ValueError):
    """A sweep config that is not what ``sweeps/README.md`` describes."""


def config_dir() -> Path:
    """The installed ``sweeps/`` folder (package data; the checkout's in editable installs)."""
    return Path(str(resources.files("domainbed_gaqat.sweeps")))


def config_names() -> list[str]:
    return sorted(p.stem for p in config_dir().glob("*.py") if not p.stem.startswith("_"))


def config_path(name: str) -> Path:
    """``name`` as a file, else ``sweeps/<name>.py``."""
    for path in (Path(name), config_dir() / f"{name}.py"):
        if path.is_file():
            return path
    raise FileNotFoundError(f"sweep config {name!r}: no such file, and not one of "
                            f"{config_names()} in {config_dir()}")


# --- reading -------------------------------------------------------------------------------


def _positions(node: ast.AST, path: tuple, out: dict) -> None:
    """The line of every key and list item under ``node``, by key path."""
    if isinstance(node, ast.Dict):
        for key, value in zip(node.keys, node.values):
            if isinstance(key, ast.Constant):
                out[(*path, key.value)] = key.lineno
                _positions(value, (*path, key.value), out)
    elif isinstance(node, ast.List):
        for i, item in enumerate(node.elts):
            out[(*path, i)] = item.lineno
            _positions(item, (*path, i), out)


def _read(path: Path) -> tuple[dict, dict]:
    """``(SWEEP literal, {key path: (file, line)})`` of one file."""
    text = path.read_text(encoding="utf-8")
    try:
        tree = ast.parse(text, str(path))
    except SyntaxError as err:
        raise ConfigError(f"{path}:{err.lineno}: invalid Python syntax ({err.msg}); expected "
                          "a file whose statement is SWEEP = {...}") from None
    nodes = [node for node in tree.body if isinstance(node, ast.Assign)
             and [getattr(t, "id", None) for t in node.targets] == ["SWEEP"]]
    if len(nodes) != 1:
        raise ConfigError(f"{path}:1: expected exactly one assignment 'SWEEP = {{...}}'")
    try:
        config = ast.literal_eval(nodes[0].value)
    except ValueError as err:
        line = getattr(err, "lineno", None) or nodes[0].lineno
        raise ConfigError(f"{path}:{line}: SWEEP must be a literal (dicts, lists, numbers, "
                          f"strings, booleans): {err}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}:{nodes[0].lineno}: SWEEP must be a dict, got "
                          f"{type(config).__name__}")
    lines = {(): nodes[0].lineno}
    _positions(nodes[0].value, (), lines)
    return config, {k: (str(path), v) for k, v in lines.items()}


def _extend(base: dict, base_lines: dict, child: dict, child_lines: dict,
            where: str) -> tuple[dict, dict]:
    """``child`` on top of ``base``: keys replace, ``hparams`` / ``table`` / ``slurm`` merge;
    ``stages``, if given, is the whole list, each entry starting from the base stage of its
    name (or of its ``from``) and replacing the keys it gives."""
    config = {**base, **{k: v for k, v in child.items() if k != "extends"}}
    lines = {**base_lines, **child_lines}
    for key in MERGED_KEYS:
        if key in child and isinstance(child[key], dict) and isinstance(base.get(key), dict):
            config[key] = {**base[key], **child[key]}
    if "stages" in child:
        if not isinstance(child["stages"], list):
            raise ConfigError(f"{where}: stages: expected a list")
        by_name = {s.get("name"): i for i, s in enumerate(base.get("stages", []))
                   if isinstance(s, dict)}
        config["stages"] = []
        lines = {k: v for k, v in lines.items() if k[:1] != ("stages",)}
        for i, entry in enumerate(child["stages"]):
            if not isinstance(entry, dict):
                raise ConfigError(f"{where}: stage {entry!r}: expected a dict")
            origin = entry.get("from", entry.get("name"))
            if "from" in entry and origin not in by_name:
                raise ConfigError(f"{where}: stage 'from' {origin!r}: expected one of the "
                                  f"base config's stages {list(by_name)}")
            j = by_name.get(origin)
            start = base["stages"][j] if j is not None else {}
            config["stages"].append({**start, **{k: v for k, v in entry.items() if k != "from"}})
            if j is not None:
                lines.update({("stages", i, *k[2:]): v for k, v in base_lines.items()
                              if k[:2] == ("stages", j)})
            lines.update({k: v for k, v in child_lines.items() if k[:2] == ("stages", i)})
    return config, lines


def _resolve(name: str, chain: tuple[str, ...] = ()) -> tuple[dict, dict, Path]:
    path = config_path(name)
    if str(path.resolve()) in chain:
        raise ConfigError(f"{path}:1: 'extends' makes a cycle: {' -> '.join(chain)} -> {path}")
    config, lines = _read(path)
    if "extends" in config:
        base = config["extends"]
        where = f"{path}:{lines.get(('extends',), (path, 1))[1]}"
        if not isinstance(base, str):
            raise ConfigError(f"{where}: extends {base!r}: expected a config name or file")
        try:
            parent, parent_lines, _ = _resolve(base, (*chain, str(path.resolve())))
        except FileNotFoundError as err:
            raise ConfigError(f"{where}: extends: {err}") from None
        config, lines = _extend(parent, parent_lines, config, lines, where)
    return config, lines, path


def load_config(name: str) -> dict:
    """Read, resolve and check a config (a ``sweeps/`` name or a file)."""
    raw, lines, path = _resolve(name)
    unknown = set(raw) - TOP_KEYS
    config = {"selection": "test", "holdout_fraction": 0.2, "hparams": {}, "table": {},
              "slurm": {}, **raw, "name": path.stem, "path": str(path), "lines": lines}
    if unknown:
        _fail(config, f"unknown keys {sorted(unknown)}; expected some of {sorted(TOP_KEYS)}",
              sorted(unknown)[0])
    validate(config)
    return config


# --- checking ------------------------------------------------------------------------------


def _fail(config: dict, message: str, *path: object) -> None:
    """Raise :class:`ConfigError` at the line of the longest known prefix of ``path``."""
    lines = config["lines"]
    for n in range(len(path), -1, -1):
        if path[:n] in lines:
            file, line = lines[path[:n]]
            raise ConfigError(f"{file}:{line}: {message}")
    raise ConfigError(f"{config['path']}:1: {message}")


def _check(ok: bool, config: dict, message: str, *path: object) -> None:
    if not ok:
        _fail(config, message, *path)


def _int(value: object, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _known(algorithm: str, dataset: str) -> set[str]:
    from domainbed import hparams_registry

    return set(hparams_registry.default_hparams(algorithm, dataset))


def reads_activation_bits(algorithm: str, dataset: str) -> bool:
    return "a_bits" in _known(algorithm, dataset)


def quantized(algorithm: str) -> bool:
    """Whether ``algorithm`` is one of the plugin's quantized algorithms."""
    found = ALGORITHMS.get(algorithm)
    return found is not None and found.quantized


def validate(config: dict) -> None:
    """Check a resolved config (raising :class:`ConfigError`); resolves ``"paper"`` grids."""
    missing = {"dataset", "test_envs", "trials", "stages"} - set(config)
    _check(not missing, config, f"missing keys {sorted(missing)}")
    dataset = config["dataset"]
    _check(dataset in datasets.DATASETS, config,
           f"dataset {dataset!r}: expected one of DomainBed's datasets {datasets.DATASETS}",
           "dataset")
    n_envs = datasets.num_environments(dataset)
    groups = config["test_envs"]
    _check(isinstance(groups, list) and groups and all(
        isinstance(g, list) and g and all(_int(e, 0) and e < n_envs for e in g)
        and len(set(g)) == len(g) for g in groups), config,
        f"test_envs {groups!r}: expected a list of groups, each a list of distinct env indices "
        f"in 0..{n_envs - 1}", "test_envs")
    _check(_int(config["trials"], 1), config, f"trials {config['trials']!r}: expected an int >= 1",
           "trials")
    _check(config["selection"] in RULES, config,
           f"selection {config['selection']!r}: expected one of {sorted(RULES)}", "selection")
    fraction = config["holdout_fraction"]
    _check(isinstance(fraction, float) and 0 < fraction < 1, config,
           f"holdout_fraction {fraction!r}: expected a float in (0, 1)", "holdout_fraction")
    bits = config.get("bits", [4, 4])
    _check(isinstance(bits, list) and len(bits) in (1, 2)
           and all(_int(b, 2) and b <= 8 for b in bits), config,
           f"bits {bits!r}: expected [W, A] or [W] (weights only), each an int in 2..8", "bits")
    _check(isinstance(config["hparams"], dict), config,
           f"hparams {config['hparams']!r}: expected a dict", "hparams")
    _slurm(config, config["slurm"], "slurm")
    stages = config["stages"]
    _check(isinstance(stages, list) and stages, config, "stages: expected a non-empty list",
           "stages")
    seen: dict[str, list[str]] = {}
    for i, spec in enumerate(stages):
        _check(isinstance(spec, dict), config, f"stage {spec!r}: expected a dict", "stages", i)
        _validate_stage(config, spec, seen, i)
        seen[spec["name"]] = spec["algorithms"]
    every = [a for algorithms in seen.values() for a in algorithms]
    _check(len(every) == len(set(every)), config,
           f"an algorithm appears in two stages ({every}): each may appear once", "stages")
    for key, value in config["hparams"].items():
        _check(key not in BIT_KEYS and any(key in _known(a, dataset) for a in every), config,
               f"hparams key {key!r}: not a hyperparameter of {every} (bits go in 'bits')",
               "hparams", key)
        for algorithm in every:
            _check_value(config, algorithm, key, value, "hparams", key)
    table = config["table"]
    _check(isinstance(table, dict) and set(table) <= {"algorithms", "split_by"}
           and isinstance(table.get("split_by", []), list)
           and set(table.get("algorithms", every)) <= set(every), config,
           f"table {table!r}: expected 'algorithms' (a subset of {every}) and 'split_by' "
           f"(a list of hparams)", "table")


def _check_value(config: dict, algorithm: str, key: str, value: object, *path: object) -> None:
    """A plugin hyperparameter's value against its range (DomainBed's own are not checked)."""
    param = (hparams_lib.params(ALGORITHMS[algorithm], config["dataset"]).get(key)
             if algorithm in ALGORITHMS else None)
    expected = param.check(value) if param is not None else None
    _check(expected is None, config, f"{key} {value!r} for {algorithm}: expected {expected}",
           *path)


def _validate_stage(config: dict, spec: dict, seen: dict[str, list[str]], i: int) -> None:
    at = ("stages", i)
    name = spec.get("name")
    where = f"stage {name!r}"
    _check(isinstance(name, str) and name.isidentifier() and name not in seen, config,
           f"{where}: 'name' must be a new identifier (stages so far: {list(seen)})", *at, "name")
    unknown = sorted(set(spec) - STAGE_KEYS - {"from"})
    _check(not unknown, config, f"{where}: unknown keys {unknown}; expected some of "
           f"{sorted(STAGE_KEYS - {'from'})}", *at, unknown[0] if unknown else "name")
    algorithms = spec.get("algorithms")
    _check(isinstance(algorithms, list) and algorithms
           and all(a in domainbed_algorithms.ALGORITHMS for a in algorithms), config,
           f"{where}: algorithms {algorithms!r}: expected a list of registered algorithms",
           *at, "algorithms")
    kinds = {quantized(a) for a in algorithms}
    _check(len(kinds) == 1, config, f"{where}: mixes quantized and full-precision algorithms",
           *at, "algorithms")
    is_quantized = kinds.pop()
    _check(not is_quantized or "bits" in config, config,
           f"{where} is quantized: the config needs bits = [W, A]", *at)
    if is_quantized:
        reads = {reads_activation_bits(a, config["dataset"]) for a in algorithms}
        _check(len(reads) == 1, config, f"{where}: mixes weight-only and W/A algorithms (their "
               "runs go to different folders): give them stages of their own", *at, "algorithms")
        _check(not reads.pop() or len(config["bits"]) == 2, config,
               f"{where} quantizes activations: the config needs bits = [W, A]", *at)
    for key in ("steps", "checkpoint_freq"):
        _check(_int(spec.get(key), 1), config, f"{where}: {key} {spec.get(key)!r}: "
               f"expected an int >= 1", *at, key)
    members = spec.setdefault("members", 1)
    _check(_int(members, 1), config, f"{where}: members {members!r}: expected an int >= 1 (runs "
           "of each job differing only in seed, for an ensemble)", *at, "members")
    eval_from = spec.setdefault("eval_from", 0)
    _check(_int(eval_from, 0) and eval_from < spec["steps"], config,
           f"{where}: eval_from {eval_from!r}: expected an int in 0..steps-1", *at, "eval_from")
    grid, fixed = spec.setdefault("grid", {}), spec.setdefault("hparams", {})
    _check(isinstance(grid, dict) and all(v == PAPER or isinstance(v, list) and v
                                          for v in grid.values()),
           config, f"{where}: grid {grid!r}: expected {{name: [values, ...] or 'paper'}}",
           *at, "grid")
    _check(isinstance(fixed, dict), config, f"{where}: hparams {fixed!r}: expected a dict",
           *at, "hparams")
    bits = min(config["bits"]) if is_quantized else 4
    for key, values in grid.items():
        if values == PAPER:
            try:
                grids = {str(hparams_lib.paper_grid(ALGORITHMS[a], config["dataset"], bits, key))
                         for a in algorithms}
            except ValueError as err:
                _fail(config, f"{where}: grid {key}: {err}", *at, "grid", key)
            _check(len(grids) == 1, config, f"{where}: grid {key}: the paper's grids of "
                   f"{algorithms} differ ({grids}): give the values", *at, "grid", key)
            grid[key] = hparams_lib.paper_grid(ALGORITHMS[algorithms[0]], config["dataset"],
                                               bits, key)
    inherited = []
    for key in ("init_from", "hparams_from"):
        if key in spec:
            ref = spec[key]
            _check(isinstance(ref, dict) and ref.get("stage") in seen
                   and ref.get("algorithm") in seen[ref["stage"]], config,
                   f"{where}: {key} {ref!r}: expected {{'stage': an earlier stage, "
                   f"'algorithm': one of its algorithms}}", *at, key)
    if "hparams_from" in spec:
        inherited = spec["hparams_from"].get("keys")
        source = spec["hparams_from"]["algorithm"]
        _check(isinstance(inherited, list) and inherited
               and set(inherited) <= _known(source, config["dataset"]), config,
               f"{where}: hparams_from needs 'keys', a list of hparams of {source} to copy",
               *at, "hparams_from")
    keys = list(grid) + list(fixed) + list(inherited)
    _check(len(keys) == len(set(keys)), config,
           f"{where}: a hyperparameter is set twice among grid, hparams and hparams_from: {keys}",
           *at)
    for algorithm in algorithms:
        unknown = set(keys) - (_known(algorithm, config["dataset"]) - set(BIT_KEYS))
        _check(not unknown, config, f"{where}: {sorted(unknown)} are not hyperparameters of "
               f"{algorithm} (bits go in 'bits')", *at, "grid" if set(grid) & unknown
               else "hparams")
        for key, value in fixed.items():
            _check_value(config, algorithm, key, value, *at, "hparams", key)
        for key, values in grid.items():
            for j, value in enumerate(values):
                _check_value(config, algorithm, key, value, *at, "grid", key, j)
    _slurm(config, spec.setdefault("slurm", {}), *at, "slurm")


def _slurm(config: dict, section: object, *path: object) -> None:
    try:
        launchers.settings(section)
    except (ValueError, TypeError) as err:
        _fail(config, str(err), *path)


def grid_points(grid: dict[str, list]) -> list[dict]:
    """The exact grid: every combination, in the config's key and value order."""
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
