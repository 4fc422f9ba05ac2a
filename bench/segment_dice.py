"""Score ``python -m carvana.segment``'s masks against a Carvana RLE solution: the Kaggle Dice.

    python -m carvana.segment --checkpoint best.pt ../shared/carvana-sample/test -o /tmp/seg
    python bench/segment_dice.py /tmp/seg ../shared/carvana-sample/test_solution.csv

Checks that segment's path (PIL decoding, letterbox, probabilities resized to the photo before
thresholding) keeps the quality the pipeline's own prediction reaches on the same images.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from carvana.data.rle import rle_decode  # noqa: E402
from carvana.training.losses import dice_per_image  # noqa: E402


def main(mask_dir: str, solution_csv: str) -> float:
    solution = pd.read_csv(solution_csv)
    scores = []
    for name, rle in zip(solution["img"], solution["rle_mask"].fillna("")):
        path = Path(mask_dir) / (Path(name).stem + "_mask.png")
        if not path.is_file():
            raise SystemExit(f"{path}: missing (segment every image of the solution first)")
        with Image.open(path) as im:
            ours = np.asarray(im) > 127
        scores.append(float(dice_per_image(ours, rle_decode(rle, ours.shape))))
    mean = float(np.mean(scores))
    print(f"{len(scores)} masks: mean Dice {mean:.4f} (min {min(scores):.4f})")
    return mean


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
