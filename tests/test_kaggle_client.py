"""kaggle_client: where credentials come from, API construction, error mapping, submit."""

from __future__ import annotations

import errno
import json
import sys
from types import SimpleNamespace

import pytest
import requests

from carvana.data.sources import kaggle_client as kc
from carvana.data.layout import COMPETITION

SECRET = "0123456789abcdef-very-secret"


@pytest.fixture
def home(kaggle_home):
    """No Kaggle credentials visible (see conftest.kaggle_home)."""
    return kaggle_home


def test_no_credentials(home):
    assert kc.find_credentials() is None
    with pytest.raises(kc.KaggleCredentialsError, match="kaggle.json"):
        kc.make_api()


def test_env_pair(home, monkeypatch):
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", SECRET)
    assert kc.find_credentials() == "KAGGLE_USERNAME/KAGGLE_KEY environment variables"


def test_kaggle_json_honours_config_dir(home, monkeypatch, tmp_path):
    (home / ".kaggle" / "kaggle.json").write_text(json.dumps({"username": "a", "key": SECRET}))
    assert kc.find_credentials() == str(home / ".kaggle" / "kaggle.json")
    other = tmp_path / "cfg"
    other.mkdir()
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(other))
    assert kc.find_credentials() is None  # ~/.kaggle/kaggle.json is no longer where kaggle looks
    (other / "kaggle.json").write_text(json.dumps({"username": "a", "key": SECRET}))
    assert kc.find_credentials() == str(other / "kaggle.json")


def test_access_tokens(home, monkeypatch):
    (home / ".kaggle" / "access_token").write_text(SECRET + "\n")
    assert "access_token" in kc.find_credentials()
    monkeypatch.setenv("KAGGLE_API_TOKEN", SECRET)
    assert kc.find_credentials() == "KAGGLE_API_TOKEN environment variable"


def test_bad_configurations_are_explained(home, monkeypatch):
    config = home / ".kaggle" / "kaggle.json"
    config.write_text('{"username": "a", "key": "' + SECRET)  # truncated JSON
    with pytest.raises(kc.KaggleCredentialsError) as info:
        kc.find_credentials()
    assert str(config) in str(info.value) and SECRET not in str(info.value)
    config.write_text(json.dumps({"username": "a"}))
    with pytest.raises(kc.KaggleCredentialsError, match="key"):
        kc.find_credentials()
    config.unlink()
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    with pytest.raises(kc.KaggleCredentialsError, match="KAGGLE_KEY"):
        kc.find_credentials()


def test_legacy_variables_rejected(home, monkeypatch):
    monkeypatch.setenv("KAGGLE_USER", "alice")
    monkeypatch.setenv("KAGGLE_PASSWD", SECRET)
    with pytest.raises(kc.KaggleCredentialsError) as info:
        kc.make_api()
    assert "no longer supported" in str(info.value) and "KAGGLE_USERNAME + KAGGLE_KEY" in str(info.value)
    assert SECRET not in str(info.value)
    # Modern credentials next to the old variables win.
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", SECRET)
    assert kc.find_credentials() is not None


class FakeKaggleApi:
    mode = "ok"

    def authenticate(self):
        if self.mode == "exit":
            print("Authentication required ...")  # what kaggle prints before exit(1)
            sys.exit(1)
        if self.mode == "offline":
            raise requests.exceptions.ConnectionError("Max retries exceeded")


@pytest.mark.parametrize("mode, error", [("ok", None), ("exit", kc.KaggleCredentialsError),
                                         ("offline", kc.KaggleNetworkError)])
def test_make_api_turns_exit_into_error(home, monkeypatch, capsys, mode, error):
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", SECRET)
    monkeypatch.setattr(FakeKaggleApi, "mode", mode)
    monkeypatch.setattr(kc, "_load_kaggle_api_class", lambda: FakeKaggleApi)
    if error is None:
        assert isinstance(kc.make_api(), FakeKaggleApi)
    else:
        with pytest.raises(error) as info:
            kc.make_api()
        assert "KAGGLE_USERNAME" in str(info.value) or "No network" in str(info.value)
    assert "Authentication required" not in capsys.readouterr().out


def test_loading_kaggle_never_runs_its_init(home, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "cfg"))  # its class body creates this folder
    saved = {n: sys.modules.pop(n) for n in list(sys.modules) if n == "kaggle" or n.startswith("kaggle.")}
    try:
        try:
            cls = kc._load_kaggle_api_class()
        except kc.KaggleError as exc:  # a broken install (e.g. kaggle 2.2.4 without 'six') is explained
            assert "pip install" in str(exc)
        else:
            assert cls.__name__ == "KaggleApi" and callable(cls.authenticate)
        # kaggle/__init__ (which authenticates and prints) never ran, and nothing half-loaded is left.
        assert capsys.readouterr().out == ""
        assert not [n for n in sys.modules if n == "kaggle" or n.startswith("kaggle.")]
    finally:
        sys.modules.update(saved)


def _http(status: int) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(f"{status} Client Error", response=response)


