"""Training augmentations: CPU ones on one native image or tile crop (before the device resize), and CPR's
lightness jitter as a batched device function (`random_hls_lightness`).

Two families, each behind its own keys:
- the winners' (ISVL, VAND 2025) `RandomLightingAugmentation` for can, fabric and rice (`lighting`): with
  probability p one of (a) brightness x U(0.5, 1.2), (b) three rectangles of 30-70 px (at the 448 model input,
  scaled to the crop) each x U(0.5, 1.5), (c) left half x1.5 and right half x0.7; and CPR's HLS lightness
  x U(0.9, 1.1) (`hls_lightness`);
- generic albumentations jitter: flips, zoom, the additive `RandomBrightnessContrast` (`brightness`) and an
  exposure factor 2**u.
Multiplicative scaling follows PIL's `ImageEnhance.Brightness` (torchvision's `ColorJitter` on PIL images):
float32 product, clipped to [0, 255], truncated to uint8.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
from torch import Tensor

from hybridad.errors import UserError

LIGHTING_BRIGHTNESS = (0.5, 1.2)  # (a) global factor range
LIGHTING_RECT_COUNT = 3  # (b) rectangles per image
LIGHTING_RECT_SIDE = (30, 70)  # (b) side range in pixels of the model input (inclusive)
LIGHTING_RECT_FACTOR = (0.5, 1.5)  # (b) per-rectangle factor range
LIGHTING_HALVES = (1.5, 0.7)  # (c) left and right factors


@dataclass
class AugmentConfig:
    """CPU augmentations for training; all off by default."""

    hflip: float = 0.0
    vflip: float = 0.0
    scale: float = 0.0  # max relative zoom jitter
    brightness: float = 0.0  # max additive brightness shift (albumentations RandomBrightnessContrast)
    exposure: float = 0.0  # max |u| of an exposure factor 2**u
    probability: float = 0.5  # chance of each of scale, brightness and exposure
    lighting: float = 0.0  # chance of the winners' RandomLightingAugmentation (ISVL: 0.5 for can/fabric/rice)
    lighting_reference_size: int = 448  # side of the model input the rectangle sizes refer to
    hls_lightness: float = 0.0  # chance of CPR's HLS lightness scaling (CPR: 0.3)
    hls_lightness_ratio: float = 0.1  # lightness factor in [1 - ratio, 1 + ratio]


def scale_brightness(img: np.ndarray, factor: float) -> np.ndarray:
    """(H,W,C) uint8 times `factor`, as PIL's ImageEnhance.Brightness: float32, clipped, truncated."""
    return np.clip(img.astype(np.float32) * np.float32(factor), 0, 255).astype(np.uint8)


def scale_rectangles(img: np.ndarray, rects: list[tuple[int, int, int, int, float]]) -> np.ndarray:
    """Scale the brightness of each (y0, x0, height, width, factor) rectangle in turn (overlaps compound)."""
    out = img.copy()
    for y0, x0, h, w, f in rects:
        out[y0 : y0 + h, x0 : x0 + w] = scale_brightness(out[y0 : y0 + h, x0 : x0 + w], f)
    return out


def scale_halves(img: np.ndarray, factors: tuple[float, float] = LIGHTING_HALVES) -> np.ndarray:
    """Columns [0, W//2) times `factors[0]`, [W//2, W) times `factors[1]`."""
    half, (left, right) = img.shape[1] // 2, factors
    left_half, right_half = scale_brightness(img[:, :half], left), scale_brightness(img[:, half:], right)
    return np.concatenate([left_half, right_half], axis=1)


def hls_lightness(img: np.ndarray, factor: float) -> np.ndarray:
    """CPR's lightness jitter: (H,W,3) uint8 RGB -> 8-bit HLS, L times `factor` (clipped, truncated), back."""
    hls = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2HLS).astype(np.float64)
    hls[..., 1] *= factor
    return cv2.cvtColor(np.clip(hls, 0, 255).astype(np.uint8), cv2.COLOR_HLS2RGB)


def hls_lightness_tensor(images: Tensor, factor: Tensor) -> Tensor:
    """CPR's lightness jitter on the device in float (no 8-bit HLS): L times `factor`, H and S kept.

    Args:
        images: (N,3,H,W) float RGB in [0,1].
        factor: (N,) lightness factors.

    Returns:
        (N,3,H,W) float in [0,1]: within 1 grey level of `hls_lightness` on grey pixels, 6 on random colours
        (mean 0.7; OpenCV quantises H, L and S to 8 bits).
    """
    mx, mn = images.amax(1, keepdim=True), images.amin(1, keepdim=True)  # (N,1,H,W)
    spread, light = mx - mn, (mx + mn) / 2
    denom = torch.where(light < 0.5, mx + mn, 2 - mx - mn).clamp_min(1e-12)
    sat = torch.where(spread > 0, spread / denom, torch.zeros_like(spread))
    light = (light * factor[:, None, None, None]).clamp(0, 1)
    top = torch.where(light < 0.5, light * (1 + sat), light + sat - light * sat)  # the largest channel
    bottom = 2 * light - top  # the smallest channel
    position = torch.where(spread > 0, (images - mn) / spread.clamp_min(1e-12), torch.zeros_like(images))
    return (bottom + (top - bottom) * position).clamp(0, 1)  # channels keep their place between min and max


