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
from types import SimpleNamespace
from typing import Callable, Sequence

import numpy as np
import pandas as pd
from torch.utils.data import DataLoader

from carvana.data.datasets import TestImageDataset, read_image, read_mask
from carvana.data.postprocess import upsample_mask
from carvana.submission.ensemble import load_members
from carvana.training import distributed as dist
from carvana.training.callbacks import Callback
from carvana.training.checkpoint import load_checkpoint
from carvana.training.folds import fold_files, load_or_assign_folds
from carvana.training.gallery import GalleryEntry, write_gallery
from carvana.training.oof import (THRESHOLD_GRID, choose_threshold, dice_column, format_summary, score_fold,
                                  summarize, write_csv, write_json)

# train_fold(fold, models_dir, log_dir, train_images, train_masks, valid_images, valid_masks) -> classifier
TrainFold = Callable[..., object]


@dataclass
class FoldsResult:
    members: list[Path]  # best.pt of each fold used for prediction
    threshold: float  # the threshold prediction uses (chosen on OOF with --threshold auto)
    summary: dict | None  # the OOF summary once any fold is scored


def parse_fold(text: str, k: int) -> list[int]:
    """--fold 'all' -> 0..K-1; 'N' -> [N]."""
    if str(text).strip().lower() == "all":
        return list(range(k))
    try:
        n = int(text)
    except ValueError:
        raise SystemExit(f"error: --fold {text!r}: expected 'all' or a fold number 0..{k - 1}") from None
    if not 0 <= n < k:
        raise SystemExit(f"error: --fold {n}: --folds {k} has folds 0..{k - 1}")
    return [n]


def run_folds(hp: SimpleNamespace, run: str, images: Sequence[Path], masks: Sequence[Path],
              input_hw: tuple[int, int], models_root: Path, logs_root: Path, train_fold: TrainFold,
              threshold: float, auto_threshold: bool) -> FoldsResult:
    """Train (or resume, or skip) the requested folds, score each out of fold, summarise."""
    main = dist.is_main_process()
    run_models, run_logs = models_root / run, logs_root / run
    table = dist.broadcast_object(load_or_assign_folds(run_logs / "folds.csv", images, hp.folds, hp.seed) if main else None)
    folds = parse_fold(hp.fold, hp.folds)
    grid = sorted(set(THRESHOLD_GRID) | {float(threshold)})
    for f in folds:
        fold_models, fold_logs = run_models / f"fold{f}", run_logs / f"fold{f}"
        if (fold_logs / "oof.csv").exists() and (hp.resume or not hp.train):
            if main:
                print(f"fold {f}/{hp.folds}: finished earlier, skipped")
            continue
        if not hp.train:
            continue
        train_i, train_m, valid_i, valid_m = fold_files(table, f, images, masks)
        if main:
            print(f"\n=== fold {f} of {hp.folds}: {len(train_i)} train / {len(valid_i)} valid images "
                  f"({table.loc[table['fold'] == f, 'car'].nunique()} validation cars) ===")
        classifier = train_fold(f, fold_models, fold_logs, train_i, train_m, valid_i, valid_m)
        dist.barrier()  # best.pt is written
        if main:  # the fold's best weights score its validation cars (one process is enough: ~1/K of train)
            classifier.load_state_dict(load_checkpoint(fold_models / "best.pt", classifier.device), weights_only=True)
            scores = score_fold(classifier, valid_i, valid_m, input_hw, grid, hp.tta, hp.predict_batch_size, hp.workers)
            meta = table.set_index("image").loc[scores["image"], ["car", "angle"]].reset_index(drop=True)
            scores = pd.concat([scores[["image"]], meta, scores.drop(columns="image")], axis=1).assign(fold=f)
            write_csv(scores, fold_logs / "oof.csv")
            print(f"fold {f}: OOF Dice {scores[dice_column(threshold)].mean():.5f} on {len(scores)} images")
        dist.barrier()

    summary = None
    if main:
        paths = {Path(i).name: (Path(i), Path(m)) for i, m in zip(images, masks)}
        threshold, summary = summarize_run(run_logs, hp.folds, threshold, auto_threshold, paths, run_models, hp.tta)
    threshold = float(dist.broadcast_object(threshold))
    members = [run_models / f"fold{f}" / "best.pt" for f in folds]
    missing = [str(p) for p in members if not p.is_file()]
    if missing:
        raise SystemExit(f"error: fold model(s) missing: {', '.join(missing)}; train them (without --no-train)")
    return FoldsResult(members, threshold, summary)


def summarize_run(run_logs: Path, k: int, threshold: float, auto_threshold: bool,
                  paths: dict[str, tuple[Path, Path]], run_models: Path, tta: bool) -> tuple[float, dict | None]:
    """Combine the scored folds into oof.csv, choose the threshold, write summary and gallery."""
    parts = [pd.read_csv(run_logs / f"fold{f}" / "oof.csv", dtype={"image": str, "car": str})
             for f in range(k) if (run_logs / f"fold{f}" / "oof.csv").exists()]
    if not parts:
        if auto_threshold:
            raise SystemExit("error: --threshold auto needs out-of-fold scores, and no fold of this run is scored yet")
        return threshold, None
    oof = pd.concat(parts, ignore_index=True).sort_values("image").reset_index(drop=True)
    means = None
    if auto_threshold:
        threshold, means = choose_threshold(oof)
    oof["dice"] = oof[dice_column(threshold)]
    cols = ["image", "car", "angle", "fold", "dice"]
    write_csv(oof[cols + [c for c in oof.columns if c.startswith("dice@")]], run_logs / "oof.csv")
    summary = summarize(oof, threshold)
    summary["folds_scored"] = sorted(int(f) for f in oof["fold"].unique())
    summary["threshold_auto"] = auto_threshold
    if means is not None:
        summary["threshold_means"] = means
    gallery = run_logs / "oof_worst.png"
    write_gallery(gallery_entries(summary["worst"], paths, run_models, threshold, tta), gallery)
    summary["gallery"] = str(gallery)
    write_json(summary, run_logs / "oof_summary.json")
    print("\n" + format_summary(summary) + f"\n  error gallery: {gallery}")
    return threshold, summary


def gallery_entries(worst: list[dict], paths: dict[str, tuple[Path, Path]], run_models: Path,
                    threshold: float, tta: bool) -> list[GalleryEntry]:
    """Re-predict the worst images with their own fold's model (a dozen images: cheap)."""
    probs: dict[str, np.ndarray] = {}
    for fold in sorted({int(w["fold"]) for w in worst}):
        names = [w["image"] for w in worst if int(w["fold"]) == fold]
        (member,) = load_members([run_models / f"fold{fold}" / "best.pt"], [1.0])
        collect = _Keep()
        loader = DataLoader(TestImageDataset([paths[n][0] for n in names], member.config.input_size), batch_size=4)
        member.classifier.predict(loader, [collect], tta=tta)
        probs.update(collect.probs)
    return [GalleryEntry(w["image"], read_image(paths[w["image"]][0]), upsample_mask(probs[w["image"]], threshold),
                         read_mask(paths[w["image"]][1]).astype(bool), float(w["dice"])) for w in worst]


class _Keep(Callback):
    def __init__(self) -> None:
        self.probs: dict[str, np.ndarray] = {}

    def on_predict_batch_end(self, trainer, names, probs) -> None:
        for n, p in zip(names, probs.detach().float().cpu().numpy()):
            self.probs[n] = p
