"""Kaggle credentials: where they come from, and scrubbing their values out of messages.

Credentials are looked up the way kaggle 2.x does (access token, then legacy
username/key, then ``kaggle auth login`` OAuth files), but only *where* they
come from is ever reported: key values are never printed, and every message
built from a foreign exception is passed through :func:`redact` first.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from carvana.data.secrets import redact, register_secret_source

TOKEN_URL = "https://www.kaggle.com/settings"
HOW_TO_CONFIGURE = (
    "Create an API token at https://www.kaggle.com/settings (API -> Create New Token), then either "
    "save the downloaded kaggle.json as ~/.kaggle/kaggle.json (chmod 600), or set "
    "KAGGLE_USERNAME and KAGGLE_KEY, or set KAGGLE_API_TOKEN."
)


class KaggleError(RuntimeError):
    """A Kaggle operation failed; the message says what to do about it."""


class KaggleCredentialsError(KaggleError):
    """Credentials are missing, malformed, outdated or rejected (HTTP 401)."""


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
        problem = type(exc).__name__
    else:
        if not isinstance(data, dict):
            raise KaggleCredentialsError(f"{path}: expected a JSON object with 'username' and 'key'")
        return data
    # Raised outside the except block: the parse error (its message or its .doc) may hold the
    # file's content, i.e. the key, and must not end up as this error's __context__.
    raise KaggleCredentialsError(
        f"{path}: cannot read Kaggle credentials ({problem}); it must be the JSON "
        f'file {{"username": ..., "key": ...}} downloaded from {TOKEN_URL}'
    )


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
        raise KaggleCredentialsError(f"Incomplete Kaggle credentials in {where}: the {missing} is missing. {HOW_TO_CONFIGURE}")
    return None


def _secret_values() -> list[str]:
    """The Kaggle credential values kept in files (the environment's are secrets.py's own)."""
    values = []
    token_env = os.environ.get("KAGGLE_API_TOKEN")
    if token_env and Path(token_env).exists():
        values.append(_read_text(Path(token_env)))
    values += [_read_text(_home_kaggle_dir() / n) for n in ("access_token", "access_token.txt")]
    with contextlib.suppress(KaggleCredentialsError):
        config = _config_dir() / "kaggle.json"
        if config.is_file():
            values.append(str(_read_kaggle_json(config).get("key") or ""))
    return [v for v in values if v]


register_secret_source(_secret_values)


class RedactedError(Exception):
    """Stands in for a foreign exception in a chain: its type and redacted message, nothing else."""


def redacted_chain(exc: BaseException) -> RedactedError:
    """A copy of ``exc`` and its causes/contexts as RedactedErrors, messages passed through redact().

    Attach it as the ``__cause__`` of an error raised *outside* the except block, so the
    original exceptions (whose messages, URLs or attributes may hold a key) are not
    reachable from what leaves our code, while the traceback still says what happened.
    """
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and len(chain) < 10:
        chain.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    copies = [RedactedError(redact(f"{type(err).__module__}.{type(err).__qualname__}: {err}")) for err in chain]
    for copy, cause in zip(copies, copies[1:]):
        copy.__cause__ = cause
    return copies[0]
