"""What every run has: its process group and device, its name and folders, its settings
record, a stage clock, and one way to report user errors (timm's task objects, in spirit).
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import numpy as np
import torch

from carvana.data.datasets import ImageReadError
from carvana.data.files import write_json_atomic
from carvana.data.sources.fetcher import CorruptArchiveError, DatasetLayoutError, UnsafeArchiveError
from carvana.data.sources.kaggle_client import KaggleError
from carvana.data.mask_table import MaskTableError
from carvana.data.sources.notebook import kaggle_working_dir
from carvana.models.registry import ModelConfigError
from carvana.models.smp_nets import EncoderWeightsError
from carvana.data.secrets import redact
from carvana.pipeline.plans import FOLDS, SINGLE, PlanError, parse_fold
from carvana.pipeline.roles import recorded
from carvana.pipeline.runs import RunError, adopt_recorded_settings, continues_run, logs_dir, models_dir, resolve_run, \
    set_workspace, start_afresh, starts_afresh
from carvana.pipeline.settings import Command, RecipeError
from carvana.submission.gzip_stream import SubmissionWriteError
from carvana.submission.validate import SubmissionError
from carvana.training import distributed as dist
from carvana.training.callbacks import Callback
from carvana.training.checkpoint import CheckpointError
from carvana.training.precision import choose_precision
from carvana.training import engines
from carvana.training.engines import EngineError, choose_engine
from carvana.training.streams import choose_eval_streams

# Errors whose message already says what is wrong and what to do: main.py prints them as
# one line, without a traceback. Anything else is a bug and keeps its traceback.
USER_ERRORS = (CheckpointError, ImageReadError, DatasetLayoutError, UnsafeArchiveError, CorruptArchiveError,
               KaggleError, SubmissionError, FloatingPointError, SubmissionWriteError, dist.PeerFailure,
               MaskTableError, ModelConfigError, EncoderWeightsError, RunError, RecipeError, PlanError, EngineError)


def user_message(exc: BaseException) -> str:
    """The one line to show for a user error. An error raised in a DataLoader worker comes back
    re-raised with the worker's traceback as its message: its last line is the original."""
    text = str(exc)
    if "Traceback (most recent call last)" in text:
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        text = re.sub(r"^[\w.]+(Error|Exception|Failure): ", "", last.strip())
    return " ".join(text.split("\n")).strip()


