"""The longest functions of the package, for the refactoring issues' before/after tables.

    python scripts/largest_functions.py [--most 10] [--root domainbed_gaqat]

A function's length is its lines from ``def`` to its last line (docstring and comments
included); nested functions count inside their parent and on their own.
"""

import argparse
import ast
from pathlib import Path


def _functions(node: ast.AST, prefix: str) -> list[tuple[int, str]]:
    out = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            name = f"{prefix}{child.name}"
            if not isinstance(child, ast.ClassDef):
                out.append((child.end_lineno - child.lineno + 1, name))
            out += _functions(child, name + ".")
    return out


def lengths(root: Path) -> list[tuple[int, str]]:
    """``(lines, "path:qualified.name")`` of every function under ``root``, longest first."""
    out = [(n, f"{path}:{name}") for path in sorted(root.rglob("*.py"))
           for n, name in _functions(ast.parse(path.read_text(encoding="utf-8")), "")]
    return sorted(out, key=lambda e: (-e[0], e[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--most", type=int, default=10)
    parser.add_argument("--root", default="domainbed_gaqat")
    args = parser.parse_args()
    print("| lines | function |\n|---:|---|")
    for n, name in lengths(Path(args.root))[:args.most]:
        print(f"| {n} | `{name}` |")


if __name__ == "__main__":
    main()
