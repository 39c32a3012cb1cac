"""Pyramid tiling and untiling on the batch's device. (stub: contract only, helper fills in)"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TileLevel:
    """One pyramid level: a cols x rows grid over the native image, neighbours sharing `overlap` of a tile."""

    cols: int = 1
    rows: int = 1
    overlap: float = 0.0  # fraction of the tile's size shared with each neighbour, in [0, 0.5)


@dataclass
class TilingConfig:
    input_size: int = 448  # every tile is resized to input_size x input_size (the model input)
    train_levels: list[TileLevel] = field(default_factory=lambda: [TileLevel()])
    test_level: TileLevel = field(default_factory=TileLevel)
