"""What one DomainBed run is: :class:`RunSpec`, defined once.

A run is DomainBed's ``train.py`` on one algorithm, dataset, set of test environments, trial,
seeds, resolved hyperparameters and step settings. Its *identity* is that meaning, not its
spelling: no paths (``data_dir``, ``output_dir``, the ``init_path`` hparam), test envs as a
sorted tuple, hparams as values (JSON formatting and key order do not count). Seeds are part of
what a run computes, but DomainBed folder hashes and this project's sweep derive them from the
other arguments (the sweep's ``hparams_seed`` hashes ``init_path`` too), so :attr:`identity`
leaves them out and :meth:`differences` (the resume check) adds them.

>>> a = RunSpec("GAQAT", "PACS", (2, 0), {"lr": 5e-5, "init_path": "/a/model.pkl"})
>>> b = RunSpec("GAQAT", "PACS", (0, 2), {"init_path": "/b/model.pkl", "lr": 5e-5})
>>> a.identity == b.identity
True
>>> a.differences(RunSpec("GAQAT", "PACS", (0, 2), {"lr": 1e-5}, seed=1))
{'hparams.lr': (5e-05, 1e-05), 'seed': (0, 1)}

A sweep's run derives its seeds and its ``train.py`` arguments from the spec, and goes to the
folder of its bit-width (DomainBed's ``Job`` then hashes the arguments into the run folder):

>>> run = RunSpec("LSQ", "PACS", (1,), {"w_bits": 3, "a_bits": 3}, steps=10).with_sweep_seeds()
>>> run.bits_name, run.train_args("/data")["hparams"], run.hparams_seed > 0
('w3a3', '{"a_bits": 3, "w_bits": 3}', True)
"""

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType

PATH_HPARAMS = ("init_path",)  # hparams that say where a file is, not what the run is
PRECISIONS = ("fp32", "bf16")
# fields of the entry's own (not DomainBed's train.py): recorded only away from their default
OWN_DEFAULTS = {"eval_from": 0, "member": 0, "precision": "fp32"}
SEEDS = ("hparams_seed", "seed")


