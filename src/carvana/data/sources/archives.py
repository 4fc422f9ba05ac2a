"""Competition archives: which zips exist, whether one is whole, and unpacking one safely.

An archive is unpacked into a temporary folder of this process's own and its top-level
entries renamed into place; a JSON marker written last records completion, so an
interrupted unzip is redone. Member names that would write outside the folder (zip-slip)
are refused before anything is written.

Several processes may fetch into one data folder at once (tuning workers, a second notebook
cell): :func:`fetch_lock` makes them take turns, so one unpacks and the others find it done.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from carvana.data.files import write_text_atomic

DOWNLOADS = "_downloads"  # markers, downloaded archives and the lock live here
LOCK_NAME = ".fetch.lock"
TMP_PREFIX = ".tmp-"  # extraction folders: .tmp-<archive>.<pid>-<random>
# A data folder that cannot be written: a read-only mount or code dataset, or no permission.
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


class DatasetLayoutError(FileNotFoundError):
    """A data folder (or the mounted competition files) lacks part of the Carvana layout."""


class UnsafeArchiveError(ValueError):
    """An archive member would be written outside the extraction folder (zip-slip)."""


class CorruptArchiveError(RuntimeError):
    """An archive is still unreadable after being downloaded again, or lacks its expected content."""


@dataclass(frozen=True)
class Archive:
    """One competition file and what its top-level entries become in the dataset folder."""

    name: str
    outputs: dict[str, str]  # top-level name inside the zip -> name in the dataset folder


def archives(hq: bool = False) -> tuple[Archive, ...]:
    """The competition files to fetch; the hq image folders are renamed to train/ and test/."""
    sfx = "_hq" if hq else ""
    # Small files first so that credential/rules problems show up before any large download.
    return (
        Archive("sample_submission.csv.zip", {"sample_submission.csv": "sample_submission.csv"}),
        Archive("metadata.csv.zip", {"metadata.csv": "metadata.csv"}),
        Archive("train_masks.csv.zip", {"train_masks.csv": "train_masks.csv"}),
        Archive("train_masks.zip", {"train_masks": "train_masks"}),
        Archive(f"train{sfx}.zip", {f"train{sfx}": "train"}),
        Archive(f"test{sfx}.zip", {f"test{sfx}": "test"}),
    )


def unsafe_member(name: str) -> bool:
    """True for a member name that is absolute, has a drive letter or a '..' component."""
    return (name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) is not None
            or ".." in re.split(r"[/\\]", name))


def zip_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete zip (missing, truncated, sizes disagree), or None if it looks whole."""
    if not path.is_file():
        return "not downloaded"
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        return f"not a valid zip, probably truncated ({exc})"
    if not infos:
        return "empty archive"
    size = path.stat().st_size
    end = max(i.header_offset + i.compress_size for i in infos)
    if end > size:  # an appended/resumed download that does not add up
        return f"size mismatch: members end at byte {end} but the file has {size} bytes"
    return None


def remove_path(path: Path) -> None:
    """Delete a file, symlink or folder tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def not_writable(folder: Path, exc: OSError) -> DatasetLayoutError:
    """The one-line error for a data folder that cannot be written, naming it and the way out."""
    return DatasetLayoutError(f"{folder}: cannot write the data there ({exc.strerror or exc}); "
                              "pass --data-root with a folder on a writable disk")


def _inside(name: object, folder: Path) -> bool:
    """Whether the path an OSError names (``exc.filename``) is ``folder`` or lies under it."""
    if not isinstance(name, (str, bytes, os.PathLike)):
        return False
    path, top = Path(os.path.abspath(os.fsdecode(name))), Path(os.path.abspath(folder))
    return path == top or top in path.parents


@contextmanager
def writing_into(folder: Path) -> Iterator[None]:
    """Inside, an OSError saying ``folder`` (or a path under it) cannot be written (a read-only
    disk, no permission) becomes one DatasetLayoutError naming ``folder``."""
    try:
        yield
    except OSError as exc:
        if exc.errno in NOT_WRITABLE and (_inside(exc.filename, folder) or _inside(exc.filename2, folder)):
            raise not_writable(folder, exc) from None
        raise


def _acquire(fd: int, lock: Path) -> bool:
    """flock ``fd`` exclusively, waiting for the holder (said once on the console); False where
    the filesystem has no flock (then nothing protects against a second process)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            warnings.warn(f"{lock}: cannot lock ({exc.strerror}); not protected against a second "
                          "process fetching into the same folder", stacklevel=4)
            return False
    holder = lock.read_text(errors="replace").strip() if lock.is_file() else ""
    print(f"[fetch] waiting for another process{f' (pid {holder})' if holder else ''} fetching into "
          f"{lock.parent.parent}", flush=True)
    fcntl.flock(fd, fcntl.LOCK_EX)  # blocking: its unpack is ours too once it is done
    return True


