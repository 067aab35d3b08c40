"""Shared helpers of the inspection commands (traces, probe, surface, export).

DomainBed data exactly as ``domainbed/scripts/train.py`` builds it (hparams, dataset, the
``misc.split_dataset`` in/out splits, ``InfiniteDataLoader`` training streams,
``FastDataLoader`` + ``misc.accuracy`` evaluation), loading a ``model.pkl`` back into its
algorithm, and no-clobber atomic output files.
"""

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

CHECKPOINT_KEYS = ("args", "model_input_shape", "model_num_classes", "model_num_domains",
                   "model_hparams", "model_dict")
QUANTIZED_ALGORITHMS = ("LSQ", "SAGM_LSQ", "GAQAT", "GAQAT_ReverseRatio", "GAQAT_NoUnfreeze")


# --- algorithms and checkpoints -----------------------------------------------------------


def default_device() -> str:
    """``cuda`` when available, else ``cpu`` (as train.py)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def algorithm_class(name: str) -> type:
    """A DomainBed algorithm class (the plugin's are registered by its start-up hook)."""
    from domainbed import algorithms

    if name not in algorithms.ALGORITHMS:
        raise ValueError(f"algorithm {name!r}: expected one of {sorted(algorithms.ALGORITHMS)}")
    return algorithms.get_algorithm_class(name)


def make_hparams(algorithm: str, dataset: str, hparams_seed: int = 0, trial_seed: int = 0,
                 overrides: str | dict | None = None) -> dict:
    """Hyperparameters chosen as train.py does (default for seed 0, else random) + overrides."""
    from domainbed import hparams_registry
    from domainbed.lib import misc

    algorithm_class(algorithm)
    if hparams_seed == 0:
        hparams = hparams_registry.default_hparams(algorithm, dataset)
    else:
        hparams = hparams_registry.random_hparams(algorithm, dataset,
                                                  misc.seed_hash(hparams_seed, trial_seed))
    if isinstance(overrides, str) and overrides:
        try:
            overrides = json.loads(overrides)
        except json.JSONDecodeError as err:
            raise ValueError(f"--hparams {overrides!r} is not a JSON object ({err})") from err
    if overrides:
        if not isinstance(overrides, dict):
            raise ValueError(f"hparams overrides must be a JSON object, got {overrides!r}")
        hparams.update(overrides)
    return hparams


def load_checkpoint(path: str) -> dict:
    """A DomainBed ``model.pkl`` (train.py's ``save_checkpoint`` dict), loaded weights-only."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no model.pkl at {path!r}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"could not read {path!r} as a weights-only DomainBed model.pkl "
                         f"({err})") from err
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{path!r} is not a DomainBed model.pkl: missing keys {missing} "
                         f"(expected {list(CHECKPOINT_KEYS)})")
    return ckpt


def algorithm_from_checkpoint(ckpt: dict, device: str = "cpu") -> nn.Module:
    """Rebuild the checkpoint's algorithm and load its ``model_dict`` with ``strict=True``.

    The initialisation hparams are reset to ``init='none'`` first: the weights come from the
    checkpoint, so the stage-1 / MoCo file it was started from need not exist any more.
    """
    name = ckpt["args"].get("algorithm")
    hparams = dict(ckpt["model_hparams"], init="none", init_path="")
    algorithm = algorithm_class(name)(tuple(ckpt["model_input_shape"]),
                                      ckpt["model_num_classes"], ckpt["model_num_domains"],
                                      hparams)
    algorithm.load_state_dict(ckpt["model_dict"])
    return algorithm.to(device).eval()


def load_algorithm(path: str, device: str = "cpu") -> tuple[nn.Module, dict]:
    """``(algorithm in eval mode, checkpoint dict)`` of a ``model.pkl``."""
    ckpt = load_checkpoint(path)
    return algorithm_from_checkpoint(ckpt, device), ckpt


def require_quantized(ckpt: dict, path: str) -> None:
    name = ckpt["args"].get("algorithm")
    if name not in QUANTIZED_ALGORITHMS:
        raise ValueError(f"{path!r} holds algorithm {name!r}: expected a quantized model "
                         f"({', '.join(QUANTIZED_ALGORITHMS)})")


def checkpoint_dict(args: dict, dataset, test_envs: Sequence[int], hparams: dict,
                    algorithm: nn.Module) -> dict:
    """The dict train.py saves as ``model.pkl``."""
    return {"args": args, "model_input_shape": dataset.input_shape,
            "model_num_classes": dataset.num_classes,
            "model_num_domains": len(dataset) - len(test_envs),
            "model_hparams": hparams, "model_dict": algorithm.state_dict()}


# --- DomainBed data, as train.py -----------------------------------------------------------


def build_dataset(name: str, data_dir: str | None, test_envs: Sequence[int], hparams: dict):
    """``datasets.<name>(data_dir, test_envs, hparams)`` with the test envs checked."""
    from domainbed import datasets

    if name not in vars(datasets) or name not in datasets.DATASETS:
        raise ValueError(f"dataset {name!r}: expected one of {datasets.DATASETS}")
    n_envs = len(vars(datasets)[name].ENVIRONMENTS)
    bad = [e for e in test_envs if not 0 <= e < n_envs]
    if not test_envs or bad:
        raise ValueError(f"test_envs {list(test_envs)}: expected one or more of 0..{n_envs - 1} "
                         f"for {name}")
    return vars(datasets)[name](data_dir, list(test_envs), hparams)


def split_envs(dataset, test_envs: Sequence[int], hparams: dict, holdout_fraction: float = 0.2,
               trial_seed: int = 0) -> tuple[list, list]:
    """train.py's ``(in_splits, out_splits)``: lists of ``(split, weights or None)``."""
    from domainbed.lib import misc

    if not 0 < holdout_fraction < 1:
        raise ValueError(f"holdout_fraction {holdout_fraction!r}: expected a number in (0, 1)")
    in_splits, out_splits = [], []
    for env_i, env in enumerate(dataset):
        out, in_ = misc.split_dataset(env, int(len(env) * holdout_fraction),
                                      misc.seed_hash(trial_seed, env_i))
        if env_i in test_envs:  # train.py's (empty) uda split reorders the test in-split
            _, in_ = misc.split_dataset(in_, 0, misc.seed_hash(trial_seed, env_i))
        balanced = hparams["class_balanced"]
        in_splits.append((in_, misc.make_weights_for_balanced_classes(in_) if balanced else None))
        out_splits.append((out, misc.make_weights_for_balanced_classes(out) if balanced
                           else None))
    return in_splits, out_splits


def train_minibatches(dataset, in_splits: list, test_envs: Sequence[int],
                      hparams: dict) -> Iterator[list]:
    """train.py's training stream: ``zip`` of one ``InfiniteDataLoader`` per training env."""
    from domainbed.lib.fast_data_loader import InfiniteDataLoader

    smallest = min(len(env) for i, (env, _) in enumerate(in_splits) if i not in test_envs)
    if hparams["batch_size"] > smallest:
        raise ValueError(f"batch_size {hparams['batch_size']} exceeds the smallest training "
                         f"split ({smallest} examples): the loader would never yield a batch")
    loaders = [InfiniteDataLoader(dataset=env, weights=weights,
                                  batch_size=hparams["batch_size"],
                                  num_workers=dataset.N_WORKERS)
               for i, (env, weights) in enumerate(in_splits) if i not in test_envs]
    return zip(*loaders)


def eval_loader(split, num_workers: int = 0):
    """train.py's evaluation loader (``FastDataLoader``, batch 64)."""
    from domainbed.lib.fast_data_loader import FastDataLoader

    return FastDataLoader(dataset=split, batch_size=64, num_workers=num_workers)


def accuracy(algorithm: nn.Module, split, device: str, num_workers: int = 0) -> float:
    """``misc.accuracy`` on one split, as train.py evaluates (unweighted)."""
    from domainbed.lib import misc

    acc = misc.accuracy(algorithm, eval_loader(split, num_workers), None, device)
    algorithm.eval()  # misc.accuracy leaves the network in train mode
    return acc


def load_batches(split, max_samples: int | None, device: str) -> list[tuple[torch.Tensor,
                                                                            torch.Tensor]]:
    """The first ``max_samples`` examples of a split (in split order), in batches of 64."""
    n = len(split) if max_samples is None else min(max_samples, len(split))
    if n == 0:
        raise ValueError("the chosen split is empty")
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(split, range(n)),
                                         batch_size=64, shuffle=False)
    return [(x.to(device), y.to(device)) for x, y in loader]


