"""DatasetFetcher fetching from a fake Kaggle API: the Carvana layout it unpacks, reruns that do no
work, downloads and unzips that are redone (truncated, corrupt, interrupted), and archives that
would write outside their folder. Errors are in test_fetcher_errors.py, the data folder and its
car-grouped split in test_fetcher_split.py."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from carvana.data.sources import fetcher as fetcher_mod
from carvana.data.sources.fetcher import CorruptArchiveError, DatasetFetcher, UnsafeArchiveError, archives
from carvana.data.layout import COMPETITION
from fetcher_helpers import ANGLES, TEST_CARS, TRAIN_CARS, FakeApi, competition_zips, layout_files, zip_bytes
from fetcher_helpers import fixture_no_mount  # noqa: F401 (no_mount: an autouse fixture)


# ----------------------------------------------------------------------------- fetching


@pytest.mark.parametrize("hq", [False, True])
def test_fetch_produces_carvana_layout(tmp_path, capsys, hq):
    api = FakeApi(competition_zips(hq))
    f = DatasetFetcher(root=tmp_path / "data", hq=hq, api=api)
    folder = f.fetch()

    assert folder == tmp_path / "data" / (COMPETITION + ("-hq" if hq else ""))
    assert (f.dataset_dir, f.source) == (folder, "kaggle")
    files = layout_files(folder)
    assert files["train"] == sorted(f"{c}_{a}.jpg" for c in TRAIN_CARS for a in ANGLES)
    assert files["train_masks"] == sorted(f"{c}_{a}_mask.gif" for c in TRAIN_CARS for a in ANGLES)
    assert files["test"] == sorted(f"{c}_{a}.jpg" for c in TEST_CARS for a in ANGLES)
    for name in ("train_masks.csv", "metadata.csv", "sample_submission.csv"):
        assert (folder / name).is_file()
    assert not (folder / "train_hq").exists() and not (folder / "test_hq").exists()
    assert not list(folder.glob(".tmp-*")) and not list((folder / "_downloads").glob("*.zip"))
    assert sorted(n for _, n, _ in api.calls) == sorted(a.name for a in archives(hq))
    out = capsys.readouterr().out
    assert all(f"{a.name}: downloading" in out and f"{a.name}: unpacking" in out for a in archives(hq))


def test_second_fetch_downloads_nothing(tmp_path, capsys):
    api = FakeApi(competition_zips())
    f = DatasetFetcher(root=tmp_path, api=api)
    first = f.fetch()
    before = layout_files(first)
    capsys.readouterr()
    assert DatasetFetcher(root=tmp_path, api=api).fetch() == first
    assert len(api.calls) == len(archives())
    assert capsys.readouterr().out.count("already done") == len(archives())
    assert layout_files(first) == before


def test_deleted_output_is_fetched_again(tmp_path):
    api = FakeApi(competition_zips())
    folder = DatasetFetcher(root=tmp_path, api=api).fetch()
    fetcher_mod.remove_path(folder / "test")  # marker still present, but its output is gone
    DatasetFetcher(root=tmp_path, api=api).fetch()
    assert api.count("test.zip") == 2 and len(layout_files(folder)["test"]) == 4


def test_truncated_download_is_redone(tmp_path, capsys):
    good = competition_zips()
    api = FakeApi({**good, "train.zip": [good["train.zip"][:-40], good["train.zip"]]})
    folder = DatasetFetcher(root=tmp_path, api=api).fetch()
    assert api.count("train.zip") == 2
    assert [force for _, n, force in api.calls if n == "train.zip"] == [False, True]
    assert len(layout_files(folder)["train"]) == 6
    assert "train.zip: not a valid zip" in capsys.readouterr().out


def corrupt_member(data: bytes, how: str) -> bytes:
    """A zip whose central directory is intact but whose first member's data is damaged."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        info = zf.infolist()[0]
    raw = bytearray(data)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)  # after the local header
    if how == "deflate":
        raw[start] = 0xFF  # block type 3: invalid deflate data -> zlib.error
    else:
        raw[start + info.compress_size - 1] ^= 0x01  # last byte of stored data -> CRC mismatch (BadZipFile)
    return bytes(raw)


