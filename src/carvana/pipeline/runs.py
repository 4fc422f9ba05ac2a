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
from carvana.pipeline.settings import flag_of

MODELS_DIR = Path("output/models")
LOGS_DIR = Path("logs")

# What a run is: resuming it with another value of these would continue a different run
# (another split, another network, an optimiser state that does not fit). An explicit flag
# that contradicts the record is refused; every other setting may change between sessions.
RUN_DEFINING = ("dataset", "classes", "class_names", "arch", "encoder", "width", "input_size", "folds", "seed",
                "validation_size", "sample_size", "hq", "optimizer", "scheduler")
# Asked of this invocation only, never taken from the record.
THIS_INVOCATION = ("resume", "train", "run_name", "checkpoint", "submit", "message", "fold", "ensemble", "ensemble_weights",
                   "predict", "tune", "study", "tune_storage", "tune_space", "tune_pruner", "tune_timeout",
                   "tune_heartbeat")


def set_workspace(base: Path) -> None:
    """Put every run's folders under ``base`` (a Kaggle Notebook's working folder) instead of
    the current folder; called once, at start-up, before any run is resolved."""
    global MODELS_DIR, LOGS_DIR
    MODELS_DIR, LOGS_DIR = base / "output" / "models", base / "logs"


class RunError(ValueError):
    """A run that cannot be resumed or predicted from as asked, named in the message."""


def models_dir(run: str) -> Path:
    return MODELS_DIR / run


def logs_dir(run: str) -> Path:
    return LOGS_DIR / run


def resumable_runs() -> list[str]:
    """Names of runs with a ``last.pt`` (a fold's counts), oldest first."""
    found = [*MODELS_DIR.glob("*/last.pt"), *MODELS_DIR.glob("*/fold*/last.pt")]
    names = [p.relative_to(MODELS_DIR).parts[0] for p in sorted(found, key=lambda p: p.stat().st_mtime)]
    return list(dict.fromkeys(reversed(names)))[::-1]


def resolve_run(hp: SimpleNamespace) -> str:
    """The run name: --run-name, else (with --resume) the latest resumable run, else a timestamp."""
    if hp.run_name:
        return hp.run_name
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
        if hasattr(hp, name) and name not in given and name not in THIS_INVOCATION:
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
    stale = [p for p in stale if p.exists()]
    for path in stale:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return bool(stale)


def resume_hint(run: str) -> str:
    """The command that continues this run (its settings come from its record)."""
    return f"python main.py --resume --run-name {run}"
