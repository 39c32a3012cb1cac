"""Post-processing of anomaly maps and binary masks. (stub: contract only, helper fills in)"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PostProcessConfig:
    gaussian_sigma: float = 0.0  # smoothing of the continuous map; 0 = off
    closing_kernel: int = 0  # square kernel side of morphological closing of the binary mask; 0 = off
    fill_holes: bool = False
    min_area: int = 0  # remove connected components smaller than this (pixels); 0 = off
    erosion_kernel: int = 0  # square erosion after closing (ISVL fruit_jelly: 15); 0 = off
    full_mask_guard: float = 0.95  # if closing/filling makes more than this fraction positive, keep the raw mask