class StageTimer:
    """Seconds per stage, in order: call it with a stage's name when that stage ends."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._clock = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._clock, 1)
        self._clock = now


@dataclass
class Session:
    """One invocation of main.py: settings (final), run, folders, device, clock."""

    hp: SimpleNamespace
    run: str
    device: str
    main: bool  # rank 0 (or the only process): writes files, prints
    task: str  # plans.BINARY | plans.MULTICLASS
    plan: str  # plans.SINGLE | FOLDS | ENSEMBLE | PREDICT
    given: dict[str, str] = field(default_factory=dict)
    timer: StageTimer = field(default_factory=StageTimer)
    callbacks: Sequence[Callback] = ()  # extra training callbacks (the tuner's pruning reporter)

    @property
    def models_dir(self) -> Path:
        return models_dir(self.run)

    @property
    def log_dir(self) -> Path:
        return logs_dir(self.run)

    def prediction_weights(self) -> Path:
        """What --no-train predicts with: --checkpoint, else the run's best.pt, which must
        exist (PlanError naming it otherwise)."""
        weights = Path(self.hp.checkpoint) if self.hp.checkpoint else self.models_dir / "best.pt"
        if not self.hp.checkpoint and not weights.exists():
            raise PlanError(f"--no-train needs weights: {weights} does not exist; pass --checkpoint PATH "
                            "or the --run-name of a trained run")
        return weights

    def record_name(self, name: str) -> Path:
        """``<log_dir>/<name>.json`` for a training run, ``predict_<name>.json`` for --no-train (which
        often works under the training run's name and must keep its records)."""
        return self.log_dir / (f"{name}.json" if self.hp.train else f"predict_{name}.json")


def open_session(command: Command, decide: Callable[[SimpleNamespace], tuple[str, str]],
                 callbacks: Sequence[Callback] = ()) -> Session:
    """Start the process group, settle the run and its final settings, let ``decide`` choose
    (or refuse) the task and plan from them before anything is written, then write the
    settings record."""
    hp = command.hp
    device = dist.init(hp.device, timeout_s=hp.dist_timeout)
    try:  # the classifiers choose again with the same functions; refused here, before anything is written
        choose_eval_streams(torch.device(device), hp.eval_streams)
        choose_engine(hp.engine, torch.device(device))
        if getattr(hp, "int8", False) and hp.predict:  # NNCF only where --int8 is asked for
            from carvana.training.quantize import check_int8

            check_int8(hp.engine, torch.device(device))
    except ValueError as exc:
        raise PlanError(str(exc)) from None
    main = dist.is_main_process()
    if move_to_workspace(hp) and main:
        print(f"outputs and data: under {workspace()} (a Kaggle Notebook's working folder: its Output tab shows them)")
    run, record = _settled_on_every_rank(hp, command.given, decide, main)
    if not main:  # every rank runs with rank 0's settings (the record it read)
        for name, value in record.get("settings", {}).items():
            setattr(hp, name, value)
    seed_everything(hp.seed)
    session = Session(hp, run, device, main, *record["decided"], command.given, callbacks=callbacks)
    if main:
        session.log_dir.mkdir(parents=True, exist_ok=True)
        precision = choose_precision(torch.device(device), hp.amp)  # the classifiers' own choice, said once
        print(precision.describe())
        write_json(session.record_name("hparams"), settings_record(command, precision.name))
    return session


def settings_record(command: Command, precision: str) -> dict[str, Any]:
    """What hparams.json holds: the final settings (secrets redacted), the precision, the recipe
    (its text redacted) and, for a tuning trial, its study."""
    record: dict[str, Any] = {**recorded(vars(command.hp)), "precision": precision}
    if command.recipe:
        record["recipe"] = {key: redact(text) for key, text in command.recipe.items()}
    if command.trial_of:
        record["trial_of"] = command.trial_of
    return record


def move_to_workspace(hp: SimpleNamespace) -> bool:
    """In a Kaggle Notebook run from outside its working folder (a read-only code dataset),
    put output/, logs/, --output, a relative --data-root and the engine cache under the working folder; the
    same on every rank (a pure function of the environment and cwd). Returns whether it moved."""
    base = workspace()
    if base is None:
        return False
    set_workspace(base)
    for name in ("output", "data_root"):
        if not Path(getattr(hp, name)).is_absolute():
            setattr(hp, name, str(base / getattr(hp, name)))
    if not engines.CACHE_DIR.is_absolute():  # compiled prediction graphs too
        engines.CACHE_DIR = base / engines.CACHE_DIR
    return True


def workspace() -> Path | None:
    """Where output/ and logs/ go when not the current folder: a Kaggle Notebook's writable
    working folder, when the current folder is outside it (None: the current folder)."""
    working = kaggle_working_dir()
    if working is None:
        return None
    here, working = Path.cwd().resolve(), working.resolve()
    return None if here == working or working in here.parents else working


def _settled_on_every_rank(hp: SimpleNamespace, given: dict[str, str], decide: Callable,
                           main: bool) -> tuple[str, dict[str, Any]]:
    """Rank 0 settles the run; every rank gets its outcome, a refusal included, so under torchrun
    a refused (e.g. sampled) setting fails every rank in step instead of desynchronising them."""
    outcome: Any = None
    if main:
        try:
            outcome = ("settled", _settle_run(hp, given, decide))
        except USER_ERRORS as exc:
            dist.broadcast_object(("refused", user_message(exc)))
            raise
    what, outcome = dist.broadcast_object(outcome)
    if what == "refused":
        raise PlanError(outcome)
    return outcome


def _settle_run(hp: SimpleNamespace, given: dict[str, str], decide: Callable) -> tuple[str, dict[str, Any]]:
    """(run name, {"settings": the final settings, "decided": (task, plan)}) on rank 0."""
    run = resolve_run(hp)
    if continues_run(hp):
        adopt_recorded_settings(hp, run, given)
    decided = decide(hp)  # refusals come before anything is removed or written
    folds = parse_fold(hp.fold, hp.folds) if decided[1] == FOLDS else None
    if starts_afresh(hp) and decided[1] in (SINGLE, FOLDS) and start_afresh(run, folds):
        print(f"run {run}: starting afresh under an existing name (the old checkpoints and scores of what trains "
              f"now were removed); --resume continues a run instead")
    return run, {"settings": vars(hp), "decided": decided}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """A run record (settings, summary), replaced atomically, indented for people to read."""
    write_json_atomic(path, data, indent=2)


def print_summary(summary: dict[str, Any]) -> None:
    print("\n=== summary ===")
    for key, value in summary.items():
        print(f"{key:>18}: {value}")
