"""The demo cars as 3-D models: what is random about a car and its studio, its geometry, the camera.

Each car is a small 3-D model (a lofted lower body, a lofted glass cabin, four wheels, mirrors and
lights) in car-frame metres (x forward, y left, z up), seen by a perspective camera on a turntable
from 16 angles (01 = front, 05 = left side, 09 = back, 13 = right side). :class:`CarSpec` holds
everything random about one car and its studio, :func:`car_geometry` the car's faces (cached per
spec), :class:`Camera` the projection to pixels. carvana.data.demo.car draws them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import numpy as np

from carvana.data.layout import ANGLES_PER_CAR, ORIG_HEIGHT, ORIG_SHAPE, ORIG_WIDTH

# Body styles: lower-body top z (m) at x/(L/2) stations, rear (-1) to front (+1), and cabin roof
# stations (x/(L/2), fraction of the roof height above the belt). Both profiles are concave so the
# two parts stay convex and back-face culling alone gives the right drawing order inside a part.
_HOOD_X = (-1.0, -0.93, -0.6, 0.35, 0.85, 1.0)
_STYLES = {  # name: (length, height, clearance, hood z, cabin stations)
    "Sedan": ((4.5, 5.0), (1.40, 1.50), (0.14, 0.18), (0.78, 0.90, 0.95, 0.92, 0.80, 0.66),
              ((0.40, 0), (0.28, .55), (0.14, .92), (0.0, 1), (-0.25, 1), (-0.38, .9), (-0.52, .45), (-0.62, 0))),
    "Hatchback": ((3.9, 4.3), (1.45, 1.55), (0.14, 0.18), (0.82, 0.95, 0.97, 0.92, 0.78, 0.66),
                  ((0.34, 0), (0.2, .6), (0.05, .95), (-0.1, 1), (-0.6, .98), (-0.8, .75), (-0.9, .3), (-0.93, 0))),
    "SUV": ((4.5, 5.0), (1.65, 1.80), (0.20, 0.26), (0.95, 1.04, 1.06, 1.05, 0.98, 0.85),
            ((0.36, 0), (0.22, .65), (0.08, .97), (-0.05, 1), (-0.78, 1), (-0.88, .8), (-0.93, 0))),
    "Coupe": ((4.3, 4.7), (1.28, 1.36), (0.12, 0.15), (0.72, 0.84, 0.88, 0.85, 0.72, 0.60),
              ((0.36, 0), (0.2, .6), (0.02, .95), (-0.12, 1), (-0.3, .92), (-0.5, .55), (-0.68, 0))),
    "Wagon": ((4.6, 5.0), (1.45, 1.55), (0.14, 0.18), (0.84, 0.94, 0.95, 0.92, 0.80, 0.66),
              ((0.38, 0), (0.25, .6), (0.1, .95), (-0.05, 1), (-0.82, .97), (-0.9, .7), (-0.94, 0))),
}
# Hard cases on purpose: white/silver close to the background, black close to the glass and tyres.
_PAINTS = (("White", (236, 236, 234), 3), ("Silver", (190, 192, 196), 3), ("Grey", (112, 114, 118), 2),
           ("Black", (24, 24, 27), 3), ("Blue", (30, 60, 140), 1), ("Red", (165, 25, 30), 1),
           ("Navy", (24, 32, 62), 1), ("Green", (35, 75, 50), 1), ("Beige", (200, 185, 150), 1))
_MAKES = ("Acme", "Borealis", "Cirrus", "Dynamo", "Estella", "Fjord", "Galvani", "Halcyon")
_SECTION = ((-.92, 0), (-1, .12), (-1, .62), (-.96, .86), (-.84, 1),  # lower body (ny, nz), edge 0 = sill
            (.84, 1), (.96, .86), (1, .62), (1, .12), (.92, 0))
GLYPHS = (  # stroke letters for the studio wall, unit box, y down
    (np.c_[0.5 + 0.5 * np.cos(np.linspace(0.8, 5.5, 12)), 0.5 - 0.5 * np.sin(np.linspace(0.8, 5.5, 12))],),
    (np.array([(0, 1), (.5, 0), (1, 1)]), np.array([(.25, .6), (.75, .6)])),
    (np.array([(0, 1), (0, 0), (.7, 0), (.85, .25), (.7, .5), (0, .5)]), np.array([(.45, .5), (.9, 1)])),
    (np.array([(0, 0), (.5, 1), (1, 0)]),), (np.array([(0, 1), (0, 0), (1, 1), (1, 0)]),))


@dataclass(frozen=True)
class CarSpec:
    """Everything random about one car and its studio; hashable so its geometry can be cached."""

    car_id: str
    style: str
    paint_name: str
    year: int
    make: str
    dims: tuple  # length, width, height, clearance, wheel radius, wheel x (m)
    hood: tuple  # lower-body top z at _HOOD_X
    cabin: tuple  # roof stations
    colours: tuple  # paint, glass, rim, sill (RGB)
    camera: tuple  # elevation (rad), distance (m), scale (px/m), centre x, ground y (full-res px)
    studio: tuple  # wall top, wall bottom, floor far, floor near (grey), table radius, shadow strength
    glyphs: tuple  # (letter index, ...) or () for a bare wall
    noise_seed: int


def random_car(rng: np.random.Generator) -> CarSpec:
    """Draw one car (shape, colours, camera, studio) from ``rng``."""
    style = str(rng.choice(list(_STYLES)))
    (l_rng, h_rng, c_rng, hood, cabin) = _STYLES[style]
    length, height, clear = rng.uniform(*l_rng), rng.uniform(*h_rng), rng.uniform(*c_rng)
    width, wheel_r = rng.uniform(1.74, 1.95), rng.uniform(0.30, 0.34) + 0.04 * (style == "SUV")
    weights = np.array([w for *_, w in _PAINTS], float)
    name, paint, _ = _PAINTS[rng.choice(len(_PAINTS), p=weights / weights.sum())]
    def jitter(c: tuple, s: int) -> tuple:  # a shared shift (greys stay grey) plus a little tint
        shift = rng.integers(-s, s + 1)
        return tuple(int(np.clip(v + shift + rng.integers(-2, 3), 0, 255)) for v in c)

    rim = jitter((185, 187, 190), 10) if rng.random() < 0.7 else jitter((60, 62, 66), 10)
    sill = (40, 40, 42) if rng.random() < 0.3 else None  # dark plastic cladding on some cars
    paint = jitter(paint, 8)
    colours = (paint, jitter((42, 46, 54), 8), rim, sill or paint)
    hood = tuple(z * height / np.mean(h_rng) for z in hood)
    elev, dist = np.radians(rng.uniform(9, 15)), rng.uniform(8.0, 11.0)
    scale = rng.uniform(0.72, 0.84) * ORIG_WIDTH / length
    camera = (elev, dist, scale, ORIG_WIDTH / 2 + rng.uniform(-50, 50), ORIG_HEIGHT * rng.uniform(0.74, 0.80))
    wall = rng.uniform(236, 250)
    studio = (wall, wall - rng.uniform(8, 20), rng.uniform(182, 200), rng.uniform(200, 214),
              rng.uniform(2.8, 3.4), rng.uniform(0.30, 0.50))
    glyphs = tuple(int(g) for g in rng.integers(0, len(GLYPHS), rng.integers(5, 9)))
    glyphs = glyphs if rng.random() < 0.7 else ()
    spec = CarSpec(car_id=rng.bytes(6).hex(), style=style, paint_name=name, year=int(rng.integers(2008, 2018)),
                   make=str(rng.choice(_MAKES)), dims=(length, width, height, clear, wheel_r, length * 0.3),
                   hood=hood, cabin=cabin, colours=colours, camera=camera, studio=studio, glyphs=glyphs,
                   noise_seed=int(rng.integers(2**31)))
    # Perspective enlarges the near end: shrink the car until every view keeps clear of the borders.
    for _ in range(10):
        geo = car_geometry(spec)
        pts = np.concatenate([f for part in ("body", "cabin") for f, _, _ in geo[part]["faces"]])
        ext = np.concatenate([Camera(spec, 2 * np.pi * a / ANGLES_PER_CAR, ORIG_SHAPE).project(pts)
                              for a in range(ANGLES_PER_CAR)]) / [ORIG_WIDTH, ORIG_HEIGHT]
        if ext[:, 0].min() > 0.03 and ext[:, 0].max() < 0.97 and ext[:, 1].min() > 0.12:
            break
        spec = replace(spec, camera=(*camera[:2], spec.camera[2] * 0.95, *camera[3:]))
    return spec


def demo_cars(seed: int, n_cars: int) -> list[CarSpec]:
    """The cars of a demo dataset, train cars first: car ``i`` depends only on (seed, i)."""
    specs: list[CarSpec] = []
    for i in range(n_cars):
        spec, attempt = random_car(np.random.default_rng([seed, i])), 0
        while spec.car_id in {s.car_id for s in specs}:  # 48-bit ids: practically never taken
            attempt += 1
            spec = random_car(np.random.default_rng([seed, i, attempt]))
        specs.append(spec)
    return specs


def _loft(sections: list[np.ndarray], mats: list[list[str]]) -> dict:
    """A closed convex loft: quads between consecutive sections plus the two end caps, with outward
    unit normals and centres precomputed (degenerate faces, e.g. a zero-height cabin end, dropped)."""
    faces = [(sec, "paint", (sign, 0.0, 0.0)) for sec, sign in ((sections[0], -1.0), (sections[-1], 1.0))
             if np.ptp(sec[:, 2]) > 1e-6]  # a zero-height end (the cabin's) has no cap
    for j in range(len(sections) - 1):
        a, b = sections[j], sections[j + 1]
        for i in range(len(a)):
            k = (i + 1) % len(a)
            quad = np.array([a[i], a[k], b[k], b[i]])
            faces.append((quad, mats[j][i], np.cross(quad[2] - quad[0], quad[3] - quad[1])))
    centre = np.mean([f.mean(0) for f, _, _ in faces], axis=0)
    keep = []
    for pts, mat, n in faces:
        n = np.asarray(n, float)
        if np.linalg.norm(n) < 1e-9:
            continue
        n = n / np.linalg.norm(n) * (1 if n @ (pts.mean(0) - centre) > 0 else -1)  # outward
        keep.append((pts, mat, n))
    return {"faces": keep, "normals": np.array([n for _, _, n in keep]),
            "centres": np.array([p.mean(0) for p, _, _ in keep])}


@functools.lru_cache(maxsize=64)
def car_geometry(spec: CarSpec) -> dict:
    """Car-frame geometry (x forward, y left, z up; metres): convex parts, wheels, mirrors, decals."""
    length, width, height, clear, wheel_r, wheel_x = spec.dims
    half = length / 2
    top = lambda x: np.interp(x / half, _HOOD_X, spec.hood)  # noqa: E731
    halfw = lambda x: width / 2 * (1 - 0.14 * np.abs(x / half) ** 4)  # rounded in plan view  # noqa: E731
    bottom = lambda x: clear + 0.08 * np.abs(x / half) ** 6  # bumpers lift at the ends  # noqa: E731
    xs = half * np.sin(np.linspace(-1, 1, 15) * np.pi / 2)  # denser near the rounded ends
    sec = np.array(_SECTION, float)
    body = [np.c_[np.full(len(sec), x), sec[:, 0] * halfw(x), bottom(x) + sec[:, 1] * (top(x) - bottom(x))]
            for x in xs]
    body_mats = [["sill", "paint", "paint", "paint", "paint", "paint", "paint", "paint", "sill", "under"]] * 14
    cab_x = np.array([c[0] for c in spec.cabin]) * half
    cab = []
    for x, f in zip(cab_x[::-1], [c[1] for c in spec.cabin][::-1]):  # rear to front like the body
        zb, w = top(x), halfw(x)
        zr = zb + f * (height - zb)
        rr = min(0.05, 0.3 * (zr - zb))
        cab.append(np.array([(x, -0.93 * w, zb), (x, -0.75 * w, zr - rr), (x, -0.6 * w, zr),
                             (x, 0.6 * w, zr), (x, 0.75 * w, zr - rr), (x, 0.93 * w, zb)]))
    cab_mats = []
    for j in range(len(cab) - 1):  # a steep roof step is windscreen / rear window, a flat one is roof
        steep = abs(cab[j + 1][2, 2] - cab[j][2, 2]) > 0.3 * abs(cab[j + 1][0, 0] - cab[j][0, 0])
        roof = "glass" if steep else "paint"
        cab_mats.append(["glass", roof, roof, roof, "glass", "under"])
    t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    wheels = []
    for wx, side in [(x, s) for x in (wheel_x, -wheel_x * 1.02) for s in (-1, 1)]:
        y = side * (halfw(wx) + 0.01)  # just proud of the body, so it is drawn over the wheel well

        def disc(r: float, dy: float, x: float = wx, z: float = wheel_r) -> np.ndarray:
            return np.c_[x + r * np.cos(t), np.full_like(t, y + side * dy), z + r * np.sin(t)]

        spokes = np.linspace(0, 2 * np.pi, 5, endpoint=False) + 0.3  # five holes between the spokes
        wheels.append({"side": side, "outer": disc(wheel_r, 0), "inner": disc(wheel_r, -0.24),
                       "rim": disc(0.66 * wheel_r, 0.005), "hub": disc(0.15 * wheel_r, 0.01),
                       "holes": [disc(0.1 * wheel_r, 0.008, wx + 0.42 * wheel_r * np.cos(a),
                                      wheel_r + 0.42 * wheel_r * np.sin(a)) for a in spokes],
                       "well": np.r_[[(wx + 1.15 * wheel_r, y, bottom(wx))], disc(1.15 * wheel_r, -0.01)[:13],
                                     [(wx - 1.15 * wheel_r, y, bottom(wx))]]})
    bx = (cab_x[2] + cab_x[-3]) / 2  # B-pillar: between the cabin's roof stations
    roof_at = np.interp(bx, cab_x[::-1], [c[2, 2] for c in cab])
    bpillars = [np.array([(x, side * k * halfw(x) * 1.003, z) for x, k, z in
                          ((bx - .05, .93, top(bx)), (bx + .05, .93, top(bx)), (bx + .05, .76, roof_at - .05),
                           (bx - .05, .76, roof_at - .05))]) for side in (-1, 1)]
    mx, zb = cab_x[0] - 0.05, top(cab_x[0] - 0.05)
    mirrors = [np.array([(x, side * y, z) for x in (mx - 0.12, mx) for y in (halfw(mx) * .9, halfw(mx) + .18)
                         for z in (zb + .03, zb + .16)]) for side in (-1, 1)]
    return {"body": _loft(body, body_mats), "cabin": _loft(cab, cab_mats), "wheels": wheels,
            "mirrors": mirrors, "half": half, "top": top, "halfw": halfw, "bottom": bottom,
            "bpillar": bx, "bpillars": bpillars, "wheel_x": wheel_x}


class Camera:
    """Turntable yaw + perspective camera looking down at the car centre, in full-resolution pixels."""

    def __init__(self, spec: CarSpec, yaw: float, size: tuple[int, int]):
        self.elev, self.dist, scale, self.cx, ground_y = spec.camera
        self.c, self.s, self.zt = np.cos(yaw), np.sin(yaw), 0.7
        self.focal = scale * self.dist
        ce, se = np.cos(self.elev), np.sin(self.elev)
        self.cy = ground_y - self.focal * self.zt * ce / (self.dist + self.zt * se)  # ground_y under the car
        self.fx, self.fy = size[1] / ORIG_WIDTH, size[0] / ORIG_HEIGHT
        self.eye = np.array([0.0, self.dist * ce, self.zt + self.dist * se])  # in (u, d, z)

    def world(self, p: np.ndarray) -> np.ndarray:
        """Car frame -> turntable frame (u right, d toward the camera, z up); also for normals."""
        p = np.asarray(p, float).reshape(-1, 3)
        return np.stack([p[:, 1] * self.c - p[:, 0] * self.s, p[:, 0] * self.c + p[:, 1] * self.s, p[:, 2]], 1)

    def project(self, p: np.ndarray) -> np.ndarray:
        """Car-frame points -> output-image pixel coordinates (N, 2)."""
        w = self.world(p)
        ce, se = np.cos(self.elev), np.sin(self.elev)
        depth = self.dist - w[:, 1] * ce - (w[:, 2] - self.zt) * se
        y_cam = -w[:, 1] * se + (w[:, 2] - self.zt) * ce
        return np.stack([(self.cx + self.focal * w[:, 0] / depth) * self.fx,
                         (self.cy - self.focal * y_cam / depth) * self.fy], 1)

    def faces_us(self, point: np.ndarray, normal: np.ndarray) -> bool:
        """Whether a surface at ``point`` (car frame) with outward ``normal`` faces the camera."""
        return float(self.world(normal)[0] @ (self.eye - self.world(point)[0])) > 0
