"""``--teacher``: pseudo-labels and distillation, one mechanism.

A teacher (checkpoints or run folders, as ``--ensemble``) labels unlabeled images (the data
set's test images and/or a folder of photos) once, into ``output/pseudo/<key>/`` keyed on
its weights, the student's data size, TTA and decoding; the student, an ordinary run of any
architecture (single split or folds), then trains on batches that are ``--pseudo-share``
pseudo-labeled. Images the teacher is unsure of (more than ``--pseudo-max-uncertain`` of
their pixels between 0.1 and 0.9) are left out, counted on the console and in labels.csv.

Never leaked: an image that is also a labeled train image (by name) is never pseudo-labeled,
so no validation image, in any fold, is ever a pseudo-labeled training image.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from carvana.data.files import write_text_atomic
from carvana.data.pseudo import select_confident, store_key
from carvana.models.registry import ModelConfig, output_size
from carvana.pipeline.fit import TaskData
from carvana.pipeline.plans import PlanError
from carvana.pipeline.runs import start_afresh
from carvana.pipeline.session import Session, write_json
from carvana.submission.ensemble import EnsemblePredictor, load_members, member_paths
from carvana.submission.pseudo_labels import label_images
from carvana.training import distributed as dist


@dataclass
class PseudoSet:
    """The pseudo-labeled images a student trains on, and where their labels are."""

    folder: Path
    images: list[Path]
    hard: bool
    share: float


def unlabeled_images(spec: str, data: TaskData) -> list[Path]:
    """--unlabeled: 'test' and/or folders, less every image that is a labeled one (by name)."""
    images: list[Path] = []
    for part in (s.strip() for s in spec.split(",") if s.strip()):
        if part == "test":
            images += list(data.test_images)
        elif Path(part).is_dir():
            images += sorted(p for p in Path(part).iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
        else:
            raise PlanError(f"--unlabeled {part!r}: expected 'test' or a folder of JPEG photos")
    labeled = {Path(p).name for p in data.train_images + data.valid_images}
    unique = {Path(p).name: Path(p) for p in images if Path(p).name not in labeled}
    if not unique:
        raise PlanError(f"--unlabeled {spec}: no unlabeled images (labeled train images are never pseudo-labeled)")
    return [unique[name] for name in sorted(unique)]


def round_session(session: Session, r: int, folds: list[int] | None) -> Session:
    """Round ``r`` (of --pseudo-rounds) before the last: the run ``<run>-round<r>``. A fresh run
    (no --resume) starts it afresh like the run itself; --resume continues it or skips it."""
    sub = replace(session, run=f"{session.run}-round{r}")
    if session.main and not session.hp.resume:
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


def check_pseudo_settings(targets: str, share: float, max_uncertain: float) -> None:
    if targets not in ("soft", "hard"):
        raise PlanError(f"--pseudo-targets {targets!r}: expected soft or hard")
    if not 0.0 < share < 1.0:
        raise PlanError(f"--pseudo-share {share}: expected a share of each batch between 0 and 1")
    if not 0.0 <= max_uncertain <= 1.0:
        raise PlanError(f"--pseudo-max-uncertain {max_uncertain}: expected a fraction in [0, 1]")


def pseudo_labels(session: Session, data: TaskData, config: ModelConfig, teacher_spec: str) -> PseudoSet | None:
    """Label the unlabeled images with the teacher (checkpoints or run folders; resuming a
    partial store), select the confident ones and write labels.csv; None without a teacher."""
    hp = session.hp
    if not teacher_spec:
        return None
    check_pseudo_settings(hp.pseudo_targets, hp.pseudo_share, hp.pseudo_max_uncertain)
    images, data_hw = unlabeled_images(hp.unlabeled, data), output_size(config)
    paths = member_paths(teacher_spec)
    predictor = EnsemblePredictor(load_members(paths, [1.0 / len(paths)] * len(paths), session.device, hp.amp,
                                               hp.channels_last, hp.eval_streams))
    teacher = {"teacher": predictor.prediction_settings(data_hw, hp.tta, hp.fast_decode), "data_size": list(data_hw),
               "models": [str(p) for p in paths]}
    folder = Path(hp.output).parent / "pseudo" / store_key({k: v for k, v in teacher.items() if k != "models"})
    if session.main:
        print(f"pseudo-labels: {predictor.describe()} labels {len(images)} unlabeled images into {folder}")
    labeled_now = label_images(predictor, images, folder, data_hw, teacher, hp.tta, hp.predict_batch_size,
                               hp.workers, hp.fast_decode)
    kept, rows = select_confident(folder, images, hp.pseudo_max_uncertain)
    if session.main:
        write_text_atomic(folder / "labels.csv", pd.DataFrame(rows).to_csv(index=False))
        print(f"pseudo-labels: {labeled_now} labeled now, {len(images) - labeled_now} reused; kept {len(kept)} of "
              f"{len(images)} (at most {hp.pseudo_max_uncertain:g} of their pixels uncertain; {folder / 'labels.csv'})")
    dist.barrier()
    if not kept:
        raise PlanError(f"--pseudo-max-uncertain {hp.pseudo_max_uncertain:g}: every pseudo-labeled image is left out; "
                        f"raise it (see {folder / 'labels.csv'})")
    return PseudoSet(folder, kept, hp.pseudo_targets == "hard", hp.pseudo_share)
