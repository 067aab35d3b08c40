"""Sweep configs (``sweeps/``): read without running code, resolved, then parsed once into
typed, frozen objects (:class:`SweepConfig`, :class:`Stage`, :class:`Grid`, :class:`StageRef`,
:class:`Table`, and the launcher's :class:`~domainbed_gaqat.plugin.launchers.SlurmSettings`).

A config is a ``.py`` file whose one statement that matters is ``SWEEP = {...}``, a literal read
with ``ast.literal_eval``; the format is in ``sweeps/README.md``. ``extends`` builds on another
config; a grid value ``"paper"`` is the paper's grid as the hparams registry holds it (the values
DomainBed's random sweep draws from, for the config's dataset and bits), resolved by the parse.
Every error names the file and line and what was expected.

>>> config = load_config("pacs_w3a3")
>>> config.dataset, config.bits, [stage.name for stage in config.stages]
('PACS', (3, 3), ['fp', 'qat', 'gaqat'])
>>> config.stage("gaqat").grid.axes["gaqat_K"]  # "paper": the 3-bit grid
(100, 150, 200)
"""

import ast
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType

from domainbed import datasets

from domainbed_gaqat.experiments.selection import SELECTION_RULES
from domainbed_gaqat.plugin import hparams as hparams_lib
from domainbed_gaqat.plugin.generic import ALIASES
from domainbed_gaqat.plugin.launchers import SlurmSettings
from domainbed_gaqat.plugin.registry import algorithm_class, is_quantized, plugin_spec

TOP_KEYS = {"paper", "extends", "dataset", "test_envs", "trials", "bits", "selection",
            "holdout_fraction", "hparams", "stages", "table", "slurm"}
MERGED_KEYS = ("hparams", "table", "slurm")  # merged key by key under ``extends``
STAGE_KEYS = {"name", "from", "algorithms", "steps", "checkpoint_freq", "eval_from", "members",
              "hparams", "grid", "init_from", "hparams_from", "slurm"}
BIT_KEYS = hparams_lib.BIT_KEYS
PAPER = "paper"


class ConfigError(ValueError):
    """A sweep config that is not what ``sweeps/README.md`` describes."""


def _frozen(mapping: Mapping) -> Mapping:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class Grid:
    """A stage's exact grid, ``{hparam: values}``: every combination is one run.

    >>> Grid({"lr": (1e-5, 3e-5), "gaqat_K": (300,)}).points()
    [{'lr': 1e-05, 'gaqat_K': 300}, {'lr': 3e-05, 'gaqat_K': 300}]
    """

    axes: Mapping[str, tuple] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "axes", _frozen({k: tuple(v) for k, v in self.axes.items()}))

    def points(self) -> list[dict[str, object]]:
        """Every combination, in the config's key and value order."""
        return [dict(zip(self.axes, values)) for values in itertools.product(*self.axes.values())]


@dataclass(frozen=True)
class StageRef:
    """``init_from`` / ``hparams_from``: an algorithm of an earlier stage, and (``hparams_from``)
    the hparams copied from the run the selection rule picks there."""

    stage: str
    algorithm: str
    keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class Stage:
    """One stage of a config (``sweeps/README.md``); ``slurm``: the launcher settings of its
    jobs (defaults, the config's section, the stage's; the environment still wins at launch)."""

    name: str
    algorithms: tuple[str, ...]
    steps: int
    checkpoint_freq: int
    eval_from: int = 0
    members: int = 1
    hparams: Mapping[str, object] = field(default_factory=dict)
    grid: Grid = field(default_factory=Grid)
    init_from: StageRef | None = None
    hparams_from: StageRef | None = None
    slurm: SlurmSettings = field(default_factory=SlurmSettings)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hparams", _frozen(self.hparams))


@dataclass(frozen=True)
class Table:
    """What ``gaqat tables`` shows of a config: the rows' ``algorithms`` (None: every one) and
    the hparams that split rows."""

    algorithms: tuple[str, ...] | None = None
    split_by: tuple[str, ...] = ()


@dataclass(frozen=True)
class SweepConfig:
    """A parsed config: ``bits`` ``(W, A)`` or ``(W,)`` (None: not given), ``selection`` a rule
    of :data:`~domainbed_gaqat.experiments.selection.SELECTION_RULES`, ``hparams`` fixed for
    every algorithm that has them."""

    name: str
    path: str
    dataset: str
    test_envs: tuple[tuple[int, ...], ...]
    trials: int
    stages: tuple[Stage, ...]
    bits: tuple[int, ...] | None = None
    selection: str = "test"
    holdout_fraction: float = 0.2
    hparams: Mapping[str, object] = field(default_factory=dict)
    table: Table = field(default_factory=Table)
    paper: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "hparams", _frozen(self.hparams))

    def stage(self, name: str) -> Stage:
        """The stage called ``name``; a :class:`ConfigError` naming the others if none is."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise ConfigError(f"--stage {name!r}: expected one of "
                          f"{[s.name for s in self.stages]} of {self.path}")

    @property
    def algorithms(self) -> list[str]:
        """Every stage's algorithms, in order."""
        return [a for stage in self.stages for a in stage.algorithms]


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


