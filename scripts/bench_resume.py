"""Time to the first new training batch after a resume, at an early and a late step.

On a PACS-layout JPEG folder written here (3 training domains, images resized to 224 px by
DomainBed's transform, random augmentation), side by side in one process:

- ``skip``: ``gaqat train``'s loaders (:mod:`domainbed_gaqat.plugin.loaders`), which draw the
  index batches before the resume point without loading a sample;
- ``replay``: the previous resume, DomainBed's ``InfiniteDataLoader`` advanced batch by batch
  to the resume point (every image decoded again).

    python scripts/bench_resume.py [--steps 20 2000] [--batch_size 32] [--workers 2]

Prints one line per (method, step) and the late/early ratio of each method.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def write_pacs(root: Path, per_domain: int) -> Path:
    rng = np.random.default_rng(0)
    for domain in ("art_painting", "cartoon", "photo", "sketch"):
        for c in range(7):
            folder = root / "PACS" / domain / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_domain // 7):
                pixels = rng.integers(0, 255, (227, 227, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs=2, default=[20, 2000])
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--per_domain", type=int, default=350)
    args = parser.parse_args()

    import torch
    from domainbed import datasets
    from domainbed.lib.fast_data_loader import InfiniteDataLoader

    import domainbed_gaqat
    from domainbed_gaqat.plugin import loaders
    from domainbed_gaqat.plugin.data import split_envs

    domainbed_gaqat.register()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_pacs(Path(tmp), args.per_domain)
        hparams = {"data_augmentation": True, "class_balanced": False}
        dataset = datasets.PACS(str(root), [0], hparams)
        in_splits, _, _ = split_envs(dataset, [0], hparams)
        train = [split for i, (split, _) in enumerate(in_splits) if i != 0]
        shares = loaders.share(args.workers, len(train))

        def skip(step: int) -> None:
            streams = [loaders.train_loader(split, None, args.batch_size, i, step, w, False)
                       for i, (split, w) in enumerate(zip(train, shares))]
            next(zip(*streams))

        def replay(step: int) -> None:
            streams = [iter(InfiniteDataLoader(split, None, args.batch_size, w))
                       for split, w in zip(train, shares)]
            batches = zip(*streams)
            for _ in range(step + 1):
                next(batches)

        times = {}
        for method, fn in (("skip", skip), ("replay", replay)):
            for step in args.steps:
                start = time.perf_counter()
                fn(step)
                times[method, step] = time.perf_counter() - start
                print(f"{method:>6} resume at step {step:>5}: first batch after "
                      f"{times[method, step]:8.2f} s", flush=True)
        early, late = args.steps
        for method in ("skip", "replay"):
            print(f"{method:>6}: step {late} / step {early} = "
                  f"{times[method, late] / times[method, early]:.2f}")
        print(f"replay / skip at step {late}: {times['replay', late] / times['skip', late]:.1f}")


if __name__ == "__main__":
    main()
