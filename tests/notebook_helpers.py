"""Shared by the Kaggle Notebook and fetch-lock tests: the mount layouts (zips, unpacked folders,
mixed), the Carvana layout they must give, a read-only mount that proves at teardown nothing was
written into it, and an isolation fixture (no credentials, no real mount, no network).

The fixtures are imported by their function names (fixture_<name>, so that a test's argument
does not shadow the import); pytest knows them by <name>. ``isolated`` is autouse in every test
module that imports it."""

from __future__ import annotations

import io
import os
import socket
import stat
import zipfile
from pathlib import Path

import pytest

from carvana.data.sources import kaggle_client, notebook
from carvana.data.layout import COMPETITION
from fetcher_helpers import ANGLES, TEST_CARS, TRAIN_CARS, competition_zips

IMAGES = ("train.zip", "train_masks.zip", "test.zip")
CSVS = ("sample_submission.csv.zip", "metadata.csv.zip", "train_masks.csv.zip")
# Per archive: "zip" (only the zip is mounted), "dir" (unpacked under its own name) or
# "inner" (unpacked with the zip's inner folder, train/train/...).
LAYOUTS = {
    "zips": {**dict.fromkeys(IMAGES, "zip"), **dict.fromkeys(CSVS, "dir")},
    "all-zips": dict.fromkeys(IMAGES + CSVS, "zip"),  # the file set the API downloads
    "folders": dict.fromkeys(IMAGES + CSVS, "dir"),
    "inner": {**dict.fromkeys(IMAGES, "inner"), **dict.fromkeys(CSVS, "dir")},
    "mixed-train-unpacked": {"train.zip": "dir", "train_masks.zip": "zip", "test.zip": "zip",
                             **dict.fromkeys(CSVS, "dir")},
    "mixed-train-zipped": {"train.zip": "zip", "train_masks.zip": "inner", "test.zip": "dir",
                           **dict.fromkeys(CSVS, "zip")},
}
OUTPUT = {"train.zip": "train", "train_masks.zip": "train_masks", "test.zip": "test",
          "sample_submission.csv.zip": "sample_submission.csv", "metadata.csv.zip": "metadata.csv",
          "train_masks.csv.zip": "train_masks.csv"}
EXPECTED = {
    "train": sorted(f"{c}_{a}.jpg" for c in TRAIN_CARS for a in ANGLES),
    "train_masks": sorted(f"{c}_{a}_mask.gif" for c in TRAIN_CARS for a in ANGLES),
    "test": sorted(f"{c}_{a}.jpg" for c in TEST_CARS for a in ANGLES),
}


def unpack_into(folder: Path, data: bytes, inner: bool = False) -> None:
    """What a notebook layout that unpacks a zip looks like (``inner``: one more folder level)."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for info in zf.infolist():
            rel = f"{info.filename.split('/')[0]}/{info.filename}" if inner else info.filename
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(zf.read(info))


def write_mount(folder: Path, forms: dict[str, str], zips: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True)
    for name, form in forms.items():
        if form == "zip":
            (folder / name).write_bytes(zips[name])
        else:
            unpack_into(folder, zips[name], inner=form == "inner")
    return folder


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under ``folder`` with its type, size, mtime and mode (the folder itself included)."""
    entries = {}
    for path in [folder, *sorted(folder.rglob("*"))]:
        st = os.lstat(path)
        entries[str(path.relative_to(folder))] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns,
                                                  stat.S_IMODE(st.st_mode))
    return entries


def set_writable(folder: Path, writable: bool) -> None:
    paths = [folder, *folder.rglob("*")]
    for path in sorted(paths, key=lambda p: len(p.parts), reverse=not writable):  # dirs last when locking
        mode = (0o755 if writable else 0o555) if path.is_dir() else (0o644 if writable else 0o444)
        os.chmod(path, mode)


@pytest.fixture(name="make_mount")
def fixture_make_mount(tmp_path):
    """Build a mount, make it read-only, and check at teardown that nothing in it changed.

    Tests may run as root, where the chmod does not stop writes: the snapshot comparison
    is what proves nothing was written, in every case.
    """
    made: list[tuple[Path, dict]] = []

    def make(forms: dict[str, str] | str = "zips", zips: dict[str, bytes] | None = None,
             name: str = COMPETITION) -> Path:
        forms = LAYOUTS[forms] if isinstance(forms, str) else forms
        folder = write_mount(tmp_path / "input" / name, forms, zips or competition_zips())
        set_writable(folder, False)
        made.append((folder, snapshot(folder)))
        return folder

    yield make
    for folder, before in made:
        after = snapshot(folder)
        set_writable(folder, True)  # so pytest can clean tmp_path up
        assert after == before, f"{folder}: the mount was written to"


@pytest.fixture(autouse=True, name="isolated")
def fixture_isolated(monkeypatch, tmp_path, kaggle_home):
    """No credentials, no real mount, no network, no Kaggle API object; returns the connect attempts."""
    for name in (notebook.INPUT_ENV, notebook.WORKING_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(notebook, "KAGGLE_INPUT_DIR", tmp_path / "no-kaggle-input")
    monkeypatch.setattr(kaggle_client, "make_api", lambda: pytest.fail("must not make a Kaggle API object"))
    attempts: list[object] = []

    def no_connect(self, address, *args):
        attempts.append(address)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", no_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", no_connect)
    return attempts


def point_at(monkeypatch, mount: Path) -> None:
    monkeypatch.setenv(notebook.INPUT_ENV, str(mount))
