"""A threshold yardstick on real photographs: normal crops of scikit-image's shipped textures, and defects of
families the threshold calibration never sees.

Each texture (`TEXTURES`: brick, grass, gravel, moon, immunohistochemistry and hubble_deep_field, photographs
in the scikit-image wheel; colour ones as their luminance, the 872 x 1000 Hubble deep field as its centre 512 x
512) becomes one
MVTec AD 2 tree (`<root>/<texture>/<slot>/...`, `slot` an existing category name, "fabric" by default, so the
run uses that category's routing, tiling and post-processing). Normal images are `SIDE` x `SIDE` crops; train,
validation and test crops come from disjoint row bands of the photo (`BANDS`), so no test pixel was seen in
training or calibration.

Defects of test_public/bad come from two groups of families (`FAMILIES`):
- `PSEUDO_FAMILIES`: our own pseudo-defect kinds (`data_modules.defect_library`), pasted with `CutPaste`
  (used leave-one-family-out: the calibration never sees the family it is tested on);
- `NOVEL_FAMILIES`: kinds no generator of ours makes, different in kind from recoloured crops: local blur
  (smudge), dent (a displacement field), phase swap (the same texture from another place, misaligned),
  hole (missing material with shading), crease (a fold line, highlight beside shadow) and blocks (JPEG-like
  8 x 8 block flattening).
Every defect has a strength drawn from U(0.15, 1), down to barely visible. The mask is the defect's footprint;
no pixel outside it changes. `manifest.json` lists each bad image's family and strength.

Every image is a pure function of (seed, texture, split, index): the same call writes the same bytes.

    python -m data_modules.photos --root data/photos
"""

from __future__ import annotations

import argparse
import json
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from hybridad.errors import UserError
from hybridad.types import CATEGORIES

# appended, never reordered: a texture's index seeds its crops
TEXTURES: tuple[str, ...] = ("brick", "grass", "gravel", "moon", "immunohistochemistry", "hubble_deep_field")
SOURCE_SIDE = 512  # larger photographs give their centre SOURCE_SIDE x SOURCE_SIDE
SIDE = 128  # crop side in photo pixels (no resampling: real pixels)
BANDS = {"train": (0, 256), "validation": (256, 384), "test": (384, 512)}  # disjoint photo rows
PSEUDO_FAMILIES: tuple[str, ...] = ("crack", "scratch", "spot", "contamination")  # defect_library.KINDS
NOVEL_FAMILIES: tuple[str, ...] = ("blur", "dent", "phase_swap", "hole", "crease", "blocks")
FAMILIES: tuple[str, ...] = PSEUDO_FAMILIES + NOVEL_FAMILIES
STRENGTH = (0.15, 1.0)
SIZE = (0.08, 0.3)  # defect footprint diameter as a fraction of the image side


@dataclass(frozen=True)
class PhotoCounts:
    """Images per split of one texture; test_public/bad has `bad_per_family` images of every family."""

    train: int = 48
    validation: int = 10
    public_good: int = 10
    bad_per_family: int = 4
    private: int = 4  # test_private and test_private_mixed each (unlabelled, as in MVTec AD 2)


@dataclass(frozen=True)
class Defect:
    family: str
    strength: float


@functools.lru_cache(maxsize=len(TEXTURES))
def _source(texture: str) -> np.ndarray:
    """The (512,512) float32 [0,1] photograph, or the centre of a larger one (read-only: callers copy what they
    change)."""
    import skimage.data  # lazy: shipped in the wheel, no download

    if texture not in TEXTURES:
        raise UserError(f"unknown texture '{texture}'; valid: {', '.join(TEXTURES)}")
    src = getattr(skimage.data, texture)()  # (H,W) grey or (H,W,3) RGB uint8, H, W >= 512
    if src.ndim == 3:  # immunohistochemistry, hubble_deep_field: their luminance (the trees are grey)
        src = cv2.cvtColor(src, cv2.COLOR_RGB2GRAY)
    y0, x0 = (src.shape[0] - SOURCE_SIDE) // 2, (src.shape[1] - SOURCE_SIDE) // 2
    src = src[y0 : y0 + SOURCE_SIDE, x0 : x0 + SOURCE_SIDE]  # (512,512)
    src = src.astype(np.float32) / 255.0  # (512,512)
    src.setflags(write=False)
    return src


