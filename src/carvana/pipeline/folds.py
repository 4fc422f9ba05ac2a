"""``--folds K``: train each car-grouped fold in its own run folder, score it out of fold,
then summarise, draw the error gallery and (``--threshold auto``) choose the threshold.

Layout for run R::

    output/models/R/fold<k>/{last,best}.pt   each fold's checkpoints (resumable like a run)
    logs/R/fold<k>/                          its metrics.csv, previews, and oof.csv once scored
    logs/R/folds.csv                         image, car, angle, fold (the split, kept for resume)
    logs/R/oof.csv                           image, car, angle, fold, dice (+ dice@t per threshold)
    logs/R/oof_summary.json, oof_worst.png   the summary and the error gallery

A fold is finished when its ``oof.csv`` exists (written after training and scoring);
``--resume`` skips finished folds and continues the first unfinished one from its last.pt.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch.utils.data import DataLoader

from carvana.data.datasets import read_image, true_mask
from carvana.data.postprocess import upsample_mask
from carvana.models.registry import output_size
from carvana.pipeline.fit import TaskData, parse_tta_sizes, train_model
from carvana.pipeline.plans import PlanError, parse_fold
from carvana.pipeline.session import Session
from carvana.submission.ensemble import EnsemblePredictor, load_members
from carvana.training import distributed as dist
from carvana.training.callbacks import Callback
from carvana.training.checkpoint import load_checkpoint, save_checkpoint
from carvana.training.folds import fold_files, load_or_assign_folds
from carvana.training.gallery import GalleryEntry, write_gallery
from carvana.training.oof import (THRESHOLD_GRID, choose_threshold, dice_column, format_summary, score_fold,
                                  summarize, write_csv, write_json)


@dataclass
class FoldsResult:
    members: list[Path]  # best.pt of each fold used for prediction
    threshold: float  # the threshold prediction uses (chosen on OOF with --threshold auto)
    summary: dict | None  # the OOF summary once any fold is scored


def fold_table(session: Session, images: list[Path]) -> pd.DataFrame:
    """The run's car-grouped fold of every image (assigned once, kept in folds.csv for resume)."""
    hp = session.hp
    try:
        table = load_or_assign_folds(session.log_dir / "folds.csv", images, hp.folds, hp.seed) if session.main else None
    except ValueError as exc:  # too few cars, or a folds.csv that does not fit this data
        raise PlanError(str(exc)) from None
    return dist.broadcast_object(table)


def is_scored(oof_csv: Path, threshold: float) -> bool:
    """Whether a fold's scores exist and hold the Dice at ``threshold`` (an off-grid threshold
    given after the fold was scored needs it scored again)."""
    if not oof_csv.exists():
        return False
    return dice_column(threshold) in pd.read_csv(oof_csv, nrows=0).columns


def run_folds(session: Session, data: TaskData, threshold: float, auto_threshold: bool,
              pseudo: Any = None) -> FoldsResult:
    """Train (or resume, or skip) the requested folds, score each out of fold, summarise."""
    hp, main = session.hp, session.main
    images, masks = data.train_images + data.valid_images, data.train_masks + data.valid_masks
    table = fold_table(session, images)
    folds = parse_fold(hp.fold, hp.folds)
    grid = sorted(set(THRESHOLD_GRID) | {float(threshold)})
    for f in folds:
        fold_models, fold_logs = session.models_dir / f"fold{f}", session.log_dir / f"fold{f}"
        if is_scored(fold_logs / "oof.csv", threshold):
            if main:
                print(f"fold {f}/{hp.folds}: finished earlier, skipped")
            continue
        split = fold_files(table, f, images, masks)
        if hp.train and not (fold_logs / "oof.csv").exists():  # a scored fold only lacks this threshold's scores
            if main:
                print(f"\n=== fold {f} of {hp.folds}: {len(split[0])} train / {len(split[2])} valid images "
                      f"({table.loc[table['fold'] == f, 'car'].nunique()} validation cars) ===")
            train_model(hp, session.device, data, split, fold_models, fold_logs, session.run, session.callbacks, pseudo)
        dist.barrier()  # best.pt is written
        if main and (fold_models / "best.pt").is_file():  # one process scores: ~1/K of train
            scores = score_best(fold_models / "best.pt", split[2], split[3], table, f, grid, session, data.mask_rles)
            write_csv(scores, fold_logs / "oof.csv")
            print(f"fold {f}: OOF Dice {scores[dice_column(threshold)].mean():.5f} on {len(scores)} images")
        dist.barrier()

    summary = None
    if main:
        paths = {Path(i).name: (Path(i), Path(m)) for i, m in zip(images, masks)}
        threshold, summary = summarize_run(session, threshold, auto_threshold, paths, data.mask_rles)
        record_threshold([session.models_dir / f"fold{f}" / "best.pt" for f in range(hp.folds)], threshold)
    threshold = float(dist.broadcast_object(threshold))
    members = [session.models_dir / f"fold{f}" / "best.pt" for f in folds]
    missing = [str(p) for p in members if not p.is_file()]
    if missing:
        raise PlanError(f"fold model(s) missing: {', '.join(missing)}; train them (without --no-train)")
    return FoldsResult(members, threshold, summary)


