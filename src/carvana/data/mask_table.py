"""Training masks from ``train_masks.csv`` (the RLE table Kaggle ships next to the GIFs).

Decoding a mask's RLE row costs ~0.4 ms on a 1918x1280 car; decoding its GIF (file read
plus LZW) ~6-11 ms on an idle core (bench/loader.py, bench/README.md). The values are the
same (tests/test_mask_table.py checks every mask of the real sample). Only the strings are
held (~9 KB per row: ~46 MB for Kaggle's 5,088 rows), and each is decoded in the loader
worker that needs it; the GIF stays the fallback for an image without a row.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from carvana.data.rle import RLEError, rle_decode

MASK_TABLE = "train_masks.csv"


class MaskTableError(ValueError):
    """A ``train_masks.csv`` that cannot be used, with the file (and row) named."""


class MaskTable(dict):
    """{image file name: RLE string}, and the ``path`` of the CSV it came from (for errors)."""

    def __init__(self, rows: dict[str, str], path: Path) -> None:
        super().__init__(rows)
        self.path = Path(path)


def load_mask_table(path: Path) -> MaskTable:
    """``train_masks.csv`` (header ``img,rle_mask``) -> {image file name: RLE string}.

    Rows are not decoded here (that happens per item, in the workers); an empty RLE is an
    empty mask. A missing column, a name listed twice or an unreadable file is an error.
    """
    try:
        # keep_default_na=False: an empty mask is "", not NaN; str dtype keeps names as written.
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise MaskTableError(f"{path}: not a readable CSV table ({exc})") from exc
    if list(table.columns[:2]) != ["img", "rle_mask"]:
        raise MaskTableError(f"{path}: expected the header 'img,rle_mask', got {','.join(map(str, table.columns))}")
    duplicated = table["img"][table["img"].duplicated()]
    if len(duplicated):
        raise MaskTableError(f"{path}: image {duplicated.iloc[0]!r} is listed more than once")
    return MaskTable(dict(zip(table["img"], table["rle_mask"])), path)


def mask_table_for(folder: Path) -> MaskTable | None:
    """The folder's ``train_masks.csv`` as a table, or None where it has none (GIFs only)."""
    path = Path(folder) / MASK_TABLE
    return load_mask_table(path) if path.is_file() else None


def mask_from_rle(rle: str, shape: tuple[int, int], source: str) -> np.ndarray:
    """Decode one row to a uint8 0/1 (H, W) mask; a malformed row is an error naming ``source``."""
    try:
        return rle_decode(rle, shape)
    except RLEError as exc:
        raise MaskTableError(f"{source}: bad RLE for an image of {shape[1]}x{shape[0]} (W x H): {exc}") from exc
