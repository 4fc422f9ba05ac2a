"""Kaggle Notebook: the competition files mounted read-only (zips, unpacked folders, mixed),
the data source order, safe resumable unpacking, nothing written into the mount, the working folder."""

from __future__ import annotations

import io
import json
import os
import socket
import stat
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest

from carvana.data.sources import kaggle_client, mounted, notebook
from carvana.data.sources.fetcher import (
    CorruptArchiveError,
    DatasetFetcher,
    DatasetLayoutError,
    UnsafeArchiveError,
    check_layout,
)
from carvana.data.layout import COMPETITION
from test_fetcher import ANGLES, TEST_CARS, TRAIN_CARS, FakeApi, competition_zips, layout_files, make_folder, zip_bytes

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


# ----------------------------------------------------------------------------- helpers


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


@pytest.fixture
def make_mount(tmp_path):
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


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path, kaggle_home):
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


# ----------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_gives_the_carvana_layout_without_copying(tmp_path, monkeypatch, capsys, make_mount, layout):
    mount = make_mount(layout)
    point_at(monkeypatch, mount)
    f = DatasetFetcher(root=tmp_path / "data")
    folder = f.fetch()
    assert (f.source, f.dataset_dir) == ("mount", folder) and check_layout(folder) == folder
    assert layout_files(folder) == EXPECTED
    for name in ("sample_submission.csv", "metadata.csv", "train_masks.csv"):
        assert (folder / name).is_file()
    assert f"data: mounted competition files at {mount} (CARVANA_INPUT)" in capsys.readouterr().out
    train, _, valid, _ = f.get_train_files(validation_size=0.34)
    assert len(train) + len(valid) == 6 and len(f.get_test_files()) == 4
    forms = LAYOUTS[layout]
    if layout == "folders":  # all unpacked under the layout's names: the mount itself, nothing written
        assert folder == mount and not (tmp_path / "data").exists()
        return
    assert folder == tmp_path / "data" / COMPETITION
    for archive, form in forms.items():
        out = folder / OUTPUT[archive]
        if form == "zip":  # unpacked into the data root; the mount's zip stays (checked at teardown)
            assert not out.is_symlink() and out.exists()
        else:  # used in place: a link into the mount, no copy
            assert out.is_symlink() and out.resolve().is_relative_to(mount.resolve())
    assert not list(folder.glob(".tmp-*")) and not list(folder.rglob("*.zip"))


def test_the_default_notebook_input_is_used_and_named(tmp_path, monkeypatch, capsys, make_mount):
    mount = make_mount("zips")
    monkeypatch.setattr(notebook, "KAGGLE_INPUT_DIR", mount)
    f = DatasetFetcher(root=tmp_path / "data")
    f.fetch()
    assert f.source == "mount"
    assert f"data: mounted competition files at {mount} (Kaggle Notebook input)" in capsys.readouterr().out


# ----------------------------------------------------------------------------- source order


def fake_demo(monkeypatch) -> None:
    def writer(root: Path, seed: int = 0, **kw) -> Path:
        return make_folder(root, ["abcabcabcabc"], angles=2, test_names=["abcabcabcabc_01.jpg"])

    monkeypatch.setitem(sys.modules, "carvana.data.demo.dataset", types.SimpleNamespace(write_demo_dataset=writer))


def test_source_order_folder_then_mount_then_credentials_then_demo(tmp_path, monkeypatch, capsys, make_mount,
                                                                  isolated):
    fake_demo(monkeypatch)
    # Nothing at all: demo data, and the banner says how to get the real files.
    f = DatasetFetcher(root=tmp_path / "demo-run")
    f.fetch()
    out = capsys.readouterr().out
    assert f.source == "demo" and "DEMO DATA IN USE" in out and notebook.INPUT_ENV in out
    # Credentials only: the API.
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", "fake-key-0123456789")
    api = FakeApi(competition_zips())
    monkeypatch.setattr(kaggle_client, "make_api", lambda: api)
    f = DatasetFetcher(root=tmp_path / "api-run")
    f.fetch()
    assert f.source == "kaggle" and api.calls
    assert "data: Kaggle API download (credentials from KAGGLE_USERNAME/KAGGLE_KEY" in capsys.readouterr().out
    # Mount + credentials (looked up or an API object handed in): the mount, and no request at all.
    mount = make_mount("zips")
    point_at(monkeypatch, mount)
    api.calls.clear()
    for fetcher in (DatasetFetcher(root=tmp_path / "mount-run"), DatasetFetcher(root=tmp_path / "m2", api=api)):
        fetcher.fetch()
        assert fetcher.source == "mount"
    assert api.calls == [] and isolated == []
    # An explicit folder (--data-dir, the caller's use_folder) wins over all of them.
    f = DatasetFetcher(root=tmp_path / "x")
    assert f.use_folder(tmp_path / "demo-run" / "demo") and f.source == "folder"


