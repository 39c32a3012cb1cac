"""Pyramid tiling and untiling on the batch's device. (stub: contract only, helper fills in)"""

from __future__ import annotations

from dataclasses import dataclass, field

from hybridad.tiling import TileLevel


@dataclass
class TilingConfig:
    input_size: int = 448  # every tile is resized to input_size x input_size (the model input)
    train_levels: list[TileLevel] = field(default_factory=lambda: [TileLevel()])
    test_level: TileLevel = field(default_factory=TileLevel)
