"""A synthetic MVTec AD 2 tree for tests and `make demo`.

Writes the real folder layout and file names (spec/mvtec_ad2.md section 1) with small images: textured
surfaces cut from scikit-image's shipped textures (fabric, rice, sheet_metal, walnuts) or simple drawn objects
(can, fruit_jelly, vial, wallplugs), the five lighting conditions of test_public, and defects whose masks
mark exactly the pixels they changed.

Every image is a pure function of (seed, category, stream, index, lighting), so `render` can redraw the clean
and the defective version of any written file. Images are kept as (H, W, C) uint8 arrays in cv2's BGR order
(C = 1 for the gray categories) and squeezed to (H, W) when written.

    python -m data_modules.synthetic --root data/synthetic --categories can vial --size 128x64
"""

from __future__ import annotations

import argparse
import functools
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

from hybridad.errors import UserError
from hybridad.types import CATEGORIES

# Native (W, H) of each category; the synthetic images keep this aspect.
CATEGORY_SIZES: dict[str, tuple[int, int]] = {
    "can": (2232, 1024),
    "fabric": (2448, 2048),
    "fruit_jelly": (2100, 1520),
    "rice": (2448, 2048),
    "sheet_metal": (4224, 1056),
    "vial": (1400, 1900),
    "wallplugs": (2448, 2048),
    "walnuts": (2448, 2048),
}
PUBLIC_LIGHTINGS: tuple[str, ...] = (
    "regular",
    "overexposed",
    "underexposed",
    "shift_1",
    "shift_2",
    "shift_3",
)
DEFECT_KINDS: tuple[str, ...] = ("scratch", "crack", "spot", "contamination", "missing")
# RNG streams. test_private_mixed reuses the test_private scenes (same scene, other lighting), as in the
# real set.
STREAMS: tuple[str, ...] = ("train", "validation", "test_public/good", "test_public/bad", "test_private")
DEFAULT_LONG_SIDE = {"small": 256, "official": 64}
PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 3]


@dataclass(frozen=True)
class SplitCounts:
    """Image counts of one category. `private` is the size of test_private and of test_private_mixed."""

    train: int
    validation: int
    public_good: int
    public_bad: int
    private: int
    private_bad: int


OFFICIAL_COUNTS: dict[str, SplitCounts] = {  # spec/mvtec_ad2.md table 1.1
    "can": SplitCounts(412, 46, 72, 90, 321, 176),
    "fabric": SplitCounts(387, 43, 66, 90, 314, 181),
    "fruit_jelly": SplitCounts(263, 37, 20, 60, 255, 184),
    "rice": SplitCounts(313, 35, 42, 90, 277, 181),
    "sheet_metal": SplitCounts(137, 19, 24, 90, 142, 106),
    "vial": SplitCounts(291, 41, 35, 105, 276, 198),
    "wallplugs": SplitCounts(293, 33, 60, 90, 232, 136),
    "walnuts": SplitCounts(432, 48, 60, 90, 228, 135),
}
SMALL_COUNTS = SplitCounts(train=8, validation=4, public_good=4, public_bad=6, private=6, private_bad=3)


class Rendered(NamedTuple):
    """One synthetic image: `clean` and `image` are (H, W, C) uint8; `mask` is (H, W) uint8 in {0, 255}."""

    clean: np.ndarray
    image: np.ndarray
    mask: np.ndarray


def category_size(category: str, long_side: int = 256) -> tuple[int, int]:
    """(W, H) of `category` scaled so that its longer side is `long_side` pixels."""
    w, h = CATEGORY_SIZES[category]
    scale = long_side / max(w, h)
    return max(8, round(w * scale)), max(8, round(h * scale))


def counts_for(category: str, counts: str) -> SplitCounts:
    """The split sizes for `counts` in {"small", "official"}."""
    if counts == "small":
        return SMALL_COUNTS
    if counts == "official":
        return OFFICIAL_COUNTS[category]
    raise UserError(f"synthetic: counts must be 'small' or 'official', got {counts!r}")


# ----------------------------------------------------------------------------------------------------------
# Scenes: surface (lit later), background (what a missing piece reveals), foreground (where defects go)