def load_config(name: str) -> SweepConfig:
    """Read, resolve and parse a config (a ``sweeps/`` name or a file)."""
    raw, lines, path = _resolve(name)
    return _Parser(raw, lines, path).config()


# --- parsing -------------------------------------------------------------------------------


def _int(value: object, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _known(algorithm: str, dataset: str) -> set[str]:
    from domainbed import hparams_registry

    return set(hparams_registry.default_hparams(algorithm, dataset))


def _resolves(algorithm: str) -> bool:
    try:
        algorithm_class(algorithm)
    except ValueError:
        return False
    return True


def _reads_activation_bits(algorithm: str, dataset: str) -> bool:
    return "a_bits" in _known(algorithm, dataset)


class _Parser:
    """Checks a resolved config and builds its :class:`SweepConfig`; every error is a
    :class:`ConfigError` at the line of the value it names."""

    def __init__(self, raw: dict, lines: dict, path: Path) -> None:
        self.raw, self.lines, self.path = raw, lines, str(path)
        self.name = path.stem

    def fail(self, message: str, *at: object) -> None:
        """Raise at the line of the longest known prefix of the key path ``at``."""
        for n in range(len(at), -1, -1):
            if at[:n] in self.lines:
                file, line = self.lines[at[:n]]
                raise ConfigError(f"{file}:{line}: {message}")
        raise ConfigError(f"{self.path}:1: {message}")

    def check(self, ok: bool, message: str, *at: object) -> None:
        if not ok:
            self.fail(message, *at)

    def slurm(self, settings: SlurmSettings, section: object, *at: object) -> SlurmSettings:
        try:
            return settings.updated(section)
        except (ValueError, TypeError) as err:
            self.fail(str(err), *at)

    def value(self, algorithm: str, key: str, value: object, *at: object) -> None:
        """A plugin hyperparameter's value against its range (DomainBed's own are not
        checked)."""
        declared = plugin_spec(algorithm)
        param = (hparams_lib.params(declared, self.dataset).get(key) if declared is not None
                 else None)
        expected = param.check(value) if param is not None else None
        self.check(expected is None, f"{key} {value!r} for {algorithm}: expected {expected}",
                   *at)

    def config(self) -> SweepConfig:
        raw, check = self.raw, self.check
        unknown = sorted(set(raw) - TOP_KEYS)
        check(not unknown, f"unknown keys {unknown}; expected some of {sorted(TOP_KEYS)}",
              *unknown[:1])
        missing = {"dataset", "test_envs", "trials", "stages"} - set(raw)
        check(not missing, f"missing keys {sorted(missing)}")
        self.dataset = dataset = raw["dataset"]
        check(dataset in datasets.DATASETS,
              f"dataset {dataset!r}: expected one of DomainBed's datasets {datasets.DATASETS}",
              "dataset")
        n_envs = datasets.num_environments(dataset)
        groups = raw["test_envs"]
        check(isinstance(groups, list) and groups and all(
            isinstance(g, list) and g and all(_int(e, 0) and e < n_envs for e in g)
            and len(set(g)) == len(g) for g in groups),
            f"test_envs {groups!r}: expected a list of groups, each a list of distinct env "
            f"indices in 0..{n_envs - 1}", "test_envs")
        check(_int(raw["trials"], 1), f"trials {raw['trials']!r}: expected an int >= 1",
              "trials")
        selection = raw.get("selection", "test")
        check(selection in SELECTION_RULES, f"selection {selection!r}: expected one of "
              f"{sorted(SELECTION_RULES)}", "selection")
        fraction = raw.get("holdout_fraction", 0.2)
        check(isinstance(fraction, float) and 0 < fraction < 1,
              f"holdout_fraction {fraction!r}: expected a float in (0, 1)", "holdout_fraction")
        bits = raw.get("bits")
        check(bits is None or isinstance(bits, list) and len(bits) in (1, 2)
              and all(_int(b, 2) and b <= 8 for b in bits),
              f"bits {bits!r}: expected [W, A] or [W] (weights only), each an int in 2..8",
              "bits")
        self.bits = None if bits is None else tuple(bits)
        self.settings = self.slurm(SlurmSettings(), raw.get("slurm", {}), "slurm")
        stages = self.stages()
        every = [a for stage in stages for a in stage.algorithms]
        return SweepConfig(
            self.name, self.path, dataset, tuple(tuple(sorted(g)) for g in groups),
            raw["trials"], stages, self.bits, selection, fraction, self.hparams(every),
            self.table(every), raw.get("paper", ""))

    def stages(self) -> tuple[Stage, ...]:
        raw = self.raw["stages"]
        self.check(isinstance(raw, list) and raw, "stages: expected a non-empty list", "stages")
        seen: dict[str, Stage] = {}
        for i, entry in enumerate(raw):
            self.check(isinstance(entry, dict), f"stage {entry!r}: expected a dict", "stages", i)
            stage = self.stage(entry, seen, ("stages", i))
            seen[stage.name] = stage
        every = [a for stage in seen.values() for a in stage.algorithms]
        self.check(len(every) == len(set(every)),
                   f"an algorithm appears in two stages ({every}): each may appear once",
                   "stages")
        return tuple(seen.values())

    def hparams(self, every: list[str]) -> dict:
        """The config's fixed hparams, each read by some algorithm and in its range."""
        fixed = self.raw.get("hparams", {})
        self.check(isinstance(fixed, dict), f"hparams {fixed!r}: expected a dict", "hparams")
        for key, value in fixed.items():
            self.check(key not in BIT_KEYS and any(key in _known(a, self.dataset) for a in every),
                       f"hparams key {key!r}: not a hyperparameter of {every} (bits go in "
                       "'bits')", "hparams", key)
            for algorithm in every:
                self.value(algorithm, key, value, "hparams", key)
        return fixed

    def table(self, every: list[str]) -> Table:
        table = self.raw.get("table", {})
        self.check(isinstance(table, dict) and set(table) <= {"algorithms", "split_by"}
                   and isinstance(table.get("split_by", []), list)
                   and set(table.get("algorithms", every)) <= set(every),
                   f"table {table!r}: expected 'algorithms' (a subset of {every}) and "
                   f"'split_by' (a list of hparams)", "table")
        shown = table.get("algorithms")
        return Table(None if shown is None else tuple(shown), tuple(table.get("split_by", ())))

    def stage(self, raw: dict, seen: dict[str, Stage], at: tuple) -> Stage:
        name = raw.get("name")
        where = f"stage {name!r}"
        self.check(isinstance(name, str) and name.isidentifier() and name not in seen,
                   f"{where}: 'name' must be a new identifier (stages so far: {list(seen)})",
                   *at, "name")
        unknown = sorted(set(raw) - STAGE_KEYS - {"from"})
        self.check(not unknown, f"{where}: unknown keys {unknown}; expected some of "
                   f"{sorted(STAGE_KEYS - {'from'})}", *at, unknown[0] if unknown else "name")
        algorithms = raw.get("algorithms")
        self.check(isinstance(algorithms, list) and algorithms
                   and all(isinstance(a, str) and _resolves(a) for a in algorithms),
                   f"{where}: algorithms {algorithms!r}: expected a list of DomainBed's "
                   "algorithms (the plugin's and <Name>_FP / _LSQ / _QTDoG included)",
                   *at, "algorithms")
        for alias in set(algorithms) & set(ALIASES):
            self.fail(f"{where}: {alias} is {ALIASES[alias]}: write the canonical name (the "
                      "tables' row)", *at, "algorithms")
        quantized = self.stage_bits(where, algorithms, at)
        for key in ("steps", "checkpoint_freq"):
            self.check(_int(raw.get(key), 1), f"{where}: {key} {raw.get(key)!r}: expected an "
                       "int >= 1", *at, key)
        members, eval_from = raw.get("members", 1), raw.get("eval_from", 0)
        self.check(_int(members, 1), f"{where}: members {members!r}: expected an int >= 1 "
                   "(runs of each job differing only in seed, for an ensemble)", *at, "members")
        self.check(_int(eval_from, 0) and eval_from < raw["steps"], f"{where}: eval_from "
                   f"{eval_from!r}: expected an int in 0..steps-1", *at, "eval_from")
        fixed = raw.get("hparams", {})
        grid = self.grid(where, raw.get("grid", {}), algorithms, quantized, at)
        self.check(isinstance(fixed, dict), f"{where}: hparams {fixed!r}: expected a dict",
                   *at, "hparams")
        init_from, hparams_from = (self.ref(where, raw.get(key), seen, key, at)
                                   for key in ("init_from", "hparams_from"))
        self.stage_hparams(where, algorithms, grid, fixed, hparams_from, at)
        slurm = self.slurm(self.settings, raw.get("slurm", {}), *at, "slurm")
        return Stage(name, tuple(algorithms), raw["steps"], raw["checkpoint_freq"], eval_from,
                     members, fixed, grid, init_from, hparams_from, slurm)

    def stage_hparams(self, where: str, algorithms: list[str], grid: Grid, fixed: dict,
                      hparams_from: StageRef | None, at: tuple) -> None:
        """Each hparam the stage sets once, read by each of its algorithms, in range."""
        keys = [*grid.axes, *fixed, *(hparams_from.keys if hparams_from else ())]
        self.check(len(keys) == len(set(keys)), f"{where}: a hyperparameter is set twice "
                   f"among grid, hparams and hparams_from: {keys}", *at)
        for algorithm in algorithms:
            unknown = set(keys) - (_known(algorithm, self.dataset) - set(BIT_KEYS))
            self.check(not unknown, f"{where}: {sorted(unknown)} are not hyperparameters of "
                       f"{algorithm} (bits go in 'bits')", *at,
                       "grid" if set(grid.axes) & unknown else "hparams")
            for key, value in fixed.items():
                self.value(algorithm, key, value, *at, "hparams", key)
            for key, values in grid.axes.items():
                for j, value in enumerate(values):
                    self.value(algorithm, key, value, *at, "grid", key, j)

    def stage_bits(self, where: str, algorithms: list[str], at: tuple) -> bool:
        """Whether the stage is quantized; its algorithms must agree, and the config's bits
        fit them."""
        kinds = {is_quantized(a) for a in algorithms}
        self.check(len(kinds) == 1, f"{where}: mixes quantized and full-precision algorithms",
                   *at, "algorithms")
        quantized = kinds.pop()
        self.check(not quantized or self.bits is not None,
                   f"{where} is quantized: the config needs bits = [W, A]", *at)
        if quantized:
            reads = {_reads_activation_bits(a, self.dataset) for a in algorithms}
            self.check(len(reads) == 1, f"{where}: mixes weight-only and W/A algorithms (their "
                       "runs go to different folders): give them stages of their own", *at,
                       "algorithms")
            self.check(not reads.pop() or len(self.bits) == 2,
                       f"{where} quantizes activations: the config needs bits = [W, A]", *at)
        return quantized

    def grid(self, where: str, raw: object, algorithms: list[str], quantized: bool,
             at: tuple) -> Grid:
        """The stage's grid, ``"paper"`` resolved to the registry's grid at the config's
        (smaller) bit-width."""
        self.check(isinstance(raw, dict) and all(v == PAPER or isinstance(v, list) and v
                                                 for v in raw.values()),
                   f"{where}: grid {raw!r}: expected {{name: [values, ...] or 'paper'}}",
                   *at, "grid")
        bits = min(self.bits) if quantized else 4
        axes = {}
        for key, values in raw.items():
            if values == PAPER:
                grids = set()
                for algorithm in algorithms:
                    declared = plugin_spec(algorithm)
                    try:
                        if declared is None:
                            raise ValueError(f"{algorithm} is DomainBed's own: give its values")
                        grids.add(tuple(hparams_lib.paper_grid(declared, self.dataset, bits,
                                                               key)))
                    except ValueError as err:
                        self.fail(f"{where}: grid {key}: {err}", *at, "grid", key)
                self.check(len(grids) == 1, f"{where}: grid {key}: the paper's grids of "
                           f"{algorithms} differ ({sorted(grids)}): give the values",
                           *at, "grid", key)
                values = grids.pop()
            axes[key] = values
        return Grid(axes)

    def ref(self, where: str, raw: object, seen: dict[str, Stage], key: str,
            at: tuple) -> StageRef | None:
        """``init_from`` / ``hparams_from``: an earlier stage's algorithm (and keys)."""
        if raw is None:
            return None
        self.check(isinstance(raw, dict) and raw.get("stage") in seen
                   and raw.get("algorithm") in seen[raw["stage"]].algorithms,
                   f"{where}: {key} {raw!r}: expected {{'stage': an earlier stage, "
                   f"'algorithm': one of its algorithms}}", *at, key)
        if key != "hparams_from":
            return StageRef(raw["stage"], raw["algorithm"])
        keys = raw.get("keys")
        self.check(isinstance(keys, list) and keys
                   and set(keys) <= _known(raw["algorithm"], self.dataset),
                   f"{where}: hparams_from needs 'keys', a list of hparams of "
                   f"{raw['algorithm']} to copy", *at, key)
        return StageRef(raw["stage"], raw["algorithm"], tuple(keys))
