"""File-system helpers shared by data prep and run dirs (the start of the path layer)."""

from __future__ import annotations

import os
import pathlib


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` whole or not at all: a temp file, fsync, then rename."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
