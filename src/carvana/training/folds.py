"""Car-grouped K-fold splits: every car in exactly one validation fold, its 16 views together.

scikit-learn's GroupKFold does the grouping; ``shuffle=True`` with ``random_state=seed``
shuffles the car order first, so the folds are deterministic for a seed and not tied to
the alphabetical order of car ids. The assignment is written to ``folds.csv`` in the
run's log folder so a resumed run (and the OOF table) uses exactly the same folds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from carvana.data.files import write_text_atomic
from carvana.data.layout import car_id

FOLD_COLUMNS = ["image", "car", "angle", "fold"]


def angle_of(image_name: str | Path) -> int:
    """'00087a6bd4dc_07.jpg' -> 7 (the view number, 1..16)."""
    stem = Path(image_name).stem
    try:
        return int(stem.rpartition("_")[2])
    except ValueError:
        raise ValueError(f"{image_name}: not a Carvana image name '<car>_<angle>.jpg'") from None


def assign_folds(images: Sequence[Path | str], k: int, seed: int) -> pd.DataFrame:
    """One row per image (image, car, angle, fold), sorted by image name; folds 0..k-1 by car."""
    names = sorted(Path(p).name for p in images)
    cars = [car_id(n) for n in names]
    n_cars = len(set(cars))
    if k < 2:
        raise ValueError(f"--folds must be 0 (one train/valid split) or >= 2, got {k}")
    if n_cars < k:
        raise ValueError(f"--folds {k} needs at least {k} cars; the training set has {n_cars}")
    fold = np.empty(len(names), dtype=np.int64)
    from sklearn.model_selection import GroupKFold  # here: scikit-learn costs every run ~1 s of start-up otherwise

    splitter = GroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for f, (_, valid_idx) in enumerate(splitter.split(np.zeros(len(names)), groups=cars)):
        fold[valid_idx] = f
    return pd.DataFrame({"image": names, "car": cars, "angle": [angle_of(n) for n in names], "fold": fold})


def load_or_assign_folds(path: Path, images: Sequence[Path | str], k: int, seed: int) -> pd.DataFrame:
    """The run's fold table: read from ``path`` if it exists (resume), else assigned and written.

    A saved table that does not match the images or K is an error naming the file: resuming
    with other folds would leak validation cars into training.
    """
    table = assign_folds(images, k, seed)
    path = Path(path)
    if path.exists():
        saved = pd.read_csv(path, dtype={"image": str, "car": str})
        if list(saved.columns) != FOLD_COLUMNS:
            raise ValueError(f"{path}: expected columns {FOLD_COLUMNS}, got {list(saved.columns)}")
        if sorted(saved["image"]) != list(table["image"]) or saved["fold"].nunique() != k:
            raise ValueError(f"{path}: this run was split into {saved['fold'].nunique()} folds of "
                             f"{len(saved)} images; now {k} folds of {len(table)} images were asked for. "
                             "Use a new --run-name for a different split.")
        return saved.sort_values("image").reset_index(drop=True)
    write_text_atomic(path, table.to_csv(index=False))
    return table


def fold_files(table: pd.DataFrame, fold: int, images: Sequence[Path], masks: Sequence[Path]
               ) -> tuple[list[Path], list[Path], list[Path], list[Path]]:
    """(train_images, train_masks, valid_images, valid_masks) of one fold, in name order."""
    mask_of = {Path(i).name: (Path(i), Path(m)) for i, m in zip(images, masks)}
    valid_names = set(table.loc[table["fold"] == fold, "image"])
    train = [mask_of[n] for n in table["image"] if n not in valid_names]
    valid = [mask_of[n] for n in table["image"] if n in valid_names]
    return [i for i, _ in train], [m for _, m in train], [i for i, _ in valid], [m for _, m in valid]
