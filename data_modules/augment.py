"""CPU training augmentations (per native image or tile, before the device hook)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np


@dataclass
class AugmentConfig:
    """CPU augmentations for training (albumentations); all off by default."""

    hflip: float = 0.0
    vflip: float = 0.0
    scale: float = 0.0  # max relative zoom jitter
    brightness: float = 0.0  # max relative brightness jitter
    exposure: float = 0.0  # max |u| of an exposure factor 2**u
    probability: float = 0.5


class Augment:
    """CPU training augmentations: albumentations flips, scale jitter and brightness, plus exposure 2**u.

    albumentations is imported here, not at module import (its import may check for updates online).

    Args:
        cfg: which augmentations, how strong.
        seed: seed of the random state (`reseed` gives each DataLoader worker its own).
    """

    def __init__(self, cfg: AugmentConfig, seed: int | None = None) -> None:
        import albumentations as A

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
        self.exposure, self.probability = cfg.exposure, cfg.probability
        self.rng = np.random.default_rng(seed)

    def reseed(self, seed: int) -> None:
        if self.compose is not None:
            self.compose.set_random_seed(seed)
        self.rng = np.random.default_rng(seed)

    def __call__(self, img: np.ndarray) -> np.ndarray:
        """(H,W,3) uint8 -> (H,W,3) uint8 of the same size."""
        if self.compose is not None:
            img = self.compose(image=img)["image"]
        if self.exposure > 0 and self.rng.random() < self.probability:
            u = self.rng.uniform(-self.exposure, self.exposure)
            img = np.clip(img.astype(np.float32) * (2.0**u), 0, 255).astype(np.uint8)
        return img


def build_augment(cfg: AugmentConfig, seed: int | None = None) -> Augment | None:
    """The augmentation pipeline of `cfg`, or None when every augmentation is off."""
    if max(cfg.hflip, cfg.vflip, cfg.scale, cfg.brightness, cfg.exposure) <= 0:
        return None
    return Augment(cfg, seed)


