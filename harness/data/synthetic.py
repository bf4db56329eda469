"""Seeded synthetic multi-object videos written in the DAVIS 2017 layout.

They let the whole pipeline run without the real DAVIS download. Each sequence holds textured
shapes (ellipse, rectangle, polygon, star, blob) that move smoothly, scale and spin, occlude one
another in a random depth order and may leave and re-enter the frame, over a textured background
seen through a jittering camera. Every frame is annotated; the masks show visible pixels only.
Every object shows at least MIN_VISIBLE pixels in frame 0, because frame 0 masks are the prompts.

Split rule: the first ceil(n * (1 - val_fraction)) sequences go to train and the rest to val,
clamped so that each split gets at least one when n >= 2; a lone sequence is listed in both.

Sequence k depends only on (seed, k, frames, size, objects), never on how many are generated.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image
from scipy.ndimage import zoom

from harness.claims import scratch_suffix
from harness.data.davis import write_palette_png
from harness.progress import progress as progress_bar

KINDS = ("ellipse", "rectangle", "polygon", "star", "blob")
MIN_VISIBLE = 20
MIN_SIDE = 32
SPEED = 0.05  # top speed per axis, as a fraction of the frame's size per frame
REACH = 1.45  # every unit shape fits in a disc of this radius (rectangle corners reach sqrt(2))
COMPLETE_MARKER = ".complete"
RESOLUTION = "480p"  # the folder name DAVIS uses; the synthetic frames keep their requested size


class RenderedSequence(NamedTuple):
    images: np.ndarray  # T x H x W x 3 uint8 RGB, before JPEG compression
    labels: np.ndarray  # T x H x W uint8 visible object ids (0 background)
    full_area: np.ndarray  # T x N in-frame pixels of each object's whole shape, ignoring occlusion
    kinds: list[str]  # shape kind of object id i + 1
    camera: np.ndarray  # T x 2 (dx, dy): frame pixel (x, y) shows scene point (x + dx, y + dy)


def parse_size(text: str) -> tuple[int, int]:
    """'256x144' -> (256, 144); (width, height)."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"size {text!r}: expected WIDTHxHEIGHT with integers, e.g. 256x144") from None
    if width < MIN_SIDE or height < MIN_SIDE:
        raise ValueError(f"size {text!r}: width and height must be at least {MIN_SIDE}")
    return width, height


def is_complete(out: str | Path) -> bool:
    """True once generate() has finished writing `out` (the marker is written last)."""
    return (Path(out) / COMPLETE_MARKER).is_file()


