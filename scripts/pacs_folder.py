"""A synthetic image folder in PACS's layout, for runs where the real dataset is not at hand.

    python scripts/pacs_folder.py ROOT [--per_class 12] [--size 256] [--seed 0]

writes ``ROOT/PACS/<domain>/<class>/<i>.jpg`` for PACS's four domains (art_painting, cartoon,
photo, sketch: DomainBed's environments 0-3) and seven classes: random colour JPEGs whose mean
brightness depends on the class and a little on the domain (something to learn), decoded and
resized by DomainBed's own PACS loader like the real ones. Needs numpy and Pillow only; an
existing folder is refused (exit status 2).
"""

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

DOMAINS = ("art_painting", "cartoon", "photo", "sketch")
CLASSES = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")


def write(root: Path, per_class: int = 12, size: int = 256, seed: int = 0) -> Path:
    """Write the folder; returns ``root / "PACS"``."""
    folder = root / "PACS"
    if folder.exists():
        raise FileExistsError(f"{folder} exists: choose another ROOT")
    rng = np.random.default_rng(seed)
    for d, domain in enumerate(DOMAINS):
        for c, name in enumerate(CLASSES):
            target = folder / domain / name
            target.mkdir(parents=True)
            base = 30 + 190 * c / (len(CLASSES) - 1) + 8 * d
            for i in range(per_class):
                pixels = np.clip(rng.normal(base, 40, (size, size, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(target / f"{i}.jpg", quality=90)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root")
    parser.add_argument("--per_class", type=int, default=12)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.per_class < 1 or args.size < 8:
        parser.error(f"--per_class {args.per_class} / --size {args.size}: expected >= 1 / >= 8")
    try:
        folder = write(Path(args.root), args.per_class, args.size, args.seed)
    except FileExistsError as err:
        parser.error(str(err))
    n = len(DOMAINS) * len(CLASSES) * args.per_class
    print(f"wrote {n} images ({args.size} px) to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
