"""Pyramid tiling on the batch's device: the DataModule's train and eval tilers.

Downscaling is antialiased by default (`F.interpolate(..., antialias=True)`, which follows PIL's bilinear
filter to within one grey level): the winners' INP-Former tiles go through torchvision's PIL `Resize(448)`.
CPR's official input is `cv2.resize` (bilinear, no antialias), so `cpr.yaml` turns it off. Upscaling is plain
bilinear either way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hybridad.tile_grid import Box, TileLevel, level_boxes, tile
from hybridad.types import TileLayout


@dataclass
class TilingConfig:
    input_size: int = 448  # every tile is resized to input_size x input_size (the model input)
    train_levels: list[TileLevel] = field(default_factory=lambda: [TileLevel()])
    test_level: TileLevel = field(default_factory=TileLevel)
    antialias: bool = True  # antialiased downscaling (PIL-like, as INP-Former); false = cv2-like (CPR)


def train_tile_boxes(height: int, width: int, levels: list[TileLevel]) -> list[tuple[int, int, Box]]:
    """Every (level index, tile index, box) of the training pyramid for one image size."""
    per_level = [level_boxes(height, width, lv) for lv in levels]
    return [(li, ti, box) for li, boxes in enumerate(per_level) for ti, box in enumerate(boxes)]


def _to_unit(x: Tensor) -> Tensor:
    """uint8 [0,255] -> float [0,1]; float input is returned as float32 unchanged."""
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def resize_tiles(tiles: Tensor, size: int, antialias: bool = True) -> Tensor:
    """(N,C,h,w) float -> (N,C,S,S) bilinear (align_corners=False); antialiased only where it downscales.

    Antialiasing applies only when h or w exceeds S, so upscaling is exactly the plain bilinear resize.
    """
    if tuple(tiles.shape[-2:]) == (size, size):
        return tiles
    shrink = antialias and max(tiles.shape[-2:]) > size
    return F.interpolate(tiles, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


class TrainTiler(nn.Module):
    """Crop each item's own tile from its native image and resize it to the model input.

    Args:
        input_size: side S of the output tiles.
        antialias: antialiased downscaling (PIL-like).
    """

    def __init__(self, input_size: int, antialias: bool = True) -> None:
        super().__init__()
        self.input_size = input_size
        self.antialias = antialias

    def forward(self, images: Tensor, tile_box: Tensor) -> Tensor:
        """(B,3,H,W) uint8 native images + (B,4) long boxes (y0,x0,y1,x1) -> (B,3,S,S) float [0,1]."""
        out = []
        for img, (y0, x0, y1, x1) in zip(images, tile_box.tolist()):  # over items: crops differ in size
            crop = _to_unit(img[None, :, y0:y1, x0:x1])  # (1,3,th,tw)
            out.append(resize_tiles(crop, self.input_size, self.antialias))  # (1,3,S,S)
        return torch.cat(out, dim=0)  # (B,3,S,S)


class EvalTiler(nn.Module):
    """Tile every image completely with the test level.

    Args:
        level: the test grid.
        input_size: side S of the output tiles.
        antialias: antialiased downscaling (PIL-like).
    """

    def __init__(self, level: TileLevel, input_size: int, antialias: bool = True) -> None:
        super().__init__()
        self.level = level
        self.input_size = input_size
        self.antialias = antialias

    def forward(self, images: Tensor) -> tuple[Tensor, TileLayout]:
        """(B,3,H,W) uint8 -> (B*n,3,S,S) float [0,1] tiles (image-major) and their layout."""
        tiles, layout = tile(images, self.level, None)  # (B*n,3,th,tw) float, [0,255] for uint8 input
        if images.dtype == torch.uint8:
            tiles = tiles / 255.0
        return resize_tiles(tiles, self.input_size, self.antialias), layout
