"""Search spaces: which of main.py's settings a study samples, and from what.

A space file is TOML whose keys are main.py's setting names and whose values are either a
list of choices or a range table::

    lr = {low = 3e-4, high = 1e-2, log = true}   # log-uniform float
    epochs = {low = 8, high = 32, step = 8}       # integers 8, 16, 24, 32
    optimizer = ["adamw", "adam"]                 # a choice
    augment = [true, false]

Every key and value is checked against main.py's defaults (name and type) and against the
settings a study may sample (``tunable``, from the pipeline's table of setting roles) before
any trial runs; a mistake is one ``SpaceError`` line naming the file and the key.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection

class SpaceError(ValueError):
    """A search space that cannot be used, with the file and key named."""


@dataclass(frozen=True)
class Param:
    """One sampled setting: a range (low..high, optionally log or stepped) or choices."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple | None = None
    integer: bool = False

    def suggest(self, trial: Any) -> Any:
        """The value an Optuna trial draws for this setting."""
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def describe(self) -> str:
        if self.choices is not None:
            return f"{self.name} in {list(self.choices)}"
        how = " (log)" if self.log else f" step {self.step:g}" if self.step else ""
        return f"{self.name} in [{self.low:g}, {self.high:g}]{how}"


def _range(name: str, low: float, high: float, **kw: Any) -> Param:
    return Param(name, low, high, integer=isinstance(low, int) and isinstance(high, int), **kw)


# The default spaces: the knobs the README's A/B tables found to matter, in ranges that a
# CPU run can afford. Whatever is given on the command line or in --config leaves the space.
_SHARED = (
    _range("lr", 3e-4, 1e-2, log=True),
    _range("weight_decay", 1e-6, 1e-2, log=True),
    Param("optimizer", choices=("adamw", "adam", "sgd")),
    Param("augment", choices=(True, False)),
    Param("batch_size", choices=(2, 4, 8)),
    Param("width", choices=(0.125, 0.25, 0.5)),
    _range("epochs", 8, 48, step=8),
)
DEFAULT_SPACES = {
    "binary": _SHARED + (_range("bce_weight", 0.25, 2.0), _range("dice_weight", 0.0, 2.0),
                         _range("boundary_weight", 1.0, 5.0), _range("boundary_band", 1, 4)),
    "multiclass": _SHARED + (_range("ce_weight", 0.25, 2.0), _range("dice_weight", 0.0, 2.0)),
}


def read_space(path: Path, defaults: dict[str, Any], tunable: Collection[str]) -> tuple[Param, ...]:
    """The space in a TOML file, checked against main.py's ``defaults`` (UPPER_CASE names) and
    the settings that may be sampled (``tunable``, lower_case)."""
    try:
        table = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise SpaceError(f"{path}: cannot read the search space ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise SpaceError(f"{path}: not valid TOML ({exc})") from None
    if not table:
        raise SpaceError(f"{path}: the search space is empty")
    return tuple(_param(path, key, value, defaults, tunable) for key, value in table.items())


def _param(path: Path, key: str, value: Any, defaults: dict[str, Any], tunable: Collection[str]) -> Param:
    name = key.lower().replace("-", "_")
    if name.upper() not in defaults:
        raise SpaceError(f"{path}: unknown setting {key!r} (keys are main.py's setting names, e.g. 'lr')")
    if name not in tunable:
        raise SpaceError(f"{path}: {key!r} cannot be searched (it says what the run is, where it runs or writes, "
                         "or does not change what a trial trains); give it on the command line")
    default = defaults[name.upper()]
    kind = type(default)

    def fits(v: Any) -> bool:
        return type(v) is kind or (kind is float and type(v) is int)

    if isinstance(value, list):
        if not value or not all(fits(v) for v in value):
            raise SpaceError(f"{path}: {key!r} must be a non-empty list of {kind.__name__} values like "
                             f"{default!r}, got {value!r}")
        return Param(name, choices=tuple(kind(v) for v in value))
    if not isinstance(value, dict):
        raise SpaceError(f"{path}: {key!r} must be a list of choices or a range {{low = .., high = ..}}, got "
                         f"{value!r} (fixed values belong on the command line or in --config)")
    return _range_param(path, key, name, value, kind, fits)


def _range_param(path: Path, key: str, name: str, value: dict, kind: type, fits) -> Param:
    unknown = set(value) - {"low", "high", "log", "step"}
    if unknown or "low" not in value or "high" not in value:
        raise SpaceError(f"{path}: {key!r}: a range has 'low' and 'high' (and optionally 'log' or 'step'), "
                         f"got keys {sorted(value)}")
    if kind not in (int, float):
        raise SpaceError(f"{path}: {key!r} is a {kind.__name__} setting: give a list of choices, not a range")
    low, high, log, step = value["low"], value["high"], value.get("log", False), value.get("step")
    if not (fits(low) and fits(high)) or (step is not None and not fits(step)) or type(log) is not bool:
        raise SpaceError(f"{path}: {key!r}: low, high and step must be {kind.__name__}s and log true/false, "
                         f"got {value!r}")
    if not low < high:
        raise SpaceError(f"{path}: {key!r}: low ({low}) must be below high ({high})")
    if log and (low <= 0 or step is not None):
        raise SpaceError(f"{path}: {key!r}: a log range needs low > 0 and no step")
    if step is not None and step <= 0:
        raise SpaceError(f"{path}: {key!r}: step must be positive")
    return Param(name, kind(low), kind(high), log=log, step=step, integer=kind is int)


def study_space(space_file: str, task: str, defaults: dict[str, Any], given: dict[str, str],
                tunable: Collection[str], unused: Collection[str] = ()) -> tuple[Param, ...]:
    """The space a study samples: the file's (else the task's default), less every setting
    given explicitly (command line or --config), which stays fixed for the study, and less
    the ``unused`` settings that this study's network ignores (a file naming one is refused)."""
    space = read_space(Path(space_file), defaults, tunable) if space_file else DEFAULT_SPACES[task]
    for p in space:
        if p.name in unused and space_file:
            raise SpaceError(f"{space_file}: {p.name!r} does not change what these trials train (--arch ignores "
                             "it); drop it from the space")
    left = tuple(p for p in space if p.name not in given and p.name not in unused)
    if not left:
        raise SpaceError(f"{space_file or 'the default space'}: every setting in it is given explicitly, "
                         "so nothing is left to search")
    return left
