"""Count module-level imports between the top-level packages, per direction.

    python bench/import_directions.py [ROOT]

A module-level import is a statement at the top of a module (not inside a
function), the kind that makes packages depend on each other at import time.
`tests/test_layers.py` holds the allowed directions; this script prints the
counts quoted in issue notes.
"""

from __future__ import annotations

import ast
import sys
from collections import Counter
from pathlib import Path

PACKAGES = ("controller", "workers", "policies")


def module_imports(path: Path) -> list[str]:
    """Top-level package names imported by the module-level statements of one file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            found += [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append(node.module.split(".")[0])
    return found


def directions(root: Path) -> Counter[tuple[str, str]]:
    """(importing package, imported package) -> number of module-level import statements."""
    counts: Counter[tuple[str, str]] = Counter()
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            for target in module_imports(path):
                if target in PACKAGES and target != package:
                    counts[(package, target)] += 1
    return counts


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]
    counts = directions(root)
    for source in PACKAGES:
        for target in PACKAGES:
            if source != target:
                sys.stdout.write(f"{source:>10} -> {target:<10} {counts[(source, target)]}\n")


if __name__ == "__main__":
    main()
