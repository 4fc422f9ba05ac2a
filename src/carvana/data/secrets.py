"""Secrets: the one ``redact`` every message, record, checkpoint and recipe goes through.

What counts as a secret:
* a URL's password (``postgresql://me:PASSWORD@host/db``), also with an empty user
  (``postgresql://:PASSWORD@host``) and with ``@`` inside the password (it runs to the last
  ``@`` before the host);
* an HTTP URL's query string (signed download tokens);
* ``Bearer`` / ``Basic`` authorization values;
* every credential value this process can see: the environment variables below, and the
  values of sources registered by the modules that know where their credentials live
  (:mod:`carvana.data.sources.kaggle_credentials` registers kaggle.json and the token files).
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

SECRET_ENVIRONMENT = ("KAGGLE_KEY", "KAGGLE_API_TOKEN", "KAGGLE_PASSWD", "PGPASSWORD")
MASK = "***"
_SOURCES: list[Callable[[], Iterable[str]]] = []
# scheme://[user]:password@host... : the password is greedy up to the last "@" of the token, so
# an unencoded "@" inside it is hidden too; the user part may be empty.
_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^:@/\s'\"]*:)[^\s'\"]*@(?P<host>[^@\s'\"/]*)")
_QUERY = re.compile(r"(https?://[^\s?#'\"]+)\?[^\s'\"]*")
_AUTH = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+")


def register_secret_source(source: Callable[[], Iterable[str]]) -> None:
    """Add a function that returns credential values to scrub (called at each redact)."""
    if source not in _SOURCES:
        _SOURCES.append(source)


def secret_values() -> list[str]:
    """Every credential value visible to this process (4 characters or more)."""
    import os

    values = [os.environ.get(name) or "" for name in SECRET_ENVIRONMENT]
    for source in _SOURCES:
        values += list(source())
    return sorted({v for v in values if v and len(v) >= 4}, key=len, reverse=True)  # longest first


def redact(text: str) -> str:
    """``text`` with every secret replaced by ``***``: what may be printed, logged or stored."""
    for secret in secret_values():
        text = text.replace(secret, MASK)
    text = _URL_PASSWORD.sub(lambda m: f"{m['head']}{MASK}@{m['host']}", text)
    text = _QUERY.sub(r"\1?<redacted>", text)
    return _AUTH.sub(rf"\1 {MASK}", text)


def without_password(url: str) -> str:
    """``url`` with its password left out (``postgresql://me@host/db``): a URL that still works
    where the password comes from elsewhere (libpq's ``PGPASSWORD`` or ``~/.pgpass``)."""
    return _URL_PASSWORD.sub(lambda m: f"{m['head'][:-1]}@{m['host']}", url).replace("://@", "://")


def has_password(url: str) -> bool:
    return bool(_URL_PASSWORD.search(url))


def redact_value(value):
    """A setting's value as it may be stored: strings redacted, anything else as it is."""
    return redact(value) if isinstance(value, str) else value
