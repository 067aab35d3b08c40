"""Command-line parts the commands share: argument types and option groups."""

import argparse


class CommandFailed(Exception):
    """A command that started its work and could not finish it (a diverged run, a full disk):
    ``gaqat`` prints the one-line message and exits with status 1 (bad input: 2)."""


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 1")
    return value


def output(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--output_dir", required=True, help="where the results are written")
    group.add_argument("--overwrite", action="store_true",
                       help="replace existing results (refused otherwise)")


def device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(parser: argparse.ArgumentParser, algorithm: str = "ERM",
        dataset: str = "RotatedMNIST") -> None:
    """DomainBed train.py's arguments that say what a run is (its defaults unless given)."""
    group = parser.add_argument_group("run (as domainbed.scripts.train)")
    group.add_argument("--algorithm", default=algorithm)
    group.add_argument("--dataset", default=dataset)
    group.add_argument("--data_dir", default=None)
    group.add_argument("--test_envs", type=int, nargs="+", default=[0])
    group.add_argument("--hparams", default=None, help="JSON-serialized hparams dict")
    group.add_argument("--hparams_seed", type=int, default=0,
                       help='seed for random hparams (0 means "default hparams")')
    group.add_argument("--trial_seed", type=int, default=0,
                       help="seed of the data split and of random hparams")
    group.add_argument("--seed", type=int, default=0, help="seed for everything else")
    group.add_argument("--holdout_fraction", type=float, default=0.2)


def checkpoint_data(parser: argparse.ArgumentParser) -> None:
    """The data a checkpoint was trained on, each field overridable."""
    group = parser.add_argument_group("data (default: the checkpoint's)")
    group.add_argument("--dataset", default=None)
    group.add_argument("--data_dir", default=None)
    group.add_argument("--test_envs", type=int, nargs="+", default=None)
