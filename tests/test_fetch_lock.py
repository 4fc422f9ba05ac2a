"""Several processes fetching into one data folder (M8), and a data folder that cannot be
written (m6): one blocking lock, temp folders of each process's own, one-line errors."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from carvana.data.sources.fetcher import DatasetFetcher, DatasetLayoutError
from carvana.data.layout import COMPETITION
from carvana.pipeline.session import user_message
from fetcher_helpers import FakeApi, competition_zips, layout_files
from notebook_helpers import EXPECTED, point_at
from notebook_helpers import fixture_isolated, fixture_make_mount  # noqa: F401 (fixtures; isolated is autouse)

HOLDER = """
import sys
from pathlib import Path
from carvana.data.sources.archives import fetch_lock
with fetch_lock(Path(sys.argv[1])) as held:
    print("locked" if held else "not held", flush=True)
    sys.stdin.readline()
"""

# A fetch whose unzip is slow (20 ms a member), started when the file ``go`` appears: several
# of them run their unpacks at the same time unless something makes them take turns.
SLOW_FETCH = """
import sys, time, zipfile
from pathlib import Path
from carvana.data.sources.fetcher import DatasetFetcher
real = zipfile.ZipFile.extract
def slow(self, member, path=None, pwd=None):
    time.sleep(0.02)
    return real(self, member, path, pwd)
