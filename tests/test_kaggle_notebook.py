"""Kaggle Notebook: the competition files mounted read-only in every layout (zips, unpacked
folders, mixed) give the Carvana layout without copying, and the data source order (an explicit
folder, then the mount, then Kaggle credentials, then demo data). Unpacking the mounted zips is
in test_kaggle_notebook_unpacking.py, the working folder and a whole main.py run in
test_kaggle_notebook_working.py."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from carvana.data.sources import kaggle_client, notebook
from carvana.data.sources.fetcher import DatasetFetcher, DatasetLayoutError, check_layout
from carvana.data.layout import COMPETITION
from fetcher_helpers import FakeApi, competition_zips, layout_files, make_folder
from notebook_helpers import EXPECTED, LAYOUTS, OUTPUT, point_at
from notebook_helpers import fixture_isolated, fixture_make_mount  # noqa: F401 (fixtures; isolated is autouse)


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
