"""Where circuitscan keeps converted models and other caches."""

from __future__ import annotations

import os
from pathlib import Path


def circuitscan_home() -> Path:
    """Cache root: ``$CIRCUITSCAN_HOME``, else ``~/.cache/circuitscan``."""
    env = os.environ.get("CIRCUITSCAN_HOME")
    root = Path(env) if env else Path.home() / ".cache" / "circuitscan"
    root.mkdir(parents=True, exist_ok=True)
    return root
