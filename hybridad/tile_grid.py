"""Pure tile/untile functions on tensors (any device).

They live in `hybridad` (not `data_modules`) so the branches' eval steps can stitch maps without importing the
data layer. `data_modules/tilers.py` wraps them in the DataModule's device-side modules.

Grid choice: every tile of a level has the same size, and the tile starts are spread evenly so the first
tile starts at 0 and the last one ends exactly at the border. With `overlap=0` and a size that the grid
divides, this is the ISVL grid (tile W//C x H//R, no overlap); when it does not divide, neighbours share the
remainder (at most one pixel each) instead of the last tile growing, so all tiles stay equal and batch
without padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from hybridad.types import TileLayout

Box = tuple[int, int, int, int]  # (y0, x0, y1, x1), end exclusive


@dataclass
class TileLevel:
    """One pyramid level: a cols x rows grid over the native image, neighbours sharing `overlap` of a tile."""

    cols: int = 1
    rows: int = 1
    overlap: float = 0.0  # fraction of the tile's size shared with each neighbour, in [0, 0.5)


def _axis_spans(length: int, n: int, overlap: float) -> list[tuple[int, int]]:
    """`n` equal spans covering [0, length) with neighbours sharing about `overlap` of a span."""
    if n < 1 or not 0.0 <= overlap < 0.5:
        raise ValueError(f"bad tile level: n={n}, overlap={overlap} (need n >= 1 and 0 <= overlap < 0.5)")
    if n > length:
        raise ValueError(f"cannot cut {n} tiles from {length} pixels")
    if n == 1:
        return [(0, length)]
    # n tiles of size t with step t*(1-overlap) cover t*(n - (n-1)*overlap) pixels
    size = min(length, math.ceil(length / (n - (n - 1) * overlap) - 1e-9))
    starts = [round(i * (length - size) / (n - 1)) for i in range(n)]
    return [(s, s + size) for s in starts]


def level_boxes(height: int, width: int, level: TileLevel) -> list[Box]:
    """The tiles of one level, row-major, as `(y0, x0, y1, x1)` boxes of equal size covering the image."""
    ys = _axis_spans(height, level.rows, level.overlap)
    xs = _axis_spans(width, level.cols, level.overlap)
    return [(y0, x0, y1, x1) for (y0, y1) in ys for (x0, x1) in xs]


def tile(images: Tensor, level: TileLevel, out_size: int | None = None) -> tuple[Tensor, TileLayout]:
    """Cut every image into the tiles of `level`.

    Args:
        images: (B,C,H,W) uint8 or float. Values are kept as they are (uint8 is cast, not rescaled).
        level: the grid.
        out_size: resize every tile to out_size x out_size (bilinear, no antialias, aspect not kept);
            None keeps the native tile size.

    Returns:
        (B*n,C,s,s) float tiles, image-major, and the `TileLayout` that puts them back.
    """
    b, c, h, w = images.shape
    boxes = level_boxes(h, w, level)
    crops = torch.stack([images[:, :, y0:y1, x0:x1] for (y0, x0, y1, x1) in boxes], dim=1)  # (B,n,C,th,tw)
    tiles = crops.flatten(0, 1)  # (B*n,C,th,tw), image-major
    tiles = tiles.float() if not tiles.is_floating_point() else tiles
    if out_size is not None and tuple(tiles.shape[-2:]) != (out_size, out_size):
        size = (out_size, out_size)
        tiles = F.interpolate(tiles, size=size, mode="bilinear", align_corners=False, antialias=False)
    return tiles, TileLayout(image_size=(h, w), boxes=boxes, num_images=b)


def native_tile_size(layout: TileLayout) -> tuple[int, int]:
    """(h, w) of the layout's boxes (every box of a level has the same size)."""
    y0, x0, y1, x1 = layout.boxes[0]
    return (y1 - y0, x1 - x0)


def untile(tile_maps: Tensor, layout: TileLayout) -> Tensor:
    """Put tile maps back on the native canvas, averaging where tiles overlap.

    Args:
        tile_maps: (N,C,h,w) with N = num_images * len(boxes), image-major; any h, w (resized bilinearly to
            each box).
        layout: from `tile`.

    Returns:
        (B,C,H,W) float maps at native resolution.
    """
    n_boxes = len(layout.boxes)
    b = layout.num_images
    if tile_maps.shape[0] != b * n_boxes:
        raise ValueError(f"got {tile_maps.shape[0]} tile maps, layout expects {b} x {n_boxes}")
    h, w = layout.image_size
    dtype = torch.promote_types(tile_maps.dtype, torch.float32)
    maps = tile_maps.to(dtype).unflatten(0, (b, n_boxes))  # (B,n,C,h,w)
    canvas = maps.new_zeros((b, maps.shape[2], h, w))  # (B,C,H,W) weighted sum
    weight = maps.new_zeros((1, 1, h, w))  # how many tiles cover each pixel
    for k, (y0, x0, y1, x1) in enumerate(layout.boxes):
        m = maps[:, k]  # (B,C,h,w)
        if tuple(m.shape[-2:]) != (y1 - y0, x1 - x0):
            m = F.interpolate(m, size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)
        canvas[:, :, y0:y1, x0:x1] += m
        weight[:, :, y0:y1, x0:x1] += 1.0
    return canvas / weight
