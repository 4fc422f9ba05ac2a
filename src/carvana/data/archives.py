"""Competition archives: which zips exist, whether one is whole, and unpacking one safely.

An archive is unpacked into a temporary folder and its top-level entries renamed into
place; a JSON marker written last records completion, so an interrupted unzip is redone.
Member names that would write outside the folder (zip-slip) are refused before anything
is written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path


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


def is_unpacked(folder: Path, marker: Path) -> bool:
    """True when ``marker`` records a finished unpack whose outputs still exist in ``folder``."""
    try:
        outputs = json.loads(marker.read_text(encoding="utf-8"))["outputs"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    # A marker whose outputs were deleted since means: fetch again.
    return all((folder / name).exists() for name in outputs)


def unpack_archive(folder: Path, archive: Archive, zip_path: Path, tmp: Path, marker: Path,
                   keep_zip: bool = False) -> None:
    """Extract ``zip_path`` via ``tmp`` into ``folder``, write ``marker`` and delete the zip.

    ``keep_zip`` leaves the zip alone (a read-only mounted one is only ever read).

    Raises UnsafeArchiveError before writing anything for a zip-slip member, and
    CorruptArchiveError when the expected top-level entries are missing. An I/O problem
    (OSError) removes ``tmp``, keeps the zip and re-raises; a corrupt member raises
    zipfile.BadZipFile / EOFError and a Ctrl-C leaves ``tmp`` (the next run removes it).
    """
    with zipfile.ZipFile(zip_path) as zf:
        infos = [i for i in zf.infolist() if not i.filename.startswith("__MACOSX/")]
        bad = [i.filename for i in infos if unsafe_member(i.filename)]
        if bad:  # checked before anything is written (zip-slip)
            raise UnsafeArchiveError(f"{zip_path}: refusing to extract, member {bad[0]!r} would be "
                                     f"written outside the target folder ({len(bad)} unsafe member(s))")
        print(f"[fetch] {archive.name}: unpacking {len(infos)} entries")
        tmp.mkdir(parents=True)
        try:
            for info in infos:
                zf.extract(info, tmp)
        except OSError:
            remove_path(tmp)  # frees the space; the zip itself is kept for the rerun
            raise
    found = sorted(p.name for p in tmp.iterdir())
    missing = [src for src in archive.outputs if src not in found]
    if missing:
        remove_path(tmp)
        raise CorruptArchiveError(f"{zip_path}: expected {', '.join(missing)} at the top of the "
                                  f"archive, found {', '.join(found) or 'nothing'}")
    for src, dst in archive.outputs.items():
        remove_path(folder / dst)  # a half-moved output of an interrupted run
        os.replace(tmp / src, folder / dst)
    partial = marker.with_name(marker.name + ".partial")
    partial.write_text(json.dumps({"archive": archive.name, "outputs": sorted(archive.outputs.values()),
                                   "entries": len(infos)}), encoding="utf-8")
    os.replace(partial, marker)
    remove_path(tmp)
    if not keep_zip:
        zip_path.unlink()  # the hq archives are GBs; the marker alone records completion
