"""DatasetFetcher: download/unpack against a fake Kaggle API, error mapping, car-grouped split."""

from __future__ import annotations

import errno
import io
import math
import re
import socket
import sys
import types
import zipfile
from pathlib import Path

import pytest
import requests

from carvana.data.sources import fetcher as fetcher_mod
from carvana.data.sources import kaggle_client, notebook
from carvana.data.sources.fetcher import (
    CorruptArchiveError,
    DatasetFetcher,
    DatasetLayoutError,
    UnsafeArchiveError,
    archives,
)
from carvana.data.sources.kaggle_client import (
    DiskFullError,
    KaggleCredentialsError,
    KaggleNetworkError,
    KaggleNotFoundError,
    KaggleRulesNotAcceptedError,
)
from carvana.data.layout import COMPETITION, car_id
from test_kaggle_client import assert_no_secret_anywhere

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "shared" / "carvana-sample"
TRAIN_CARS = ["0cdf5b5d0ce1", "1a17a1bd648b", "2faf504842df"]
TEST_CARS = ["fff9b3a5373f", "0d3adbbc9a8b"]
ANGLES = ["01", "02"]
SECRET = "s3cr3t-kaggle-key-0123456789"


# ----------------------------------------------------------------------------- helpers


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


def http_error(status: int, text: str = "") -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(text or f"{status} Client Error: for url https://www.kaggle.com/api/v1", response=response)


@pytest.fixture(autouse=True)
def no_mount(monkeypatch, tmp_path):
    """No mounted competition files: run inside a Kaggle Notebook, these tests must not take the real ones."""
    monkeypatch.delenv(notebook.INPUT_ENV, raising=False)
    monkeypatch.setattr(notebook, "KAGGLE_INPUT_DIR", tmp_path / "no-kaggle-input")


@pytest.fixture
def no_creds(kaggle_home):
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


# ----------------------------------------------------------------------------- clear errors


def test_no_credentials_uses_demo_data(tmp_path, monkeypatch, capsys, no_creds):
    written = []

    def fake_writer(root: Path, seed: int = 0, **kw) -> Path:
        written.append((root, seed))
        return make_folder(root, ["abcabcabcabc"], angles=2, test_names=["abcabcabcabc_01.jpg"])

    monkeypatch.setitem(sys.modules, "carvana.data.demo.dataset", types.SimpleNamespace(write_demo_dataset=fake_writer))
    monkeypatch.setattr(kaggle_client, "make_api", lambda: pytest.fail("must not contact Kaggle"))
    f = DatasetFetcher(root=tmp_path / "data", seed=7)
    folder = f.fetch()
    assert written == [(tmp_path / "data" / "demo", 7)]
    assert (folder, f.source, f.dataset_dir) == (tmp_path / "data" / "demo", "demo", folder)
    out = capsys.readouterr().out
    assert "DEMO DATA IN USE" in out and kaggle_client.rules_url() in out and "--data-dir" in out
    assert "KAGGLE_USERNAME" in out and "kaggle.json" in out


def test_legacy_user_password_env_is_rejected(tmp_path, monkeypatch, no_creds):
    monkeypatch.setenv("KAGGLE_USER", "alice")
    monkeypatch.setenv("KAGGLE_PASSWD", SECRET)
    with pytest.raises(KaggleCredentialsError) as info:
        DatasetFetcher(root=tmp_path, api=None).fetch()
    msg = str(info.value)
    assert "no longer supported" in msg and "KAGGLE_USERNAME" in msg and "KAGGLE_KEY" in msg
    assert "https://www.kaggle.com/settings" in msg and SECRET not in msg


class ApiException(Exception):
    """The shape of older kaggle clients' errors: status code in ``.status``."""

    def __init__(self, status: int):
        super().__init__(f"({status})\nReason: denied")
        self.status = status


