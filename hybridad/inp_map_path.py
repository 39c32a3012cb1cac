"""INP-Former's map path: per-group token-grid distances -> one smoothed map per tile (pure torch, any device).

`inp_former.map_smoothing` picks one of three paths (the exported runtime uses this module too):

- `isvl` (default, the VAND 2025 winners' `isvl.py`): upsample every group's (h, w) map bilinearly with
  align_corners=True **directly to the tile's native size**, average the groups, then INP-Former's 5x5 Gaussian
  (sigma 4, zero padding 2) at that resolution. The stitched map is a plain paste of these tiles.
- `official` (INP-Former's `evaluation_batch`): the same upsampling and the same 5x5 kernel at the **input
  resolution** (the tile as the network saw it); `untile` then resizes each tile map to its native box.
- `none`: upsampling straight to the native size, no smoothing.

The whole-map blur `postprocess.whole_map_blur_sigma` is a different, optional step applied after stitching.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hybridad.gaussian import inp_gaussian_kernel

MAP_SMOOTHING = ("isvl", "official", "none")
KERNEL_SIZE = 5  # INP-Former: get_gaussian_kernel(kernel_size=5, sigma=4)
KERNEL_SIGMA = 4.0


def inp_gaussian(maps: Tensor) -> Tensor:
    """(N,1,H,W) -> (N,1,H,W): the 5x5 sigma-4 kernel as a bias-free conv with zero padding 2."""
    kernel = inp_gaussian_kernel(KERNEL_SIZE, KERNEL_SIGMA, maps.device).to(maps.dtype)
    return F.conv2d(maps, kernel, padding=KERNEL_SIZE // 2)


def tile_maps_from_groups(group_maps: Tensor, smoothing: str, native_size: tuple[int, int],
                          input_size: tuple[int, int]) -> Tensor:
    """(N,G,h,w) 1 - cos per fused group at the token grid -> (N,1,H,W) tile maps.

    Args:
        group_maps: the per-group distance maps (`InpFormerModel.group_maps`).
        smoothing: one of `MAP_SMOOTHING` (module docstring).
        native_size: (H, W) of the tile's box in the native image.
        input_size: (S, S) of the tile as the network saw it (used by `official`).

    Returns:
        (N,1,H,W) float32 maps at `native_size` (`isvl`, `none`) or at `input_size` (`official`).
    """
    if smoothing not in MAP_SMOOTHING:
        raise ValueError(f"map smoothing {smoothing!r}: use one of {MAP_SMOOTHING}")
    size = tuple(input_size) if smoothing == "official" else tuple(native_size)
    up = F.interpolate(group_maps.float(), size=size, mode="bilinear", align_corners=True)  # (N,G,H,W)
    maps = up.mean(dim=1, keepdim=True)  # (N,1,H,W)
    return maps if smoothing == "none" else inp_gaussian(maps)
