"""``--teacher``: pseudo-labels and distillation, one mechanism.

A teacher (checkpoints or run folders, as ``--ensemble``) labels unlabeled images (the data
set's test images and/or a folder of photos) once, into ``output/pseudo/<key>/`` keyed on
its weights, the student's data size, TTA and decoding; the student, an ordinary run of any
architecture (single split or folds), then trains on batches that are ``--pseudo-share``
pseudo-labeled. Images the teacher is unsure of (more than ``--pseudo-max-uncertain`` of
their pixels between 0.1 and 0.9), and images that cannot be read, are left out, counted on
the console and in labels.csv.

Never leaked: an image that is also a labeled train image (the same file: the key of
:func:`carvana.data.pseudo.image_key`, which also names its label) is never pseudo-labeled,
so no validation image, in any fold, is ever a pseudo-labeled training image.

Only a run that trains labels anything: the settings are checked in pipeline/plans.py before
anything is removed, and ``--no-train`` never reaches this module.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, TypeVar

import pandas as pd

from carvana.data.files import write_text_atomic
from carvana.data.pseudo import KeyedImage, image_key, keyed, select_confident, store_key
from carvana.models.registry import ModelConfig, output_size
from carvana.pipeline.fit import TaskData
from carvana.pipeline.plans import PlanError, teacher_paths, unlabeled_parts
from carvana.pipeline.runs import start_afresh, starts_afresh
from carvana.pipeline.session import Session, write_json
from carvana.submission.ensemble import EnsemblePredictor, load_members
from carvana.submission.pseudo_labels import label_images
from carvana.training import distributed as dist

T = TypeVar("T")


@dataclass
class PseudoSet:
    """The pseudo-labeled images a student trains on, and where their labels are."""

    folder: Path
    images: list[KeyedImage]
    hard: bool
    share: float


def unlabeled_images(spec: str, data: TaskData) -> list[KeyedImage]:
    """--unlabeled: 'test' and/or folders, each file once, less every labeled image: the same
    file as a train or validation image (the identity its label is stored under), or a file of
    the same name (a copy of a labeled photo in another folder)."""
    paths: list[Path] = []
    for part in unlabeled_parts(spec):
        if part == "test":
            paths += [Path(p) for p in data.test_images]
        else:
            paths += sorted(p for p in Path(part).iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    labeled = {image_key(p) for p in data.train_images + data.valid_images}
    labeled_names = {Path(p).name for p in data.train_images + data.valid_images}
    unique = {image.key: image for image in keyed(paths)
              if image.key not in labeled and image.path.name not in labeled_names}
    if not unique:
        raise PlanError(f"--unlabeled {spec}: no unlabeled images (labeled train images are never pseudo-labeled)")
    return sorted(unique.values(), key=lambda i: (str(i.path), i.key))


def round_session(session: Session, r: int, folds: list[int] | None) -> Session:
    """Round ``r`` (of --pseudo-rounds) before the last: the run ``<run>-round<r>``. A fresh
    training run (no --resume) starts it afresh like the run itself; --resume continues it or
    skips it; a run that trains nothing never removes it."""
    sub = replace(session, run=f"{session.run}-round{r}")
    if session.main and starts_afresh(session.hp):
        start_afresh(sub.run, folds)
        (sub.log_dir / "round.json").unlink(missing_ok=True)
    dist.barrier()
    return sub


def round_finished(sub: Session) -> bool:
    return (sub.log_dir / "round.json").exists()


def finish_round(sub: Session, teacher: str) -> None:
    """Mark a round's student trained (``round.json``), so a resumed run skips it."""
    if sub.main:
        write_json(sub.log_dir / "round.json", {"run": sub.run, "teacher": teacher, "finished": True})
    dist.barrier()


def pseudo_labels(session: Session, data: TaskData, config: ModelConfig,
                  teacher: str | list[Path]) -> PseudoSet | None:
    """Label the unlabeled images with the teacher (--teacher's checkpoints or run folders, or the
    checkpoints themselves: --refit-pseudo's folds; resuming a partial store), select the
    confident ones and write labels.csv; None without a teacher or when nothing trains."""
    hp = session.hp
    if not teacher or not hp.train:
        return None
    # Rank 0 keys the images and every rank takes its list, so all agree on every label's name.
    images = on_rank_0(session, "listing the unlabeled images", lambda: unlabeled_images(hp.unlabeled, data))
    data_hw = output_size(config)
    paths = list(teacher) if isinstance(teacher, list) else teacher_paths(teacher)
    predictor = EnsemblePredictor(load_members(paths, [1.0 / len(paths)] * len(paths), session.device, hp.amp,
                                               hp.channels_last, hp.eval_streams, hp.engine))
    teacher = {"teacher": predictor.prediction_settings(data_hw, hp.tta, hp.fast_decode), "data_size": list(data_hw),
               "models": [str(p) for p in paths]}
    folder = Path(hp.output).parent / "pseudo" / store_key({k: v for k, v in teacher.items() if k != "models"})
    if session.main:
        print(f"pseudo-labels: {predictor.describe()} labels {len(images)} unlabeled images into {folder}")
    labeled_now = label_images(predictor, images, folder, data_hw, teacher, hp.tta, hp.predict_batch_size,
                               hp.workers, hp.fast_decode)
    kept = on_rank_0(session, "selecting the pseudo-labels", lambda: select(folder, images, labeled_now, hp))
    if not kept:
        raise PlanError(f"--pseudo-max-uncertain {hp.pseudo_max_uncertain:g}: every pseudo-labeled image is left out; "
                        f"raise it (see {folder / 'labels.csv'})")
    return PseudoSet(folder, kept, hp.pseudo_targets == "hard", hp.pseudo_share)


def select(folder: Path, images: list[KeyedImage], labeled_now: int, hp: SimpleNamespace) -> list[KeyedImage]:
    """The confident, readable images (read back once, by rank 0), with labels.csv and the counts."""
    kept, rows = select_confident(folder, images, hp.pseudo_max_uncertain)
    write_text_atomic(folder / "labels.csv", pd.DataFrame(rows).to_csv(index=False))
    unreadable = sum(r["unreadable"] for r in rows)
    print(f"pseudo-labels: {labeled_now} labeled now, {len(images) - labeled_now} reused; kept {len(kept)} of "
          f"{len(images)} (at most {hp.pseudo_max_uncertain:g} of their pixels uncertain"
          f"{f'; {unreadable} unreadable, left out' if unreadable else ''}; {folder / 'labels.csv'})")
    return kept


def on_rank_0(session: Session, stage: str, work: Callable[[], T]) -> T:
    """``work()`` done by rank 0 and its result given to every rank; its error stops every
    rank in step (a refusal on rank 0 alone would leave the others waiting at the broadcast)."""
    result, error = None, None
    if session.main:
        try:
            result = work()
        except Exception as exc:  # any error: re-raised on rank 0, a PeerFailure on the others
            error = exc
    dist.raise_if_any_failed(error, stage)
    return dist.broadcast_object(result)
