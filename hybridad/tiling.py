"""Pure tile/untile functions on tensors (any device). (stub: contract only, helper fills in)

They live in `hybridad` (not `data_modules`) so the branches' eval steps can stitch maps without importing the
data layer. `data_modules/tiling.py` wraps them in the DataModule's device-side modules.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TileLevel:
    """One pyramid level: a cols x rows grid over the native image, neighbours sharing `overlap` of a tile."""

    cols: int = 1
    rows: int = 1
    overlap: float = 0.0  # fraction of the tile's size shared with each neighbour, in [0, 0.5)
