"""Photos in, masks and cutouts out: reading any image, letterbox geometry, output files.

Used by ``python -m carvana.segment`` (and the ONNX parity check of ``carvana.export``).

Geometry: a photo is **letterboxed** into the network's input, not stretched. Carvana
models are trained on 1918x1280 images resized to a ~1.5:1 input (e.g. 256x384), so the
cars they saw kept their proportions; letterboxing keeps them for a portrait or square
photo too, where stretching would squash the car to a shape never seen in training. For a
Carvana-shaped photo both are the same to within a pixel. The padding repeats the photo's
edge pixels (a studio backdrop continues instead of a hard artificial border). The network's
probabilities are cropped back to the photo's box and resized to the photo's own size
*before* thresholding, so edges are placed at full resolution.

Decoding: the outputs need the photo at full size, so it is always decoded in full. The
network input of a JPEG comes from a second, DCT-reduced decode (``read_photo(path, scale)``,
PIL's ``Image.draft``, the scale :func:`carvana.data.jpeg.decode_scale` picks for the photo's
box), resized with the photo's exact geometry. For a 1918x1280 photo and a 256x384 input that
extra decode at 1/4 took ~2 ms against ~7 ms for the area resize of the full decode it
replaces (rough figures from a busy 2-core VM). Other formats, and ``--no-fast-decode``,
resize the full decode.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
from PIL import Image, ImageColor, ImageOps

from carvana.data.datasets import mirror_pad, resize_decoded
from carvana.data.files import write_bytes_atomic

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
FITS = ("letterbox", "stretch")


class PhotoError(ValueError):
    """A photo (or background picture) that cannot be used, with the file named in the message."""


def is_jpeg_file(path: Path) -> bool:
    """True when the file starts with the JPEG start-of-image marker (whatever its suffix)."""
    try:
        with open(path, "rb") as f:
            return f.read(2) == b"\xff\xd8"
    except OSError:
        return False


def read_photo(path: Path, scale: int = 1) -> np.ndarray:
    """Any JPEG/PNG/WebP as uint8 RGB (H, W, 3), upright (EXIF orientation applied).

    ``scale`` 2, 4 or 8: a JPEG decoded at 1/scale by libjpeg's DCT scaling (``Image.draft``;
    each side rounded up, the orientation applied after), other formats in full regardless.
    Grayscale and palette images become RGB; images with transparency are composited onto
    white first (what lies under transparent pixels is arbitrary); 16-bit images are scaled
    to 8 bits. Any failure (missing, truncated, not an image) raises :class:`PhotoError`.
    """
    try:
        with Image.open(path) as im:
            if scale > 1 and im.format in ("JPEG", "MPO"):  # raw (file) orientation: same scale either way
                im.draft("RGB", (im.size[0] // scale, im.size[1] // scale))
            im = ImageOps.exif_transpose(im)  # also forces the full decode, so truncation shows here
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                arr = np.asarray(im, dtype=np.float32)
                scale = 257.0 if arr.max(initial=0) > 255 else 1.0
                gray = np.clip(arr / scale + 0.5, 0, 255).astype(np.uint8)
                return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))
            if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
                rgba = im.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(white, rgba)
            rgb = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise PhotoError(f"{path}: file not found") from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise PhotoError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from None
    if rgb.ndim != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise PhotoError(f"{path}: empty image")
    return np.ascontiguousarray(rgb)


def find_photos(inputs: Sequence[str | Path], exclude: Path | None = None) -> tuple[list[tuple[Path, Path]], list[str]]:
    """(photos, problems): every (path, output stem relative to OUT_DIR) named by ``inputs``.

    Files are taken as given (whatever their suffix: reading decides); folders are searched
    recursively for image suffixes, skipping hidden entries and ``exclude`` (the output folder,
    so outputs never become inputs). Paths that do not exist are reported in ``problems``.
    """
    photos: list[tuple[Path, Path]] = []
    problems: list[str] = []
    skip = exclude.resolve() if exclude is not None else None
    for item in map(Path, inputs):
        if item.is_dir():
            found = []
            for p in sorted(item.rglob("*")):
                rel = p.relative_to(item)
                if (p.suffix.lower() not in IMAGE_SUFFIXES or not p.is_file()
                        or any(part.startswith(".") for part in rel.parts)
                        or (skip is not None and p.resolve().is_relative_to(skip))):
                    continue
                found.append((p, rel.with_suffix("")))
            if not found:
                warnings.warn(f"{item}: no {'/'.join(IMAGE_SUFFIXES)} images in this folder", stacklevel=2)
            photos += found
        elif item.exists():
            photos.append((item, Path(item.stem)))
        else:
            problems.append(f"{item}: no such file or folder")
    seen: dict[Path, Path] = {}
    clashes = []
    for path, rel in photos:
        if rel in seen:
            clashes.append(f"{seen[rel]} and {path}")
        seen.setdefault(rel, path)
    if clashes:
        raise PhotoError(f"these inputs would write the same output files ({'; '.join(clashes[:5])}): "
                         "segment them in separate runs with different -o folders")
    return photos, problems


@dataclass(frozen=True)
class Box:
    """Where the photo sits inside the network's output grid (the rest is padding)."""

    top: int
    left: int
    height: int
    width: int


