"""Shared by the fetcher and Kaggle Notebook tests: tiny competition archives, a fake Kaggle API
serving them, Carvana-layout folders of empty files, and the fixtures that keep a real mount
and real credentials out of sight.

The fixtures are imported by their function names (fixture_<name>, so that a test's argument
does not shadow the import); pytest knows them by <name>. ``no_mount`` is autouse in every test
module that imports it."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from carvana.data.sources import notebook

TRAIN_CARS = ["0cdf5b5d0ce1", "1a17a1bd648b", "2faf504842df"]
TEST_CARS = ["fff9b3a5373f", "0d3adbbc9a8b"]
ANGLES = ["01", "02"]


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def competition_zips(hq: bool = False) -> dict[str, bytes]:
    """Tiny stand-ins for the six competition archives (content bytes are irrelevant here)."""
    sfx = "_hq" if hq else ""
    train_names = [f"{c}_{a}" for c in TRAIN_CARS for a in ANGLES]
    test_names = [f"{c}_{a}.jpg" for c in TEST_CARS for a in ANGLES]
    csv_rows = "".join(f"{n},1 1\n" for n in test_names)
    return {
        f"train{sfx}.zip": zip_bytes({f"train{sfx}/{n}.jpg": b"jpg" for n in train_names}),
        "train_masks.zip": zip_bytes({f"train_masks/{n}_mask.gif": b"gif" for n in train_names}),
        "train_masks.csv.zip": zip_bytes({"train_masks.csv": b"img,rle_mask\n"}),
        f"test{sfx}.zip": zip_bytes({f"test{sfx}/{n}": b"jpg" for n in test_names}),
        "metadata.csv.zip": zip_bytes({"metadata.csv": b"id,year,make,model,trim1,trim2\n"}),
        "sample_submission.csv.zip": zip_bytes({"sample_submission.csv": ("img,rle_mask\n" + csv_rows).encode()}),
    }


class FakeApi:
    """Serves prepared bytes like KaggleApi.competition_download_file (writes <path>/<file_name>).

    ``serve[name]`` is bytes, or a list consumed one item per call (bytes or an exception).
    """

    def __init__(self, serve: dict[str, object]):
        self.serve = dict(serve)
        self.calls: list[tuple[str, str, bool]] = []

    def competition_download_file(self, competition, file_name, path=None, force=False, quiet=False):
        self.calls.append((competition, file_name, force))
        item = self.serve[file_name]
        if isinstance(item, list):
            item = item.pop(0) if len(item) > 1 else item[0]
        if isinstance(item, BaseException):
            raise item
        Path(path, file_name).write_bytes(item)

    def count(self, name: str) -> int:
        return sum(1 for _, n, _ in self.calls if n == name)


@pytest.fixture(autouse=True, name="no_mount")
def fixture_no_mount(monkeypatch, tmp_path):
    """No mounted competition files: run inside a Kaggle Notebook, these tests must not take the real ones."""
    monkeypatch.delenv(notebook.INPUT_ENV, raising=False)
    monkeypatch.setattr(notebook, "KAGGLE_INPUT_DIR", tmp_path / "no-kaggle-input")


@pytest.fixture(name="no_creds")
def fixture_no_creds(kaggle_home):
    """No Kaggle credentials visible (see conftest.kaggle_home)."""
    return kaggle_home


def layout_files(folder: Path) -> dict[str, list[str]]:
    return {d: sorted(p.name for p in (folder / d).iterdir()) for d in ("train", "train_masks", "test")}


def make_folder(root: Path, cars: list[str], angles: int = 16, test_names: list[str] | None = None) -> Path:
    """A Carvana-layout folder of empty files."""
    for d in ("train", "train_masks", "test"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for car in cars:
        for a in range(1, angles + 1):
            (root / "train" / f"{car}_{a:02d}.jpg").touch()
            (root / "train_masks" / f"{car}_{a:02d}_mask.gif").touch()
    test_names = test_names or []
    for name in test_names:
        (root / "test" / name).touch()
    (root / "sample_submission.csv").write_text("img,rle_mask\n" + "".join(f"{n},1 1\n" for n in test_names))
    return root