@pytest.mark.parametrize(
    "exc, kind, needles",
    [
        (http_error(401), KaggleCredentialsError, ["401", "regenerate", "https://www.kaggle.com/settings"]),
        (ApiException(401), KaggleCredentialsError, ["401", "regenerate"]),
        (http_error(403), KaggleRulesNotAcceptedError,
         [kaggle_client.rules_url(COMPETITION), "I Understand and Accept"]),
        (ApiException(403), KaggleRulesNotAcceptedError, [kaggle_client.rules_url(COMPETITION)]),
        (http_error(404), KaggleNotFoundError, ["404", COMPETITION]),
        (requests.exceptions.ConnectionError("Failed to resolve 'www.kaggle.com'"), KaggleNetworkError,
         ["No network", "demo dataset", "--data-dir"]),
        (socket.gaierror(-3, "Temporary failure in name resolution"), KaggleNetworkError, ["No network"]),
        (requests.exceptions.ReadTimeout("read timed out"), KaggleNetworkError, ["No network"]),
    ],
)
def test_download_errors_explain_what_to_do(tmp_path, exc, kind, needles):
    api = FakeApi({name: exc for name in competition_zips()})
    with pytest.raises(kind) as info:
        DatasetFetcher(root=tmp_path, api=api).fetch()
    for needle in needles:
        assert needle in str(info.value)
    assert "sample_submission.csv.zip" in str(info.value)  # the action names the file


def test_disk_full_names_file_and_keeps_completed(tmp_path):
    good = competition_zips()
    api = FakeApi({**good, "train.zip": OSError(errno.ENOSPC, "No space left on device")})
    with pytest.raises(DiskFullError) as info:
        DatasetFetcher(root=tmp_path, api=api).fetch()
    folder = tmp_path / COMPETITION
    assert str(folder / "_downloads" / "train.zip") in str(info.value)
    assert "free space and rerun" in str(info.value)
    assert (folder / "_downloads" / "train_masks.zip.done").is_file() and (folder / "train_masks").is_dir()


def test_keys_never_printed_or_raised(tmp_path, monkeypatch, capsys, no_creds):
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", SECRET)
    leaky = [
        http_error(401, f"401 Client Error: Unauthorized for url https://www.kaggle.com/api?key={SECRET}"),
        RuntimeError(f"unexpected failure, Authorization: Basic {SECRET}"),
        requests.exceptions.ConnectionError(f"cannot connect with key {SECRET}"),
    ]
    for exc in leaky:
        api = FakeApi({name: exc for name in competition_zips()})
        monkeypatch.setattr(kaggle_client, "make_api", lambda api=api: api)
        with pytest.raises(kaggle_client.KaggleError) as info:
            DatasetFetcher(root=tmp_path).fetch()  # credentials found -> lazily made api
        assert_no_secret_anywhere(info.value, SECRET)
    out, err = capsys.readouterr()
    assert "KAGGLE_USERNAME/KAGGLE_KEY environment variables" in out  # where, not what
    assert SECRET not in out and SECRET not in err


# ----------------------------------------------------------------------------- folders and splits


def test_use_folder_names_missing_pieces(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DatasetLayoutError) as info:
        DatasetFetcher().use_folder(tmp_path)
    for piece in ("train_masks/", "test/", "sample_submission.csv"):
        assert piece in str(info.value)
    listed = re.search(r"missing (.*) \(expected", str(info.value)).group(1).split(", ")
    assert listed == ["train_masks/", "test/", "sample_submission.csv"]  # train/ is there
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        DatasetFetcher().use_folder(tmp_path / "nope")


def test_lists_need_a_dataset_first():
    with pytest.raises(RuntimeError, match="fetch"):
        DatasetFetcher().get_train_files()


CARS = [f"{i:012x}" for i in range(10)]


def split_cars(result) -> tuple[set[str], set[str]]:
    train, train_masks, valid, valid_masks = result
    for images, masks in ((train, train_masks), (valid, valid_masks)):
        assert [m.name for m in masks] == [f"{p.stem}_mask.gif" for p in images]
        assert all(m.is_file() for m in masks)
        assert images == sorted(images, key=lambda p: p.name)
    return {car_id(p) for p in train}, {car_id(p) for p in valid}