def fit_box(photo_hw: tuple[int, int], target_hw: tuple[int, int], fit: str = "letterbox") -> Box:
    """The photo's box in ``target_hw``: the largest same-aspect box, centred ('letterbox'),
    or the whole target ('stretch')."""
    th, tw = target_hw
    if fit == "stretch":
        return Box(0, 0, th, tw)
    if fit != "letterbox":
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    h, w = photo_hw
    scale = min(th / h, tw / w)
    bh, bw = min(th, max(1, round(h * scale))), min(tw, max(1, round(w * scale)))
    return Box((th - bh) // 2, (tw - bw) // 2, bh, bw)


def input_box(photo_hw: tuple[int, int], input_hw: tuple[int, int], margin: int = 0, fit: str = "letterbox") -> Box:
    """The photo's box in a network's output grid (the input less ``margin`` per side)."""
    return fit_box(photo_hw, (input_hw[0] - 2 * margin, input_hw[1] - 2 * margin), fit)


def to_network_input(rgb: np.ndarray, input_hw: tuple[int, int], margin: int = 0,
                     fit: str = "letterbox", photo_hw: tuple[int, int] | None = None) -> tuple[np.ndarray, Box]:
    """Resize ``rgb`` into an (H, W, 3) uint8 network input; return it and the photo's box.

    ``margin``: pixels a valid-convolution network loses per side; the photo is fitted into
    the output grid (H - 2m, W - 2m), so the output aligns with the box. The letterbox bands
    repeat the photo's edge pixels; the margin then mirrors the whole grid outwards (edge not
    repeated), exactly as training feeds such a network (``models.unet_original.mirror_pad``).
    ``photo_hw``: the photo's full size when ``rgb`` is a DCT-reduced decode of it (the box is
    the full photo's; ``datasets.resize_decoded`` keeps its geometry exact).
    """
    h, w = input_hw
    gh, gw = h - 2 * margin, w - 2 * margin
    photo_hw = tuple(photo_hw or rgb.shape[:2])
    box = input_box(photo_hw, input_hw, margin, fit)
    # Bilinear below a 2x shrink, else area (datasets.resize_interpolation), as in training.
    resized = resize_decoded(rgb, (box.height, box.width), photo_hw)
    out = cv2.copyMakeBorder(resized, box.top, gh - box.top - box.height, box.left, gw - box.left - box.width,
                             cv2.BORDER_REPLICATE)
    if margin:
        grid = torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1)[None].float()
        out = mirror_pad(grid, margin)[0].permute(1, 2, 0).to(torch.uint8).numpy()  # copies values: exact
    return np.ascontiguousarray(out), box


def probabilities_to_mask(prob: np.ndarray, box: Box, photo_hw: tuple[int, int], threshold: float) -> np.ndarray:
    """Crop the photo's box out of a network-resolution probability map, resize it bilinearly
    to the photo's size, then threshold: a bool (H, W) mask."""
    crop = np.ascontiguousarray(prob[box.top:box.top + box.height, box.left:box.left + box.width], dtype=np.float32)
    h, w = photo_hw
    if crop.shape != (h, w):
        crop = cv2.resize(crop, (w, h), interpolation=cv2.INTER_LINEAR)
    return crop > threshold


