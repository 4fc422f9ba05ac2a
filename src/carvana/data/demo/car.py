"""Procedurally drawn demo cars: one view of one car in its photo studio, with its exact mask.

The car itself (random spec, 3-D geometry, turntable camera) is carvana.data.demo.car_model; this
module draws a view of it like Carvana's photo studio: a light-grey wall with dark lettering, a
floor with a turntable and a soft shadow under the car that is background, not car. The mask is
the union of the filled polygons at full resolution; the image is the same drawing, softened by a
slight blur (the anti-aliasing of a real lens) plus sensor noise. carvana.data.demo.dataset writes
these views out in the Carvana layout.
"""

from __future__ import annotations

import functools

import cv2
import numpy as np

# CarSpec, random_car and demo_cars are imported from here too (their home before the model had its own module).
from carvana.data.demo.car_model import GLYPHS, Camera, CarSpec, car_geometry, demo_cars, random_car  # noqa: F401
from carvana.data.layout import ANGLES_PER_CAR, ORIG_SHAPE, ORIG_WIDTH

_S = 16.0  # cv2 fixed-point factor (shift=4): sub-pixel polygon vertices at any output size
_LIGHT = np.array([-0.25, 0.55, 0.8]) / np.linalg.norm([-0.25, 0.55, 0.8])


def _shade(base: tuple, normal_w: np.ndarray, gloss: float) -> tuple:
    """Studio shading: diffuse from a soft box above the camera, bright reflections on upward faces."""
    diff = max(0.0, float(normal_w @ _LIGHT))
    up = max(0.0, float(normal_w[2]))
    col = np.array(base, float) * (0.5 + 0.55 * diff) + gloss * (70 * up ** 2 + 90 * diff ** 30)
    return tuple(float(v) for v in np.clip(col, 0, 255))


def _fill(img: np.ndarray, mask: np.ndarray | None, pts2d: np.ndarray, colour) -> None:
    """Fill a polygon (output pixels, sub-pixel vertices) in ``img``, and with 1 in ``mask`` if given."""
    poly = [np.round(pts2d * _S).astype(np.int32)]
    cv2.fillPoly(img, poly, colour, cv2.LINE_8, 4)
    if mask is not None:
        cv2.fillPoly(mask, poly, 1, cv2.LINE_8, 4)


@functools.lru_cache(maxsize=2)
def _noise_tile(seed: int, h: int, w: int) -> np.ndarray:
    """Uniform 0..6 noise, a little larger than the image so each view can use a shifted crop."""
    return np.random.default_rng(seed).integers(0, 7, (h + 32, w + 32, 3), np.uint8)


def draw_background(spec: CarSpec, size: tuple[int, int] = ORIG_SHAPE) -> np.ndarray:
    """The empty studio of ``spec`` (wall, lettering, floor, turntable) as RGB uint8 of ``size`` (H, W)."""
    h, w = size
    wall_top, wall_bot, floor_far, floor_near, table_r, _ = spec.studio
    cam = Camera(spec, 0.0, size)
    junction = cam.project([(-6.0, 0, 0)])[0, 1]  # floor meets the wall 6 m behind the turntable
    rows = np.arange(h, dtype=float)
    grey = np.where(rows < junction, wall_top + (wall_bot - wall_top) * rows / max(junction, 1),
                    floor_far + (floor_near - floor_far) * (rows - junction) / max(h - junction, 1))
    grey = cv2.GaussianBlur(grey.reshape(-1, 1), (1, 0), sigmaX=1, sigmaY=0.02 * h).ravel()  # curved cyclorama
    img = np.ascontiguousarray(np.broadcast_to((grey[:, None] + np.array([-1.0, 0.0, 2.0]))[:, None, :],
                                               (h, w, 3)).clip(0, 255).astype(np.uint8))
    t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    table = cam.project(np.c_[table_r * np.cos(t), table_r * np.sin(t), np.zeros_like(t)])
    _fill(img, None, table, tuple(floor_near - 10 + (c - 1) for c in range(3)))
    cv2.polylines(img, [np.round(table * _S).astype(np.int32)], True, (floor_near - 22,) * 3,
                  max(1, round(2 * w / ORIG_WIDTH)), cv2.LINE_AA, 4)
    if spec.glyphs:  # dark lettering on the wall, which the car often overlaps (not car!)
        gh, n = 0.11 * h, len(spec.glyphs)
        gw = 0.85 * w / n
        for i, g in enumerate(spec.glyphs):
            for stroke in GLYPHS[g]:
                pts = np.c_[0.075 * w + (i + 0.12 + 0.76 * stroke[:, 0]) * gw,
                            junction - 0.03 * h - gh * (1 - stroke[:, 1])]
                cv2.polylines(img, [np.round(pts * _S).astype(np.int32)], False, (92, 93, 96),
                              max(1, int(gh / 7)), cv2.LINE_AA, 4)
    return img


