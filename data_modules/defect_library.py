"""Defect patches for cut-paste: a procedural library rendered in torch, or a folder of user crops.

Both return a `DefectLibrary`. Procedural shapes are drawn with distance fields on a coordinate grid, so a
whole kind is rendered in a few batched tensor ops. A crop folder follows the winners' layout
(`data/anomaly/<category>/<type>/*.png`, RGBA or grey+alpha): point `cut_paste.defect_dir` at the category
folder; each first-level sub-folder is one defect type.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from data_modules.listing import imread
from hybridad.errors import UserError

KINDS: tuple[str, ...] = ("crack", "scratch", "spot", "contamination")


class DefectLibrary(NamedTuple):
    """Defect patches resized to one square side s, with what the winners' sampling needs."""

    patches: Tensor  # (K,3,s,s) float [0,1]
    alphas: Tensor  # (K,1,s,s) float {0,1}
    sides: Tensor  # (K,) float: side in pixels of each patch's square before resizing to s
    kinds: Tensor  # (K,) long: index of each patch's type in `kind_names`
    kind_names: tuple[str, ...]


def _uniform(shape: tuple[int, ...], lo: float, hi: float, g: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=g, device=g.device)


def _grid(size: int, device: torch.device) -> Tensor:
    """(s*s,2) pixel-centre coordinates (x, y) in [-1, 1]."""
    c = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size * 2 - 1
    yy, xx = torch.meshgrid(c, c, indexing="ij")  # (s,s) each
    return torch.stack([xx, yy], dim=-1).reshape(-1, 2)  # (s*s,2)


def _polyline_distance(points: Tensor, grid: Tensor) -> Tensor:
    """Distance from every grid point to a polyline. points (K,M+1,2), grid (P,2) -> (K,P)."""
    a, b = points[:, :-1, None, :], points[:, 1:, None, :]  # (K,M,1,2)
    ab = b - a
    ap = grid[None, None] - a  # (K,M,P,2)
    t = ((ap * ab).sum(-1) / (ab * ab).sum(-1).clamp_min(1e-12)).clamp(0, 1)  # (K,M,P)
    closest = a + t[..., None] * ab  # (K,M,P,2)
    return (grid[None, None] - closest).norm(dim=-1).amin(dim=1)  # (K,P)