def test_split_by_car_deterministic_and_seeded(tmp_path):
    f = DatasetFetcher()
    f.use_folder(make_folder(tmp_path, CARS))
    results = {seed: f.get_train_files(validation_size=0.3, seed=seed) for seed in range(5)}
    for seed, result in results.items():
        train_cars, valid_cars = split_cars(result)
        assert not train_cars & valid_cars
        assert train_cars | valid_cars == set(CARS)
        assert len(valid_cars) == round(0.3 * len(CARS))
        assert len(result[0]) + len(result[2]) == 16 * len(CARS)
        assert f.get_train_files(validation_size=0.3, seed=seed) == result
    assert len({tuple(r[2]) for r in results.values()}) > 1  # seeds give different splits


def test_sample_size_keeps_a_fraction_of_cars(tmp_path):
    f = DatasetFetcher()
    f.use_folder(make_folder(tmp_path, CARS, angles=3))
    for fraction in (0.1, 0.25, 0.5, 1.0):
        train_cars, valid_cars = split_cars(f.get_train_files(validation_size=0.5, sample_size=fraction, seed=3))
        assert not train_cars & valid_cars
        assert len(train_cars | valid_cars) == math.ceil(len(CARS) * fraction)
    # One car only: nothing can be held out, and the single car stays whole.
    train_cars, valid_cars = split_cars(f.get_train_files(validation_size=0.5, sample_size=0.1))
    assert len(train_cars) == 1 and not valid_cars
    # Validation at least one car whenever there are two.
    _, valid_cars = split_cars(f.get_train_files(validation_size=0.01, sample_size=0.2))
    assert len(valid_cars) == 1


@pytest.mark.parametrize("kw", [{"validation_size": 1.0}, {"validation_size": -0.1},
                                {"sample_size": 0.0}, {"sample_size": 1.5}, {"validation_size": float("nan")}])
def test_split_rejects_out_of_range(tmp_path, kw):
    f = DatasetFetcher()
    f.use_folder(make_folder(tmp_path, CARS[:2], angles=1))
    with pytest.raises(ValueError, match=next(iter(kw))):
        f.get_train_files(**kw)


def test_train_image_without_mask_is_named(tmp_path):
    folder = make_folder(tmp_path, CARS[:2], angles=2)
    (folder / "train_masks" / f"{CARS[1]}_02_mask.gif").unlink()
    f = DatasetFetcher()
    f.use_folder(folder)
    with pytest.raises(FileNotFoundError, match=f"{CARS[1]}_02.jpg.*no mask"):
        f.get_train_files()


def test_test_files_follow_sample_submission_order(tmp_path):
    names = [f"{c}_{a:02d}.jpg" for c in ("ffffffffffff", "000000000000", "888888888888") for a in (2, 1)]
    f = DatasetFetcher()
    f.use_folder(make_folder(tmp_path, CARS[:1], angles=1, test_names=names))
    assert [p.name for p in f.get_test_files()] == names
    assert all(p.parent == tmp_path / "test" for p in f.get_test_files())
    assert [p.name for p in f.get_test_files(sample_size=0.5)] == names[:3]
    assert [p.name for p in f.get_test_files(sample_size=0.01)] == names[:1]
    for name in names[1:4]:
        (tmp_path / "test" / name).unlink()
    with pytest.raises(FileNotFoundError, match=rf"3 image\(s\).*{names[1]}"):
        f.get_test_files()


def test_real_sample_folder_split():
    if not SAMPLE_DIR.is_dir():
        pytest.skip(f"real sample data not present at {SAMPLE_DIR}")
    f = DatasetFetcher()
    assert f.use_folder(SAMPLE_DIR) == SAMPLE_DIR and f.source == "folder"
    result = f.get_train_files(validation_size=0.2, seed=0)
    train_cars, valid_cars = split_cars(result)
    assert len(result[0]) + len(result[2]) == 384
    assert len(train_cars | valid_cars) == 24 and not train_cars & valid_cars
    assert len(valid_cars) == round(0.2 * 24)
    assert len(f.get_test_files()) == len(list((SAMPLE_DIR / "test").glob("*.jpg")))
