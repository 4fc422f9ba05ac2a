"""Everything that touches the official ``kaggle`` package (2.2.4): the API object, errors, submit.

Where credentials come from, and scrubbing them out of messages (:func:`redact`), is in
``carvana.data.sources.kaggle_credentials``; its names are re-exported here.

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
import re
import socket
import sys
import types
from pathlib import Path
from typing import Any

from carvana.data.sources.kaggle_credentials import (  # noqa: F401  (re-exported)
    HOW_TO_CONFIGURE,
    TOKEN_URL,
    KaggleCredentialsError,
    KaggleError,
    find_credentials,
    redact,
    redacted_chain,
)
from carvana.data.layout import COMPETITION

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
        raise KaggleCredentialsError(f"No Kaggle credentials found. {HOW_TO_CONFIGURE}")
    api = _load_kaggle_api_class()()
    captured = io.StringIO()
    failure: KaggleError | None = None
    try:
        # Captured because authenticate() prints its own help and then calls exit(1).
        with contextlib.redirect_stdout(captured):
            api.authenticate()
    except SystemExit:
        failure = KaggleCredentialsError(
            f"Kaggle did not accept the credentials from {source} (invalid or expired token?). "
            f"{HOW_TO_CONFIGURE}"
        )
    except Exception as exc:
        failure = clean_kaggle_error(exc, "authenticating with Kaggle")
    if failure is not None:  # raised here, not in the except block: see clean_kaggle_error
        raise failure
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
    The result's message is redacted, but ``exc`` may still hold a key: raise
    :func:`clean_kaggle_error`'s result instead, outside the except block.
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
            f"The token is wrong, expired or revoked: regenerate it. {HOW_TO_CONFIGURE}"
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


def clean_kaggle_error(
    exc: BaseException, action: str, competition: str = COMPETITION, *, path: str | Path | None = None
) -> KaggleError:
    """:func:`explain_kaggle_error` with a redacted copy of ``exc``'s chain as its cause.

    Raise the result *after* the except block that caught ``exc`` (an exception raised inside
    one gets the handled exception as ``__context__``, key and all):

        failure = None
        try: ...
        except Exception as exc: failure = clean_kaggle_error(exc, "doing X")
        if failure is not None: raise failure
    """
    error = explain_kaggle_error(exc, action, competition, path=path)
    if error is not exc:  # our own errors are built from redacted text already
        error.__cause__ = redacted_chain(exc)
    return error


# --------------------------------------------------------------------------- submit


def submit(path: str | Path, message: str, competition: str = COMPETITION, api: Any = None) -> Any:
    """Upload a submission file; return Kaggle's response. Errors become KaggleError subclasses."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: submission file not found")
    api = api if api is not None else make_api()
    action = f"submitting {path} to {competition}"
    failure: KaggleError | None = None
    try:
        response = api.competition_submit(str(path), message, competition)
    except Exception as exc:
        failure = clean_kaggle_error(exc, action, competition, path=path)
    if failure is not None:  # outside the except block: nothing unredacted in the chain
        raise failure
    # kaggle reports a failed upload through the response message instead of raising.
    reply = str(getattr(response, "message", "") or "")
    if reply.startswith("Could not submit"):
        raise KaggleError(f"Upload failed while {action}: {redact(reply)}; rerun to retry.")
    return response
