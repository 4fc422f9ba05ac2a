"""Everything that touches the official ``kaggle`` package (2.2.4).

Credentials are looked up the way kaggle 2.x does (access token, then legacy
username/key, then ``kaggle auth login`` OAuth files), but only *where* they
come from is ever reported: key values are never printed, and every message
built from a foreign exception is passed through :func:`redact` first.

HTTP errors surface from kaggle 2.2.4 (via kagglesdk) as
``requests.HTTPError`` whose ``.response.status_code`` holds the status; older
clients raised ``ApiException`` with ``.status``. Both shapes are handled.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import importlib.util
import io
import json
import os
import re
import socket
import sys
import types
from pathlib import Path
from typing import Any

from carvana.data.layout import COMPETITION

TOKEN_URL = "https://www.kaggle.com/settings"
_HOW_TO_CONFIGURE = (
    "Create an API token at https://www.kaggle.com/settings (API -> Create New Token), then either "
    "save the downloaded kaggle.json as ~/.kaggle/kaggle.json (chmod 600), or set "
    "KAGGLE_USERNAME and KAGGLE_KEY, or set KAGGLE_API_TOKEN."
)


class KaggleError(RuntimeError):
    """A Kaggle operation failed; the message says what to do about it."""


class KaggleCredentialsError(KaggleError):
    """Credentials are missing, malformed, outdated or rejected (HTTP 401)."""


class KaggleRulesNotAcceptedError(KaggleError):
    """HTTP 403: the competition rules have not been accepted by this account."""


class KaggleNotFoundError(KaggleError):
    """HTTP 404: the competition or file does not exist."""


class KaggleNetworkError(KaggleError):
    """Kaggle could not be reached (no connection, DNS failure, timeout)."""


class DiskFullError(KaggleError):
    """The disk filled up (ENOSPC) while writing a file."""


def rules_url(competition: str = COMPETITION) -> str:
    """The page where the competition rules are accepted."""
    return f"https://www.kaggle.com/competitions/{competition}/rules"


# --------------------------------------------------------------------------- credentials


def _home_kaggle_dir() -> Path:
    # kagglesdk reads access_token / credentials.json from ~/.kaggle regardless of KAGGLE_CONFIG_DIR.
    return Path(os.path.expanduser("~")) / ".kaggle"


def _config_dir() -> Path:
    """The folder kaggle 2.2.4 reads kaggle.json from (mirrors KaggleApi.config_dir)."""
    configured = os.environ.get("KAGGLE_CONFIG_DIR")
    if configured:
        return Path(configured).expanduser()
    home_dir = _home_kaggle_dir()
    if sys.platform.startswith("linux") and not home_dir.exists():
        xdg = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
        return Path(xdg) / "kaggle"
    return home_dir


def _read_text(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text or None


def _access_token_source() -> str | None:
    token = os.environ.get("KAGGLE_API_TOKEN")
    if token:
        if Path(token).exists():
            return f"file named by KAGGLE_API_TOKEN ({token})"  # a path, not the token itself
        return "KAGGLE_API_TOKEN environment variable"
    for name in ("access_token", "access_token.txt"):
        path = _home_kaggle_dir() / name
        if _read_text(path):
            return f"{path} (access token file)"
    return None


def _read_kaggle_json(path: Path) -> dict[str, Any]:
    """Parse kaggle.json, raising KaggleCredentialsError naming the file when it is malformed."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise KaggleCredentialsError(
            f"{path}: cannot read Kaggle credentials ({type(exc).__name__}); it must be the JSON "
            f'file {{"username": ..., "key": ...}} downloaded from {TOKEN_URL}'
        ) from None  # `from None`: the parse error may quote the file's content (the key)
    if not isinstance(data, dict):
        raise KaggleCredentialsError(f"{path}: expected a JSON object with 'username' and 'key'")
    return data


