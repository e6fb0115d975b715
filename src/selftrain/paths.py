"""Where built-in resources live, and how config paths resolve.

`builtin:X` names a file shipped with selftrain: looked up in the package folder
(src/selftrain/X: prompts, probe suites), then the repository top level (constitution/,
conf/), then the copies a wheel carries under selftrain/_data/. Any other path is a
user path, relative to the working directory.
"""
from __future__ import annotations

import os
from pathlib import Path

from selftrain import UserError

PACKAGE_DIR = Path(__file__).resolve().parent
_ROOTS = (PACKAGE_DIR, PACKAGE_DIR.parent.parent, PACKAGE_DIR / "_data")


def conf_dir() -> Path:
    for root in _ROOTS[1:]:
        if (root / "conf" / "config.yaml").is_file():
            return root / "conf"
    raise RuntimeError("selftrain's conf/ folder is missing from the installation")


def resolve(path: str, what: str = "file") -> Path:
    """Resolve a config path; raise a one-line UserError if it does not exist."""
    if path.startswith("builtin:"):
        rel = path[len("builtin:"):]
        for root in _ROOTS:
            if (root / rel).exists():
                return root / rel
        raise UserError(f"built-in {what} not found: {path}")
    p = Path(os.path.expanduser(path))
    if not p.exists():
        raise UserError(f"{what} not found: {path}")
    return p.resolve()


def cache_dir() -> Path:
    """The cache for converted models: $SELFTRAIN_CACHE, else ~/.cache/selftrain."""
    return Path(os.environ.get("SELFTRAIN_CACHE", Path.home() / ".cache" / "selftrain"))