def _texture(k: int, size: int, base: Tensor, noise: float, g: torch.Generator) -> Tensor:
    """(K,3,s,s) colour `base` (K,3) plus smooth noise of amplitude `noise`."""
    coarse = torch.randn((k, 1, max(2, size // 8), max(2, size // 8)), generator=g, device=g.device)
    smooth = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)  # (K,1,s,s)
    return (base[:, :, None, None] + noise * smooth).clamp(0, 1)


def _crack(k: int, size: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Thin dark random-walk polylines through the patch centre."""
    m = 10
    heading = _uniform((k, 1), 0, 2 * math.pi, g)
    turns = heading + torch.cumsum(_uniform((k, m), -0.6, 0.6, g), dim=1)  # (K,M)
    steps = torch.stack([turns.cos(), turns.sin()], dim=-1) * (1.6 / m)  # (K,M,2)
    pts = torch.cat([steps.new_zeros(k, 1, 2), steps.cumsum(dim=1)], dim=1)  # (K,M+1,2)
    pts = pts - pts.mean(dim=1, keepdim=True)  # centre the walk
    pts = pts / pts.abs().amax(dim=(1, 2), keepdim=True).clamp_min(1e-6) * 0.9  # fit inside [-0.9, 0.9]
    width = _uniform((k, 1), 0.75, 1.75, g) * 2 / size  # half-width 0.75-1.75 px, in grid units
    alpha = _polyline_distance(pts, _grid(size, g.device)) <= width  # (K,P)
    base = _uniform((k, 1), 0.02, 0.3, g).expand(k, 3) + _uniform((k, 3), -0.03, 0.03, g)
    return _texture(k, size, base, 0.05, g), alpha.float().reshape(k, 1, size, size)


def _scratch(k: int, size: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Thin straight or gently curved lines (quadratic Bezier), bright or dark."""
    m = 16
    angle = _uniform((k, 1), 0, math.pi, g)
    direction = torch.cat([angle.cos(), angle.sin()], dim=1)  # (K,2)
    p0, p2 = -0.9 * direction, 0.9 * direction  # (K,2) ends through the centre
    normal = torch.stack([-direction[:, 1], direction[:, 0]], dim=1)  # (K,2)
    p1 = normal * _uniform((k, 1), -0.5, 0.5, g)  # control point: 0 = straight
    t = torch.linspace(0, 1, m + 1, device=g.device)[None, :, None]  # (1,M+1,1)
    pts = (1 - t) ** 2 * p0[:, None] + 2 * (1 - t) * t * p1[:, None] + t**2 * p2[:, None]  # (K,M+1,2)
    width = _uniform((k, 1), 0.5, 1.0, g) * 2 / size  # half-width 0.5-1 px
    alpha = _polyline_distance(pts, _grid(size, g.device)) <= width  # (K,P)
    bright = torch.rand((k, 1), generator=g, device=g.device) < 0.5
    level = torch.where(bright, _uniform((k, 1), 0.75, 1.0, g), _uniform((k, 1), 0.0, 0.25, g))
    return _texture(k, size, level.expand(k, 3), 0.03, g), alpha.float().reshape(k, 1, size, size)


def _spot(k: int, size: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Filled rotated ellipses of a random colour."""
    xy = _grid(size, g.device)[None]  # (1,P,2)
    theta = _uniform((k, 1), 0, math.pi, g)
    u = xy[..., 0] * theta.cos() + xy[..., 1] * theta.sin()  # (K,P)
    v = -xy[..., 0] * theta.sin() + xy[..., 1] * theta.cos()
    ra, rb = _uniform((k, 1), 0.4, 0.95, g), _uniform((k, 1), 0.2, 0.95, g)
    alpha = (u / ra) ** 2 + (v / rb) ** 2 <= 1.0  # (K,P)
    base = _uniform((k, 3), 0.0, 1.0, g)
    return _texture(k, size, base, 0.08, g), alpha.float().reshape(k, 1, size, size)


def _contamination(k: int, size: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Irregular blobs (radius modulated by a few harmonics) with a noisy grey texture."""
    xy = _grid(size, g.device)[None]  # (1,P,2)
    r = xy.norm(dim=-1)  # (1,P)
    phi = torch.atan2(xy[..., 1], xy[..., 0])  # (1,P)
    harm = torch.arange(2, 7, device=g.device, dtype=torch.float32)[None, :, None]  # (1,5,1)
    amp = _uniform((k, 5, 1), 0.0, 0.12, g)
    phase = _uniform((k, 5, 1), 0, 2 * math.pi, g)
    radius = 0.6 * (1 + (amp * torch.cos(harm * phi[:, None] + phase)).sum(dim=1))  # (K,P)
    alpha = r <= radius.clamp(0.15, 0.95)  # (K,P)
    grey = _uniform((k, 1), 0.1, 0.9, g).expand(k, 3)
    tex = _texture(k, size, grey, 0.15, g)
    speckle = 0.1 * torch.randn((k, 1, size, size), generator=g, device=g.device)  # fine noise
    return (tex + speckle).clamp(0, 1), alpha.float().reshape(k, 1, size, size)


def make_defect_library(size: int, per_kind: int, generator: torch.Generator) -> DefectLibrary:
    """Render `per_kind` patches of each kind in `KINDS` on the generator's device (K = 4 * per_kind)."""
    parts = [fn(per_kind, size, generator) for fn in (_crack, _scratch, _spot, _contamination)]
    patches = torch.cat([p for p, _ in parts], dim=0)  # (K,3,s,s)
    alphas = torch.cat([a for _, a in parts], dim=0)  # (K,1,s,s)
    dev = patches.device
    kinds = torch.arange(len(KINDS), device=dev).repeat_interleave(per_kind)  # (K,) in KINDS order
    sides = torch.full((patches.shape[0],), float(size), device=dev)
    return DefectLibrary(patches, alphas, sides, kinds, KINDS)


def _square(rgba: np.ndarray) -> np.ndarray:
    """Pad an (h,w,4) crop to a centred square with transparent borders."""
    h, w = rgba.shape[:2]
    side = max(h, w)
    out = np.zeros((side, side, 4), dtype=rgba.dtype)
    y0, x0 = (side - h) // 2, (side - w) // 2
    out[y0 : y0 + h, x0 : x0 + w] = rgba
    return out


def _read_crop(f: Path) -> np.ndarray:
    """(h,w,4) uint8 RGBA from an RGBA or grey+alpha PNG."""
    img = imread(f, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise UserError(f"cannot read defect crop {f}")
    if img.dtype == np.uint16:
        img = (img // 257).astype(np.uint8)
    if img.ndim == 3 and img.shape[2] == 2:  # gray + alpha
        return np.dstack([img[..., 0]] * 3 + [img[..., 1]])
    if img.ndim == 3 and img.shape[2] == 4:  # BGRA
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGBA)
    raise UserError(f"defect crop {f} has no alpha channel (need RGBA or gray+alpha PNG)")


def load_defect_folder(path: str | Path, size: int = 64) -> DefectLibrary:
    """Read every RGBA or gray+alpha PNG under `path`, pad to square and resize to `size`.

    The type of a crop is its first-level sub-folder (`<path>/<type>/.../*.png`); crops directly in `path`
    have the type "". `sides` keeps each crop's padded side in pixels (the winners scale a crop by its own
    size).
    """
    folder = Path(path)
    files = sorted(folder.rglob("*.png")) if folder.is_dir() else []
    if not files:
        raise UserError(f"defect folder {folder} is missing or holds no .png crops (cut_paste.defect_dir)")
    types = [f.relative_to(folder).parts[0] if len(f.relative_to(folder).parts) > 1 else "" for f in files]
    names = sorted(set(types))
    patches, alphas, sides, kinds = [], [], [], []
    for f, kind in zip(files, types):
        sq = _square(_read_crop(f))
        rgb = cv2.resize(np.ascontiguousarray(sq[..., :3]), (size, size), interpolation=cv2.INTER_AREA)
        alpha = cv2.resize(np.ascontiguousarray(sq[..., 3]), (size, size), interpolation=cv2.INTER_NEAREST)
        patches.append(torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0)  # (3,s,s)
        alphas.append(torch.from_numpy((alpha > 0).astype(np.float32))[None])  # (1,s,s)
        sides.append(float(sq.shape[0]))
        kinds.append(names.index(kind))
    return DefectLibrary(
        torch.stack(patches), torch.stack(alphas), torch.tensor(sides), torch.tensor(kinds), tuple(names)
    )