def draw_car(spec: CarSpec | np.random.Generator, angle_index: int, size: tuple[int, int] = ORIG_SHAPE,
             background: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Draw view ``angle_index`` (0..15; file angle = index + 1) of a car (a spec, or a new random one).

    Returns (image RGB uint8 HxWx3, mask uint8 HxW of 0/1) at ``size`` = (H, W); ``background``
    (from draw_background, same size) saves redrawing the studio for each view.
    """
    if isinstance(spec, np.random.Generator):
        spec = random_car(spec)
    geo, (h, w) = car_geometry(spec), size
    paint, glass, rim, sill = spec.colours
    cam = Camera(spec, 2 * np.pi * angle_index / ANGLES_PER_CAR, size)
    img = (draw_background(spec, size) if background is None else background).copy()
    mask = np.zeros((h, w), np.uint8)

    _shadow(img, cam, geo, spec, size)

    # Wheels/mirrors on the side turned away (or both, near front/back views) go behind the body.
    near = lambda side: side * cam.s > 0.2  # noqa: E731
    mats = {"paint": (paint, 1.0), "glass": (glass, 1.6), "sill": (sill, 0.5), "under": ((20, 20, 20), 0.0)}

    def wheel(wh: dict) -> None:
        hull = cv2.convexHull(np.r_[cam.project(wh["outer"]), cam.project(wh["inner"])].astype(np.float32))
        _fill(img, mask, hull[:, 0].astype(float), (28, 28, 30))
        if cam.faces_us(wh["outer"][0], np.array([0, wh["side"], 0])):
            _fill(img, None, cam.project(wh["outer"]), (40, 40, 43))
            _fill(img, None, cam.project(wh["rim"]), _shade(rim, cam.world([0, 0.7 * wh["side"], 0.7])[0], 0.5))
            for hole in wh["holes"]:
                _fill(img, None, cam.project(hole), (22, 22, 24))
            _fill(img, None, cam.project(wh["hub"]), (95, 96, 100))

    def mirror(box: np.ndarray) -> None:
        hull = cv2.convexHull(cam.project(box).astype(np.float32))
        _fill(img, mask, hull[:, 0].astype(float), _shade(paint, cam.world([0, 0, 1])[0], 0.7))

    def part(loft: dict) -> None:
        normals_w = cam.world(loft["normals"])
        seen = np.einsum("ij,ij->i", normals_w, cam.eye - cam.world(loft["centres"])) > 0
        for (pts, mat, _), n_w in zip([f for f, v in zip(loft["faces"], seen) if v], normals_w[seen]):
            base, gloss = mats.get(mat, (paint, 1.0))
            _fill(img, mask, cam.project(pts), _shade(base, n_w, gloss))

    for wh in geo["wheels"]:
        if not near(wh["side"]):
            wheel(wh)
    for box, side in zip(geo["mirrors"], (-1, 1)):
        if not near(side):
            mirror(box)
    part(geo["body"])
    _details(img, cam, geo, spec)
    part(geo["cabin"])
    for quad, side in zip(geo["bpillars"], (-1, 1)):
        if cam.faces_us(quad.mean(0), np.array([0.0, side, 0.3])):
            _fill(img, None, cam.project(quad), _shade(paint, cam.world([0, side, 0.2])[0], 1.0))
    for box, side in zip(geo["mirrors"], (-1, 1)):
        if near(side):
            mirror(box)
    for wh in geo["wheels"]:
        if near(wh["side"]):
            _fill(img, None, cam.project(wh["well"]), (18, 18, 20))
            wheel(wh)

    # Lens softness = anti-aliasing of every edge (the mask keeps the hard 50 % boundary), done only
    # around the car since the studio is already smooth; then sensor noise from a per-car tile.
    x0, y0, bw, bh = cv2.boundingRect(mask)
    sy, sx = slice(max(y0 - 4, 0), y0 + bh + 4), slice(max(x0 - 4, 0), x0 + bw + 4)
    img[sy, sx] = cv2.GaussianBlur(img[sy, sx], (0, 0), 0.7 * max(w / ORIG_WIDTH, 0.5))
    oy, ox = (7 * angle_index) % 32, (13 * angle_index) % 32
    img = cv2.subtract(cv2.add(img, _noise_tile(spec.noise_seed, h, w)[oy:oy + h, ox:ox + w]), (3, 3, 3, 0))
    return img, mask


def _shadow(img: np.ndarray, cam: Camera, geo: dict, spec: CarSpec, size: tuple[int, int]) -> None:
    """Soft shadow: footprint + tyre contacts, drawn at 1/8 scale and blurred; it only darkens the floor."""
    h, w = size
    half, wx, (_length, width, *_rest) = geo["half"], geo["wheel_x"], spec.dims
    small = np.zeros((max(h // 8, 8), max(w // 8, 8)), np.float32)
    k = np.array([small.shape[1] / w, small.shape[0] / h])
    t = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    corners = np.array([(1, -1, 0), (1, 1, 0), (-1, 1, 0), (-1, -1, 0)])
    foot = [(corners * [0.98 * half, 0.53 * width, 0], 0.75)]
    foot += [(np.c_[x + 0.35 * np.cos(t), y + 0.15 * np.sin(t), 0 * t], 1.0)  # darker tyre contacts
             for x in (wx, -wx) for y in (0.12 - width / 2, width / 2 - 0.12)]
    for pts, darkness in foot:
        cv2.fillPoly(small, [np.round(cam.project(pts) * k * _S).astype(np.int32)], darkness, cv2.LINE_AA, 4)
    small = cv2.GaussianBlur(small, (0, 0), 0.12 * spec.camera[2] * k[0] * w / ORIG_WIDTH + 0.5)
    x0, y0, bw, bh = cv2.boundingRect((small > 2e-3).astype(np.uint8))
    sy, sx = slice(y0 * h // small.shape[0], (y0 + bh + 1) * h // small.shape[0]), \
        slice(x0 * w // small.shape[1], (x0 + bw + 1) * w // small.shape[1])
    factor = 1 - spec.studio[5] * cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)[sy, sx]
    img[sy, sx] = (img[sy, sx] * factor[..., None]).astype(np.uint8)  # only where there is shadow


def _details(img: np.ndarray, cam: Camera, geo: dict, spec: CarSpec) -> None:
    """Lights, grille, plates, door lines and handles, drawn on the body faces that face the camera."""
    half, top, halfw, bottom = geo["half"], geo["top"], geo["halfw"], geo["bottom"]
    paint = spec.colours[0]
    for end in (1, -1):
        x = end * half * 1.001
        if not cam.faces_us([x, 0, 0.5], np.array([end, 0, 0])):
            continue
        wz, b, hz = halfw(x), bottom(x), top(x) - bottom(x)
        on_cap = lambda ys, zs: np.array([(x, y * wz, b + z * hz) for y, z in zip(ys, zs)])  # noqa: E731
        lamp = (225, 228, 232) if end == 1 else (170, 22, 26)
        for s in (-1, 1):
            lamp_pts = on_cap([s * .5, s * .88, s * .88, s * .5], [.62, .62, .86, .82])
            _fill(img, None, cam.project(lamp_pts), lamp)
        if end == 1:
            _fill(img, None, cam.project(on_cap([-.36, .36, .32, -.32], [.38, .38, .62, .62])), (30, 30, 33))
        _fill(img, None, cam.project(on_cap([-.2, .2, .2, -.2], [.2, .2, .36, .36])), (228, 230, 232))
    for side in (-1, 1):
        if not cam.faces_us([0, side * halfw(0), 0.5], np.array([0, side, 0])):
            continue
        dark = tuple(0.55 * c for c in paint)
        on_side = lambda xz: np.array([(x, side * halfw(x) * 1.002, z) for x, z in xz])  # noqa: E731
        for x in (geo["bpillar"] + 0.95, geo["bpillar"], geo["bpillar"] - 0.9):  # door gaps
            line = cam.project(on_side([(x, bottom(x) + 0.1), (x, top(x) - 0.03)]))
            cv2.polylines(img, [np.round(line * _S).astype(np.int32)], False, dark, max(1, round(2 * cam.fx)),
                          cv2.LINE_8, 4)
        for x in (geo["bpillar"] + 0.15, geo["bpillar"] - 0.75):  # door handles
            z = top(x) - 0.14
            handle = on_side([(x, z), (x + 0.2, z), (x + 0.2, z + 0.04), (x, z + 0.04)])
            _fill(img, None, cam.project(handle), dark)

