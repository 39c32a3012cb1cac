"""Gaussian kernels and blurs, in one place (pure torch, any device; the export runtime imports it).

- `gaussian_kernel1d(sigma, radius)`: the sampled Gaussian exp(-x^2 / (2 sigma^2)) on -radius..radius,
  normalised, in float64. Every separable or torchvision-style blur of this repository builds its kernel here:
  the whole-map blur (`postprocess.smooth`, scipy's radius `scipy_radius`), CPR's map blur and image score
  (`mirror_blur2d`) and CPR's positive-sampling weight (`models/cpr/foreground.py`).
- `inp_gaussian_kernel`: INP-Former's 5x5 sigma-4 kernel. It keeps the official `get_gaussian_kernel` formula
  (a 2-D float32 grid with the 1 / (2 pi sigma^2) factor, then divided by its sum) instead of the float64 1-D
  kernel above: the two differ in the last float32 bits, and INP-Former's maps must stay bit-equal to the
  official code (tests/unit/test_inp_map_path.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def scipy_radius(sigma: float, truncate: float = 4.0) -> int:
    """Kernel radius of `scipy.ndimage.gaussian_filter`: int(truncate * sigma + 0.5)."""
    return int(truncate * sigma + 0.5)


def gaussian_kernel1d(sigma: float, radius: int, device: torch.device | None = None) -> Tensor:
    """(2 radius + 1,) float64 normalised Gaussian exp(-x^2 / (2 sigma^2)), x = -radius..radius."""
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def mirror_blur2d(x: Tensor, kernel: int, sigma: float) -> Tensor:
    """torchvision-style blur of (B,1,H,W): one 2-D `kernel` x `kernel` Gaussian (outer product of the float64
    1-D kernel, cast to the maps' float type), 'reflect' (mirror) padding of kernel // 2; maps no larger than
    the radius fall back to edge replication. CPR's map blur and image score."""
    r = kernel // 2
    k1 = gaussian_kernel1d(sigma, r, x.device)  # (k,) float64
    k2 = (k1[:, None] * k1[None, :]).to(x.dtype if x.is_floating_point() else torch.float32)  # (k,k)
    pad_mode = "reflect" if min(x.shape[-2:]) > r else "replicate"
    return F.conv2d(F.pad(x, (r, r, r, r), mode=pad_mode), k2[None, None])


def inp_gaussian_kernel(kernel_size: int, sigma: float, device: torch.device | None = None) -> Tensor:
    """(1,1,k,k) float32 kernel of INP-Former's `get_gaussian_kernel`, computed the same way (bit-equal):
    exp(-|xy - centre|^2 / (2 sigma^2)) / (2 pi sigma^2) over the k x k grid, divided by its sum."""
    coord = torch.arange(kernel_size, device=device)
    x_grid = coord.repeat(kernel_size).view(kernel_size, kernel_size)  # (k,k)
    xy_grid = torch.stack([x_grid, x_grid.t()], dim=-1).float()  # (k,k,2)
    centre, variance = (kernel_size - 1) / 2.0, sigma**2.0
    kernel = (1.0 / (2.0 * math.pi * variance)) * torch.exp(
        -torch.sum((xy_grid - centre) ** 2.0, dim=-1) / (2 * variance))  # (k,k)
    return (kernel / torch.sum(kernel)).view(1, 1, kernel_size, kernel_size)