@contextmanager
def fetch_lock(folder: Path) -> Iterator[bool]:
    """Hold ``folder/_downloads/.fetch.lock`` (a blocking fcntl.flock) while fetching or unpacking
    into ``folder``; yields whether it is held (False: no flock there, or a read-only folder
    that already exists, which is fine as long as everything in it is already done).

    The kernel drops a flock when its holder dies (kill -9 included), so a crashed run blocks
    nothing; the file itself stays (removing it would race with the next locker). An OSError
    saying ``folder`` cannot be written becomes one DatasetLayoutError naming it.
    """
    folder = Path(folder)
    lock = folder / DOWNLOADS / LOCK_NAME
    fd = None
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        if exc.errno not in NOT_WRITABLE:
            raise
        if not lock.parent.is_dir():  # nowhere to put even the markers
            raise not_writable(folder, exc) from None
    try:
        held = fd is not None and _acquire(fd, lock)
        if held:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for the message of a waiter
        with writing_into(folder):
            yield held
    finally:
        if fd is not None:
            os.close(fd)  # releases the flock


def clear_leftovers(folder: Path) -> None:
    """Remove the temp folders and names of interrupted unzips and links in ``folder``. Call only
    while holding :func:`fetch_lock`: every other writer waits for it, so none of them is live."""
    for path in [*folder.glob(f"{TMP_PREFIX}*"), *folder.glob(".*.tmp")]:
        remove_path(path)


def is_unpacked(folder: Path, marker: Path) -> bool:
    """True when ``marker`` records a finished unpack whose outputs still exist in ``folder``."""
    try:
        outputs = json.loads(marker.read_text(encoding="utf-8"))["outputs"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    # A marker whose outputs were deleted since means: fetch again.
    return all((folder / name).exists() for name in outputs)


def unpack_archive(folder: Path, archive: Archive, zip_path: Path, marker: Path, keep_zip: bool = False) -> None:
    """Extract ``zip_path`` into ``folder`` via a temp folder of this process's own
    (``.tmp-<archive>.<pid>-*``), write ``marker`` and delete the zip. Call under :func:`fetch_lock`.

    ``keep_zip`` leaves the zip alone (a read-only mounted one is only ever read).

    Raises UnsafeArchiveError before writing anything for a zip-slip member, and
    CorruptArchiveError when the expected top-level entries are missing. Any error removes the
    temp folder (freeing the space) and keeps the zip for the rerun: an I/O problem re-raises
    the OSError, a corrupt member zipfile.BadZipFile / EOFError / zlib.error. A Ctrl-C leaves
    the temp folder (removing GBs would delay the exit); the next holder of the lock removes it.
    """
    with zipfile.ZipFile(zip_path) as zf:
        infos = [i for i in zf.infolist() if not i.filename.startswith("__MACOSX/")]
        bad = [i.filename for i in infos if unsafe_member(i.filename)]
        if bad:  # checked before anything is written (zip-slip)
            raise UnsafeArchiveError(f"{zip_path}: refusing to extract, member {bad[0]!r} would be "
                                     f"written outside the target folder ({len(bad)} unsafe member(s))")
        print(f"[fetch] {archive.name}: unpacking {len(infos)} entries")
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{archive.name}.{os.getpid()}-", dir=folder))
        try:
            for info in infos:
                zf.extract(info, tmp)
            found = sorted(p.name for p in tmp.iterdir())
            missing = [src for src in archive.outputs if src not in found]
            if missing:
                raise CorruptArchiveError(f"{zip_path}: expected {', '.join(missing)} at the top of the "
                                          f"archive, found {', '.join(found) or 'nothing'}")
        except Exception:
            remove_path(tmp)
            raise
    for src, dst in archive.outputs.items():
        remove_path(folder / dst)  # a half-moved output of an interrupted run
        os.replace(tmp / src, folder / dst)
    write_text_atomic(marker, json.dumps({"archive": archive.name, "outputs": sorted(archive.outputs.values()),
                                          "entries": len(infos)}))
    remove_path(tmp)
    if not keep_zip:
        zip_path.unlink()  # the hq archives are GBs; the marker alone records completion
