"""The competition files mounted read-only (a Kaggle Notebook's input, or ``CARVANA_INPUT``).

Each part of the Carvana layout (train/, train_masks/, test/ and the csv files) is taken from
the mount in one of two forms, per part, so mixed layouts work:

* already unpacked (``train/``, ``train/train/`` with the zip's inner folder, ``sample_submission.csv``):
  used in place -- linked from the dataset folder, never copied;
* only as its zip (``train.zip``, ``sample_submission.csv.zip``): read in place and unpacked once
  into the dataset folder under the data root, with archives.unpack_archive's safety (zip-slip
  refused before anything is written) and resume rules (a marker written last; a half-unpacked
  folder is redone). The mount's zip is never copied or deleted.

Nothing is ever written into the mount. When every part is unpacked in the mount under its
own name, the mount itself is the dataset folder and nothing is written anywhere.

The dataset folder is written under archives.fetch_lock: processes started together (tuning
workers, one per GPU) take turns, and the later ones find the unpacked parts done. A dataset
folder that cannot be written (the cwd of a read-only code dataset) is one DatasetLayoutError.
"""

from __future__ import annotations

import errno
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from carvana.data.sources.archives import (
    DOWNLOADS,
    Archive,
    CorruptArchiveError,
    DatasetLayoutError,
    archives,
    clear_leftovers,
    fetch_lock,
    is_unpacked,
    remove_path,
    unpack_archive,
    zip_problem,
)
from carvana.data.files import atomic_path, fsync_dir
from carvana.data.sources.kaggle_client import DiskFullError

OPTIONAL = ("train_masks.csv", "metadata.csv")


@dataclass(frozen=True)
class Part:
    """Where one output of the layout comes from: a path used in place, or a zip to unpack."""

    dst: str  # name in the dataset folder: train, train_masks, test or a csv file
    archive: Archive
    in_place: Path | None = None
    zip_path: Path | None = None


def _unpacked(mount: Path, name: str, want_dir: bool) -> Path | None:
    """``mount/name`` (or the zip's inner ``mount/name/name``) when it holds that part unpacked."""
    path = mount / name
    inner = path / name
    if path.is_dir() and (inner.is_dir() if want_dir else inner.is_file()):
        path = inner
    if want_dir:
        return path if path.is_dir() and any(path.iterdir()) else None
    return path if path.is_file() else None


def _find(mount: Path, archive: Archive) -> Part | None:
    ((src, dst),) = archive.outputs.items()
    found = _unpacked(mount, src, want_dir=not dst.endswith(".csv"))
    if found is not None:
        return Part(dst, archive, in_place=found)
    if (mount / archive.name).is_file():
        return Part(dst, archive, zip_path=mount / archive.name)
    return None


def find_parts(mount: Path, hq: bool = False) -> list[Part]:
    """Locate every part in the mount; raise DatasetLayoutError naming the mount and what is missing.

    With ``hq`` the train_hq/test_hq images are taken where mounted, else the standard ones
    (with a console note): the mount's content is fixed, so asking for more cannot help.
    """
    parts, missing = [], []
    for archive, plain in zip(archives(hq), archives(False)):
        part = _find(mount, archive)
        if part is None and archive != plain:
            part = _find(mount, plain)
            if part is not None:
                print(f"[fetch] {archive.name} is not mounted: using {plain.name.removesuffix('.zip')} instead")
        dst = next(iter(archive.outputs.values()))
        if part is not None:
            parts.append(part)
        elif dst not in OPTIONAL:
            missing.append(f"{dst}{'' if dst.endswith('.csv') else '/'} (or {archive.name})")
    if missing:
        raise DatasetLayoutError(f"{mount}: mounted competition files lack {', '.join(missing)}")
    return parts


def _link(target: Path, link: Path) -> None:
    """Make ``link`` a symlink to ``target`` (a part used in place), replacing what was there."""
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return
    with atomic_path(link, fsync=False) as tmp:  # a link has no bytes of its own to fsync
        os.symlink(target, tmp, target_is_directory=target.is_dir())
        # An earlier unpack of this part is a folder, which a rename cannot replace; never
        # follows a link into the mount.
        remove_path(link)
    fsync_dir(link.parent)  # the rename itself survives a crash


def unpack_mounted(folder: Path, archive: Archive, zip_path: Path) -> bool:
    """Unpack a mounted zip into ``folder`` unless its marker says it is done; True if it unpacked.

    The zip is only read. A damaged one cannot be downloaded again, so it is an error naming it.
    Call under archives.fetch_lock (two unzips of one part would replace each other's output).
    """
    marker = folder / DOWNLOADS / f"{archive.name}.done"
    if is_unpacked(folder, marker):
        print(f"[fetch] {archive.name}: already unpacked")
        return False
    problem = zip_problem(zip_path)
    if problem:
        raise CorruptArchiveError(f"{zip_path}: mounted archive is unusable ({problem})")
    failure: Exception | None = None
    try:
        unpack_archive(folder, archive, zip_path, marker, keep_zip=True)
    except (zipfile.BadZipFile, EOFError, zlib.error) as exc:  # CRC error / bad deflate data in a member
        failure = CorruptArchiveError(f"{zip_path}: mounted archive has corrupt data ({exc})")
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        failure = DiskFullError(f"Disk full while unpacking {zip_path} into {folder}: free space and rerun; "
                                "completed parts are kept.")
    if failure is not None:
        raise failure
    return True


def assemble(mount: Path, folder: Path, hq: bool = False) -> Path:
    """The dataset folder for the mount: the mount itself when it is fully unpacked under the
    layout's names, else ``folder`` holding links to the unpacked parts and the unpacked zips."""
    mount = mount.absolute()  # link targets must not depend on the working directory
    parts = find_parts(mount, hq)
    if all(p.in_place == mount / p.dst for p in parts):
        print(f"[fetch] every part is unpacked in {mount}: using it in place")
        return mount
    with fetch_lock(folder) as held:  # other processes wait here, then find the work done
        if held:
            clear_leftovers(folder)
        for part in parts:
            if part.in_place is not None:
                print(f"[fetch] {part.dst}: using {part.in_place} in place")
                remove_path(folder / DOWNLOADS / f"{part.archive.name}.done")  # an earlier unpack of it is replaced
                _link(part.in_place, folder / part.dst)
            else:
                assert part.zip_path is not None
                unpack_mounted(folder, part.archive, part.zip_path)
    return folder
