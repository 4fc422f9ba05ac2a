"""Durable file writes shared by every layer: a JSON record or a text replaced atomically (temp
name, fsync, rename) and the directory fsync that makes a rename itself survive a crash."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, data: dict[str, Any], fsync: bool = True, indent: int | None = None) -> None:
    """Replace ``path`` with ``data`` as JSON via a temp file and a rename (values JSON cannot
    hold, such as paths, are written as their text)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=indent, default=str)
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` through a temporary name of this process's own
    (``.<name>.<pid>.tmp``: several processes may write one file), so a reader never sees half
    a file; the rename is made durable."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (skipped where directories can't be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
