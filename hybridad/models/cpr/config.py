"""CPR settings. (stub: contract only, helper fills in)"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CprConfig:
    weights: str = ""  # local DenseNet201 weight file (torchvision or timm keys); required unless preset=tiny
    preset: str = ""  # "tiny": random-init trunk for tests and the CPU demo
    k_nearest: int = 10
    top_t: int = 256
    foreground: bool = True
    lr: float = 1e-3
    weight_decay: float = 1e-2
    steps: int = 2000
