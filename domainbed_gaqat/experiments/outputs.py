"""Output files of the commands: written atomically, never overwriting a result unless asked.

A killed command leaves no half-written file: each is written to a temporary name next to its
place and moved there in one step.
"""

import os
import tempfile
from collections.abc import Callable, Sequence


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
