"""Durable file writes shared by every layer, one implementation: a temp name of this
process and thread's own next to the target, the data fsynced, a rename over the target,
and the directory fsynced so the rename itself survives a crash. A reader never sees half
a file, and several processes (tuning workers, torchrun ranks) may write one file at once:
the last rename wins, whole."""

from __future__ import annotations

import json
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def temp_name(path: Path) -> Path:
    """``.<name>.<pid>-<thread>.tmp`` beside ``path``: no other writer uses the same name."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")


@contextmanager
def atomic_path(path: Path, fsync: bool = True) -> Iterator[Path]:
    """Yield a temp path to write ``path``'s new contents to (by any writer: torch.save,
    savefig, cv2.imwrite, ...); on success its bytes are fsynced and it is renamed over
    ``path`` durably; on an error it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)


def write_bytes_atomic(path: Path, data: bytes, fsync: bool = True) -> None:
    """Replace ``path`` with ``data`` (see :func:`atomic_path`)."""
    with atomic_path(path, fsync) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: Path, text: str, fsync: bool = True) -> None:
    """Replace ``path`` with ``text`` (see :func:`atomic_path`)."""
    write_bytes_atomic(path, text.encode(), fsync)


def write_json_atomic(path: Path, data: dict[str, Any], fsync: bool = True, indent: int | None = None) -> None:
    """Replace ``path`` with ``data`` as JSON (values JSON cannot hold, such as paths, are
    written as their text)."""
    write_text_atomic(path, json.dumps(data, indent=indent, default=str), fsync)


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
