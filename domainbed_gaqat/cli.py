"""``gaqat``: the project's one command line.

    gaqat COMMAND [options]        (also ``python -m domainbed_gaqat COMMAND``)

Each command is a module with ``add_arguments(parser)`` (its options and the shared groups of
:mod:`domainbed_gaqat.options` it takes) and ``run(args) -> int``; modules are imported only
when their command runs, so ``gaqat --help`` is quick. One error convention: bad input (a value,
a missing file, an existing result, a config) ends with ``gaqat COMMAND: error: <one line>`` and
exit status 2, before any work is done; work that cannot be finished (a diverged run, a full
disk) ends with ``gaqat COMMAND: failed: <one line>`` and exit status 1.
"""

import argparse
import importlib
import sys

from domainbed_gaqat import listing
from domainbed_gaqat.options import CommandFailed

# name: (module, one line of help)
COMMANDS = {
    "sweep": ("domainbed_gaqat.experiments.sweep",
              "run a sweeps/ config as DomainBed jobs, stage after stage"),
    "tables": ("domainbed_gaqat.experiments.tables", "the paper's tables from run folders"),
    "train": ("domainbed_gaqat.train", "DomainBed's train.py, resumable (time limits, preemption)"),
    "ensemble": ("domainbed_gaqat.ensemble", "QT-DoG's EoQ: the summed logits of runs' models"),
    "traces": ("domainbed_gaqat.traces",
               "scale-gradient traces while training (paper Figs 2-5)"),
    "probe": ("domainbed_gaqat.probe", "accuracy under scaled quantizer scales (Table 1)"),
    "surface": ("domainbed_gaqat.surface", "loss surfaces around trained models (Fig 6)"),
    "export": ("domainbed_gaqat.export", "ONNX export with integer weights, checked"),
    "bench": ("domainbed_gaqat.bench", "time and memory of the training steps, side by side"),
    "demo": ("domainbed_gaqat.demo", "the offline demo sweep end to end, then its tables"),
    "list": ("domainbed_gaqat.listing", "the plugin's algorithms, sweep configs and datasets"),
}
BAD_INPUT = (ValueError, FileNotFoundError, FileExistsError)


# --- dispatch ------------------------------------------------------------------------------


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gaqat", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Quantization-aware training for domain generalization on DomainBed.",
        epilog="commands:\n" + "\n".join(f"  {n:<10}{h}" for n, (_, h) in COMMANDS.items())
        + "\n\n'gaqat COMMAND --help' for a command's options; 'gaqat list' describes these:\n"
        + listing.epilog())
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND")
    return parser


def command_parser(name: str, prog: str | None = None) -> tuple[argparse.ArgumentParser, object]:
    """The parser of one command and its module."""
    module = importlib.import_module(COMMANDS[name][0])
    doc = (module.__doc__ or COMMANDS[name][1]).strip()
    parser = argparse.ArgumentParser(prog=prog or f"gaqat {name}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    return parser, module


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run ``gaqat`` with ``argv`` (default: the process's arguments); returns the exit status.
    ``prog`` names a command installed under another name (``gaqat-sweep``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        _top_parser().parse_args(argv[:1] or ["--help"])
    try:
        parser, module = command_parser(argv[0], prog)
    except ImportError as err:  # an optional extra that is not installed
        print(f"{prog or 'gaqat ' + argv[0]}: error: {err}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv[1:])
    try:
        return module.run(args)
    except BAD_INPUT as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    except CommandFailed as err:
        print(f"{parser.prog}: failed: {err}", file=sys.stderr)
        return 1


def run_as_module(name: str) -> None:
    """``python -m domainbed_gaqat.<module>``: the command ``name``."""
    sys.exit(main([name, *sys.argv[1:]], prog=f"python -m {COMMANDS[name][0]}"))


def gaqat() -> None:
    """The ``gaqat`` console script."""
    sys.exit(main())


def gaqat_sweep() -> None:
    """``gaqat-sweep``, the first name of ``gaqat sweep``."""
    sys.exit(main(["sweep", *sys.argv[1:]], prog="gaqat-sweep"))


def gaqat_tables() -> None:
    """``gaqat-tables``, the first name of ``gaqat tables``."""
    sys.exit(main(["tables", *sys.argv[1:]], prog="gaqat-tables"))