def random_hls_lightness(
    images: Tensor, prob: float = 0.3, ratio: float = 0.1, generator: torch.Generator | None = None
) -> Tensor:
    """CPR's batch augmentation: with probability `prob` per image, lightness x U(1 - ratio, 1 + ratio)."""
    n, dev = images.shape[0], images.device
    apply = torch.rand(n, generator=generator, device=dev) < prob
    factor = 1 + ratio * (2 * torch.rand(n, generator=generator, device=dev) - 1)
    return hls_lightness_tensor(images, torch.where(apply, factor, torch.ones_like(factor)))


def draw_rectangles(
    rng: np.random.Generator, height: int, width: int, reference: int = 448
) -> list[tuple[int, int, int, int, float]]:
    """The winners' three rectangles, drawn at `reference` x `reference` and scaled to a (height, width) crop.

    Returns:
        (y0, x0, h, w, factor) per rectangle, inside the crop.
    """
    lo, hi = LIGHTING_RECT_SIDE
    sy, sx = height / reference, width / reference
    rects = []
    for _ in range(LIGHTING_RECT_COUNT):
        rh, rw = (int(v) for v in rng.integers(lo, hi + 1, size=2))  # at the reference size
        ry, rx = int(rng.integers(0, reference - rh + 1)), int(rng.integers(0, reference - rw + 1))
        f = float(rng.uniform(*LIGHTING_RECT_FACTOR))
        y0, x0 = round(ry * sy), round(rx * sx)
        h, w = max(1, min(round(rh * sy), height - y0)), max(1, min(round(rw * sx), width - x0))
        rects.append((y0, x0, h, w, f))
    return rects


class Augment:
    """CPU training augmentations of one (H,W,3) uint8 crop.

    Order: the winners' lighting, CPR's HLS lightness, then the albumentations ops (flips, zoom, additive
    brightness), then exposure. albumentations is imported here, not at module import (its import may check
    for updates online).

    Args:
        cfg: which augmentations, how strong.
        seed: seed of the random state (`reseed` gives each DataLoader worker its own).
    """

    def __init__(self, cfg: AugmentConfig, seed: int | None = None) -> None:
        import albumentations as A

        for key in ("hflip", "vflip", "probability", "lighting", "hls_lightness"):
            if not 0.0 <= getattr(cfg, key) <= 1.0:
                value = getattr(cfg, key)
                raise UserError(f"data.augment.{key}={value} is a probability: use a value in [0, 1]")
        if not 0.0 <= cfg.hls_lightness_ratio < 1.0 or cfg.lighting_reference_size < LIGHTING_RECT_SIDE[1]:
            raise UserError(
                "data.augment: hls_lightness_ratio must be in [0, 1) and lighting_reference_size at least "
                f"{LIGHTING_RECT_SIDE[1]} (got {cfg.hls_lightness_ratio}, {cfg.lighting_reference_size})"
            )
        ops: list[Any] = []
        if cfg.hflip > 0:
            ops.append(A.HorizontalFlip(p=cfg.hflip))
        if cfg.vflip > 0:
            ops.append(A.VerticalFlip(p=cfg.vflip))
        if cfg.scale > 0:
            zoom = (1 - cfg.scale, 1 + cfg.scale)
            ops.append(A.Affine(scale=zoom, border_mode=cv2.BORDER_REFLECT_101, p=cfg.probability))
        if cfg.brightness > 0:
            b, p = cfg.brightness, cfg.probability
            ops.append(A.RandomBrightnessContrast(brightness_limit=b, contrast_limit=0.0, p=p))
        self.compose = A.Compose(ops, seed=seed) if ops else None
        self.cfg = cfg
        self.rng = np.random.default_rng(seed)

    def reseed(self, seed: int) -> None:
        if self.compose is not None:
            self.compose.set_random_seed(seed)
        self.rng = np.random.default_rng(seed)

    def lighting(self, img: np.ndarray) -> np.ndarray:
        """One of the winners' three lighting changes, chosen uniformly (`__call__` draws the p)."""
        choice = int(self.rng.integers(3))
        if choice == 0:
            return scale_brightness(img, float(self.rng.uniform(*LIGHTING_BRIGHTNESS)))
        if choice == 1:
            h, w = img.shape[:2]
            return scale_rectangles(img, draw_rectangles(self.rng, h, w, self.cfg.lighting_reference_size))
        return scale_halves(img)

    def __call__(self, img: np.ndarray) -> np.ndarray:
        """(H,W,3) uint8 -> (H,W,3) uint8 of the same size."""
        cfg = self.cfg
        if cfg.lighting > 0 and self.rng.random() < cfg.lighting:
            img = self.lighting(img)
        if cfg.hls_lightness > 0 and self.rng.random() < cfg.hls_lightness:
            r = cfg.hls_lightness_ratio
            img = hls_lightness(img, 1.0 + float(self.rng.uniform(-r, r)))
        if self.compose is not None:
            img = self.compose(image=img)["image"]
        if cfg.exposure > 0 and self.rng.random() < cfg.probability:
            u = self.rng.uniform(-cfg.exposure, cfg.exposure)
            img = np.clip(img.astype(np.float32) * (2.0**u), 0, 255).astype(np.uint8)
        return img


def build_augment(cfg: AugmentConfig, seed: int | None = None) -> Augment | None:
    """The augmentation pipeline of `cfg`, or None when every augmentation is off."""
    strengths = (cfg.hflip, cfg.vflip, cfg.scale, cfg.brightness, cfg.exposure)
    strengths += (cfg.lighting, cfg.hls_lightness)
    if max(strengths) <= 0:
        return None
    return Augment(cfg, seed)
