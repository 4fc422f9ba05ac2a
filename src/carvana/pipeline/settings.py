"""Command-line overrides for the hyperparameters at the top of main.py.

Every UPPER_CASE setting ``FOO_BAR = default`` becomes ``--foo-bar VALUE`` with the
default's type (booleans become ``--foo-bar`` / ``--no-foo-bar``). Unknown flags and
values of the wrong type are errors, as argparse reports them.
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace
from typing import Any, Sequence


def settings_from(namespace: dict[str, Any]) -> dict[str, Any]:
    """The UPPER_CASE plain values (bool/int/float/str) of a module's globals, in order."""
    return {
        k: v
        for k, v in namespace.items()
        if k.isupper() and not k.startswith("_") and isinstance(v, (bool, int, float, str))
    }


def _typed(kind: type):
    def convert(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None

    return convert


def parse_settings(
    defaults: dict[str, Any],
    argv: Sequence[str] | None = None,
    help_text: dict[str, str] | None = None,
    description: str = "",
) -> SimpleNamespace:
    """Parse ``argv`` against ``defaults``; returns lower_case attributes (``hp.batch_size``)."""
    # allow_abbrev=False: "--epoch" must not silently mean "--epochs".
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False
    )
    help_text = help_text or {}
    for name, default in defaults.items():
        flag = "--" + name.lower().replace("_", "-")
        doc = help_text.get(name, " ")
        if isinstance(default, bool):
            parser.add_argument(flag, default=default, action=argparse.BooleanOptionalAction, help=doc)
        else:
            parser.add_argument(flag, default=default, type=_typed(type(default)), help=doc, metavar=type(default).__name__.upper())
    args = parser.parse_args(argv)
    return SimpleNamespace(**vars(args))


def comments_of(source: str) -> dict[str, str]:
    """Trailing ``# comment`` of each ``NAME = value  # comment`` line, for --help."""
    out = {}
    for line in source.splitlines():
        head, sep, comment = line.partition("#")
        name = head.split("=")[0].strip()
        if sep and "=" in head and name.isupper():
            out[name] = comment.strip()
    return out


def changed_settings(hp: SimpleNamespace, defaults: dict[str, Any]) -> dict[str, Any]:
    """The settings whose value differs from ``defaults`` (i.e. given on the command line), lower_case."""
    return {name.lower(): getattr(hp, name.lower()) for name, default in defaults.items()
            if hasattr(hp, name.lower()) and getattr(hp, name.lower()) != default}