def split_names(names: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """(train, val) by the rule in the module docstring."""
    if len(names) == 1:
        return list(names), list(names)
    n_train = min(max(math.ceil(len(names) * (1 - val_fraction)), 1), len(names) - 1)
    return names[:n_train], names[n_train:]


class _Object:
    """One shape's appearance and its smooth trajectory; poses are closed-form functions of time."""

    def __init__(self, rng: np.random.Generator, width: int, height: int) -> None:
        dims = np.array([width, height], dtype=float)
        self.kind = KINDS[rng.integers(len(KINDS))]
        self.radius = rng.uniform(0.10, 0.22) * min(width, height)
        self.aspect = rng.uniform(0.55, 1.0)
        self.sides = int(rng.integers(3, 7))  # polygon sides or star points
        self.wobble = rng.uniform(0.04, 0.14, 3), np.array([2, 3, 5]), rng.uniform(0, 2 * np.pi, 3)
        # Sinusoidal motion keeps velocity smooth and lets objects drift out and come back;
        # the amplitude is capped so that no object moves faster than SPEED of the frame per frame.
        self.omega = rng.uniform(0.12, 0.45, 2)
        self.amplitude = np.minimum(rng.uniform(0.1, 0.6, 2) * dims, SPEED * dims / self.omega)
        self.phase = rng.uniform(0, 2 * np.pi, 2)
        start = rng.uniform(0.1, 0.9, 2) * dims
        self.centre = start - self.amplitude * np.sin(self.phase)
        self.scale = rng.uniform(0.05, 0.3), rng.uniform(0.1, 0.4), rng.uniform(0, 2 * np.pi)
        self.angle0, self.spin = rng.uniform(0, 2 * np.pi), rng.uniform(-0.15, 0.15)
        self.colour = rng.uniform(20, 235, 3)
        self.colour2 = rng.uniform(20, 235, 3)
        self.stripes = rng.uniform(1.0, 3.5), rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
        self.speckle = rng.uniform(4, 12, 2)

    def pose(self, t: int) -> tuple[float, float, float, float]:
        x, y = self.centre + self.amplitude * np.sin(self.omega * t + self.phase)
        amp, omega, phase = self.scale
        return x, y, self.radius * math.exp(amp * math.sin(omega * t + phase)), self.angle0 + self.spin * t

    @staticmethod
    def local(xs: np.ndarray, ys: np.ndarray, x: float, y: float, r: float, angle: float):
        # Shape-relative coordinates: the unit shape lives in [-1, 1]^2 and the texture moves with it.
        c, s = math.cos(angle), math.sin(angle)
        dx, dy = xs - x, ys - y
        return (c * dx + s * dy) / r, (c * dy - s * dx) / r

    def inside(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        if self.kind == "ellipse":
            return u**2 + (v / self.aspect) ** 2 <= 1
        if self.kind == "rectangle":
            return (np.abs(u) <= 1) & (np.abs(v) <= self.aspect)
        r, theta = np.hypot(u, v), np.arctan2(v, u) + np.pi
        sector = 2 * np.pi / self.sides
        if self.kind == "polygon":  # regular n-gon in polar form
            return r * np.cos(np.mod(theta, sector) - sector / 2) <= math.cos(math.pi / self.sides)
        if self.kind == "star":
            frac = np.mod(theta, sector) / sector
            return r <= 0.45 + 0.55 * np.abs(1 - 2 * frac)
        amps, harmonics, phases = self.wobble
        limit = 0.8 + sum(a * np.cos(k * theta + p) for a, k, p in zip(amps, harmonics, phases, strict=True))
        return r <= limit

    def texture(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        freq, angle, phase = self.stripes
        stripe = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (u * math.cos(angle) + v * math.sin(angle)) + phase)
        speckle = 18 * np.sin(self.speckle[0] * u) * np.sin(self.speckle[1] * v)
        return self.colour + stripe[:, None] * (self.colour2 - self.colour) + speckle[:, None]


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    coarse = rng.uniform(30, 225, (4, 6, 3))
    smooth = zoom(coarse, (height / 4, width / 6, 1), order=1)
    blotch = rng.normal(0, 1, (height // 10 + 2, width // 10 + 2))
    detail = zoom(blotch, (height / blotch.shape[0], width / blotch.shape[1]), order=3)
    ys, xs = np.mgrid[0:height, 0:width]
    cell = int(rng.integers(8, 24))
    checker = ((ys // cell + xs // cell) % 2) * 2 - 1
    angle = rng.uniform(0, np.pi)
    grating = np.sin(2 * np.pi * (xs * math.cos(angle) + ys * math.sin(angle)) / rng.uniform(10, 40))
    pattern = 12 * checker + 10 * grating + 15 * detail
    return (smooth + pattern[..., None] * rng.uniform(0.5, 1.5, 3)).astype(np.float32)


def render_sequence(
    seed: int, index: int, frames: int, size: tuple[int, int], objects: tuple[int, int]
) -> RenderedSequence:
    """Render sequence `index` of the synthetic set in memory, with shape-level areas for tests."""
    width, height = size
    rng = np.random.default_rng([seed, index])
    count = int(rng.integers(objects[0], objects[1] + 1))
    margin = max(2, round(0.03 * min(width, height)))
    canvas = _background(rng, height + 2 * margin, width + 2 * margin)
    # Camera jitter: whole-pixel shifts from a walk pulled back to the centre, so that it keeps
    # shaking instead of drifting to the edge of the canvas and sticking there.
    steps = rng.normal(0, margin / 2, (frames, 2))
    walk = np.zeros((frames, 2))
    for t in range(1, frames):
        walk[t] = 0.6 * walk[t - 1] + steps[t]
    camera = np.clip(np.rint(walk), -margin, margin).astype(int)
    rows, cols = np.arange(height, dtype=float)[:, None], np.arange(width, dtype=float)

    def render(objs: list[_Object], order: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
        cx, cy = camera[t]
        image = canvas[margin + cy : margin + cy + height, margin + cx : margin + cx + width].copy()
        labels = np.zeros((height, width), dtype=np.uint8)
        areas = [0] * len(objs)
        for i in order:  # back to front, so later objects occlude earlier ones
            x, y, r, angle = objs[i].pose(t)
            x, y, reach = x - cx, y - cy, REACH * r
            # Only the shape's bounding box is evaluated, which keeps large frames cheap.
            x0, x1 = max(int(x - reach), 0), min(int(x + reach) + 2, width)
            y0, y1 = max(int(y - reach), 0), min(int(y + reach) + 2, height)
            if x0 >= x1 or y0 >= y1:
                continue
            u, v = objs[i].local(cols[x0:x1], rows[y0:y1], x, y, r, angle)
            mask = objs[i].inside(u, v)
            image[y0:y1, x0:x1][mask] = objs[i].texture(u[mask], v[mask])
            labels[y0:y1, x0:x1][mask] = i + 1
            areas[i] = int(mask.sum())
        return image, labels, areas

    for _ in range(200):
        objs = [_Object(rng, width, height) for _ in range(count)]
        order = rng.permutation(count)
        first = render(objs, order, 0)
        visible = np.bincount(first[1].ravel(), minlength=count + 1)[1:]
        if visible.min() >= MIN_VISIBLE:
            break
    else:
        raise RuntimeError(f"could not place {count} visible objects in a {width}x{height} frame; use a larger size")

    images = np.empty((frames, height, width, 3), dtype=np.uint8)
    labels = np.empty((frames, height, width), dtype=np.uint8)
    full_area = np.zeros((frames, count), dtype=np.int64)
    for t in range(frames):
        image, labels[t], full_area[t] = first if t == 0 else render(objs, order, t)
        noise = rng.standard_normal((height, width, 3), dtype=np.float32)
        images[t] = np.clip(image + 3 * noise, 0, 255)
    return RenderedSequence(images, labels, full_area, [o.kind for o in objs], camera)


def _check_args(sequences: int, frames: int, size: tuple[int, int], objects: tuple[int, int], val_fraction: float):
    if sequences < 1 or frames < 1:
        raise ValueError(f"sequences ({sequences}) and frames ({frames}) must be at least 1")
    if len(size) != 2 or min(size) < MIN_SIDE:
        raise ValueError(f"size {size}: expected (width, height), each at least {MIN_SIDE}")
    if len(objects) != 2 or not 1 <= objects[0] <= objects[1] <= 254:
        raise ValueError(f"objects {objects}: expected (min, max) with 1 <= min <= max <= 254")
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction {val_fraction}: expected a value in [0, 1]")


def generate(
    out: str | Path,
    sequences: int = 8,
    frames: int = 12,
    size: tuple[int, int] = (256, 144),
    seed: int = 0,
    objects: tuple[int, int] = (1, 3),
    val_fraction: float = 0.5,
    progress: bool = False,
) -> Path:
    """Write a synthetic DAVIS 2017-style dataset to `out`; size is (width, height). Returns `out`.

    Files go to a sibling `<out>.tmp-<pid>@<host>` folder that is renamed to `out` once the
    `.complete` marker is in it, so `out` is never seen half written.
    """
    out = Path(out)
    size, objects = (int(size[0]), int(size[1])), (int(objects[0]), int(objects[1]))
    _check_args(sequences, frames, size, objects, val_fraction)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty; remove it or choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + scratch_suffix())  # removed by the next suite once this process is dead
    shutil.rmtree(tmp, ignore_errors=True)  # only a crashed run with this same pid could have left it

    names = [f"synth-{k:03d}" for k in range(sequences)]
    try:
        for k, name in enumerate(progress_bar(names, desc="synthetic DAVIS", unit="sequence", enabled=progress)):
            seq = render_sequence(seed, k, frames, size, objects)
            image_dir = tmp / "JPEGImages" / RESOLUTION / name
            ann_dir = tmp / "Annotations" / RESOLUTION / name
            image_dir.mkdir(parents=True)
            ann_dir.mkdir(parents=True)
            for t in range(frames):
                Image.fromarray(seq.images[t]).save(image_dir / f"{t:05d}.jpg", quality=90)
                write_palette_png(ann_dir / f"{t:05d}.png", seq.labels[t])
        sets = tmp / "ImageSets" / "2017"
        sets.mkdir(parents=True)
        for split, members in zip(("train", "val"), split_names(names, val_fraction), strict=True):
            (sets / f"{split}.txt").write_text("".join(f"{name}\n" for name in members))
        params = dict(
            sequences=sequences,
            frames=frames,
            size=list(size),
            seed=seed,
            objects=list(objects),
            val_fraction=val_fraction,
        )
        (tmp / COMPLETE_MARKER).write_text(json.dumps(params, sort_keys=True) + "\n")
        if out.exists():
            out.rmdir()  # empty, checked above; rename cannot replace a directory portably
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
