"""Where cached artefacts live (XDG cache dir, overridable with USERIP_CACHE_DIR)."""

from __future__ import annotations

import os
from pathlib import Path

from platformdirs import user_cache_dir


def cache_dir(*parts: str) -> Path:
    root = os.environ.get("USERIP_CACHE_DIR") or user_cache_dir("userip")
    p = Path(root).joinpath(*parts)
    p.mkdir(parents=True, exist_ok=True)
    return p