@dataclass(frozen=True)
class RunSpec:
    """One run. ``hparams`` are the resolved values (the registry's draw for ``hparams_seed``
    and ``trial_seed``, then the ``--hparams`` overrides); ``steps`` / ``checkpoint_freq`` None
    mean the dataset's defaults; ``member`` tells ensemble members apart (same run, other
    seed); ``precision`` is the training arithmetic (``fp32`` or ``bf16`` autocast)."""

    algorithm: str
    dataset: str
    test_envs: tuple[int, ...]
    hparams: Mapping[str, object] = field(default_factory=dict)
    trial_seed: int = 0
    hparams_seed: int = 0
    seed: int = 0
    holdout_fraction: float = 0.2
    steps: int | None = None
    checkpoint_freq: int | None = None
    task: str = "domain_generalization"
    uda_holdout_fraction: float = 0.0
    eval_from: int = 0
    member: int = 0
    precision: str = "fp32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "test_envs", tuple(int(e) for e in self.test_envs))
        object.__setattr__(self, "hparams", MappingProxyType(dict(self.hparams)))
        for name in ("holdout_fraction", "uda_holdout_fraction"):  # train.py's 0 is 0.0
            object.__setattr__(self, name, float(getattr(self, name)))

    # --- built from what a run was given or recorded ---------------------------------------

    @classmethod
    def from_args(cls, args: Mapping[str, object], hparams: Mapping[str, object]) -> "RunSpec":
        """From train.py's arguments (``vars(args)``, or a record's ``args``) and the resolved
        hparams; arguments that are not fields (paths, flags) are ignored."""
        names = {f.name for f in fields(cls)} - {"hparams"}
        given = {k: v for k, v in args.items() if k in names and v is not None}
        given["test_envs"] = tuple(given.get("test_envs") or ())
        return cls(hparams=hparams, **given)

    @classmethod
    def from_record(cls, record: Mapping[str, object]) -> "RunSpec":
        """From one ``results.jsonl`` record (its ``args`` and ``hparams``)."""
        return cls.from_args(record["args"], record["hparams"])

    @classmethod
    def from_train_args(cls, args: Mapping[str, object]) -> "RunSpec":
        """From a command's arguments, hparams given in full as ``--hparams`` JSON (a sweep's
        DomainBed ``Job.train_args``)."""
        return cls.from_args(args, json.loads(args["hparams"]))

    def to_dict(self) -> dict[str, object]:
        """Every field as plain values (``RunSpec(**spec.to_dict()) == spec``)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        return {**out, "test_envs": list(self.test_envs), "hparams": dict(self.hparams)}

    # --- what it is ------------------------------------------------------------------------

    def meaning(self) -> dict[str, object]:
        """The identity's fields as plain values (see the module docstring)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name not in SEEDS and f.name != "hparams"}
        out["test_envs"] = sorted(self.test_envs)
        out["hparams"] = {k: v for k, v in self.hparams.items() if k not in PATH_HPARAMS}
        return out

    @property
    def identity(self) -> str:
        """The run's meaning as one canonical string (equal for equal runs)."""
        return json.dumps(self.meaning(), sort_keys=True)

    @property
    def copy_key(self) -> str:
        """The identity and the seeds: equal for a run and its copies (two runs of one
        identity but other seeds are two draws, not copies)."""
        return json.dumps({**self.meaning(), **{k: getattr(self, k) for k in SEEDS}},
                          sort_keys=True)

    def differences(self, other: "RunSpec") -> dict[str, tuple[object, object]]:
        """``{field: (mine, other's)}`` over the identity and the seeds; hparams per key
        (``hparams.lr``); numbers compare by value (``1e-5 == 0.00001``, ``1 == 1.0``)."""
        mine, theirs = self.meaning(), other.meaning()
        ours_h, theirs_h = mine.pop("hparams"), theirs.pop("hparams")
        for name in SEEDS:
            mine[name], theirs[name] = getattr(self, name), getattr(other, name)
        for key in ours_h.keys() | theirs_h.keys():
            mine[f"hparams.{key}"] = ours_h.get(key)
            theirs[f"hparams.{key}"] = theirs_h.get(key)
        return {k: (mine[k], theirs[k]) for k in sorted(mine)
                if not _same(mine[k], theirs[k])}

    @property
    def quantized_bits(self) -> tuple[int, ...] | None:
        """``(W, A)``, ``(W,)`` for weights only, or None for full precision, from the hparams."""
        if "w_bits" not in self.hparams:
            return None
        return tuple(self.hparams[k] for k in ("w_bits", "a_bits") if k in self.hparams)

    @property
    def bits_name(self) -> str:
        """``fp``, ``w<W>a<A>`` or ``w<W>`` (weights only): a sweep's folder per bit-width."""
        bits = self.quantized_bits
        return "fp" if bits is None else "".join(f"{k}{b}" for k, b in zip("wa", bits))

    def recorded_own_args(self) -> dict[str, object]:
        """The entry's own arguments as records hold them: only those away from default."""
        return {k: getattr(self, k) for k, d in OWN_DEFAULTS.items() if getattr(self, k) != d}

    # --- as a sweep's job ------------------------------------------------------------------

    def with_sweep_seeds(self) -> "RunSpec":
        """The seeds a sweep gives the run. ``hparams_seed`` hashes what the run computes
        (algorithm, dataset, hparams with their paths, step settings, the entry's own
        arguments away from default), so runs that differ get different seeds (DomainBed's
        model selection groups runs by it) and equal runs of two configs are one job; ``seed``
        is DomainBed's sweep's hash of dataset, algorithm, test envs, ``hparams_seed`` and
        trial."""
        from domainbed.lib import misc

        what = {"algorithm": self.algorithm, "dataset": self.dataset,
                "hparams": dict(self.hparams), "steps": self.steps,
                "checkpoint_freq": self.checkpoint_freq,
                "holdout_fraction": self.holdout_fraction, **self.recorded_own_args()}
        hparams_seed = misc.seed_hash(json.dumps(what, sort_keys=True))
        seed = misc.seed_hash(self.dataset, self.algorithm, list(self.test_envs), hparams_seed,
                              self.trial_seed)
        return replace(self, hparams_seed=hparams_seed, seed=seed)

    def train_args(self, data_dir: str) -> dict[str, object]:
        """Its ``domainbed_gaqat.train`` arguments (DomainBed's train.py's and the entry's own
        away from default), hparams in full as ``--hparams`` JSON."""
        args = {"dataset": self.dataset, "algorithm": self.algorithm,
                "test_envs": list(self.test_envs), "hparams_seed": self.hparams_seed,
                "data_dir": data_dir, "task": self.task, "trial_seed": self.trial_seed,
                "hparams": json.dumps(dict(self.hparams), sort_keys=True), "seed": self.seed,
                "holdout_fraction": self.holdout_fraction}
        for name in ("steps", "checkpoint_freq"):
            if getattr(self, name) is not None:
                args[name] = getattr(self, name)
        if self.uda_holdout_fraction:
            args["uda_holdout_fraction"] = self.uda_holdout_fraction
        return {**args, **self.recorded_own_args()}


def _same(a: object, b: object) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b