class _Scene(NamedTuple):
    surface: np.ndarray  # (H, W, C) float32, 0..255
    background: np.ndarray  # (H, W, C) float32
    foreground: np.ndarray  # (H, W) bool


@dataclass(frozen=True)
class _Texture:
    source: str  # skimage.data function name
    src_long: int  # source pixels covered by the image's long side
    offset: tuple[int, int]  # crop corner (x, y) in the 512 x 512 source; crop + 32 px jitter stays inside
    gain: float  # contrast around mid-gray
    lo: tuple[float, ...]  # colour (BGR or gray) at t = 0
    hi: tuple[float, ...]  # colour at t = 1
    hole: tuple[float, ...]  # colour seen through a missing piece
    brushed: bool = False  # horizontal motion blur (brushed metal)


_TEXTURES: dict[str, _Texture] = {
    "fabric": _Texture("brick", 300, (60, 90), 1.6, (95, 45, 25), (235, 175, 120), (25, 20, 15)),
    "rice": _Texture("grass", 380, (90, 40), 1.3, (120, 165, 185), (215, 235, 248), (35, 45, 50)),
    "sheet_metal": _Texture("gravel", 470, (8, 300), 0.9, (70,), (215,), (20,), brushed=True),
    "walnuts": _Texture("gravel", 200, (150, 200), 1.5, (15, 45, 85), (125, 175, 215), (10, 15, 20)),
}


@functools.lru_cache(maxsize=4)
def _texture_source(name: str) -> np.ndarray:
    """A (512, 512) float32 scikit-image texture scaled to 0..1 (shipped in the wheel, no download)."""
    import skimage.data  # lazy: only needed when textures are drawn

    return getattr(skimage.data, name)().astype(np.float32) / 255.0


