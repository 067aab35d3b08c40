"""Command-line parts the commands share: argument types, option groups, and the former
spellings of renamed options."""

import argparse
import sys


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


class Renamed(argparse.Action):
    """An option's former spelling, accepted for one release with a deprecation message on
    stderr (``nargs=0``: a flag that sets ``const``).

    >>> parser = argparse.ArgumentParser(prog="gaqat x")
    >>> _ = parser.add_argument("--new_name", action="store_true")
    >>> _ = parser.add_argument("--new-name", action=Renamed, new="--new_name", nargs=0,
    ...                         const=True, dest="new_name")
    >>> parser.parse_args(["--new-name"]).new_name  # stderr: ... --new-name is deprecated ...
    True
    """

    def __init__(self, option_strings: list[str], dest: str, new: str, **kwargs) -> None:
        self.new = new
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"{parser.prog}: warning: {option_string} is deprecated: use {self.new} (the old "
              "spelling is accepted until the next release)", file=sys.stderr)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def output(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--output_dir", required=True, help="where the results are written")
    group.add_argument("--overwrite", action="store_true",
                       help="replace existing results (refused otherwise)")


def device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run_identity(parser: argparse.ArgumentParser, algorithm: str = "ERM",
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
