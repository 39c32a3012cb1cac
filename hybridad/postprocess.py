"""Post-processing of anomaly maps (smoothing, normalisation) and of binary masks (threshold + morphology).

Everything runs on the input's device, on (B,1,H,W) tensors. One step leaves the device for the CPU, because
connected components have no cheap GPU form in torch: `remove_small` (OpenCV labelling). `fill_holes` uses
scipy for CPU inputs and an iterative flood fill elsewhere. The ISVL walnuts HSV k-means foreground mask is
not implemented (it needs the RGB image).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class PostProcessConfig:
    gaussian_sigma: float = 0.0  # smoothing of the continuous map; 0 = off
    closing_kernel: int = 0  # square kernel side of morphological closing of the binary mask; 0 = off
    fill_holes: bool = False
    min_area: int = 0  # remove connected components smaller than this (pixels); 0 = off
    erosion_kernel: int = 0  # square erosion after closing (ISVL fruit_jelly: 15); 0 = off
    full_mask_guard: float = 0.95  # if closing/filling makes more than this fraction positive, keep raw mask


# ------------------------------------------------------------------------------------------ continuous maps


def gaussian_kernel1d(sigma: float, truncate: float = 4.0, device: torch.device | None = None) -> Tensor:
    """(2r+1,) normalised Gaussian, r = int(truncate * sigma + 0.5) (as scipy.ndimage.gaussian_filter)."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).float()


def smooth(anomaly_map: Tensor, cfg: PostProcessConfig) -> Tensor:
    """Separable Gaussian blur of (B,1,H,W) maps with `cfg.gaussian_sigma` (identity when 0).

    Borders are reflected without repeating the edge pixel (OpenCV BORDER_REFLECT_101, scipy mode "mirror");
    maps smaller than the kernel radius fall back to edge replication.
    """
    if cfg.gaussian_sigma <= 0:
        return anomaly_map
    k = gaussian_kernel1d(cfg.gaussian_sigma, device=anomaly_map.device).to(anomaly_map.dtype)
    r = (k.numel() - 1) // 2
    h, w = anomaly_map.shape[-2:]
    mode = "reflect" if r < min(h, w) else "replicate"
    x = F.pad(anomaly_map, (r, r, r, r), mode=mode)  # (B,1,H+2r,W+2r)
    x = F.conv2d(x, k.view(1, 1, 1, -1))  # (B,1,H+2r,W) along width
    return F.conv2d(x, k.view(1, 1, -1, 1))  # (B,1,H,W) along height


def normalize(anomaly_map: Tensor, low: float, high: float) -> Tensor:
    """(map - low) / (high - low), clamped to [0, 1]; `low`/`high` are fitted statistics (e.g. validation
    min/max or a percentile pair), not the statistics of this map."""
    if not high > low:
        raise ValueError(f"normalize needs high > low, got low={low}, high={high}")
    return ((anomaly_map - low) / (high - low)).clamp(0.0, 1.0)


# ----------------------------------------------------------------------------------------------- morphology


def _max_filter(x: Tensor, k: int, outside: float) -> Tensor:
    """Max over a k x k window at offsets [-(k//2), k-1-k//2] (OpenCV's default anchor); outside = `outside`.
    Separable (row max, then column max): O(k) per pixel."""
    a = k // 2
    x = F.pad(x, (a, k - 1 - a, a, k - 1 - a), value=outside)  # (B,1,H+k-1,W+k-1)
    x = F.max_pool2d(x, (1, k), stride=1)  # (B,1,H+k-1,W)
    return F.max_pool2d(x, (k, 1), stride=1)  # (B,1,H,W)


def _opencv_per_image(mask: Tensor, op: int, k: int) -> Tensor:
    kernel = np.ones((k, k), np.uint8)
    out = [cv2.morphologyEx(m, op, kernel) for m in mask[:, 0].to(torch.uint8).numpy()]  # B x (H,W)
    return torch.from_numpy(np.stack(out))[:, None] > 0  # (B,1,H,W)


