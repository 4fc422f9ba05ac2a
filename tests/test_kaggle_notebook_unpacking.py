"""Kaggle Notebook: unpacking the mounted zips into the data root, safely and resumably: once, and
a rerun does no work; a half-unpacked folder redone; zips escaping their folder refused; a damaged
mounted zip named (never downloaded instead); the HQ zips where mounted; a part unpacked in a
later mount replacing the earlier unpack. Nothing is ever written into the mount."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from carvana.data.sources import mounted
from carvana.data.sources.fetcher import CorruptArchiveError, DatasetFetcher, UnsafeArchiveError
from carvana.data.layout import COMPETITION
from fetcher_helpers import ANGLES, TRAIN_CARS, competition_zips, layout_files, zip_bytes
from notebook_helpers import CSVS, EXPECTED, LAYOUTS, point_at, snapshot
from notebook_helpers import fixture_isolated, fixture_make_mount  # noqa: F401 (fixtures; isolated is autouse)


# ----------------------------------------------------------------------------- unpacking


def test_zips_are_unpacked_once_and_a_rerun_does_no_work(tmp_path, monkeypatch, capsys, make_mount):
    point_at(monkeypatch, make_mount("mixed-train-zipped"))
    calls = []
    real = mounted.unpack_archive
    monkeypatch.setattr(mounted, "unpack_archive", lambda *a, **kw: (calls.append(a[1].name), real(*a, **kw)))
    folder = DatasetFetcher(root=tmp_path / "data").fetch()
    assert sorted(calls) == sorted(["train.zip", *CSVS])
    lock = "_downloads/.fetch.lock"  # taken again (its holder's pid rewritten), which is not work
    before = snapshot(folder)
    calls.clear()
    capsys.readouterr()
    assert DatasetFetcher(root=tmp_path / "data").fetch() == folder
    assert calls == [] and {**snapshot(folder), lock: None} == {**before, lock: None}
    assert capsys.readouterr().out.count("already unpacked") == 4


def test_a_half_unpacked_folder_is_redone(tmp_path, monkeypatch, make_mount):
    point_at(monkeypatch, make_mount("zips"))
    real_extract = zipfile.ZipFile.extract
    seen = []

    def crashing_extract(self, member, path=None, pwd=None):
        if Path(self.filename).name == "train.zip":
            seen.append(member)
            if len(seen) > 2:
                raise KeyboardInterrupt  # Ctrl-C (or the notebook's stop button) halfway through
        return real_extract(self, member, path, pwd)

    monkeypatch.setattr(zipfile.ZipFile, "extract", crashing_extract)
    folder = tmp_path / "data" / COMPETITION
    with pytest.raises(KeyboardInterrupt):
        DatasetFetcher(root=tmp_path / "data").fetch()
    (leftover,) = folder.glob(".tmp-train.zip.*")  # the interrupted unzip's own temp folder
    assert (leftover / "train").is_dir() and not (folder / "_downloads" / "train.zip.done").exists()
    monkeypatch.setattr(zipfile.ZipFile, "extract", real_extract)
    # An output without its marker (a run stopped between the move and the marker) is redone too.
    (folder / "train_masks" / "stray_mask.gif").write_bytes(b"x")
    (folder / "_downloads" / "train_masks.zip.done").unlink()
    DatasetFetcher(root=tmp_path / "data").fetch()
    assert layout_files(folder) == EXPECTED and not list(folder.glob(".tmp-*"))
    assert json.loads((folder / "_downloads" / "train.zip.done").read_text())["outputs"] == ["train"]


@pytest.mark.parametrize("evil", ["../evil.txt", "train/../../evil.txt", "/tmp/abs-mount/evil.txt"])
def test_a_mounted_zip_escaping_its_folder_is_refused(tmp_path, monkeypatch, make_mount, evil):
    zips = {**competition_zips(), "train.zip": zip_bytes({"train/ok_01.jpg": b"jpg", evil: b"pwned"})}
    point_at(monkeypatch, make_mount("zips", zips))
    with pytest.raises(UnsafeArchiveError) as info:
        DatasetFetcher(root=tmp_path / "data").fetch()
    assert evil in str(info.value) and "train.zip" in str(info.value)
    assert not list(tmp_path.rglob("evil.txt")) and not Path("/tmp/abs-mount/evil.txt").exists()
    folder = tmp_path / "data" / COMPETITION
    assert not (folder / "train").exists() and not list(folder.glob(".tmp-*"))


def test_a_damaged_mounted_zip_is_named_and_not_downloaded(tmp_path, monkeypatch, make_mount, isolated):
    zips = competition_zips()
    zips["test.zip"] = zips["test.zip"][:-30]
    mount = make_mount("zips", zips)
    point_at(monkeypatch, mount)
    with pytest.raises(CorruptArchiveError, match=rf"{mount / 'test.zip'}: mounted archive is unusable"):
        DatasetFetcher(root=tmp_path / "data").fetch()
    assert isolated == []


def test_hq_takes_the_hq_zips_where_mounted_else_the_standard_ones(tmp_path, monkeypatch, capsys, make_mount):
    zips = {**competition_zips(), **competition_zips(hq=True)}
    zips["train_hq.zip"] = zip_bytes({f"train_hq/{c}_{a}.jpg": b"HQ" for c in TRAIN_CARS for a in ANGLES})
    point_at(monkeypatch, make_mount({**LAYOUTS["zips"], "train_hq.zip": "zip"}, zips))
    folder = DatasetFetcher(root=tmp_path / "data", hq=True).fetch()
    assert folder == tmp_path / "data" / f"{COMPETITION}-hq" and layout_files(folder) == EXPECTED
    assert {p.read_bytes() for p in (folder / "train").iterdir()} == {b"HQ"}  # from train_hq.zip
    assert "test_hq.zip is not mounted: using test instead" in capsys.readouterr().out


def test_a_part_unpacked_in_the_mount_later_replaces_the_earlier_unpack(tmp_path, monkeypatch, make_mount):
    point_at(monkeypatch, make_mount("zips", name="first"))
    folder = DatasetFetcher(root=tmp_path / "data").fetch()
    assert not (folder / "train").is_symlink()
    second = make_mount("mixed-train-unpacked", name="second")
    point_at(monkeypatch, second)
    assert DatasetFetcher(root=tmp_path / "data").fetch() == folder
    assert (folder / "train").is_symlink() and (folder / "train").resolve() == (second / "train").resolve()
    assert not (folder / "_downloads" / "train.zip.done").exists() and layout_files(folder) == EXPECTED
