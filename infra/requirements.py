"""Print the project's dependencies from pyproject.toml, one requirement a line, for the image build.

The image installs exactly what `pip install -e .` installs for the tests, from the same file, in a
layer that only changes when pyproject.toml does. `--only NAME ...` keeps the named distributions
(the CPU image takes torch and torchvision from PyTorch's CPU index first).

    python infra/requirements.py pyproject.toml [--only torch torchvision]
"""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path


def requirement_name(requirement: str) -> str:
    """The distribution name of a PEP 508 requirement, normalised (PEP 503)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def dependencies(pyproject: Path, only: list[str] | None = None) -> list[str]:
    requirements = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    if only is None:
        return requirements
    wanted = {requirement_name(name) for name in only}
    selected = [r for r in requirements if requirement_name(r) in wanted]
    missing = wanted - {requirement_name(r) for r in selected}
    if missing:
        raise SystemExit(f"{pyproject} does not depend on {', '.join(sorted(missing))}")
    return selected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject", type=Path)
    parser.add_argument("--only", nargs="+", metavar="NAME", help="Print only these distributions.")
    args = parser.parse_args()
    print("\n".join(dependencies(args.pyproject, args.only)))


if __name__ == "__main__":
    main()
