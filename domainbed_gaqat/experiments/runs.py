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
"""

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
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
        object.__setattr__(self, "test_envs", tuple(self.test_envs))
        object.__setattr__(self, "hparams", MappingProxyType(dict(self.hparams)))

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

    def recorded_own_args(self) -> dict[str, object]:
        """The entry's own arguments as records hold them: only those away from default."""
        return {k: getattr(self, k) for k, d in OWN_DEFAULTS.items() if getattr(self, k) != d}


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