def _use_opencv(mask: Tensor, backend: str) -> bool:
    if backend not in ("auto", "torch", "opencv"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'opencv', got {backend!r}")
    return backend == "opencv" or (backend == "auto" and mask.device.type == "cpu")


def dilate(mask: Tensor, k: int, backend: str = "auto") -> Tensor:
    """Binary dilation of (B,1,H,W) bool with a k x k square, like cv2.dilate (outside pixels never count).

    `backend`: "torch" (separable max-pool, any device), "opencv" (CPU), "auto" (OpenCV on CPU: much faster
    for large kernels, same result).
    """
    if _use_opencv(mask, backend):
        return _opencv_per_image(mask.cpu(), cv2.MORPH_DILATE, k).to(mask.device)
    return _max_filter(mask.float(), k, 0.0) > 0.5


def erode(mask: Tensor, k: int, backend: str = "auto") -> Tensor:
    """Binary erosion with a k x k square, like cv2.erode (outside pixels count as foreground)."""
    if _use_opencv(mask, backend):
        return _opencv_per_image(mask.cpu(), cv2.MORPH_ERODE, k).to(mask.device)
    return _max_filter((~mask).float(), k, 0.0) < 0.5


def close(mask: Tensor, k: int, backend: str = "auto") -> Tensor:
    """Closing (dilate, then erode with the same window), equal to cv2.morphologyEx(MORPH_CLOSE) defaults."""
    return erode(dilate(mask, k, backend), k, backend)


def _fill_holes_iterative(mask: Tensor) -> Tensor:
    """Hole filling by growing the border background (4-connected) inside the background until it stops."""
    background = ~mask
    reach = torch.zeros_like(mask)
    reach[..., 0, :] = background[..., 0, :]
    reach[..., -1, :] = background[..., -1, :]
    reach[..., :, 0] |= background[..., :, 0]
    reach[..., :, -1] |= background[..., :, -1]
    while True:
        before = reach
        for _ in range(16):  # check convergence every 16 steps (one sync each)
            grown = reach.clone()
            grown[..., 1:, :] |= reach[..., :-1, :]
            grown[..., :-1, :] |= reach[..., 1:, :]
            grown[..., :, 1:] |= reach[..., :, :-1]
            grown[..., :, :-1] |= reach[..., :, 1:]
            reach = grown & background
        if torch.equal(reach, before):
            return ~reach


def fill_holes(mask: Tensor, method: str = "auto") -> Tensor:
    """Set background pixels that are not 4-connected to the image border (scipy binary_fill_holes semantics).

    Args:
        mask: (B,1,H,W) bool.
        method: "scipy" (CPU), "iterative" (any device), or "auto" (scipy on CPU, iterative elsewhere).

    Note: ISVL flood-fills from pixel (0,0) only; that differs where background touches the border but is cut
    off from the corner, and fills everything when the corner is foreground (their 95 % guard catches that).
    """
    if method == "auto":
        method = "scipy" if mask.device.type == "cpu" else "iterative"
    if method == "iterative":
        return _fill_holes_iterative(mask)
    filled = [ndi.binary_fill_holes(m) for m in mask[:, 0].cpu().numpy()]  # B x (H,W)
    return torch.from_numpy(np.stack(filled))[:, None].to(mask.device)  # (B,1,H,W)


def remove_small(mask: Tensor, min_area: int) -> Tensor:
    """Drop 8-connected components under `min_area` pixels from a (B,1,H,W) bool mask (labelled on CPU)."""
    out = []
    for m in mask[:, 0].to("cpu", torch.uint8).numpy():  # (H,W) each
        n, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8, ltype=cv2.CV_32S)
        keep = stats[:, cv2.CC_STAT_AREA] >= min_area  # (n,)
        keep[0] = False
        out.append(keep[labels])  # gather: (H,W)
    return torch.from_numpy(np.stack(out))[:, None].to(mask.device)  # (B,1,H,W)


def binarize(anomaly_map: Tensor, threshold: float, cfg: PostProcessConfig) -> Tensor:
    """Threshold and clean (B,1,H,W) maps into (B,1,H,W) bool masks, the masks the PNG writer saves.

    Steps: `map >= threshold` (inclusive: ISVL's uint8 rule floor(255 s) > T is s >= (T+1)/255); closing with
    a `closing_kernel` square; hole filling; the full-mask guard (per image: if closing/filling left more than
    `full_mask_guard` of the pixels positive, keep the mask from before closing); erosion with an
    `erosion_kernel` square; removal of 8-connected components under `min_area` pixels. Steps set to 0/False
    are skipped.
    """
    raw = anomaly_map >= threshold
    mask = raw
    if cfg.closing_kernel > 0:
        mask = close(mask, cfg.closing_kernel)
    if cfg.fill_holes:
        mask = fill_holes(mask)
    if mask is not raw and cfg.full_mask_guard < 1.0:
        too_full = mask.float().mean(dim=(1, 2, 3)) > cfg.full_mask_guard  # (B,)
        mask = torch.where(too_full.view(-1, 1, 1, 1), raw, mask)
    if cfg.erosion_kernel > 0:
        mask = erode(mask, cfg.erosion_kernel)
    if cfg.min_area > 0:
        mask = remove_small(mask, cfg.min_area)
    return mask
