"""``--refit``: once the folds are scored out of fold and (``--threshold auto``) the threshold is
chosen on them, one more model trains on every train image (all cars) and predicts the test
set alone, at that threshold. The folds only measure and choose; the refit is what is submitted.
With ``--refit-warm`` it starts from the best fold's weights (a fine-tune, at ``--refit-lr``)
instead of from scratch; with ``--refit-pseudo`` (pipeline/binary.py) its batches also mix in the
folds' pseudo-labels of the test images.

Layout for run R::

    output/models/R/refit/last.pt     its resumable state, as any run's
    output/models/R/refit/best.pt     the weights at the END of training, with the threshold recorded
    output/models/R/refit/refit.json  written last: the refit is finished (images, epochs, minutes)
    logs/R/refit/metrics.csv          its training log (train loss only: no car is held out)

Without a validation set the saver keeps as best.pt the epoch of lowest train loss, which may
be an early one: when training ends, last.pt (the schedule's end) is published as best.pt.
``--resume`` continues an unfinished refit from its last.pt and skips a finished one (that
with refit.json); ``--no-train --run-name R`` predicts with R's refit/best.pt.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd

from carvana.data.layout import car_id
from carvana.pipeline.fit import TaskData, train_model
from carvana.pipeline.folds import record_threshold
from carvana.pipeline.plans import PlanError
from carvana.pipeline.runs import remove_run_path, starts_afresh
from carvana.pipeline.session import Session, write_json
from carvana.training import distributed as dist
from carvana.training.callbacks import Callback
from carvana.training.checkpoint import publish_copy

# submission/ensemble.py's member_paths knows these two names too (it cannot import the pipeline).
FOLDER, FINISHED = "refit", "refit.json"


def refit_folders(session: Session) -> tuple[Path, Path]:
    """(checkpoints, logs) of the run's refit."""
    return session.models_dir / FOLDER, session.log_dir / FOLDER


def refit_budget(hp: SimpleNamespace) -> float:
    """The refit's training minutes: --refit-budget, else the folds' own --time-budget (0 = none:
    it trains --epochs, as the folds did)."""
    return float(hp.refit_budget) if hp.refit_budget > 0 else float(hp.time_budget)


def finished_record(folder: Path) -> dict[str, Any] | None:
    """The finished refit's record (refit.json), or None while it is unfinished or absent."""
    path = folder / FINISHED
    return json.loads(path.read_text()) if path.is_file() else None


def discard_stale_refit(session: Session) -> None:
    """A fresh folds run (no --resume) removes the refit an earlier run of this name left, before
    any fold trains: a finished one would otherwise be skipped, and submitted, by a later --resume."""
    if session.main and starts_afresh(session.hp):
        for path in (p for p in refit_folders(session) if p.exists() or p.is_symlink()):
            remove_run_path(path)
    dist.barrier()


class PublishFinal(Callback):
    """At the end of training, publish last.pt (just written for the last epoch) as best.pt."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.published = folder, False

    def on_train_end(self, trainer: Any) -> None:
        if dist.is_main_process():
            publish_copy(self.folder / "last.pt", self.folder / "best.pt")
        self.published = True  # before train_model may remove last.pt (--no-keep-last)


def warm_start(hp: SimpleNamespace, members: list[Path], summary: dict[str, Any] | None) -> Path | None:
    """--refit-warm: the best.pt (of ``members``, output/models/R/fold<f>/best.pt) of the fold with
    the highest OOF Dice in ``summary`` (the first one on a tie, or when none is scored yet); None
    without --refit-warm: the refit starts from scratch."""
    if not hp.refit_warm or not members:
        return None
    per_fold = {int(f): float(d) for f, d in ((summary or {}).get("per_fold") or {}).items()}
    return max(members, key=lambda p: per_fold.get(int(p.parent.name.removeprefix("fold")), float("-inf")))


def run_refit(session: Session, data: TaskData, threshold: float, pseudo: Any = None,
              start: Path | None = None) -> dict[str, Any]:
    """Train (or resume, or skip) the refit on every train image, with the folds' pseudo-labeled
    batches where ``pseudo``, from ``start``'s weights where given (:func:`warm_start`); record
    ``threshold`` in its best.pt; returns its record."""
    hp, main = session.hp, session.main
    folder, logs = refit_folders(session)
    if finished_record(folder) is None:
        images, masks = data.train_images + data.valid_images, data.train_masks + data.valid_masks
        budget, lr = refit_budget(hp), float(hp.refit_lr or hp.lr)
        if main:
            limit = f"{budget:g} minutes (at most {hp.epochs} epochs)" if budget else f"{hp.epochs} epochs"
            origin = f"from {start}" if start is not None else "from scratch"
            print(f"\n=== refit on every car: {len(images)} images ({len({car_id(Path(p).name) for p in images})} "
                  f"cars), {limit}, {origin}, lr {lr:g} ===")
        final = PublishFinal(folder)
        refit_hp = SimpleNamespace(**{**vars(hp), "time_budget": budget, "lr": lr})
        classifier = train_model(refit_hp, session.device, data, (images, masks, [], []), folder, logs, session.run,
                                 [*session.callbacks, final], pseudo, start)
        if main and not final.published:  # trained to the end before (resumed after its last epoch)
            publish_copy(folder / "last.pt", folder / "best.pt")
        record = {"folder": str(folder), "images": len(images),
                  "pseudo_labeled_images": len(pseudo.images) if pseudo is not None else 0,
                  "epochs_trained": classifier.epoch + 1, "minutes": training_minutes(logs / "metrics.csv"),
                  "budget_minutes": budget, "started_from": str(start) if start is not None else "scratch", "lr": lr}
        dist.barrier()
        if main:
            record_threshold([folder / "best.pt"], threshold)
            write_json(folder / FINISHED, record)  # last: the refit is finished
    elif main:
        print(f"refit: finished earlier, skipped ({folder / 'best.pt'})")
    if main:  # a resumed run may have chosen another threshold (more folds scored)
        record_threshold([folder / "best.pt"], threshold)
    dist.barrier()
    return dist.broadcast_object(finished_record(folder) if main else None)


def training_minutes(metrics_csv: Path) -> float:
    """Minutes the refit trained, over every session (metrics.csv keeps each epoch's seconds)."""
    if not metrics_csv.is_file():
        return 0.0
    return round(float(pd.read_csv(metrics_csv)["seconds"].sum()) / 60, 3)


def refit_weights(session: Session, info: dict[str, Any]) -> Path:
    """--no-train on a refit run: its finished refit's best.pt (PlanError naming it otherwise);
    adds the refit's record to ``info``. Reads the run, writes nothing to it."""
    folder = refit_folders(session)[0]
    record = finished_record(folder)
    if record is None or not (folder / "best.pt").is_file():
        raise PlanError(f"--no-train on a --refit run needs its finished refit: {folder / FINISHED} is missing; "
                        f"finish it with: python main.py --resume --run-name {session.run}")
    info["refit"] = record
    return folder / "best.pt"
