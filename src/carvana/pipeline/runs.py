"""Which run a command works on, and whose settings win.

A run is ``output/models/<run>/`` (checkpoints; ``fold<k>/`` with ``--folds``) and
``logs/<run>/`` (``hparams.json``: the settings it was started with, then metrics, scores,
summaries). Every plan (single split, folds, multi-class, predict only) resolves its run
here, so ``--resume`` means the same thing on every path:

* ``--run-name R`` names the run; ``--resume`` alone takes the latest run with a ``last.pt``.
* A resumed run (or a run predicted from by name) takes its own recorded settings. A flag
  given explicitly may change how it continues (``--epochs``, ``--workers``, ...), but one
  that contradicts what the run *is* (its data split, model, optimiser) is an error naming
  both values.
* Training under an existing run's name without ``--resume`` starts it afresh: its old
  checkpoints and fold scores are removed first, so nothing stale is mistaken for finished.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from carvana.models.registry import parse_size
from carvana.pipeline.roles import RUN_DEFINING, read_back
from carvana.pipeline.settings import flag_of

MODELS_DIR = Path("output/models")
LOGS_DIR = Path("logs")

def set_workspace(base: Path) -> None:
    """Put every run's folders under ``base`` (a Kaggle Notebook's working folder) instead of
    the current folder; called once, at start-up, before any run is resolved."""
    global MODELS_DIR, LOGS_DIR
    MODELS_DIR, LOGS_DIR = base / "output" / "models", base / "logs"


class RunError(ValueError):
    """A run that cannot be resumed or predicted from as asked, named in the message."""


MAX_NAME = 100


def check_name(flag: str, name: str) -> str:
    """``name`` if it is one plain folder name (letters and digits of any script, '-', '_', '.',
    not starting with '.', at most MAX_NAME characters), else RunError: a run or study name
    becomes a folder that a fresh start removes, so it can never be '..', a path or absolute."""
    plain = all(c.isalnum() or c in "-_." for c in name)
    if not name or name.startswith(".") or len(name) > MAX_NAME or not plain:
        raise RunError(f"{flag} {name!r}: expected one plain folder name (letters, digits, '-', '_' or '.', not "
                       f"starting with '.', at most {MAX_NAME} characters)")
    return name


def models_dir(run: str) -> Path:
    return MODELS_DIR / check_name("--run-name", run)


def logs_dir(run: str) -> Path:
    return LOGS_DIR / check_name("--run-name", run)


def is_trial(run: str) -> bool:
    """Whether ``run`` is a tuning trial (its record says so): never resumed as a run."""
    try:
        return bool(json.loads((LOGS_DIR / run / "hparams.json").read_text()).get("trial_of"))
    except (OSError, ValueError, AttributeError):
        return False


def resumable_runs() -> list[str]:
    """Names of runs with a ``last.pt`` (a fold's or a refit's counts), oldest first; tuning
    trials are not runs to resume (the study continues them)."""
    found = [*MODELS_DIR.glob("*/last.pt"), *MODELS_DIR.glob("*/fold*/last.pt"), *MODELS_DIR.glob("*/refit/last.pt")]
    names = [p.relative_to(MODELS_DIR).parts[0] for p in sorted(found, key=lambda p: p.stat().st_mtime)]
    return [name for name in list(dict.fromkeys(reversed(names)))[::-1] if not is_trial(name)]


def resolve_run(hp: SimpleNamespace) -> str:
    """The run name: --run-name (one plain folder name), else (with --resume) the latest
    resumable run, else a timestamp."""
    if hp.run_name:
        return check_name("--run-name", hp.run_name)
    if hp.resume and hp.train:
        runs = resumable_runs()
        if not runs:
            raise RunError(f"--resume: no run with a last.pt under {MODELS_DIR}; start one without --resume")
        return runs[-1]
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def recorded_settings(run: str) -> dict[str, Any] | None:
    """The settings run ``run`` was started with (``hparams.json``, else a ``last.pt``'s), or None."""
    path = logs_dir(run) / "hparams.json"
    if path.is_file():
        try:
            return dict(json.loads(path.read_text()))
        except (ValueError, TypeError) as exc:
            raise RunError(f"{path}: not a readable settings record ({exc})") from None
    from carvana.training.checkpoint import load_checkpoint  # only for runs older than hparams.json

    for last in [models_dir(run) / "last.pt", *sorted(models_dir(run).glob("fold*/last.pt"))]:
        if last.is_file():
            return dict(load_checkpoint(last).get("hparams") or {})
    return None


def continues_run(hp: SimpleNamespace) -> bool:
    """Whether this command continues an existing run rather than starting one: --resume, or
    --no-train predicting from a named run's own weights."""
    return bool(hp.resume and hp.train) or bool(not hp.train and hp.run_name and not hp.checkpoint
                                                 and not getattr(hp, "ensemble", ""))


def adopt_recorded_settings(hp: SimpleNamespace, run: str, given: dict[str, str]) -> dict[str, Any]:
    """Fill ``hp`` from the run's record for every setting not given explicitly; returns the
    record. A given run-defining setting that contradicts it raises RunError naming both."""
    record = recorded_settings(run)
    if record is None:
        if hp.resume and hp.train:
            runs = ", ".join(resumable_runs()) or "none"
            raise RunError(f"--resume: run {run!r} has no {models_dir(run) / 'last.pt'} (nor {logs_dir(run)}/hparams.json);"
                           f" check --run-name (runs with a last.pt: {runs})")
        return {}
    for name in RUN_DEFINING:
        if name in given and name in record and not same_value(name, getattr(hp, name), record[name]):
            raise RunError(f"{flag_of(name)} {getattr(hp, name)} ({given[name]}) contradicts run {run!r}, which was "
                           f"started with {flag_of(name)} {record[name]} ({logs_dir(run)}/hparams.json); drop "
                           f"{flag_of(name)} to continue the run as it was, or start a new --run-name")
    for name, value in record.items():
        if hasattr(hp, name) and name not in given and read_back(name, training=hp.train):
            if isinstance(getattr(hp, name), bool) == isinstance(value, bool):  # a foreign type is not adopted
                setattr(hp, name, value)
    return record


def same_value(name: str, ours: Any, theirs: Any) -> bool:
    """Whether two values of setting ``name`` mean the same (sizes compare as HxW)."""
    if name == "input_size":
        try:
            return parse_size(str(ours)) == parse_size(str(theirs))
        except ValueError:
            return str(ours) == str(theirs)
    if isinstance(ours, float) or isinstance(theirs, float):
        try:
            return float(ours) == float(theirs)
        except (TypeError, ValueError):
            return False
    return ours == theirs


def starts_afresh(hp: SimpleNamespace) -> bool:
    """Whether this command starts what it trains afresh (removing what an earlier run of the
    same name left): it trains, and does not --resume."""
    return bool(hp.train and not hp.resume)


def start_afresh(run: str, folds: list[int] | None = None) -> bool:
    """Remove what an earlier run of this name left for what is trained now, so a fresh run
    never finds it: a single split's checkpoints; with ``folds``, those folds' checkpoints and
    scores and the combined OOF files (other folds, trained separately with --fold N, stay,
    and so does their split unless every fold starts afresh). Returns whether anything was there."""
    if folds is None:
        stale = [models_dir(run)]
    else:
        stale = [p for f in folds for p in (models_dir(run) / f"fold{f}", logs_dir(run) / f"fold{f}")]
        stale += [logs_dir(run) / name for name in ("oof.csv", "oof_summary.json", "oof_worst.png")]
        now = {f"fold{f}" for f in folds}
        if not [p for p in models_dir(run).glob("fold*") if p.name not in now]:
            stale.append(logs_dir(run) / "folds.csv")
    stale = [p for p in stale if p.exists() or p.is_symlink()]
    for path in stale:
        remove_run_path(path)
    return bool(stale)


def remove_run_path(path: Path) -> None:
    """Remove a run's file or folder, only after checking that it lies inside the run folders
    (output/models/<run>, logs/<run>): a last guard, whatever name led here."""
    bases = [MODELS_DIR.resolve(), LOGS_DIR.resolve()]
    where = Path(path).parent.resolve() / Path(path).name  # a link is removed, never followed
    inside = [base for base in bases if base in where.parents and where.relative_to(base).parts[0] not in ("..", ".")]
    if not inside:
        raise RunError(f"{path}: refusing to remove a path outside {MODELS_DIR} and {LOGS_DIR}")
    if where.is_dir() and not where.is_symlink():
        shutil.rmtree(where)
    else:
        where.unlink()


def resume_hint(run: str, trial_of: str = "") -> str:
    """The command that continues this run (its settings come from its record); a tuning
    trial is continued by its study."""
    if trial_of:
        return f"rerun the same --tune command: study {trial_of} runs this trial again"
    return f"python main.py --resume --run-name {run}"
