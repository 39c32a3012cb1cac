"""Cut-paste pseudo-anomalies on the batch's device. (stub: contract only, helper fills in)"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CutPasteConfig:
    enabled: bool = False
    probability: float = 0.5  # chance that a training tile receives pseudo-anomalies
    max_patches: int = 2  # 1..max_patches patches per chosen tile
    scale_min: float = 0.02  # patch side as a fraction of the tile side
    scale_max: float = 0.15
    opacity_min: float = 0.7  # blending strength
    opacity_max: float = 1.0
    defect_dir: str = ""  # optional folder of user defect crops (RGBA / gray+alpha PNG)
    library_size: int = 64  # procedural patches generated per kind (crack, scratch, spot, contamination)