def find_credentials() -> str | None:
    """Describe where Kaggle credentials come from, or None when none are configured.

    Returns a description such as ``"KAGGLE_USERNAME/KAGGLE_KEY environment variables"`` or a
    file path -- never a key. Raises KaggleCredentialsError for configurations that cannot work:
    only the retired ``KAGGLE_USER``/``KAGGLE_PASSWD`` variables, half of a username/key pair,
    or a malformed kaggle.json.
    """
    token_source = _access_token_source()
    if token_source:
        return token_source

    env_user, env_key = os.environ.get("KAGGLE_USERNAME"), os.environ.get("KAGGLE_KEY")
    if env_user and env_key:
        return "KAGGLE_USERNAME/KAGGLE_KEY environment variables"
    config = _config_dir() / "kaggle.json"
    file_values: dict[str, Any] = _read_kaggle_json(config) if config.is_file() else {}
    user = env_user or file_values.get("username")
    key = env_key or file_values.get("key")
    if user and key:
        if env_user or env_key:  # kaggle merges the environment over the file
            return f"{config} + KAGGLE_{'USERNAME' if env_user else 'KEY'} environment variable"
        return str(config)

    oauth = _home_kaggle_dir() / "credentials.json"
    if oauth.is_file():
        return f"{oauth} (kaggle auth login)"

    if os.environ.get("KAGGLE_USER") or os.environ.get("KAGGLE_PASSWD"):
        raise KaggleCredentialsError(
            "KAGGLE_USER/KAGGLE_PASSWD (account login and password) are no longer supported: the "
            "Kaggle API only accepts API tokens. Set KAGGLE_USERNAME + KAGGLE_KEY (API token from "
            f"{TOKEN_URL}) or save the token as ~/.kaggle/kaggle.json instead, and unset "
            "KAGGLE_USER/KAGGLE_PASSWD."
        )
    if user or key:
        where = "KAGGLE_USERNAME/KAGGLE_KEY" if (env_user or env_key) else str(config)
        missing = "key (KAGGLE_KEY)" if user else "username (KAGGLE_USERNAME)"
        raise KaggleCredentialsError(f"Incomplete Kaggle credentials in {where}: the {missing} is missing. {_HOW_TO_CONFIGURE}")
    return None


def _secret_values() -> list[str]:
    """Every credential value visible to this process, so messages can be scrubbed of them."""
    values = [os.environ.get(name) for name in ("KAGGLE_KEY", "KAGGLE_API_TOKEN", "KAGGLE_PASSWD")]
    token_env = os.environ.get("KAGGLE_API_TOKEN")
    if token_env and Path(token_env).exists():
        values.append(_read_text(Path(token_env)))
    values += [_read_text(_home_kaggle_dir() / n) for n in ("access_token", "access_token.txt")]
    with contextlib.suppress(KaggleCredentialsError):
        config = _config_dir() / "kaggle.json"
        if config.is_file():
            values.append(str(_read_kaggle_json(config).get("key") or ""))
    return [v for v in values if v and len(v) >= 4]


