"""The data loaders of a run: DomainBed's sampling, reproducible, resumable and within the job.

DomainBed's ``InfiniteDataLoader`` draws each training batch from a pass of uniform draws with
replacement over the split (``RandomSampler(replacement=True)``, or ``WeightedRandomSampler``
with class weights), cut into batches of ``batch_size`` with the pass's last partial batch
dropped. :class:`IndexStream` draws exactly that stream from a generator of its own, seeded by
the run's seed and the environment, instead of from torch's global random state while
prefetching (which makes DomainBed's stream depend on its number of workers). Batch ``b`` of a
stream is therefore a function of the seed and ``b`` alone, and:

- a resumed run skips to its batch by drawing indices, without loading one image;
- a sample's random augmentation is seeded by (seed, stream, batch), not by a worker's history,
  so records do not depend on how many worker processes load the data, or on a resume;
- the main process's global random state is left to the algorithm.

Worker processes: :func:`cpus_given` (Slurm's ``SLURM_CPUS_PER_TASK``, the affinity mask) bounds
the run's workers in total; the training loaders share them, and their workers stop while the
evaluation loader (which then has them all) runs. Workers ignore SIGINT, SIGTERM and SIGUSR2,
which Slurm, ``timeout`` and a terminal send to the whole process group: the main process alone
decides how to stop.
"""

import os
import random
import signal
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)
EVAL_BATCH = 64  # DomainBed's FastDataLoader batch size for evaluation


def seed_of(*parts: object) -> int:
    """DomainBed's ``misc.seed_hash``: an int in ``[0, 2^31)`` from any values.

    >>> seed_of(0, "train", 3) == seed_of(0, "train", 3) != seed_of(0, "train", 4)
    True
    """
    from domainbed.lib import misc

    return misc.seed_hash(*parts)


class IndexStream:
    """The index batches of one training loader (see the module docstring): with ``weights``
    (class balancing) every batch is ``torch.multinomial(weights, batch_size, True)``, else
    each pass is ``torch.randint(n, (n,))`` cut into ``n // batch_size`` batches.

    >>> s = IndexStream(n=10, batch_size=4, weights=None, seed=0)
    >>> [len(b) for _, b in zip(range(3), s.batches())]
    [4, 4, 4]
    >>> list(zip(range(2), s.batches(start=2)))[0][1] == list(zip(range(3), s.batches()))[2][1]
    True
    """

    def __init__(self, n: int, batch_size: int, weights: Sequence[float] | None,
                 seed: int) -> None:
        if not 1 <= batch_size <= n:
            raise ValueError(f"batch_size {batch_size}: expected 1..{n} (the split has {n} "
                             "examples; a larger batch would never be drawn)")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)

    def batches(self, start: int = 0) -> Iterator[list[int]]:
        """Batch ``start``, ``start + 1``, ... (the batches before are drawn, not yielded)."""
        generator = torch.Generator().manual_seed(self.seed)
        b = 0
        while True:
            if self.weights is not None:
                pass_batches = torch.multinomial(self.weights, self.batch_size, True,
                                                 generator=generator).view(1, -1)
            else:
                per_pass = self.n // self.batch_size
                draws = torch.randint(high=self.n, size=(self.n,), dtype=torch.int64,
                                      generator=generator)
                pass_batches = draws[:per_pass * self.batch_size].view(per_pass, -1)
            if b + len(pass_batches) <= start:
                b += len(pass_batches)
                continue
            for row in pass_batches[max(start - b, 0):]:
                yield row.tolist()
            b += len(pass_batches)


class SeededBatches(Dataset):
    """Loads one batch ``(number, indices)`` of ``split`` with torch's, NumPy's and Python's
    random states seeded by ``(seed, number)`` (random augmentations), leaving the caller's
    random states as they were."""

    def __init__(self, split: Dataset, seed: int) -> None:
        self.split, self.seed = split, seed

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, item: tuple[int, list[int]]):
        number, indices = item
        seed = seed_of(self.seed, number)
        saved = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed)
            try:
                return default_collate([self.split[i] for i in indices])
            finally:
                random.setstate(saved[0])
                np.random.set_state(saved[1])


def _ignore_stop_signals(worker_id: int) -> None:
    """A worker's first code: the stop signals, blocked since it was started (:func:`_iterate`),
    are ignored, then unblocked (any that arrived meanwhile are dropped)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _iterate(split: Dataset, seed: int, items: Iterator | list, workers: int,
             pin: bool) -> Iterator:
    """The batches of ``items``, loaded by ``workers`` processes started with the stop signals
    blocked: a signal sent to the process group while a worker starts stays pending in it
    instead of running the main process's handler (inherited through ``fork``) there. The main
    process's own signals wait the few milliseconds the start takes."""
    # its own generator: the workers' base seed is not drawn from the global random state
    loader = DataLoader(SeededBatches(split, seed), batch_size=None, sampler=items,
                        num_workers=workers, pin_memory=pin, worker_init_fn=_ignore_stop_signals,
                        prefetch_factor=2 if workers else None,
                        generator=torch.Generator().manual_seed(seed))
    before = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def train_loader(split: Dataset, weights, batch_size: int, seed: int, start: int, workers: int,
                 pin: bool) -> Iterator:
    """Batches ``start``, ``start + 1``, ... of one training environment as ``(x, y)``."""
    stream = IndexStream(len(split), batch_size, weights, seed)
    items = ((start + i, indices) for i, indices in enumerate(stream.batches(start)))
    return _iterate(split, seed, items, workers, pin)


def eval_batches(split: Dataset, seed: int, workers: int, pin: bool) -> Iterator:
    """The whole split in order, in batches of 64 (DomainBed's evaluation batch)."""
    items = [(b, list(range(i, min(i + EVAL_BATCH, len(split)))))
             for b, i in enumerate(range(0, len(split), EVAL_BATCH))]
    return _iterate(split, seed, items, workers, pin)


def cpus_given() -> int:
    """The CPUs this process was given: the affinity mask, and Slurm's ``SLURM_CPUS_PER_TASK``
    where it is set (the smaller)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return min(cpus, int(slurm)) if slurm.isdigit() and int(slurm) > 0 else cpus


def worker_budget(requested: int | None, dataset_workers: int, n_loaders: int) -> int:
    """Loader worker processes the run may have at once: ``requested`` (``--workers``), else
    none for a dataset DomainBed loads in the main process (``N_WORKERS == 0``: tensors in
    memory), else the CPUs given but one (the main process's), at most DomainBed's
    ``N_WORKERS`` per training loader.

    >>> worker_budget(3, 8, 4), worker_budget(None, 0, 4)
    (3, 0)
    """
    if requested is not None:
        return requested
    if dataset_workers == 0:
        return 0
    return max(0, min(cpus_given() - 1, dataset_workers * max(n_loaders, 1)))


def share(total: int, n: int) -> list[int]:
    """``total`` workers over ``n`` loaders, as evenly as possible.

    >>> share(5, 3), share(1, 3)
    ([2, 2, 1], [1, 0, 0])
    """
    return [total // n + (i < total % n) for i in range(n)] if n else []
