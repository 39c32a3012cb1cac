"""INP-Former settings. (stub: contract only, helper fills in)"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class InpFormerConfig:
    encoder: str = "vit_large_patch14_reg4_dinov2"  # timm name (any DINOv2 S/B/L/G, with or without reg4)
    weights: str = ""  # local DINOv2 weight file (.pth from Meta or timm .safetensors/.pth); required unless preset=tiny
    preset: str = ""  # "tiny": random-init small ViT for tests and the CPU demo
    pos_embed: str = "dinov2"  # "dinov2" (official: offset 0.1, no antialias) | "timm"
    tapped_layers: list[int] = field(default_factory=list)  # empty = per-size default
    num_inps: int = 6
    lr: float = 1e-3
    final_lr: float = 1e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    coherence_weight: float = 0.2
    grad_clip: float = 0.1