def redact(text: str) -> str:
    """Remove credential values, URL query strings (signed tokens) and auth headers from text."""
    for secret in _secret_values():
        text = text.replace(secret, "***")
    text = re.sub(r"(https?://[^\s?#'\"]+)\?[^\s'\"]*", r"\1?<redacted>", text)
    return re.sub(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+", r"\1 ***", text)


# --------------------------------------------------------------------------- API object


def _load_kaggle_api_class() -> type:
    """Import KaggleApi without running ``kaggle/__init__.py``.

    That __init__ authenticates at import time (network calls, help text printed on stdout),
    so a stand-in parent package is registered just for this import. Afterwards every
    ``kaggle.*`` module loaded under it is dropped again, so that a later plain ``import kaggle``
    elsewhere loads the real package as usual; the class returned keeps working regardless.
    """
    if "kaggle" in sys.modules:  # already imported for real by someone else: nothing to avoid
        return _import_extended().KaggleApi
    spec = importlib.util.find_spec("kaggle")  # locates the package without executing it
    if spec is None or not spec.submodule_search_locations:
        raise KaggleError("The 'kaggle' package is not installed: pip install -r requirements.txt")
    before = set(sys.modules)
    stub = types.ModuleType("kaggle")
    stub.__path__ = list(spec.submodule_search_locations)
    sys.modules["kaggle"] = stub
    try:
        return _import_extended().KaggleApi
    finally:
        for name in set(sys.modules) - before:
            if name == "kaggle" or name.startswith("kaggle."):
                del sys.modules[name]
        sys.modules.pop("kaggle", None)


def _import_extended() -> types.ModuleType:
    try:
        return importlib.import_module("kaggle.api.kaggle_api_extended")
    except (ImportError, OSError) as exc:
        hint = f" && pip install {exc.name}" if isinstance(exc, ImportError) and exc.name else ""
        raise KaggleError(
            f"The 'kaggle' package could not be imported ({type(exc).__name__}: {exc}); "
            f"repair the environment, e.g. pip install -r requirements.txt{hint}"
        ) from exc


def make_api() -> Any:
    """Return an authenticated ``KaggleApi``; raise KaggleCredentialsError with instructions if that fails."""
    source = find_credentials()
    if source is None:
        raise KaggleCredentialsError(f"No Kaggle credentials found. {_HOW_TO_CONFIGURE}")
    api = _load_kaggle_api_class()()
    captured = io.StringIO()
    try:
        # Captured because authenticate() prints its own help and then calls exit(1).
        with contextlib.redirect_stdout(captured):
            api.authenticate()
    except SystemExit:
        raise KaggleCredentialsError(
            f"Kaggle did not accept the credentials from {source} (invalid or expired token?). "
            f"{_HOW_TO_CONFIGURE}"
        ) from None
    except Exception as exc:
        raise explain_kaggle_error(exc, "authenticating with Kaggle") from exc
    if captured.getvalue().strip():  # e.g. the "key readable by other users" warning is worth keeping
        print(redact(captured.getvalue().rstrip()))
    return api


# --------------------------------------------------------------------------- errors


def _causes(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and len(chain) < 10:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status of an error from requests/kagglesdk (``.response.status_code``) or ApiException (``.status``)."""
    for err in _causes(exc):
        response = getattr(err, "response", None)
        for value in (getattr(response, "status_code", None), getattr(response, "status", None),
                      getattr(err, "status", None), getattr(err, "status_code", None)):
            if isinstance(value, int) and 100 <= value <= 599:
                return value
        # An HTTPError raised without a response still carries "403 Client Error: ..." in its text.
        if "HTTP" in type(err).__name__ or "Api" in type(err).__name__:
            match = re.search(r"\b([45]\d\d)\b", str(err))
            if match:
                return int(match.group(1))
    return None


def _network_error_types() -> tuple[type[BaseException], ...]:
    types_: list[type[BaseException]] = [socket.gaierror, TimeoutError, ConnectionError]
    with contextlib.suppress(ImportError):
        import requests

        types_ += [requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                   requests.exceptions.ChunkedEncodingError]
    with contextlib.suppress(ImportError):
        import urllib3.exceptions

        types_ += [urllib3.exceptions.NewConnectionError, urllib3.exceptions.MaxRetryError,
                   urllib3.exceptions.ProtocolError, urllib3.exceptions.TimeoutError]
    return tuple(types_)


def explain_kaggle_error(
    exc: BaseException, action: str, competition: str = COMPETITION, *, path: str | Path | None = None
) -> KaggleError:
    """Map an exception raised while doing ``action`` to a KaggleError whose message says what to do.

    ``path`` names the file being written, for disk-full errors (defaults to ``exc.filename``).
    The result is meant to be raised ``from exc``.
    """
    if isinstance(exc, KaggleError):
        return exc
    detail = redact(f"{type(exc).__name__}: {exc}")
    chain = _causes(exc)
    for err in chain:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            target = path or err.filename or "a file"
            return DiskFullError(
                f"Disk full while writing {target} ({action}): free space and rerun; completed files are kept."
            )
    status = _http_status(exc)
    if status == 401:
        try:
            where = find_credentials() or "nowhere"
        except KaggleCredentialsError:
            where = "an unusable configuration"
        return KaggleCredentialsError(
            f"Kaggle rejected the API key (HTTP 401) while {action}; credentials came from {where}. "
            f"The token is wrong, expired or revoked: regenerate it. {_HOW_TO_CONFIGURE}"
        )
    if status == 403:
        return KaggleRulesNotAcceptedError(
            f"Kaggle refused access (HTTP 403) while {action}: this account has not accepted the "
            f"rules of '{competition}'. Open {rules_url(competition)}, click \"I Understand and "
            "Accept\", then rerun."
        )
    if status == 404:
        return KaggleNotFoundError(
            f"Not found (HTTP 404) while {action}: check the competition slug '{competition}' and "
            f"the file name against https://www.kaggle.com/competitions/{competition}/data. ({detail})"
        )
    if status == 429:
        return KaggleError(f"Kaggle rate-limited the request (HTTP 429) while {action}: wait a few minutes and rerun.")
    if status is not None and status >= 500:
        return KaggleError(f"Kaggle server error (HTTP {status}) while {action}: retry later. ({detail})")
    network = _network_error_types()
    if status is None and any(isinstance(err, network) for err in chain):
        return KaggleNetworkError(
            f"No network: could not reach Kaggle while {action} ({detail}). Check the connection and "
            "rerun, or run without credentials to use the demo dataset, or pass --data-dir with a "
            "folder that already holds the Carvana data."
        )
    return KaggleError(f"Kaggle error while {action}: {detail}")


# --------------------------------------------------------------------------- submit


def submit(path: str | Path, message: str, competition: str = COMPETITION, api: Any = None) -> Any:
    """Upload a submission file; return Kaggle's response. Errors become KaggleError subclasses."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: submission file not found")
    api = api if api is not None else make_api()
    action = f"submitting {path} to {competition}"
    try:
        response = api.competition_submit(str(path), message, competition)
    except Exception as exc:
        raise explain_kaggle_error(exc, action, competition, path=path) from exc
    # kaggle reports a failed upload through the response message instead of raising.
    reply = str(getattr(response, "message", "") or "")
    if reply.startswith("Could not submit"):
        raise KaggleError(f"Upload failed while {action}: {redact(reply)}; rerun to retry.")
    return response