class Data:
    """A checkpoint's (or a run's) DomainBed dataset and train.py splits."""

    def __init__(self, dataset_name: str, data_dir: str | None, test_envs: Sequence[int],
                 hparams: dict, holdout_fraction: float = 0.2, trial_seed: int = 0) -> None:
        self.test_envs = list(test_envs)
        self.hparams = hparams
        self.dataset = build_dataset(dataset_name, data_dir, self.test_envs, hparams)
        self.in_splits, self.out_splits = split_envs(self.dataset, self.test_envs, hparams,
                                                     holdout_fraction, trial_seed)

    @classmethod
    def from_checkpoint(cls, ckpt: dict, dataset: str | None = None,
                        data_dir: str | None = None,
                        test_envs: Sequence[int] | None = None) -> "Data":
        """The data of the run that wrote ``ckpt`` (its args), each field overridable."""
        args = ckpt["args"]
        return cls(dataset or args["dataset"], data_dir or args.get("data_dir"),
                   test_envs if test_envs is not None else args["test_envs"],
                   ckpt["model_hparams"], args.get("holdout_fraction", 0.2),
                   args.get("trial_seed", 0))

    @property
    def train_envs(self) -> list[int]:
        return [i for i in range(len(self.dataset)) if i not in self.test_envs]

    @property
    def num_workers(self) -> int:
        return self.dataset.N_WORKERS

    def split(self, env: int, which: str):
        """Split ``which`` (``in``, ``out`` or ``full``) of env ``env``."""
        if not 0 <= env < len(self.dataset):
            raise ValueError(f"env {env}: expected 0..{len(self.dataset) - 1}")
        if which == "full":
            return self.dataset[env]
        if which not in ("in", "out"):
            raise ValueError(f"split {which!r}: expected 'in', 'out' or 'full'")
        return (self.in_splits if which == "in" else self.out_splits)[env][0]

    def minibatches(self) -> Iterator[list]:
        return train_minibatches(self.dataset, self.in_splits, self.test_envs, self.hparams)

    def accuracies(self, algorithm: nn.Module, device: str) -> dict[str, float]:
        """In-domain = mean training-domain validation (``env{i}_out``) accuracy; out-of-domain
        = mean test-env ``env{t}_in`` accuracy (DomainBed's test accuracy); plus each split."""
        accs = {f"env{i}_out_acc": accuracy(algorithm, self.out_splits[i][0], device,
                                            self.num_workers) for i in self.train_envs}
        accs.update({f"env{t}_in_acc": accuracy(algorithm, self.in_splits[t][0], device,
                                                self.num_workers) for t in self.test_envs})
        ood = [accs[f"env{t}_in_acc"] for t in self.test_envs]
        return {"id_acc": sum(accs[f"env{i}_out_acc"] for i in self.train_envs)
                / len(self.train_envs), "ood_acc": sum(ood) / len(ood), **accs}


