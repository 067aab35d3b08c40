"""The run's loaders: DomainBed's sampling stream, a skip equal to drawing, augmentations that do
not depend on the workers, workers within the CPUs given."""

import random
import subprocess

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support.helpers import PYTHON, subprocess_env
from torch.utils.data import BatchSampler, Dataset, RandomSampler, WeightedRandomSampler

from domainbed_gaqat.plugin import loaders


def domainbeds_stream(n: int, batch_size: int, weights, generator, count: int) -> list:
    """DomainBed's ``InfiniteDataLoader`` sampler (fast_data_loader.py: a BatchSampler with
    drop_last over RandomSampler(replacement=True), or WeightedRandomSampler of one batch,
    repeated without end), given a generator instead of the global random state."""
    if weights is not None:
        sampler = WeightedRandomSampler(weights, replacement=True, num_samples=batch_size,
                                        generator=generator)
    else:
        sampler = RandomSampler(range(n), replacement=True, generator=generator)
    batches = BatchSampler(sampler, batch_size=batch_size, drop_last=True)
    out = []
    while len(out) < count:
        out += list(batches)
    return out[:count]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), data=st.data(), weighted=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_the_stream_is_domainbeds_and_a_skip_equals_drawing(n, data, weighted, seed):
    batch_size = data.draw(st.integers(1, n))
    start = data.draw(st.integers(0, 3 * (n // batch_size) + 2))
    weights = [float(w) for w in np.random.default_rng(seed).random(n) + 0.01] if weighted else None
    stream = loaders.IndexStream(n, batch_size, weights, seed)
    expected = domainbeds_stream(n, batch_size, weights, torch.Generator().manual_seed(seed),
                                 start + 5)
    got = [b for _, b in zip(range(start + 5), stream.batches())]
    assert got == expected
    assert [b for _, b in zip(range(5), stream.batches(start))] == expected[start:]


def test_a_batch_larger_than_the_split_is_refused():
    with pytest.raises(ValueError, match=r"batch_size 11: expected 1..10"):
        loaders.IndexStream(10, 11, None, 0)


class Augmented(Dataset):
    """Samples with a random augmentation from torch's, NumPy's and Python's random states."""

    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int):
        noise = torch.rand(2) + float(np.random.rand()) + random.random()
        return torch.full((2,), float(i)) + noise, i % 3


def _batches(workers: int, start: int = 0, count: int = 6) -> list:
    it = loaders.train_loader(Augmented(), None, 8, 7, start, workers, False)
    return [next(it) for _ in range(count)]


def test_batches_do_not_depend_on_workers_or_on_a_resume():
    torch.manual_seed(0)
    before = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    alone = _batches(0)
    after = torch.get_rng_state(), np.random.get_state()[1], random.getstate()
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1])
    assert before[2] == after[2]  # loading leaves the caller's random states alone
    for other in (_batches(1), _batches(2)):
        for (x, y), (x2, y2) in zip(alone, other):
            assert torch.equal(x, x2) and torch.equal(y, y2)
    resumed = _batches(2, start=4, count=2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(alone[4:], resumed))
    assert not torch.equal(alone[0][0], alone[1][0])  # batches differ
    evaluation = list(loaders.eval_batches(Augmented(), 5, 2, False))
    assert [len(y) for _, y in evaluation] == [40]
    assert torch.equal(torch.cat([x for x, _ in evaluation]),
                       torch.cat([x for x, _ in loaders.eval_batches(Augmented(), 5, 0, False)]))


def test_workers_stay_within_the_cpus_given(monkeypatch):
    monkeypatch.setattr(loaders.os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert loaders.cpus_given() == 8
    assert loaders.worker_budget(None, 8, 3) == 7  # one CPU for the main process
    assert loaders.worker_budget(None, 8, 1) == 7
    assert loaders.worker_budget(None, 2, 2) == 4  # at most DomainBed's N_WORKERS per loader
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "4")
    assert loaders.cpus_given() == 4 and loaders.worker_budget(None, 8, 3) == 3
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert loaders.worker_budget(None, 8, 3) == 0
    assert loaders.worker_budget(5, 8, 3) == 5 and loaders.worker_budget(None, 0, 3) == 0
    for total, n in ((7, 3), (0, 2), (2, 5), (9, 9)):
        shares = loaders.share(total, n)
        assert sum(shares) == total and len(shares) == n and max(shares) - min(shares) <= 1


STORM = """
import os, signal, sys, threading, time
import torch
from torch.utils.data import TensorDataset
from domainbed_gaqat.plugin import loaders

log = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND)
signal.signal(signal.SIGUSR2, lambda *_: os.write(log, b"%d\\n" % os.getpid()))
done = threading.Event()

def storm():
    while not done.is_set():
        os.killpg(0, signal.SIGUSR2)
        time.sleep(0.0005)

split = TensorDataset(torch.zeros(8, 2), torch.zeros(8, dtype=torch.long))
threading.Thread(target=storm, daemon=True).start()
for _ in range(int(sys.argv[2])):
    for _ in loaders.eval_batches(split, 0, 2, False):
        pass
done.set()
print(os.getpid())
"""


def test_workers_never_run_the_main_process_handler(tmp_path):
    """A storm of SIGUSR2 to the whole process group while loaders start their workers, the
    main process's handler writing its pid: only the main process's pid is written (a worker
    inheriting the handler through ``fork`` before it ignores the signal writes its own; this
    happened with the signals unblocked at the fork)."""
    log = tmp_path / "handled"
    log.touch()
    proc = subprocess.run([PYTHON, "-c", STORM, str(log), "15"], env=subprocess_env(
        OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300,
        start_new_session=True)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert set(log.read_text().split()) == {proc.stdout.strip()}