@functools.lru_cache(maxsize=1)
def _library(seed: int):  # noqa: ANN202 (DefectLibrary: torch imported lazily)
    import torch

    from data_modules.defect_library import make_defect_library

    return make_defect_library(64, 16, torch.Generator().manual_seed(seed))


def _rng(seed: int, texture: str, split: str, index: int) -> np.random.Generator:
    _source(texture)  # a clear error for an unknown texture
    return np.random.default_rng([seed, TEXTURES.index(texture), list(BANDS).index(split), index])


def normal_crop(texture: str, band: str, rng: np.random.Generator) -> tuple[np.ndarray, int, int]:
    """(SIDE,SIDE) float32 [0,1] crop from the photo's `band` rows, and its corner (x0, y0)."""
    src = _source(texture)
    y_lo, y_hi = BANDS[band]
    y0 = int(rng.integers(y_lo, y_hi - SIDE + 1))
    x0 = int(rng.integers(0, src.shape[1] - SIDE + 1))
    return src[y0 : y0 + SIDE, x0 : x0 + SIDE].copy(), x0, y0


def _blob(rng: np.random.Generator, side: int = SIDE) -> np.ndarray:
    """(side,side) bool irregular ellipse of diameter SIZE x side, fully inside the image."""
    d = rng.uniform(*SIZE) * side
    ra, rb = d / 2, d / 2 * rng.uniform(0.5, 1.0)
    cx, cy = rng.uniform(ra + 1, side - ra - 1, size=2)
    theta = rng.uniform(0, math.pi)
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) + 0.5
    u = (x - cx) * math.cos(theta) + (y - cy) * math.sin(theta)
    v = -(x - cx) * math.sin(theta) + (y - cy) * math.cos(theta)
    phi = np.arctan2(v, u)
    wobble = 1 + 0.15 * np.sin(3 * phi + rng.uniform(0, 2 * math.pi))
    return (u / ra) ** 2 + (v / rb) ** 2 <= wobble**2


def _blur(img: np.ndarray, s: float, rng: np.random.Generator, **_: object) -> tuple[np.ndarray, np.ndarray]:
    fp = _blob(rng)
    soft = cv2.GaussianBlur(img, (0, 0), 1.0 + 3.0 * s)
    return np.where(fp, img + s * (soft - img), img), fp


