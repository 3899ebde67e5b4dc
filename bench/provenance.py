"""The commit a benchmark ran on, for its results file."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> dict:
    """{"commit": short hash or None, "dirty": tracked files changed since it (None without git)}."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=ROOT).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=ROOT).stdout.strip()
    except OSError:  # no git on the machine (a copied tree)
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(dirty) if commit else None}