# --- outputs ---------------------------------------------------------------------------


def check_new(paths: Sequence[str], overwrite: bool) -> None:
    """Fail before any work if an output exists and ``overwrite`` is off."""
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not overwrite:
        raise FileExistsError(f"refusing to overwrite existing results {existing}: choose "
                              "another output directory or pass --overwrite")


def atomic_write(path: str, write: Callable[[str], None], overwrite: bool = False) -> str:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then move it into place
    (a hard link, which fails if ``path`` appeared meanwhile, unless ``overwrite``)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    base = os.path.basename(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{base}.", suffix=os.path.splitext(base)[1])
    os.close(fd)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
        write(tmp)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise FileExistsError(f"refusing to overwrite {path!r}: pass --overwrite") from None
            except OSError:  # no hard links on this file system
                check_new([path], overwrite=False)
                os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_table(df, path_stem: str, overwrite: bool) -> list[str]:
    """A pandas table as ``<stem>.csv`` and, when pyarrow is installed, ``<stem>.parquet``."""
    paths = [atomic_write(path_stem + ".csv", lambda p: df.to_csv(p, index=False), overwrite)]
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return paths
    paths.append(atomic_write(path_stem + ".parquet", lambda p: df.to_parquet(p, index=False),
                              overwrite))
    return paths


def write_text(path: str, text: str, overwrite: bool) -> str:
    def write(p: str) -> None:
        with open(p, "w") as f:
            f.write(text)

    return atomic_write(path, write, overwrite)


def save_figure(fig, path: str, overwrite: bool) -> str:
    """A matplotlib ``Figure`` as PNG (Agg; no pyplot state)."""
    return atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120,
                                                    bbox_inches="tight"), overwrite)


def finish(paths: Sequence[str]) -> None:
    """The commands' last line: where their files are."""
    directories = sorted({os.path.dirname(os.path.abspath(p)) for p in paths})
    names = ", ".join(os.path.basename(p) for p in paths)
    print(f"Wrote {len(paths)} files to {', '.join(directories)}: {names}")


def run_cli(main: Callable[[], object]) -> None:
    """Run a command's ``main``; bad input (missing file, existing output, invalid value)
    ends with ``error: <message>`` and exit status 1 instead of a traceback."""
    try:
        main()
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        sys.exit(f"error: {err}")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 1")
    return value