def _dent(img: np.ndarray, s: float, rng: np.random.Generator, **_: object) -> tuple[np.ndarray, np.ndarray]:
    fp = _blob(rng)
    ys, xs = np.nonzero(fp)
    cy, cx = ys.mean(), xs.mean()
    r = max(np.ptp(ys), np.ptp(xs)) / 2 + 1
    y, x = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32)
    d = np.hypot(x - cx, y - cy) / r  # 0 at the centre
    pull = s * 0.6 * np.clip(1 - d, 0, 1) ** 2 * fp  # samples pulled outwards: a bulge
    map_x, map_y = (x - (x - cx) * pull).astype(np.float32), (y - (y - cy) * pull).astype(np.float32)
    warped = cv2.remap(img, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    shade = 1 - 0.15 * s * np.clip(1 - d, 0, 1) * ((x - cx) + (y - cy)) / (r * 1.42)  # lit from top-left
    return np.where(fp, warped * shade, img), fp


def _phase_swap(img: np.ndarray, s: float, rng: np.random.Generator, texture: str = "", x0: int = 0,
                y0: int = 0) -> tuple[np.ndarray, np.ndarray]:
    fp = _blob(rng)
    src = _source(texture)
    lo, hi = BANDS["test"]
    dy = int(rng.integers(lo, hi - SIDE + 1))
    dx = int((x0 + rng.integers(SIDE // 4, src.shape[1] - SIDE // 4)) % (src.shape[1] - SIDE + 1))
    other = src[dy : dy + SIDE, dx : dx + SIDE]
    return np.where(fp, img + s * (other - img), img), fp


def _hole(img: np.ndarray, s: float, rng: np.random.Generator, **_: object) -> tuple[np.ndarray, np.ndarray]:
    fp = _blob(rng)
    dist = cv2.distanceTransform(fp.astype(np.uint8), cv2.DIST_L2, 3)  # depth from the rim
    depth = np.clip(dist / max(float(dist.max()), 1.0), 0, 1)
    gy, gx = np.gradient(dist)
    rim = np.clip(0.5 + 0.5 * (gx + gy), 0, 1)  # inner wall lit from top-left
    floor = 0.08 + 0.25 * rim * (1 - depth) + 0.03 * rng.standard_normal(img.shape).astype(np.float32)
    return np.where(fp, img + s * (floor - img), img), fp


def _crease(img: np.ndarray, s: float, rng: np.random.Generator, **_: object) -> tuple[np.ndarray, np.ndarray]:
    length = rng.uniform(0.3, 0.8) * SIDE
    cx, cy = rng.uniform(0.3, 0.7, size=2) * SIDE
    a = rng.uniform(0, math.pi)
    y, x = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32) + 0.5
    along = (x - cx) * math.cos(a) + (y - cy) * math.sin(a)
    across = -(x - cx) * math.sin(a) + (y - cy) * math.cos(a)
    half = rng.uniform(2.0, 4.0)
    fp = (np.abs(along) <= length / 2) & (np.abs(across) <= half)
    profile = np.sign(across) * np.clip(1 - np.abs(across) / half, 0, 1) * 0.35 * s  # highlight | shadow
    out = np.clip(img + np.where(across >= 0, profile, profile * 0.8), 0, 1)
    return np.where(fp, out, img), fp


def _blocks(img: np.ndarray, s: float, rng: np.random.Generator, **_: object) -> tuple[np.ndarray, np.ndarray]:
    bw, bh = (int(v) for v in rng.integers(2, 5, size=2))  # 2..4 blocks of 8 px each way
    bx, by = int(rng.integers(0, SIDE // 8 - bw + 1)), int(rng.integers(0, SIDE // 8 - bh + 1))
    fp = np.zeros((SIDE, SIDE), bool)
    fp[by * 8 : (by + bh) * 8, bx * 8 : (bx + bw) * 8] = True
    flat = cv2.resize(cv2.resize(img, (SIDE // 8, SIDE // 8), interpolation=cv2.INTER_AREA), (SIDE, SIDE),
                      interpolation=cv2.INTER_NEAREST)  # every 8 x 8 block its mean
    return np.where(fp, img + s * (flat - img), img), fp


_NOVEL = {"blur": _blur, "dent": _dent, "phase_swap": _phase_swap, "hole": _hole, "crease": _crease,
          "blocks": _blocks}


def _pseudo(img: np.ndarray, family: str, s: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One `defect_library` patch of `family`, pasted by `CutPaste` with opacity `s` (colours kept)."""
    import torch

    from data_modules.cut_paste import CutPaste, CutPasteConfig
    lib = _library(0)  # the same 16 patches per kind for every image; `seed` picks one and places it
    keep = lib.kinds == lib.kind_names.index(family)
    lib = lib._replace(patches=lib.patches[keep], alphas=lib.alphas[keep], sides=lib.sides[keep],
                       kinds=torch.zeros(int(keep.sum()), dtype=torch.long), kind_names=(family,))
    grow = 3.0 if family in ("crack", "scratch") else 1.5  # thin lines: long enough to be seen at 128 px
    cfg = CutPasteConfig(enabled=True, probability=1.0, max_patches=1, scale_min=SIZE[0] * grow,
                         scale_max=SIZE[1] * grow, colour_jitter=False, opacity_min=s, opacity_max=s,
                         min_contrast=0.0)
    x = torch.from_numpy(img)[None, None].expand(1, 3, SIDE, SIDE).contiguous()  # (1,3,S,S) grey
    out, mask = CutPaste(cfg, lib)(x, torch.Generator().manual_seed(seed))
    return out[0, 0].numpy(), mask[0, 0].numpy() > 0.5


def render_bad(texture: str, family: str, index: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, Defect]:
    """The `index`-th test_public/bad image of `family`: (SIDE,SIDE) uint8 image and mask, and its defect."""
    if family not in FAMILIES:
        raise UserError(f"unknown defect family '{family}'; valid: {', '.join(FAMILIES)}")
    rng = _rng(seed, texture, "test", 1000 + FAMILIES.index(family) * 100 + index)
    img, x0, y0 = normal_crop(texture, "test", rng)
    s = float(rng.uniform(*STRENGTH))
    if family in _NOVEL:
        out, fp = _NOVEL[family](img, s, rng, texture=texture, x0=x0, y0=y0)
    else:
        out, fp = _pseudo(img, family, s, int(rng.integers(0, 2**31)))
    out8 = np.clip(np.round(out * 255), 0, 255).astype(np.uint8)
    base8 = np.clip(np.round(img * 255), 0, 255).astype(np.uint8)
    out8 = np.where(fp, out8, base8)  # exactly the normal crop outside the footprint
    return out8, fp, Defect(family, round(s, 4))


def render_normal(texture: str, split: str, index: int, seed: int = 0) -> np.ndarray:
    """A (SIDE,SIDE) uint8 normal crop of `split`'s band ("train" | "validation" | "test")."""
    img, _, _ = normal_crop(texture, split, _rng(seed, texture, split, index))
    return np.clip(np.round(img * 255), 0, 255).astype(np.uint8)


def mixed_lighting(img: np.ndarray, index: int) -> np.ndarray:
    """test_private_mixed: a global gain and offset (lighting change) on the same scene; four variants,
    `index % 4`. (uint8 in, uint8 out; the threshold benchmark applies the same variants to labelled images.)"""
    gain, offset = [(1.35, 10), (0.65, -5), (1.0, 35), (1.0, -35)][index % 4]
    return np.clip(img.astype(np.float32) * gain + offset, 0, 255).astype(np.uint8)


def _write(path: Path, grey: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.dstack([grey] * 3) if grey.dtype == np.uint8 and grey.ndim == 2 else grey):
        raise OSError(f"could not write {path}")


def write_photo_dataset(root: Path, textures: Sequence[str] = TEXTURES, slot: str = "fabric",
                        counts: PhotoCounts = PhotoCounts(), seed: int = 0) -> dict[str, Path]:
    """Write one MVTec AD 2 tree per texture: `<root>/<texture>/<slot>/...` plus `manifest.json`.

    Returns {texture: data root to pass as `data.root`} (category = `slot`). Existing trees are rewritten.
    """
    if slot not in CATEGORIES:
        raise UserError(f"slot '{slot}' is not a category; valid: {', '.join(CATEGORIES)}")
    roots = {}
    for tex in textures:
        tree = Path(root) / tex / slot
        manifest: dict[str, dict[str, object]] = {}
        for i in range(counts.train):
            _write(tree / f"train/good/{i:03d}_regular.png", render_normal(tex, "train", i, seed))
        for i in range(counts.validation):
            _write(tree / f"validation/good/{i:03d}_regular.png", render_normal(tex, "validation", i, seed))
        for i in range(counts.public_good):
            _write(tree / f"test_public/good/{i:03d}_regular.png", render_normal(tex, "test", i, seed))
        n = 0
        for family in FAMILIES:
            for j in range(counts.bad_per_family):
                img, mask, defect = render_bad(tex, family, j, seed)
                stem = f"{n:03d}_regular"
                _write(tree / f"test_public/bad/{stem}.png", img)
                _write(tree / f"test_public/ground_truth/bad/{stem}_mask.png", mask.astype(np.uint8) * 255)
                manifest[f"test_public/bad/{stem}"] = {"family": defect.family, "strength": defect.strength}
                n += 1
        for i in range(counts.private):
            img = render_normal(tex, "test", 500 + i, seed)
            _write(tree / f"test_private/{i:03d}_regular.png", img)
            _write(tree / f"test_private_mixed/{i:03d}_mixed.png", mixed_lighting(img, i))
        (tree.parent / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
        roots[tex] = tree.parent
    return roots


def read_manifest(data_root: Path) -> dict[str, str]:
    """{sample_id: family} of a tree written by `write_photo_dataset` (`data_root` = `<root>/<texture>`)."""
    path = Path(data_root) / "manifest.json"
    if not path.is_file():
        raise UserError(f"{path} is missing: write the tree with `python -m data_modules.photos`")
    return {k: str(v["family"]) for k, v in json.loads(path.read_text()).items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data/photos")
    parser.add_argument("--textures", nargs="*", default=list(TEXTURES), choices=TEXTURES)
    parser.add_argument("--slot", default="fabric", help="category whose routing and post-processing the run uses")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for tex, path in write_photo_dataset(Path(args.root), args.textures, args.slot, seed=args.seed).items():
        print(f"{tex}: data.root={path} data.category={args.slot}")


if __name__ == "__main__":
    main()