zipfile.ZipFile.extract = slow
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.005)
DatasetFetcher(root=Path(sys.argv[1])).fetch()
"""


def child_env(tmp_path: Path, mount: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAGGLE_", "CARVANA_"))}
    return {**env, "HOME": str(tmp_path / "home"), "CARVANA_INPUT": str(mount)}


def test_a_second_fetch_waits_for_the_lock_holder_then_finds_nothing_of_its_own_removed(
        tmp_path, monkeypatch, capsys, make_mount):
    # Fails on the old code: nothing waited; the fetch unpacked beside the other process.
    mount = make_mount("zips")
    point_at(monkeypatch, mount)
    folder = tmp_path / "data" / COMPETITION
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=child_env(tmp_path, mount))
    try:
        assert holder.stdout.readline().strip() == "locked"
        # The holder's own unzip in progress: a waiter must not remove it.
        own = folder / ".tmp-train.zip.live-writer"
        (own / "train").mkdir(parents=True)
        done: list[Path] = []
        waiter = threading.Thread(target=lambda: done.append(DatasetFetcher(root=tmp_path / "data").fetch()))
        waiter.start()
        said = f"waiting for another process (pid {holder.pid}) fetching into {folder}"
        out, deadline = "", time.time() + 60
        while said not in out and time.time() < deadline:
            time.sleep(0.1)
            out += capsys.readouterr().out
        time.sleep(0.5)
        assert said in out and waiter.is_alive() and not done  # still waiting for the lock
        assert own.is_dir() and not (folder / "train").exists()
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(30) == 0
        waiter.join(60)
    finally:
        holder.kill()
    assert done == [folder] and layout_files(folder) == EXPECTED
    assert not own.exists()  # its writer is gone now: removed under the lock


def test_processes_started_together_unpack_one_mount_without_breaking_each_other(tmp_path, make_mount):
    # Fails on the old code: each removed the others' fixed-name .tmp-<zip> folder mid-unzip
    # (FileExistsError / FileNotFoundError tracebacks, or a short train/).
    mount = make_mount("all-zips")
    root, go = tmp_path / "data", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", SLOW_FETCH, str(root), str(go)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=child_env(tmp_path, mount)) for _ in range(3)]
    time.sleep(3.0)  # let them import and wait at the start line
    go.touch()
    results = [(p.wait(120), *p.communicate()) for p in procs]
    for rc, out, err in results:
        assert rc == 0 and "Traceback" not in err, out[-2000:] + err[-2000:]
    folder = root / COMPETITION
    assert layout_files(folder) == EXPECTED and not list(folder.glob(".tmp-*"))
    outs = "".join(out for _, out, _ in results)
    assert outs.count("train.zip: unpacking") == 1  # one process unpacked, the others found it done
    assert outs.count("train.zip: already unpacked") == 2


def test_leftovers_of_dead_writers_are_removed_under_the_lock(tmp_path, monkeypatch, make_mount):
    point_at(monkeypatch, make_mount("zips"))
    folder = tmp_path / "data" / COMPETITION
    stale = [folder / ".tmp-train.zip", folder / ".tmp-test.zip.4242-abc", folder / ".tmp-link-train"]
    for path in stale:
        (path / "train").mkdir(parents=True)  # an older version's name, a killed process's, a link's
    os.symlink(tmp_path, folder / ".train.4242-1.tmp")  # a link renamed into place by a killed process
    assert DatasetFetcher(root=tmp_path / "data").fetch() == folder
    assert layout_files(folder) == EXPECTED
    assert not [p for p in stale if p.exists()] and not (folder / ".train.4242-1.tmp").is_symlink()


def under(path, top: Path) -> bool:
    path, top = Path(os.path.abspath(os.fsdecode(path))), Path(os.path.abspath(top))
    return path == top or top in path.parents


def read_only(monkeypatch, top: Path) -> None:
    """Make everything under ``top`` behave as on a read-only filesystem (tests may run as root,
    for whom a chmod forbids nothing): creating a folder or opening a file to write fails with EROFS."""
    real_mkdir, real_open, real_symlink = os.mkdir, os.open, os.symlink
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def refused(path) -> OSError:
        return OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))

    def mkdir(path, mode=0o777, *, dir_fd=None):
        if under(path, top):
            if os.path.lexists(path):  # the kernel says "exists" first
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(path))
            raise refused(path)
        return real_mkdir(path, mode, dir_fd=dir_fd)

    def open_(path, flags, mode=0o777, *, dir_fd=None):
        if under(path, top) and flags & writes:
            raise refused(path)
        return real_open(path, flags, mode, dir_fd=dir_fd)

    def symlink(src, dst, target_is_directory=False, *, dir_fd=None):
        if under(dst, top):
            raise refused(dst)
        return real_symlink(src, dst, target_is_directory, dir_fd=dir_fd)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "symlink", symlink)


def assert_one_line(exc: BaseException, folder: Path) -> None:
    line = user_message(exc)
    assert "\n" not in line and line.startswith(f"{folder}: cannot write the data there (Read-only file system)")
    assert "--data-root" in line and "writable disk" in line


@pytest.mark.parametrize("source", ["mount", "kaggle", "demo"])
def test_a_data_root_on_a_read_only_disk_is_one_line_naming_it(tmp_path, monkeypatch, make_mount, source):
    # Fails on the old code: an OSError (EROFS) traceback from mkdir.
    api = FakeApi(competition_zips()) if source == "kaggle" else None
    if source == "mount":
        point_at(monkeypatch, make_mount("zips"))
    code = tmp_path / "code"  # e.g. a notebook run from a read-only code dataset
    code.mkdir()
    read_only(monkeypatch, code)
    with pytest.raises(DatasetLayoutError) as info:
        DatasetFetcher(root=code / "data", api=api).fetch()
    assert_one_line(info.value, code / "data" / ("" if source == "demo" else COMPETITION))
    assert not (code / "data").exists() and (api is None or api.calls == [])


def test_a_read_only_folder_fails_in_one_line_at_the_first_write_and_works_when_all_is_done(
        tmp_path, monkeypatch, make_mount):
    # Fails on the old code: the unzip's EROFS was re-raised as a traceback (unpack_mounted).
    point_at(monkeypatch, make_mount("zips"))
    folder = tmp_path / "data" / COMPETITION
    (folder / "_downloads").mkdir(parents=True)  # e.g. copied from an earlier run, never unpacked
    with monkeypatch.context() as patch:
        read_only(patch, folder)
        with pytest.raises(DatasetLayoutError) as info:
            DatasetFetcher(root=tmp_path / "data").fetch()
    assert_one_line(info.value, folder)
    assert DatasetFetcher(root=tmp_path / "data").fetch() == folder  # writable again: unpacked
    read_only(monkeypatch, folder)
    assert DatasetFetcher(root=tmp_path / "data").fetch() == folder  # read-only, nothing left to write
    assert layout_files(folder) == EXPECTED
