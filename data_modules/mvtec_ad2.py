"""MVTec AD 2 samples, dataset and DataModule. (stub: contract only, helper fills in)"""

from __future__ import annotations

from dataclasses import dataclass, field

from data_modules.cut_paste import CutPasteConfig
from data_modules.tiling import TilingConfig


@dataclass
class AugmentConfig:
    """CPU augmentations for training (albumentations); all off by default."""

    hflip: float = 0.0
    vflip: float = 0.0
    scale: float = 0.0  # max relative zoom jitter
    brightness: float = 0.0  # max relative brightness jitter
    exposure: float = 0.0  # max |u| of an exposure factor 2**u
    probability: float = 0.5


@dataclass
class DataConfig:
    root: str = "data/mvtec_ad2"
    category: str = "can"
    batch_size: int = 16  # tiles per training step
    eval_batch_size: int = 1  # native images per eval step
    num_workers: int = 2
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    cut_paste: CutPasteConfig = field(default_factory=CutPasteConfig)