@pytest.mark.parametrize("how", ["deflate", "crc"])
def test_corrupt_member_data_is_downloaded_again(tmp_path, capsys, how):
    good = competition_zips()
    if how == "crc":  # stored, so a flipped byte decompresses fine and only the CRC check catches it
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
            for name in zipfile.ZipFile(io.BytesIO(good["train.zip"])).namelist():
                zf.writestr(name, b"jpg" * 50)
        good["train.zip"] = buf.getvalue()
    else:
        good["train.zip"] = zip_bytes({f"train/{c}_{a}.jpg": b"jpg" * 500 for c in TRAIN_CARS for a in ANGLES})
    bad = corrupt_member(good["train.zip"], how)
    (tmp_path / "bad.zip").write_bytes(bad)
    assert fetcher_mod.zip_problem(tmp_path / "bad.zip") is None  # the directory alone looks whole
    api = FakeApi({**good, "train.zip": [bad, good["train.zip"]]})
    folder = DatasetFetcher(root=tmp_path / "data", api=api).fetch()
    assert [force for _, n, force in api.calls if n == "train.zip"] == [False, True]
    assert len(layout_files(folder)["train"]) == 6 and not list(folder.glob(".tmp-train.zip*"))
    assert "train.zip: corrupt data" in capsys.readouterr().out


def test_partial_zip_left_by_earlier_run_is_not_trusted(tmp_path):
    good = competition_zips()
    downloads = tmp_path / COMPETITION / "_downloads"
    downloads.mkdir(parents=True)
    (downloads / "test.zip").write_bytes(good["test.zip"][: len(good["test.zip"]) // 2])
    api = FakeApi(good)
    folder = DatasetFetcher(root=tmp_path, api=api).fetch()
    assert api.count("test.zip") == 1 and len(layout_files(folder)["test"]) == 4


def test_size_mismatch_reported_by_kaggle_is_redone(tmp_path):
    good = competition_zips()
    mismatch = ValueError("Downloaded file size (10) does not match expected size (99)")
    api = FakeApi({**good, "metadata.csv.zip": [mismatch, good["metadata.csv.zip"]]})
    folder = DatasetFetcher(root=tmp_path, api=api).fetch()
    assert [force for _, n, force in api.calls if n == "metadata.csv.zip"] == [False, True]
    assert (folder / "metadata.csv").is_file()


def test_zip_still_bad_after_redownload_names_file(tmp_path):
    good = competition_zips()
    api = FakeApi({**good, "train_masks.zip": b"PK\x03\x04 this is not a zip"})
    with pytest.raises(CorruptArchiveError, match=r"train_masks\.zip.*still unusable"):
        DatasetFetcher(root=tmp_path, api=api).fetch()
    assert api.count("train_masks.zip") == 2


def test_interrupted_unzip_is_redone(tmp_path, monkeypatch):
    api = FakeApi(competition_zips())
    real_extract = zipfile.ZipFile.extract
    extracted = []

    def crashing_extract(self, member, path=None, pwd=None):
        if Path(self.filename).name == "train.zip":
            extracted.append(member)
            if len(extracted) > 1:
                raise KeyboardInterrupt  # the user hits Ctrl-C halfway through train.zip
        return real_extract(self, member, path, pwd)

    monkeypatch.setattr(zipfile.ZipFile, "extract", crashing_extract)
    folder = tmp_path / COMPETITION
    with pytest.raises(KeyboardInterrupt):
        DatasetFetcher(root=tmp_path, api=api).fetch()
    (leftover,) = folder.glob(".tmp-train.zip.*")  # the interrupted unzip's own temp folder
    assert (leftover / "train").is_dir()
    assert not (folder / "_downloads" / "train.zip.done").exists() and not (folder / "train").exists()

    monkeypatch.setattr(zipfile.ZipFile, "extract", real_extract)
    DatasetFetcher(root=tmp_path, api=api).fetch()
    assert not leftover.exists() and not list(folder.glob(".tmp-*"))
    assert (folder / "_downloads" / "train.zip.done").is_file()
    assert len(layout_files(folder)["train"]) == 6
    assert api.count("train.zip") == 1  # the whole zip from the first run was reused


@pytest.mark.parametrize("evil", ["../evil.txt", "/tmp/abs/evil.txt", "C:/evil.txt", "train/../../evil.txt"])
def test_zip_slip_member_is_refused(tmp_path, evil):
    good = competition_zips()
    members = {"train/ok_01.jpg": b"jpg", evil: b"pwned"}
    api = FakeApi({**good, "train.zip": zip_bytes(members)})
    root = tmp_path / "deep" / "data"
    with pytest.raises(UnsafeArchiveError) as info:
        DatasetFetcher(root=root, api=api).fetch()
    assert evil in str(info.value) and "train.zip" in str(info.value)
    assert not list(tmp_path.rglob("evil.txt")) and not Path("/tmp/abs/evil.txt").exists()
    assert not (root / COMPETITION / "train").exists()  # nothing at all extracted from it
    assert not list((root / COMPETITION).glob(".tmp-*"))
