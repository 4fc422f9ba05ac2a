"""The demo cars as a 3-class trimap set (car / background / border band), in the ``folder``
layout (``images/*.jpg`` + ``masks/*.png``), so a multi-class run needs no download.

Class ids mirror Oxford-IIIT Pet's trimaps: 0 car, 1 background, 2 border (a band straddling
the car's outline). Written into a temp sibling folder and renamed into place with a
``.complete`` marker holding the parameters, like carvana.data.demo.dataset.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import cv2
from PIL import Image

from carvana.data.demo.car import demo_cars, draw_background, draw_car
from carvana.data.palette import palette_bytes

FORMAT_VERSION = 1
MARKER = ".complete"
CLASS_NAMES = ("car", "background", "border")


def trimap_from_mask(mask, band: int):
    """0/1 car mask -> uint8 trimap: 0 car, 1 background, 2 within ``band`` px of the outline."""
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * band + 1, 2 * band + 1))
    border = cv2.dilate(mask, kernel) != cv2.erode(mask, kernel)
    trimap = (1 - mask).astype("uint8")
    trimap[border] = 2
    return trimap


def write_demo_trimap_dataset(root: Path, seed: int = 0, n_cars: int = 6, angles: int = 8,
                              size: tuple[int, int] = (320, 480)) -> Path:
    """Write ``n_cars`` x ``angles`` views at ``size`` (H, W) into ``root``; return ``root``.

    A finished folder with the same parameters is returned as is; a folder holding anything
    else than this layout is never overwritten.
    """
    root = Path(root)
    params = {"format": FORMAT_VERSION, "seed": int(seed), "n_cars": int(n_cars), "angles": int(angles),
              "size": [int(size[0]), int(size[1])]}
    try:
        if json.loads((root / MARKER).read_text()) == params:
            return root
    except (OSError, ValueError):
        pass
    if root.exists() and not {p.name for p in root.iterdir()} <= {"images", "masks", MARKER}:
        raise FileExistsError(f"{root}: exists and is not a demo trimap dataset; refusing to overwrite it")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    tmp.chmod(0o755)
    try:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        band = max(2, round(0.012 * max(size)))
        step = max(1, 16 // angles)
        for spec in demo_cars(seed, n_cars):
            background = draw_background(spec, size)
            for a in range(0, step * angles, step):
                img, mask = draw_car(spec, a % 16, size=size, background=background)
                name = f"{spec.car_id}_{a % 16 + 1:02d}"
                ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
                if not ok:
                    raise OSError(f"could not encode {name}.jpg")
                (tmp / "images" / f"{name}.jpg").write_bytes(jpg.tobytes())
                png = Image.fromarray(trimap_from_mask(mask, band), mode="P")
                png.putpalette(palette_bytes())
                png.save(tmp / "masks" / f"{name}.png")
        (tmp / MARKER).write_text(json.dumps(params, sort_keys=True))
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