def test_carvana_input_naming_a_missing_folder_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", "fake-key-0123456789")
    point_at(monkeypatch, tmp_path / "nowhere")
    with pytest.raises(DatasetLayoutError, match=rf"{tmp_path / 'nowhere'}: CARVANA_INPUT names a folder"):
        DatasetFetcher(root=tmp_path / "data").fetch()


def test_a_mount_missing_a_required_part_names_it(tmp_path, monkeypatch, make_mount):
    forms = {k: v for k, v in LAYOUTS["zips"].items() if k not in ("test.zip", "metadata.csv.zip")}
    point_at(monkeypatch, make_mount(forms))
    with pytest.raises(DatasetLayoutError) as info:
        DatasetFetcher(root=tmp_path / "data").fetch()
    assert "test/ (or test.zip)" in str(info.value) and "metadata" not in str(info.value)  # optional


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


# ----------------------------------------------------------------------------- working folder


def test_kaggle_working_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(notebook, "KAGGLE_WORKING_DIR", tmp_path / "kaggle" / "working")
    assert notebook.kaggle_working_dir() is None and not notebook.in_kaggle_notebook()
    (tmp_path / "kaggle" / "working").mkdir(parents=True)
    assert notebook.kaggle_working_dir() == tmp_path / "kaggle" / "working" and notebook.in_kaggle_notebook()
    monkeypatch.setenv(notebook.WORKING_ENV, str(tmp_path / "elsewhere"))
    assert notebook.kaggle_working_dir() is None  # named but missing
    (tmp_path / "elsewhere").mkdir()
    assert notebook.kaggle_working_dir() == tmp_path / "elsewhere"
    monkeypatch.setenv(notebook.WORKING_ENV, "")
    assert notebook.kaggle_working_dir() is None  # empty: "not in a notebook"
    if os.geteuid() != 0:  # root may write anywhere a chmod forbids
        monkeypatch.setenv(notebook.WORKING_ENV, str(tmp_path / "elsewhere"))
        os.chmod(tmp_path / "elsewhere", 0o555)
        try:
            assert notebook.kaggle_working_dir() is None
        finally:
            os.chmod(tmp_path / "elsewhere", 0o755)


# ----------------------------------------------------------------------------- end to end

MAIN = Path(__file__).resolve().parents[1] / "main.py"
TINY = ["--input-size", "64x64", "--width", "0.125", "--epochs", "1", "--batch-size", "2", "--workers", "0",
        "--no-amp", "--validation-size", "0.5", "--predict-batch-size", "4", "--chunk-size", "5"]


def zip_folder(folder: Path, top: str) -> bytes:
    return zip_bytes({f"{top}/{p.name}": p.read_bytes() for p in sorted((folder / top).iterdir())})


def test_main_trains_on_the_mounted_files(tmp_path, make_mount):
    from carvana.data.demo.dataset import write_demo_dataset

    source = write_demo_dataset(tmp_path / "made", seed=5, n_train_cars=2, n_test_cars=1)
    zips = {f"{top}.zip": zip_folder(source, top) for top in ("train", "train_masks", "test")}
    csvs = {f"{p.name}.zip": zip_bytes({p.name: p.read_bytes()}) for p in source.glob("*.csv")
            if p.name in OUTPUT.values()}  # not test_solution.csv
    mount = make_mount({**dict.fromkeys(zips, "zip"), **dict.fromkeys(csvs, "dir")}, {**zips, **csvs})
    assert (mount / "sample_submission.csv").is_file() and (mount / "train.zip").is_file()
    mount_files = snapshot(mount)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAGGLE_", "CARVANA_"))}
    working = tmp_path / "working"  # the notebook's /kaggle/working, outside the current folder
    working.mkdir()
    env.update(HOME=str(tmp_path / "home"), CARVANA_INPUT=str(mount), CARVANA_WORKING=str(working))
    result = subprocess.run([sys.executable, str(MAIN), "--run-name", "m1", "--no-keep-last", *TINY], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"data: mounted competition files at {mount} (CARVANA_INPUT)" in result.stdout
    assert "DEMO DATA" not in result.stdout and not (cwd / "data" / "demo").exists()
    # Outputs land in the working folder (the notebook's Output tab), only best.pt kept.
    assert f"outputs and data: under {working}" in result.stdout
    assert (working / "output" / "submit.csv.gz").is_file() and not (cwd / "output").exists()
    assert (working / "output/models/m1/best.pt").is_file() and not (working / "output/models/m1/last.pt").exists()
    summary = json.loads((working / "logs" / "m1" / "summary.json").read_text())
    n_train = len(list((source / "train").glob("*.jpg")))
    assert summary["data"] == "mount" and summary["train_images"] + summary["valid_images"] == n_train == 32
    assert summary["test_images"] == len(list((source / "test").glob("*.jpg"))) == 16
    # The zips went under the data root, which (relative) follows the outputs into the working
    # folder: the current folder may be a read-only code dataset. Nothing went into the mount.
    unpacked = working / "data" / COMPETITION
    assert (unpacked / "_downloads" / "train.zip.done").is_file() and len(list((unpacked / "train").iterdir())) == 32
    assert not (cwd / "data").exists()
    assert snapshot(mount) == mount_files