# ------------------------------------------------------------------------------- outputs
@dataclass(frozen=True)
class Background:
    """What ``--background`` composites the car onto: a colour, or a picture (covering the photo)."""

    color: tuple[int, int, int] | None = None
    picture: np.ndarray | None = None

    def canvas(self, hw: tuple[int, int]) -> np.ndarray:
        """An (H, W, 3) uint8 RGB background of the photo's size (a picture is scaled to cover it, centred)."""
        h, w = hw
        if self.picture is None:
            return np.broadcast_to(np.array(self.color, np.uint8), (h, w, 3))
        ph, pw = self.picture.shape[:2]
        scale = max(h / ph, w / pw)
        sh, sw = max(h, round(ph * scale)), max(w, round(pw * scale))
        big = cv2.resize(self.picture, (sw, sh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        top, left = (sh - h) // 2, (sw - w) // 2
        return big[top:top + h, left:left + w]


def parse_background(text: str) -> Background:
    """An existing image file -> that picture; otherwise a colour ('white', '#00ff00', 'rgb(0,0,255)')."""
    if Path(text).is_file():
        return Background(picture=read_photo(Path(text)))
    try:
        rgb = ImageColor.getrgb(text)
    except ValueError:
        raise PhotoError(f"--background {text!r}: neither an image file nor a colour name / #rrggbb") from None
    return Background(color=tuple(int(c) for c in rgb[:3]))


def output_paths(out_dir: Path, rel_stem: Path, overlay: bool, background: bool) -> dict[str, Path]:
    """Every file written for one photo, by kind."""
    base = Path(out_dir) / rel_stem
    paths = {"mask": base.with_name(base.name + "_mask.png"), "cutout": base.with_name(base.name + "_cutout.png")}
    if overlay:
        paths["overlay"] = base.with_name(base.name + "_overlay.jpg")
    if background:
        paths["background"] = base.with_name(base.name + "_background.jpg")
    return paths


def _write_atomic(path: Path, image: np.ndarray, params: list[int]) -> None:
    """Encode by ``path``'s suffix, write to a temp name beside it, rename: never a half file."""
    ok, data = cv2.imencode(path.suffix, image, params)
    if not ok:
        raise OSError(f"{path}: could not encode the image")
    # Durable too: a rerun skips photos whose outputs exist, so a file emptied by a crash would stay.
    write_bytes_atomic(path, data.tobytes())


def outline_overlay(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The photo with the mask's outline (holes too) drawn on it, RGB."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    thickness = max(2, round(max(rgb.shape[:2]) / 400))
    out = np.ascontiguousarray(rgb).copy()
    cv2.drawContours(out, contours, -1, (0, 255, 0), thickness, lineType=cv2.LINE_AA)
    return out


def composite(rgb: np.ndarray, mask: np.ndarray, background: Background) -> np.ndarray:
    """The car (mask) from the photo on ``background``, RGB."""
    return np.where(mask[..., None], rgb, background.canvas(rgb.shape[:2]))


def write_outputs(rgb: np.ndarray, mask: np.ndarray, paths: dict[str, Path], background: Background | None = None) -> None:
    """Write the files ``paths`` names (see :func:`output_paths`) for photo ``rgb`` and bool ``mask``.

    The mask is written last, after everything else, so a present mask means a finished photo
    even for a reader that only looks at masks.
    """
    alpha = mask.astype(np.uint8) * 255
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    png = [cv2.IMWRITE_PNG_COMPRESSION, 3]
    jpg = [cv2.IMWRITE_JPEG_QUALITY, 92]
    _write_atomic(paths["cutout"], np.dstack([bgr, alpha]), png)
    if "overlay" in paths:
        _write_atomic(paths["overlay"], cv2.cvtColor(outline_overlay(rgb, mask), cv2.COLOR_RGB2BGR), jpg)
    if "background" in paths:
        if background is None:
            raise ValueError("a background output needs a Background")
        _write_atomic(paths["background"], cv2.cvtColor(composite(rgb, mask, background), cv2.COLOR_RGB2BGR), jpg)
    _write_atomic(paths["mask"], alpha, png)
