"""Post-processing of anomaly maps (smoothing, normalisation) and of binary masks (threshold + morphology).

Everything runs on the input's device, on (B,1,H,W) tensors. Two steps leave the device for the CPU:
`remove_small` (OpenCV labelling; connected components have no cheap GPU form in torch) and
`hsv_kmeans_foreground` (OpenCV colour conversion; the k-means itself runs on a 180x256 histogram).
`fill_holes` uses scipy for CPU inputs and an iterative flood fill elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F
from torch import Tensor

from hybridad.gaussian import gaussian_kernel1d, scipy_radius


@dataclass
class PostProcessConfig:
    # optional blur of the whole stitched native map (scipy-style separable Gaussian, radius int(4 sigma + 0.5),
    # mirrored borders); 0 = off. INP-Former's own per-tile 5x5 kernel is `inp_former.map_smoothing`.
    whole_map_blur_sigma: float = 0.0
    closing_kernel: int = 0  # square kernel side of morphological closing of the binary mask; 0 = off
    fill_holes: bool = False
    min_area: int = 0  # remove connected components smaller than this (pixels); 0 = off
    erosion_kernel: int = 0  # square erosion after closing (ISVL fruit_jelly: 15); 0 = off
    full_mask_guard: float = 0.95  # if closing/filling makes more than this fraction positive, keep raw mask
    # ISVL walnuts: masks of these splits are ANDed with the image's HSV k-means object mask before closing
    foreground_splits: list[str] = field(default_factory=list)  # e.g. [test_private_mixed]; empty = off
    foreground_dilation: int = 15  # square dilation of that object mask (ISVL: 15)
    foreground_seed: int = 0  # seed of the k-means++ initialisation


# ------------------------------------------------------------------------------------------ continuous maps


def smooth(anomaly_map: Tensor, cfg: PostProcessConfig) -> Tensor:
    """Separable Gaussian blur of (B,1,H,W) maps with `cfg.whole_map_blur_sigma` (identity when 0).

    Borders are reflected without repeating the edge pixel (OpenCV BORDER_REFLECT_101, scipy mode "mirror");
    maps smaller than the kernel radius fall back to edge replication.
    """
    if cfg.whole_map_blur_sigma <= 0:
        return anomaly_map
    sigma = cfg.whole_map_blur_sigma  # scipy's kernel radius (truncate 4)
    k = gaussian_kernel1d(sigma, scipy_radius(sigma), anomaly_map.device).float().to(anomaly_map.dtype)
    r = (k.numel() - 1) // 2
    h, w = anomaly_map.shape[-2:]
    mode = "reflect" if r < min(h, w) else "replicate"
    x = F.pad(anomaly_map, (r, r, r, r), mode=mode)  # (B,1,H+2r,W+2r)
    x = F.conv2d(x, k.view(1, 1, 1, -1))  # (B,1,H+2r,W) along width
    return F.conv2d(x, k.view(1, 1, -1, 1))  # (B,1,H,W) along height


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


# ------------------------------------------------------------------------------------ object mask (walnuts)

HUE_BINS, VALUE_BINS = 180, 256  # OpenCV 8-bit HSV: H in [0, 180), V in [0, 256)


def _two_means(
    points: np.ndarray, weights: np.ndarray, seed: int, inits: int = 3, iters: int = 100
) -> np.ndarray:
    """Weighted Lloyd 2-means, k-means++ seeding, best of `inits` by inertia: (M,2) points -> (2,2) centres.

    On the distinct (H, V) pairs weighted by their pixel counts this is exactly k-means on every pixel.
    """
    rng = np.random.default_rng(seed)
    p = weights / weights.sum()
    best, best_inertia = None, np.inf
    for _ in range(inits):
        first = points[rng.choice(len(points), p=p)]
        d2 = ((points - first) ** 2).sum(1)  # (M,)
        second = points[rng.choice(len(points), p=weights * d2 / (weights * d2).sum())]
        centres = np.stack([first, second])  # (2, 2)
        for _ in range(iters):
            dist = ((points[:, None] - centres[None]) ** 2).sum(-1)  # (M, 2)
            assign = dist.argmin(1)  # (M,)
            new = np.stack([np.average(points[assign == k], axis=0, weights=weights[assign == k])
                            if weights[assign == k].sum() > 0 else centres[k] for k in range(2)])
            if np.array_equal(new, centres):
                break
            centres = new
        inertia = (weights * ((points[:, None] - centres[None]) ** 2).sum(-1).min(1)).sum()
        if inertia < best_inertia:
            best, best_inertia = centres, inertia
    assert best is not None
    return best


def hsv_kmeans_foreground(images: Tensor, dilation: int = 15, seed: int = 0) -> Tensor:
    """Object mask of (B,3,H,W) uint8 RGB images -> (B,1,H,W) bool, the ISVL walnuts step.

    Per image: OpenCV 8-bit HSV; k-means with k=2 on each pixel's (H, V) (k-means++ seeded with `seed`); the
    cluster with the lower mean V is background, the other one foreground; the foreground is dilated with a
    `dilation` square (0 = none). Runs on the CPU on the (H, V) histogram (at most 180 x 256 distinct
    points), so its cost is the colour conversion and one histogram per image. An image of one colour is all
    foreground.
    """
    out = []
    for rgb in images.permute(0, 2, 3, 1).to("cpu", torch.uint8).numpy():  # (H,W,3) each
        hsv = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)  # (H,W,3) uint8
        key = hsv[..., 0].astype(np.int32) * VALUE_BINS + hsv[..., 2]  # (H,W) flat (H, V) bin
        counts = np.bincount(key.ravel(), minlength=HUE_BINS * VALUE_BINS)  # (180*256,)
        present = np.flatnonzero(counts)  # (M,) distinct (H, V) pairs
        if len(present) < 2:
            out.append(np.ones(key.shape, bool))
            continue
        points = np.stack([present // VALUE_BINS, present % VALUE_BINS], 1).astype(np.float64)  # (M, 2): H, V
        centres = _two_means(points, counts[present].astype(np.float64), seed)
        dist = ((points[:, None] - centres[None]) ** 2).sum(-1)  # (M, 2)
        object_bin = np.zeros(HUE_BINS * VALUE_BINS, bool)
        object_bin[present] = dist.argmin(1) == int(centres[:, 1].argmax())  # brighter cluster = object
        mask = object_bin[key]  # gather: (H,W)
        if dilation > 1:
            mask = cv2.dilate(mask.astype(np.uint8), np.ones((dilation, dilation), np.uint8)) > 0
        out.append(mask)
    return torch.from_numpy(np.stack(out))[:, None].to(images.device)  # (B,1,H,W)


def binarize(
    anomaly_map: Tensor, threshold: float, cfg: PostProcessConfig, foreground: Tensor | None = None
) -> Tensor:
    """Threshold and clean (B,1,H,W) maps into (B,1,H,W) bool masks, the masks the PNG writer saves.

    Steps: `map >= threshold` on the float16-rounded map (the values cached and submitted, so a mask always
    equals `cached map >= threshold`; inclusive: ISVL's uint8 rule floor(255 s) > T is s >= (T+1)/255), ANDed
    with `foreground` ((B,1,H,W) bool object mask, e.g. `hsv_kmeans_foreground`) when given; closing with
    a `closing_kernel` square; hole filling; the full-mask guard (per image: if closing/filling left more than
    `full_mask_guard` of the pixels positive, keep the mask from before closing); erosion with an
    `erosion_kernel` square; removal of 8-connected components under `min_area` pixels. Steps set to 0/False
    are skipped.
    """
    raw = anomaly_map.to(torch.float16).float() >= threshold  # (B,1,H,W) bool, compared in float32
    if foreground is not None:
        raw = raw & foreground.to(raw.device)
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