def score_best(best: Path, valid_images: list[Path], valid_masks: list[Path], table: pd.DataFrame, fold: int,
               grid: list[float], session: Session, mask_rles: Any = None) -> pd.DataFrame:
    """A fold's best model scored on its validation cars as the test set is predicted (TTA, the
    model's own data size and any --tta-sizes): one row per image with its Dice at each
    threshold of ``grid``."""
    hp = session.hp
    predictor = fold_predictor(best, session)
    scores = score_fold(predictor, valid_images, valid_masks, output_size(predictor.members[0].config), grid, hp.tta,
                        hp.predict_batch_size, hp.workers, mask_rles, fast_decode=hp.fast_decode)
    meta = table.set_index("image").loc[scores["image"], ["car", "angle"]].reset_index(drop=True)
    return pd.concat([scores[["image"]], meta, scores.drop(columns="image")], axis=1).assign(fold=fold)


def fold_predictor(best: Path, session: Session) -> EnsemblePredictor:
    """A fold's best.pt ready to predict as every prediction of the session does: its
    ``--device``, ``--amp``, ``--channels-last``, ``--eval-streams``, ``--engine`` and
    ``--tta-sizes`` (one member per size; one member without)."""
    hp = session.hp
    return EnsemblePredictor(load_members([best], [1.0], session.device, hp.amp, hp.channels_last, hp.eval_streams,
                                          hp.engine, tta_sizes=parse_tta_sizes(hp.tta_sizes)), progress=False)


def record_threshold(checkpoints: list[Path], threshold: float) -> None:
    """Store the threshold prediction uses in each fold's best.pt (``hparams.threshold``), so
    segment and export apply the one OOF chose rather than 0.5."""
    for path in (p for p in checkpoints if p.is_file()):
        state = load_checkpoint(path)
        if (state.get("hparams") or {}).get("threshold") != threshold:
            save_checkpoint({**state, "hparams": {**(state.get("hparams") or {}), "threshold": threshold}}, path)


def summarize_run(session: Session, threshold: float, auto_threshold: bool, paths: dict[str, tuple[Path, Path]],
                  mask_rles: Any = None) -> tuple[float, dict | None]:
    """Combine the scored folds into oof.csv, choose the threshold, write summary and gallery."""
    run_logs, k = session.log_dir, session.hp.folds
    parts = [pd.read_csv(run_logs / f"fold{f}" / "oof.csv", dtype={"image": str, "car": str})
             for f in range(k) if (run_logs / f"fold{f}" / "oof.csv").exists()]
    if not parts:
        if auto_threshold:
            raise PlanError("--threshold auto needs out-of-fold scores, and no fold of this run is scored yet")
        return threshold, None
    oof = pd.concat(parts, ignore_index=True).sort_values("image").reset_index(drop=True)
    means = votes = None
    if auto_threshold:
        threshold, means, votes = choose_threshold(oof)
    oof["dice"] = oof[dice_column(threshold)]
    cols = ["image", "car", "angle", "fold", "dice"]
    write_csv(oof[cols + [c for c in oof.columns if c.startswith("dice@")]], run_logs / "oof.csv")
    summary = summarize(oof, threshold)
    summary["folds_scored"] = sorted(int(f) for f in oof["fold"].unique())
    summary["threshold_auto"] = auto_threshold
    if means is not None:
        summary["threshold_means"] = means
        summary["threshold_votes"] = votes
    gallery = run_logs / "oof_worst.png"
    write_gallery(gallery_entries(summary["worst"], paths, session, threshold, mask_rles), gallery)
    summary["gallery"] = str(gallery)
    write_json(summary, run_logs / "oof_summary.json")
    print("\n" + format_summary(summary) + f"\n  error gallery: {gallery}")
    return threshold, summary


def gallery_entries(worst: list[dict], paths: dict[str, tuple[Path, Path]], session: Session,
                    threshold: float, mask_rles: Any = None) -> list[GalleryEntry]:
    """Re-predict the worst images with their own fold's model (a dozen images: cheap), with the
    session's device, precision and streams, as the OOF scores were."""
    hp = session.hp
    probs: dict[str, np.ndarray] = {}
    for fold in sorted({int(w["fold"]) for w in worst}):
        names = [w["image"] for w in worst if int(w["fold"]) == fold]
        predictor = fold_predictor(session.models_dir / f"fold{fold}" / "best.pt", session)
        collect = _Keep()  # images at each member's data size: unet-original pads them itself
        loader = DataLoader(predictor.test_dataset([paths[n][0] for n in names], hp.fast_decode), batch_size=4)
        predictor.predict(loader, [collect], tta=hp.tta)
        probs.update(collect.probs)
    return [GalleryEntry(w["image"], read_image(paths[w["image"]][0]), upsample_mask(probs[w["image"]], threshold),
                         true_mask(*paths[w["image"]], mask_rles).astype(bool), float(w["dice"])) for w in worst]


class _Keep(Callback):
    def __init__(self) -> None:
        self.probs: dict[str, np.ndarray] = {}

    def on_predict_batch_end(self, trainer, names, probs) -> None:
        for n, p in zip(names, probs.detach().float().cpu().numpy()):
            self.probs[n] = p
