"""The shape of the package's code: lines per module and the longest functions.

    python benchmarks/code_shape.py [PACKAGE_DIR] [--top 10] [--modules 15]

Prints the largest modules (lines, including docstrings and blank lines), the package total, and
the longest functions and methods (lines from ``def`` to the last line of the body, decorators
left out). Read with ``ast`` only: nothing is imported. Used to compare a refactor before and after
(run it on each tree); no figure here is a target.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path


def module_lines(package: Path) -> dict[str, int]:
    """Lines of every ``.py`` file under ``package``, by path relative to its parent."""
    return {str(p.relative_to(package.parent)): len(p.read_text().splitlines()) for p in sorted(package.rglob("*.py"))}


def function_lengths(package: Path) -> list[tuple[int, str]]:
    """(lines, "module:qualified.name") of every function and method under ``package``."""
    out = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text())
        module = str(path.relative_to(package.parent))
        out.extend((n, f"{module}:{name}") for name, n in _functions(tree, ""))
    return sorted(out, reverse=True)


def _functions(node: ast.AST, prefix: str):
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            name = prefix + child.name
            yield name, child.end_lineno - child.lineno + 1
            yield from _functions(child, name + ".")
        elif isinstance(child, ast.ClassDef):
            yield from _functions(child, prefix + child.name + ".")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", nargs="?", default=str(Path(__file__).resolve().parents[1] / "ckptsel"))
    parser.add_argument("--top", type=int, default=10, help="longest functions shown")
    parser.add_argument("--modules", type=int, default=15, help="largest modules shown")
    args = parser.parse_args()
    package = Path(args.package).resolve()
    lines = module_lines(package)
    print(f"{package}: {len(lines)} modules, {sum(lines.values())} lines")
    print(f"\n{'lines':>6}  module (largest {args.modules})")
    for name, n in sorted(lines.items(), key=lambda kv: -kv[1])[:args.modules]:
        print(f"{n:>6}  {name}")
    print(f"\n{'lines':>6}  function (longest {args.top})")
    for n, name in function_lengths(package)[:args.top]:
        print(f"{n:>6}  {name}")


if __name__ == "__main__":
    main()
