"""The demo dataset writer: procedurally drawn cars (carvana.demo_car) in the exact Carvana layout.

For running the pipeline without Kaggle: train/, train_masks/ (palette GIFs), test/ (JPEGs),
train_masks.csv, sample_submission.csv, metadata.csv and the hidden test_solution.csv, written into
a temp sibling folder and renamed into place with a ``.complete`` marker, so the same parameters
give byte-identical files and an interrupted write is rebuilt.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from pathlib import Path

import cv2
from PIL import Image

from carvana.data.demo.car import demo_cars, draw_background, draw_car
from carvana.data.layout import ANGLES_PER_CAR
from carvana.data.rle import rle_encode

FORMAT_VERSION = 1  # bump when the drawing (carvana.demo_car) changes, so old demo folders are rebuilt
MARKER = ".complete"
_LAYOUT_NAMES = {"train", "train_masks", "test", "train_masks.csv", "sample_submission.csv",
                 "metadata.csv", "test_solution.csv", MARKER}


def _read_marker(root: Path) -> dict | None:
    try:
        return json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _write_all(folder: Path, seed: int, n_train_cars: int, n_test_cars: int) -> None:
    """Draw every car into ``folder`` (a fresh temp folder): images, masks and the CSV files."""
    specs = demo_cars(seed, n_train_cars + n_test_cars)
    for sub in ("train", "train_masks", "test"):
        (folder / sub).mkdir()
    train_rows, solution_rows = [], []
    for i, spec in enumerate(specs):
        is_train, background = i < n_train_cars, draw_background(spec)
        for a in range(ANGLES_PER_CAR):
            img, mask = draw_car(spec, a, background=background)
            name = f"{spec.car_id}_{a + 1:02d}.jpg"
            ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
            if not ok:
                raise OSError(f"could not encode {name}")
            (folder / ("train" if is_train else "test") / name).write_bytes(jpg.tobytes())
            (train_rows if is_train else solution_rows).append((name, rle_encode(mask)))
            if is_train:  # palette GIF like the competition's: index 0 black, 1 white, 256 entries
                gif = Image.frombytes("P", (mask.shape[1], mask.shape[0]), mask.tobytes())
                gif.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
                gif.save(folder / "train_masks" / f"{Path(name).stem}_mask.gif", format="GIF", optimize=False)

    def table(path: Path, rows: list, header=("img", "rle_mask"), **kw) -> None:
        with open(path, "w", newline="") as f:
            writer = csv.writer(f, **kw)
            writer.writerow(header)
            writer.writerows(sorted(rows))

    table(folder / "train_masks.csv", train_rows)
    table(folder / "test_solution.csv", solution_rows)
    table(folder / "sample_submission.csv", [(name, "1 1") for name, _ in solution_rows])
    # Quoted with LF endings like the real metadata.csv (the other CSVs use CRLF, like Kaggle's).
    table(folder / "metadata.csv", [(s.car_id, str(s.year), s.make, s.style, s.style, s.paint_name) for s in specs],
          header=("id", "year", "make", "model", "trim1", "trim2"), quoting=csv.QUOTE_ALL, lineterminator="\n")


def write_demo_dataset(root: Path, seed: int = 0, n_train_cars: int = 8, n_test_cars: int = 4) -> Path:
    """Write a demo dataset in the Carvana layout into ``root`` (plus test_solution.csv); return ``root``.

    Built in a temp sibling folder and renamed into place, with a ``.complete`` marker holding the
    parameters: a finished folder with the same parameters is returned as is, any other (other
    parameters, or no marker) is rebuilt. A folder holding anything but the layout is never deleted.
    """
    root = Path(root)
    seed, n_train_cars, n_test_cars = int(seed), int(n_train_cars), int(n_test_cars)  # json-able
    params = {"format": FORMAT_VERSION, "seed": seed, "n_train_cars": n_train_cars, "n_test_cars": n_test_cars}
    if _read_marker(root) == params:
        return root
    if root.exists():
        if not root.is_dir() or not {p.name for p in root.iterdir()} <= _LAYOUT_NAMES:
            raise FileExistsError(f"{root}: exists and is not a demo dataset; refusing to overwrite it")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the dataset is not
    try:
        _write_all(tmp, seed, n_train_cars, n_test_cars)
        (tmp / MARKER).write_text(json.dumps(params, sort_keys=True))
        if root.exists():  # a stale or interrupted folder: swap it out, then delete it
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            os.replace(root, old / root.name)
            os.replace(tmp, root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only left over if something failed
    return root