def _texture_scene(category: str, w: int, h: int, rng: np.random.Generator) -> _Scene:
    spec = _TEXTURES[category]
    src = _texture_source(spec.source)
    cw, ch = (
        (spec.src_long, round(spec.src_long * h / w))
        if w >= h
        else (round(spec.src_long * w / h), spec.src_long)
    )
    jx, jy = rng.integers(0, 33, size=2)
    x0, y0 = spec.offset[0] + int(jx), spec.offset[1] + int(jy)
    crop = src[y0 : y0 + max(ch, 1), x0 : x0 + max(cw, 1)]
    t = cv2.resize(crop, (w, h), interpolation=cv2.INTER_AREA)  # (h, w)
    if spec.brushed:
        t = cv2.blur(t, (max(3, w // 12), 1))
    t = np.clip((t - 0.5) * spec.gain + 0.5, 0.0, 1.0)
    lo, hi = np.array(spec.lo, np.float32), np.array(spec.hi, np.float32)
    surface = lo + t[..., None] * (hi - lo)  # (h, w, C)
    background = np.broadcast_to(np.array(spec.hole, np.float32), surface.shape).copy()
    return _Scene(surface, background, np.ones((h, w), bool))


def _grid(w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates: x of shape (1, w), y of shape (h, 1)."""
    return np.arange(w, dtype=np.float32)[None, :], np.arange(h, dtype=np.float32)[:, None]


def _rounded_rect(w: int, h: int, x0: float, y0: float, x1: float, y1: float, r: float) -> np.ndarray:
    """(h, w) bool mask of an axis-aligned rectangle with rounded corners."""
    x, y = _grid(w, h)
    r = max(0.0, min(r, (x1 - x0) / 2, (y1 - y0) / 2))
    dx = np.maximum(np.maximum(x0 + r - x, x - (x1 - r)), 0.0)  # (1, w)
    dy = np.maximum(np.maximum(y0 + r - y, y - (y1 - r)), 0.0)  # (h, 1)
    inside = (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
    return inside & (dx**2 + dy**2 <= r**2)


def _can_scene(w: int, h: int, rng: np.random.Generator) -> _Scene:
    x, y = _grid(w, h)
    j = rng.uniform(-0.015, 0.015, size=4)
    x0, x1 = (0.05 + j[0]) * w, (0.95 + j[1]) * w
    y0, y1 = (0.16 + j[2]) * h, (0.84 + j[3]) * h
    body = _rounded_rect(w, h, x0, y0, x1, y1, 0.08 * (y1 - y0))
    colour = np.empty((h, w, 3), np.float32)
    colour[:] = (45, 45, 195)  # red body
    rim = (x < x0 + 0.06 * w) | (x > x1 - 0.06 * w)  # (1, w)
    label = (x > 0.36 * w) & (x < 0.64 * w)
    colour[np.broadcast_to(label, (h, w))] = (225, 228, 232)
    colour[np.broadcast_to(rim, (h, w))] = (185, 185, 185)
    u = (y - (y0 + y1) / 2) / ((y1 - y0) / 2)  # (h, 1), -1..1 across the cylinder
    shade = 0.5 + 0.5 * np.sqrt(np.clip(1.0 - u**2, 0.0, 1.0))
    bg = np.array((70, 62, 55), np.float32)
    surface = np.where(body[..., None], colour * shade[..., None], bg)
    return _Scene(surface.astype(np.float32), np.broadcast_to(bg, surface.shape).copy(), body)


def _fruit_jelly_scene(w: int, h: int, rng: np.random.Generator) -> _Scene:
    x, y = _grid(w, h)
    bg = np.array((212, 220, 226), np.float32)
    surface = np.broadcast_to(bg, (h, w, 3)).copy()
    fg = np.zeros((h, w), bool)
    colours = ((10, 120, 240), (45, 40, 200), (60, 175, 90), (30, 200, 235), (120, 50, 160), (20, 90, 210))
    jitter = rng.uniform(-0.015, 0.015, size=(6, 4))
    for k in range(6):  # six jellies in a 3 x 2 tray
        cx = (0.19 + 0.31 * (k % 3) + jitter[k, 0]) * w
        cy = (0.28 + 0.44 * (k // 3) + jitter[k, 1]) * h
        a, b = (0.12 + jitter[k, 2]) * w, (0.17 + jitter[k, 3]) * h
        r2 = ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2  # (h, w)
        inside = r2 <= 1.0
        shade = 0.65 + 0.35 * (1.0 - r2)
        highlight = 80.0 * np.exp(
            -(((x - cx + 0.35 * a) / (0.25 * a)) ** 2 + ((y - cy + 0.4 * b) / (0.2 * b)) ** 2)
        )
        jelly = np.array(colours[k], np.float32) * shade[..., None] + highlight[..., None]
        surface[inside] = jelly[inside]
        fg |= inside
    return _Scene(surface, np.broadcast_to(bg, surface.shape).copy(), fg)


def _vial_scene(w: int, h: int, rng: np.random.Generator) -> _Scene:
    x, y = _grid(w, h)
    j = rng.uniform(-0.012, 0.012, size=3)
    x0, x1 = (0.30 + j[0]) * w, (0.70 + j[0]) * w
    y0, y1 = (0.12 + j[1]) * h, (0.92 + j[1]) * h
    level = (0.45 + j[2]) * h
    body = _rounded_rect(w, h, x0, y0, x1, y1, 0.12 * (x1 - x0))
    u = (x - (x0 + x1) / 2) / ((x1 - x0) / 2)  # (1, w), -1..1 across the vial
    glass = 150.0 + 60.0 * (1.0 - u**2)
    liquid = 85.0 + 45.0 * (1.0 - u**2)
    value = np.where(y > level, liquid, glass)  # (h, w)
    value = np.where(np.abs(u) > 0.88, 70.0, value)  # glass walls
    cap = _rounded_rect(w, h, x0 + 0.04 * w, (0.05 + j[1]) * h, x1 - 0.04 * w, y0 + 0.06 * h, 0.02 * w)
    bg = 205.0
    surface = np.where(body, value, bg)
    surface = np.where(cap, 60.0, surface)[..., None].astype(np.float32)  # (h, w, 1)
    return _Scene(surface, np.full_like(surface, bg), body | cap)


def _wallplugs_scene(w: int, h: int, rng: np.random.Generator) -> _Scene:
    x, y = _grid(w, h)
    bg = 45.0
    value = np.full((h, w), bg, np.float32)
    fg = np.zeros((h, w), bool)
    jitter = rng.uniform(-0.012, 0.012, size=(3, 3))
    for k in range(3):  # three plugs standing side by side
        cx = (0.25 + 0.25 * k + jitter[k, 0]) * w
        half = 0.06 * w
        y0, y1 = (0.10 + jitter[k, 1]) * h, (0.90 + jitter[k, 2]) * h
        plug = _rounded_rect(w, h, cx - half, y0, cx + half, y1, 0.5 * half)
        u = (x - cx) / half  # (1, w)
        ribs = 18.0 * np.sin(2 * np.pi * (y - y0) / (0.06 * h))  # (h, 1)
        plug_value = (175.0 + ribs) * (0.75 + 0.25 * np.clip(1.0 - u**2, 0.0, 1.0))
        slot = (np.abs(x - cx) < 0.012 * w) & (y > y0 + 0.25 * (y1 - y0)) & (y < y1 - 0.25 * (y1 - y0))
        plug_value = np.where(slot, 90.0, plug_value)
        value = np.where(plug, plug_value, value)
        fg |= plug
    surface = value[..., None]  # (h, w, 1)
    return _Scene(surface, np.full_like(surface, bg), fg)


_OBJECT_SCENES: dict[str, Callable[[int, int, np.random.Generator], _Scene]] = {
    "can": _can_scene,
    "fruit_jelly": _fruit_jelly_scene,
    "vial": _vial_scene,
    "wallplugs": _wallplugs_scene,
}


def _scene(category: str, w: int, h: int, rng: np.random.Generator) -> _Scene:
    if category in _TEXTURES:
        scene = _texture_scene(category, w, h, rng)
    else:
        scene = _OBJECT_SCENES[category](w, h, rng)
    noise = rng.standard_normal(scene.surface.shape, dtype=np.float32) * 1.5  # sensor noise, (H, W, C)
    return _Scene(scene.surface + noise, scene.background + noise, scene.foreground)


# ----------------------------------------------------------------------------------------------------------
# Lighting


def _apply_lighting(img: np.ndarray, lighting: str) -> np.ndarray:
    """Exposure, colour-temperature or gradient-lighting change of an (H, W, C) float image, as uint8."""
    h, w, c = img.shape
    x, y = _grid(w, h)
    if lighting in ("regular", "mixed"):
        out = img
    elif lighting == "overexposed":
        out = img * 1.4 + 20.0
    elif lighting == "underexposed":
        out = img * 0.6
    elif lighting == "shift_1":  # warmer (colour) or a left-to-right light gradient (gray)
        out = img * (np.array((0.85, 1.0, 1.15), np.float32) if c == 3 else (0.75 + 0.5 * x / w)[..., None])
    elif lighting == "shift_2":  # cooler (colour) or a top-to-bottom light gradient (gray)
        out = img * (np.array((1.15, 1.0, 0.85), np.float32) if c == 3 else (1.25 - 0.5 * y / h)[..., None])
    elif lighting == "shift_3":  # lateral gradient lighting with a slight tint
        gain = (0.7 + 0.6 * x / w)[..., None]  # (1, w, 1)
        out = img * gain * (np.array((1.0, 1.06, 0.95), np.float32) if c == 3 else 1.0)
    else:
        raise UserError(f"synthetic: unknown lighting {lighting!r}; use one of {PUBLIC_LIGHTINGS}")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------
# Defects


def _shifted(values: np.ndarray, amount: float) -> np.ndarray:
    """Defect colour for `values`: darker (x0.4) if they are bright on average, else brighter by `amount`."""
    v = values.astype(np.float32)
    darker = v.mean() > 110.0
    return np.clip(v * 0.4 if darker else v + amount, 0, 255).astype(np.uint8)


def _draw_defect(
    kind: str,
    image: np.ndarray,
    background: np.ndarray,
    foreground: np.ndarray,
    rng: np.random.Generator,
    tiny: bool = False,
) -> np.ndarray:
    """Draw one defect into `image` (in place); returns the (H, W) bool region it painted."""
    h, w, c = image.shape
    s = max(w, h) / 256.0  # defect sizes are given for a 256 px long side
    ys, xs = np.nonzero(foreground)
    pick = int(rng.integers(len(ys)))
    cx, cy = int(xs[pick]), int(ys[pick])
    region = np.zeros((h, w), np.uint8)
    if kind == "spot":
        d = rng.uniform(2.0, 6.0) if tiny else rng.uniform(8.0, 24.0)  # diameter at 256 px
        ax = max(0, round(d * s / 2 - 0.5)), max(0, round(d * s * rng.uniform(0.6, 1.0) / 2 - 0.5))
        cv2.ellipse(region, (cx, cy), ax, float(rng.uniform(0, 180)), 0, 360, 255, -1)
        sel = region > 0
        image[sel] = _shifted(image[sel], 90.0)
    elif kind == "scratch":
        angle, length = rng.uniform(0, np.pi), rng.uniform(15.0, 60.0) * s
        end = (round(cx + length * np.cos(angle)), round(cy + length * np.sin(angle)))
        cv2.line(region, (cx, cy), end, 255, 1 if s < 2 else 2)
        sel = region > 0
        image[sel] = _shifted(image[sel], 80.0)
    elif kind == "crack":
        n = int(rng.integers(8, 20))
        angles = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0.0, 0.45, n))  # (n,)
        steps = 3.0 * s * np.stack([np.cos(angles), np.sin(angles)], axis=1)  # (n, 2) as (dx, dy)
        points = np.vstack([[cx, cy], (cx, cy) + np.cumsum(steps, axis=0)])  # (n+1, 2)
        cv2.polylines(region, [np.rint(points).astype(np.int32)[:, None, :]], False, 255, 1)  # (n+1, 1, 2)
        sel = region > 0
        image[sel] = _shifted(image[sel], 100.0)
    elif kind == "contamination":
        k = int(rng.integers(3, 7))
        centres = np.array([cx, cy]) + rng.normal(0.0, 4.0 * s, size=(k, 2))  # (k, 2)
        radii = np.maximum(1, np.rint(rng.uniform(2.0, 6.0, size=k) * s)).astype(int)
        for (px, py), r in zip(np.rint(centres).astype(int), radii, strict=True):
            cv2.circle(region, (int(px), int(py)), int(r), 255, -1)
        sel = region > 0
        bright = image[sel].mean() < 110.0
        base = rng.uniform(190, 240, size=c) if bright else rng.uniform(15, 70, size=c)
        noisy = base + rng.normal(0.0, 12.0, size=(int(sel.sum()), c))  # (n_sel, C)
        image[sel] = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    elif kind == "missing":
        k = int(rng.integers(6, 10))
        angles = np.sort(rng.uniform(0, 2 * np.pi, size=k))
        radii = rng.uniform(5.0, 14.0, size=k) * s
        poly = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)  # (k, 2)
        cv2.fillPoly(region, [np.rint(poly).astype(np.int32)], 255)
        sel = (region > 0) & foreground
        image[sel] = background[sel]
        return np.zeros((h, w), bool)  # nothing to force: the mask is what really changed
    else:
        raise ValueError(f"unknown defect kind {kind!r}")
    return region > 0


def _add_defects(
    clean: np.ndarray, background: np.ndarray, foreground: np.ndarray, rng: np.random.Generator, index: int
) -> tuple[np.ndarray, np.ndarray]:
    """Defective copy of `clean` and the (H, W) uint8 0/255 mask of exactly the pixels that changed."""
    image = clean.copy()
    kinds = [DEFECT_KINDS[index % len(DEFECT_KINDS)]]
    kinds += list(rng.choice(DEFECT_KINDS, size=int(rng.integers(0, 3))))
    painted = np.zeros(clean.shape[:2], bool)
    for kind in kinds:
        painted |= _draw_defect(str(kind), image, background, foreground, rng, tiny=bool(rng.random() < 0.3))
    # Tiny defects (2-6 px across at 256 px) are common in MVTec AD 2.
    if index % 2 == 0 or rng.random() < 0.3:
        painted |= _draw_defect("spot", image, background, foreground, rng, tiny=True)
    if not np.any(image != clean):  # e.g. a missing piece cut only where object and background look alike
        painted |= _draw_defect("spot", image, background, foreground, rng)
    # A painted pixel whose new value happens to equal the old one is flipped, so the drawn shape stays whole.
    same = painted & np.all(image == clean, axis=-1)
    image[same] = 255 - clean[same]
    changed = np.any(image != clean, axis=-1)  # (H, W)
    return image, changed.astype(np.uint8) * 255


def render(
    category: str,
    size: tuple[int, int],
    *,
    seed: int = 0,
    stream: str = "train",
    index: int = 0,
    lighting: str = "regular",
    defective: bool = False,
) -> Rendered:
    """Draw one synthetic image, deterministically.

    Args:
        category: one of CATEGORIES.
        size: (W, H) in pixels.
        seed: dataset seed.
        stream: one of STREAMS ("test_public/bad", ...); test_private_mixed uses "test_private".
        index: image index within the stream (NNN).
        lighting: one of PUBLIC_LIGHTINGS (or "mixed", which equals "regular").
        defective: draw defects.

    Returns:
        Rendered(clean, image, mask); without defects image is clean and the mask is all zeros.
    """
    w, h = size
    key = [seed, CATEGORIES.index(category), STREAMS.index(stream), index]
    scene = _scene(category, w, h, np.random.default_rng(key + [0]))
    clean = _apply_lighting(scene.surface, lighting)
    if not defective:
        return Rendered(clean, clean, np.zeros((h, w), np.uint8))
    background = _apply_lighting(scene.background, lighting)
    image, mask = _add_defects(clean, background, scene.foreground, np.random.default_rng(key + [1]), index)
    return Rendered(clean, image, mask)


# ----------------------------------------------------------------------------------------------------------
# Writing the tree


def _write_png(path: Path, array: np.ndarray) -> None:
    img = array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array  # (H, W, 1) -> (H, W)
    if not cv2.imwrite(str(path), img, PNG_PARAMS):
        raise OSError(f"could not write {path}")


def _private_plan(seed: int, category: str, counts: SplitCounts) -> tuple[np.ndarray, list[str]]:
    """Which test_private indices are defective, and the hidden lighting of each test_private_mixed image."""
    cat = CATEGORIES.index(category)
    rng = np.random.default_rng([seed, cat, len(STREAMS)])
    bad = np.zeros(counts.private, bool)
    bad[rng.permutation(counts.private)[: counts.private_bad]] = True
    lightings = [str(v) for v in rng.choice(PUBLIC_LIGHTINGS, size=counts.private)]
    return bad, lightings


class _Job(NamedTuple):
    """One image file to write (and its mask for test_public/bad)."""

    path: str  # relative to the category folder
    stream: str
    index: int
    lighting: str
    defective: bool
    mask_path: str | None = None


def _jobs(seed: int, category: str, counts: SplitCounts) -> list[_Job]:
    jobs = [
        _Job(f"train/good/{i:03d}_regular.png", "train", i, "regular", False) for i in range(counts.train)
    ]
    jobs += [
        _Job(f"validation/good/{i:03d}_regular.png", "validation", i, "regular", False)
        for i in range(counts.validation)
    ]
    for label, n in (("good", counts.public_good), ("bad", counts.public_bad)):
        for i in range(n):
            lighting = PUBLIC_LIGHTINGS[i % len(PUBLIC_LIGHTINGS)]
            stem = f"{i:03d}_{lighting}"
            mask = f"test_public/ground_truth/bad/{stem}_mask.png" if label == "bad" else None
            folder = f"test_public/{label}"
            jobs.append(_Job(f"{folder}/{stem}.png", folder, i, lighting, label == "bad", mask))
    bad, lightings = _private_plan(seed, category, counts)
    for i in range(counts.private):
        jobs.append(_Job(f"test_private/{i:03d}_regular.png", "test_private", i, "regular", bool(bad[i])))
        jobs.append(
            _Job(f"test_private_mixed/{i:03d}_mixed.png", "test_private", i, lightings[i], bool(bad[i]))
        )
    return jobs


def _write_category(tree: Path, category: str, size: tuple[int, int], counts: SplitCounts, seed: int) -> None:
    jobs = _jobs(seed, category, counts)
    for folder in sorted({Path(p).parent for job in jobs for p in (job.path, job.mask_path) if p}):
        (tree / folder).mkdir(parents=True, exist_ok=True)
    for job in jobs:
        out = render(
            category,
            size,
            seed=seed,
            stream=job.stream,
            index=job.index,
            lighting=job.lighting,
            defective=job.defective,
        )
        _write_png(tree / job.path, out.image)
        if job.mask_path is not None:
            _write_png(tree / job.mask_path, out.mask)


def write_synthetic_dataset(
    root: Path,
    categories: Sequence[str] = CATEGORIES,
    size: tuple[int, int] | None = None,
    counts: str = "small",
    seed: int = 0,
    *,
    long_side: int | None = None,
    overwrite: bool = False,
    verbose: bool = True,
) -> None:
    """Write a synthetic MVTec AD 2 tree under `root`, one `<root>/<category>/` per category.

    Each category is written to `<root>/.<category>.tmp` and renamed when complete.

    Args:
        root: dataset root.
        categories: categories to write.
        size: (W, H) for every category; default keeps each category's aspect with the long side
            `long_side`.
        counts: "small" (a few images per split) or "official" (the real split sizes).
        seed: dataset seed; the same seed gives byte-identical files.
        long_side: long side when `size` is None (default 256 for "small", 64 for "official").
        overwrite: replace existing category folders instead of refusing.
        verbose: print one line per category.

    Raises:
        UserError: unknown category or counts, bad size, or a non-empty target folder without `overwrite`.
    """
    root = Path(root)
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown:
        raise UserError(f"synthetic: unknown categories {unknown}; choose from {', '.join(CATEGORIES)}")
    plans = {c: counts_for(c, counts) for c in categories}
    if size is not None and (len(size) != 2 or min(size) < 8):
        raise UserError(f"synthetic: size must be (W, H) with both sides >= 8 px, got {size}")
    side = long_side if long_side is not None else DEFAULT_LONG_SIDE[counts]
    if side < 8:
        raise UserError(f"synthetic: long side must be >= 8 px, got {side}")
    for category in categories:
        target = root / category
        if (target.is_file() or (target.is_dir() and any(target.iterdir()))) and not overwrite:
            raise UserError(
                f"synthetic: {target} exists and is not empty; pass --overwrite or choose another --root"
            )
    root.mkdir(parents=True, exist_ok=True)
    for category in categories:
        start = time.perf_counter()
        wh = tuple(size) if size is not None else category_size(category, side)
        tmp, target = root / f".{category}.tmp", root / category
        if tmp.exists():
            shutil.rmtree(tmp)  # left over from an interrupted run
        _write_category(tmp, category, wh, plans[category], seed)
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        tmp.rename(target)
        if verbose:
            n = plans[category]
            print(
                f"{category:<12} {wh[0]}x{wh[1]} train {n.train} validation {n.validation} test_public "
                f"{n.public_good}+{n.public_bad} test_private {n.private} test_private_mixed {n.private} "
                f"({time.perf_counter() - start:.1f} s)",
                flush=True,
            )


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 128x64 (W x H), got {text!r}") from None
    return w, h


def main(argv: list[str] | None = None) -> None:
    """Command line: `python -m data_modules.synthetic --root DIR [options]`."""
    parser = argparse.ArgumentParser(prog="synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, type=Path, help="dataset root to write into")
    parser.add_argument(
        "--categories", nargs="+", default=list(CATEGORIES), choices=CATEGORIES, metavar="CAT"
    )
    parser.add_argument("--size", type=_parse_size, default=None, help="W x H for every category, e.g. 64x48")
    parser.add_argument("--long-side", type=int, default=None, help="long side when --size is not given")
    parser.add_argument("--counts", choices=("small", "official"), default="small")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace existing category folders")
    args = parser.parse_args(argv)
    try:
        write_synthetic_dataset(
            args.root,
            args.categories,
            args.size,
            args.counts,
            args.seed,
            long_side=args.long_side,
            overwrite=args.overwrite,
        )
    except UserError as err:
        msg = str(err).removeprefix("synthetic: ")
        print(f"synthetic: error: {msg}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
