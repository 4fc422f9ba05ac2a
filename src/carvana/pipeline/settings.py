"""main.py's settings: command-line flags, TOML recipe files, and what a run records.

Every UPPER_CASE setting ``FOO_BAR = default`` at the top of main.py becomes ``--foo-bar
VALUE`` with the default's type (booleans become ``--foo-bar`` / ``--no-foo-bar``).
``--config FILE.toml`` (timm's ``-c``) reads a recipe whose keys are those setting names
(``epochs = 8`` or ``EPOCHS = 8``) and sets the parser's defaults from it, so flags on the
command line still win. Unknown keys and values of the wrong type are one-line errors
naming the file and the key; nothing in a recipe is executed.
"""

from __future__ import annotations

import argparse
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence


class RecipeError(ValueError):
    """A recipe file that cannot be used, with the file and key named."""


@dataclass
class Command:
    """What ``python main.py ...`` asked for."""

    hp: SimpleNamespace  # every setting, lower_case (hp.batch_size)
    given: dict[str, str] = field(default_factory=dict)  # setting -> where it was given: "command line" or the recipe
    recipe: dict[str, str] | None = None  # {"file": path, "contents": text} of --config
    trial_of: str = ""  # the study, when this command is one of its trials


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


def flag_of(name: str) -> str:
    """``batch_size`` or ``BATCH_SIZE`` -> ``--batch-size``."""
    return "--" + name.lower().replace("_", "-")


def _parser(defaults: dict[str, Any], help_text: dict[str, str], description: str, default: Any) -> argparse.ArgumentParser:
    # allow_abbrev=False: "--epoch" must not silently mean "--epochs".
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--config", "-c", metavar="FILE.toml", default="",
                        help="a recipe file of settings (flags given here override it); see configs/")
    for name, value in defaults.items():
        doc = help_text.get(name, " ")
        shown = value if default is None else default
        if isinstance(value, bool):
            parser.add_argument(flag_of(name), default=shown, action=argparse.BooleanOptionalAction, help=doc)
        else:
            parser.add_argument(flag_of(name), default=shown, type=_typed(type(value)), help=doc,
                                metavar=type(value).__name__.upper())
    return parser


def read_recipe(path: Path, defaults: dict[str, Any]) -> dict[str, Any]:
    """A recipe's settings, keyed like ``defaults`` (UPPER_CASE), each checked for type."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read the recipe ({exc.strerror or exc})") from None
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path}: not valid TOML ({exc})") from None
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = key.upper().replace("-", "_")
        if name not in defaults:
            raise RecipeError(f"{path}: unknown setting {key!r} (settings are main.py's names, e.g. 'epochs')")
        out[name] = _checked(path, key, value, defaults[name])
    return out


def _checked(path: Path, key: str, value: Any, default: Any) -> Any:
    """``value`` as the type of ``default`` (an int is a float too), or RecipeError."""
    kind = type(default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not kind:
        raise RecipeError(f"{path}: {key!r} must be {'a' if kind is not int else 'an'} {kind.__name__} like "
                          f"{default!r}, got {value!r}")
    return value


def parse_command(defaults: dict[str, Any], argv: Sequence[str] | None = None,
                  help_text: dict[str, str] | None = None, description: str = "") -> Command:
    """Parse ``argv`` (and its ``--config`` recipe) against main.py's ``defaults``."""
    help_text = help_text or {}
    # First pass with every default suppressed: what is left was typed on the command line.
    typed = _parser(defaults, help_text, description, argparse.SUPPRESS).parse_args(argv)
    typed_names = {k.upper() for k in vars(typed) if k != "config"}
    parser = _parser(defaults, help_text, description, None)
    recipe, given = None, {name.lower(): "command line" for name in typed_names}
    config = getattr(typed, "config", "")
    if config:
        values = read_recipe(Path(config), defaults)
        parser.set_defaults(**{k.lower(): v for k, v in values.items()})
        recipe = {"file": str(config), "contents": Path(config).read_text()}
        given = {**{k.lower(): str(config) for k in values}, **given}
    hp = parser.parse_args(argv)
    del hp.config
    return Command(hp, given, recipe)


def parse_settings(defaults: dict[str, Any], argv: Sequence[str] | None = None,
                   help_text: dict[str, str] | None = None, description: str = "") -> SimpleNamespace:
    """Parse ``argv`` against ``defaults``; returns lower_case attributes (``hp.batch_size``)."""
    return parse_command(defaults, argv, help_text, description).hp


def comments_of(source: str) -> dict[str, str]:
    """Trailing ``# comment`` of each ``NAME = value  # comment`` line, for --help."""
    out = {}
    for line in source.splitlines():
        head, sep, comment = line.partition("#")
        name = head.split("=")[0].strip()
        if sep and "=" in head and name.isupper():
            out[name] = comment.strip()
    return out
