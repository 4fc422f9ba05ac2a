"""DatasetFetcher's errors: demo data without credentials, legacy credentials refused, each
download failure (HTTP status, network, full disk) mapped to an error that says what to do,
and the Kaggle key never printed or raised."""

from __future__ import annotations

import errno
import socket
import sys
import types
from pathlib import Path

import pytest
import requests

from carvana.data.sources import kaggle_client
from carvana.data.sources.fetcher import DatasetFetcher
from carvana.data.sources.kaggle_client import (
    DiskFullError,
    KaggleCredentialsError,
    KaggleNetworkError,
    KaggleNotFoundError,
    KaggleRulesNotAcceptedError,
)
from carvana.data.layout import COMPETITION
from fetcher_helpers import FakeApi, competition_zips, make_folder
from fetcher_helpers import fixture_no_creds, fixture_no_mount  # noqa: F401 (fixtures; no_mount is autouse)
from test_kaggle_client import assert_no_secret_anywhere

SECRET = "s3cr3t-kaggle-key-0123456789"


def http_error(status: int, text: str = "") -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(text or f"{status} Client Error: for url https://www.kaggle.com/api/v1", response=response)


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
