"""DomainBed data exactly as ``domainbed/scripts/train.py`` builds it: the dataset, the
``misc.split_dataset`` in/out splits, ``InfiniteDataLoader`` training streams, and
``FastDataLoader`` + ``misc.accuracy`` evaluation.
"""

from collections.abc import Iterator, Sequence

import torch
from torch import nn


def default_device() -> str:
    """``cuda`` when available, else ``cpu`` (as train.py)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


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
               trial_seed: int = 0, uda_holdout_fraction: float = 0.0
               ) -> tuple[list, list, list]:
    """train.py's ``(in_splits, out_splits, uda_splits)``: lists of ``(split, weights or
    None)``; a test env's in-split is split again into its uda part (empty by default, which
    still reorders it, as in train.py) and the rest."""
    from domainbed.lib import misc

    if not 0 < holdout_fraction < 1:
        raise ValueError(f"holdout_fraction {holdout_fraction!r}: expected a number in (0, 1)")
    if not 0 <= uda_holdout_fraction < 1:
        raise ValueError(f"uda_holdout_fraction {uda_holdout_fraction!r}: expected a number "
                         "in [0, 1)")
    balanced = hparams["class_balanced"]

    def weighted(split) -> tuple:
        return split, misc.make_weights_for_balanced_classes(split) if balanced else None

    in_splits, out_splits, uda_splits = [], [], []
    for env_i, env in enumerate(dataset):
        out, in_ = misc.split_dataset(env, int(len(env) * holdout_fraction),
                                      misc.seed_hash(trial_seed, env_i))
        uda = []
        if env_i in test_envs:
            uda, in_ = misc.split_dataset(in_, int(len(in_) * uda_holdout_fraction),
                                          misc.seed_hash(trial_seed, env_i))
        in_splits.append(weighted(in_))
        out_splits.append(weighted(out))
        if len(uda):
            uda_splits.append(weighted(uda))
    return in_splits, out_splits, uda_splits


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
        self.name, self.test_envs, self.hparams = dataset_name, list(test_envs), hparams
        self.dataset = build_dataset(dataset_name, data_dir, self.test_envs, hparams)
        self.in_splits, self.out_splits, _ = split_envs(self.dataset, self.test_envs, hparams,
                                                        holdout_fraction, trial_seed)

    @classmethod
    def from_checkpoint(cls, ckpt: dict, dataset: str | None = None,
                        data_dir: str | None = None,
                        test_envs: Sequence[int] | None = None) -> "Data":
        """The data of the run that wrote ``ckpt`` (its args), each field overridable; a model
        that cannot read that data (other classes or input shape) is refused."""
        args = ckpt["args"]
        data = cls(dataset or args["dataset"], data_dir or args.get("data_dir"),
                   test_envs if test_envs is not None else args["test_envs"],
                   ckpt["model_hparams"], args.get("holdout_fraction", 0.2),
                   args.get("trial_seed", 0))
        data.check_model(ckpt)
        return data

    def check_model(self, ckpt: dict) -> None:
        """Refuse a model of another dataset: its classes and input shape must be the data's
        (else every prediction would be scored against the wrong labels)."""
        mine = (self.dataset.num_classes, tuple(self.dataset.input_shape))
        theirs = (ckpt["model_num_classes"], tuple(ckpt["model_input_shape"]))
        if mine != theirs:
            raise ValueError(
                f"the model was trained on {ckpt['args'].get('dataset')!r} ({theirs[0]} classes, "
                f"input {theirs[1]}); {self.name!r} has {mine[0]} classes, input {mine[1]}: "
                "give the model's dataset (--dataset), or a model of this one")

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
