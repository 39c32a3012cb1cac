"""INP-Former settings (`inp_former.*` in the run config)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class InpFormerConfig:
    """Architecture, encoder source and optimisation of the INP-Former branch.

    The input size is not here: the DataModule resizes tiles to `data.tiling.input_size` (a multiple of 14).
    """

    encoder: str = "vit_large_patch14_reg4_dinov2"  # timm name (any DINOv2 S/B/L/G, with or without reg4)
    weights: str = ""  # local DINOv2 weight file (.pth from Meta or timm .safetensors/.pth); required unless preset=tiny
    preset: str = ""  # "tiny": random-init small ViT for tests and the CPU demo
    pos_embed: str = "dinov2"  # "dinov2" (official: offset 0.1, no antialias) | "timm"
    tapped_layers: list[int] = field(default_factory=list)  # empty = per-size default
    num_inps: int = 6
    lr: float = 1e-3
    final_lr: float = 1e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 100  # official: linear warm-up over 100 iterations, whatever the run length
    warmup_max_fraction: float = 0.0  # > 0: cap the warm-up at this fraction of the run's steps; 0 = no cap
    coherence_weight: float = 0.2
    # tile map path (hybridad/inp_map_path.py): "isvl" = the winners' (upsample straight to the native tile size,
    # then INP-Former's 5x5 sigma-4 zero-padded Gaussian there), "official" = INP-Former's (the same kernel at
    # the input resolution, then resized to the native box), "none" = straight to native, no smoothing
    map_smoothing: str = "isvl"
    grad_clip: float = 0.1
    # added by the INP-Former branch
    fused_attn: bool = True  # False = explicit softmax attention in the encoder (bit-exact with the official code)
    soft_mining_gamma: float = 3.0  # exponent of the soft-mining gradient weight (d / mean d)^gamma
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-10
    amsgrad: bool = True
    train_on_pasted: bool = False  # False: tiles that received cut-paste defects are dropped from the loss
    checkpoint: str = ""  # whole-model weights written by `hybridad convert inp-former` (optional)
    random_encoder: bool = False  # allow a random-init encoder without `weights` (benchmarks only)
    encoder_seed: int = 0  # seed of the random-init encoder (tiny preset / random_encoder), so reloads match
    tiny_depth: int = 4  # encoder depth of the tiny preset (ViT-S/14 width)
    compile: str = ""  # "" = eager; a torch.compile backend ("inductor") compiles the model's forward in place