def test_explain_shapes(home, monkeypatch):
    assert isinstance(kc.explain_kaggle_error(_http(401), "x"), kc.KaggleCredentialsError)
    rules = kc.explain_kaggle_error(_http(403), "downloading train.zip", "some-comp")
    assert "https://www.kaggle.com/competitions/some-comp/rules" in str(rules)
    # Status only in the text (HTTPError raised without a response), and wrapped in another error.
    assert isinstance(kc.explain_kaggle_error(requests.HTTPError("403 Client Error: Forbidden"), "x"),
                      kc.KaggleRulesNotAcceptedError)
    try:
        try:
            raise _http(404)
        except requests.HTTPError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert isinstance(kc.explain_kaggle_error(outer, "x"), kc.KaggleNotFoundError)
    full = kc.explain_kaggle_error(OSError(errno.ENOSPC, "No space left", "/data/x.zip"), "downloading x.zip")
    assert isinstance(full, kc.DiskFullError) and "/data/x.zip" in str(full) and "completed files are kept" in str(full)
    other = kc.explain_kaggle_error(ValueError("odd"), "doing y")
    assert type(other) is kc.KaggleError and "doing y" in str(other) and "odd" in str(other)


def test_redact_removes_all_secret_shapes(home, monkeypatch):
    monkeypatch.setenv("KAGGLE_KEY", SECRET)
    (home / ".kaggle" / "access_token").write_text("tok-from-file-42")
    text = kc.redact(f"key={SECRET} url=https://storage.googleapis.com/f.zip?X-Goog-Signature=abc "
                     "Authorization: Bearer tok.abc tok-from-file-42")
    assert SECRET not in text and "X-Goog-Signature" not in text and "tok.abc" not in text
    assert "tok-from-file-42" not in text and "https://storage.googleapis.com/f.zip" in text


class FakeSubmitApi:
    def __init__(self, outcome=None, message="Successfully submitted"):
        self.outcome, self.message, self.calls = outcome, message, []

    def competition_submit(self, file_name, message, competition):
        self.calls.append((file_name, message, competition))
        if self.outcome is not None:
            raise self.outcome
        return SimpleNamespace(message=self.message)


def test_submit(tmp_path, home):
    sub = tmp_path / "submit.csv.gz"
    sub.write_bytes(b"data")
    api = FakeSubmitApi()
    assert kc.submit(sub, "first try", api=api).message == "Successfully submitted"
    assert api.calls == [(str(sub), "first try", COMPETITION)]
    with pytest.raises(kc.KaggleRulesNotAcceptedError, match="I Understand and Accept"):
        kc.submit(sub, "m", api=FakeSubmitApi(_http(403)))
    with pytest.raises(kc.KaggleError, match="Upload failed"):
        kc.submit(sub, "m", api=FakeSubmitApi(message="Could not submit to competition"))
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        kc.submit(tmp_path / "missing.csv", "m", api=FakeSubmitApi())


def assert_no_secret_anywhere(exc: BaseException, secret: str) -> None:
    """Neither the message, nor any __cause__/__context__, nor the printed traceback holds the secret."""
    import traceback

    seen, todo = [], [exc]
    while todo:
        err = todo.pop()
        if err is None or any(err is s for s in seen):
            continue
        seen.append(err)
        assert secret not in str(err) and secret not in repr(err.args), f"{type(err).__name__}: {err}"
        todo += [err.__cause__, err.__context__]
    assert secret not in "".join(traceback.format_exception(exc))


class LeakyKaggleApi:
    """A kaggle API whose every call fails with an error quoting the key (as a bad URL would)."""

    def __init__(self, secret):
        self.secret = secret

    def _fail(self):
        try:
            raise ValueError(f"bad request https://www.kaggle.com/api/v1?key={self.secret} key {self.secret}")
        except ValueError as inner:
            raise requests.exceptions.ConnectionError(f"connection to kaggle with key {self.secret} failed") from inner

    def authenticate(self):
        self._fail()

    def competition_submit(self, *args):
        self._fail()


def test_no_exception_leaving_the_client_carries_the_key(home, monkeypatch, tmp_path):
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", SECRET)
    monkeypatch.setattr(kc, "_load_kaggle_api_class", lambda: lambda: LeakyKaggleApi(SECRET))
    with pytest.raises(kc.KaggleNetworkError) as info:
        kc.make_api()
    assert_no_secret_anywhere(info.value, SECRET)
    assert "ConnectionError" in "".join(__import__("traceback").format_exception(info.value))  # still says what

    sub = tmp_path / "submit.csv.gz"
    sub.write_bytes(b"data")
    with pytest.raises(kc.KaggleError) as info:
        kc.submit(sub, "m", api=LeakyKaggleApi(SECRET))
    assert_no_secret_anywhere(info.value, SECRET)


def test_a_malformed_kaggle_json_error_does_not_carry_its_content(home):
    (home / ".kaggle" / "kaggle.json").write_text('{"username": "alice", "key": "' + SECRET + '" oops')
    with pytest.raises(kc.KaggleCredentialsError) as info:
        kc.find_credentials()
    assert "kaggle.json" in str(info.value)
    assert_no_secret_anywhere(info.value, SECRET)
    assert info.value.__context__ is None
