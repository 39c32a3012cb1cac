"""The MVTec AD 2 dataset: decoded native images (eval) or (image, level, tile) triples (training)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from data_modules.augment import AugmentConfig, build_augment
from data_modules.listing import png_size, read_image, read_mask
from data_modules.tilers import train_tile_boxes
from data_modules.train_sampler import decode_item_index, item_seed
from hybridad.errors import UserError
from hybridad.types import Batch, Sample, Split


def _seed_worker(worker_id: int) -> None:
    """Give each DataLoader worker its own augmentation stream (torch seeds workers differently)."""
    info = torch.utils.data.get_worker_info()
    augment = getattr(info.dataset, "augment", None) if info is not None else None
    if augment is not None:
        augment.reseed(torch.initial_seed() % 2**32)


class MVTecAD2Dataset(Dataset):
    """Decoded MVTec AD 2 images at native size.

    Args:
        samples: from `list_samples`; all of one size.
        train_levels: when given, items are (image, level, tile) triples over these levels (training);
            otherwise one item per image.
        augment: CPU augmentations (training only).
        seed: seed of the augmentation pipeline.

    Items are dicts: `image` (3,H,W) uint8, `mask` (1,H,W) float or None, `label`, `sample_id`, `lighting`,
    `tile_box` (4,) long (training) or None.
    """

    def __init__(
        self,
        samples: list[Sample],
        train_levels: list | None = None,
        augment: AugmentConfig | None = None,
        seed: int | None = None,
    ) -> None:
        if not samples:
            raise ValueError("no samples")
        self.samples = samples
        self.with_masks = samples[0].split == Split.TEST_PUBLIC  # the only split with ground truth
        h, w, _ = png_size(samples[0].image_path)
        self.image_size = (h, w)
        self.triples = None
        if train_levels is not None:
            boxes = train_tile_boxes(h, w, train_levels)
            # (sample index, level index, tile index, box): one epoch = every tile of every image once
            self.triples = [(i, li, ti, box) for i in range(len(samples)) for (li, ti, box) in boxes]
        train = augment is not None and train_levels is not None
        self.augment = build_augment(augment, seed) if train else None
        self.seed = seed or 0
        self._cache: tuple[int, np.ndarray] | None = None  # last decoded image (consecutive triples share it)

    def __len__(self) -> int:
        return len(self.triples) if self.triples is not None else len(self.samples)

    def _decode(self, index: int) -> np.ndarray:
        if self._cache is not None and self._cache[0] == index:
            return self._cache[1]
        s = self.samples[index]
        img = read_image(s.image_path)
        if img.shape[:2] != self.image_size:
            ref = self.samples[0].image_path
            raise UserError(
                f"image {s.image_path} is {img.shape[1]}x{img.shape[0]} but {ref} is "
                f"{self.image_size[1]}x{self.image_size[0]}; all images of a category must have one size"
            )
        self._cache = (index, img)
        return img

    def __getitem__(self, idx: int) -> dict[str, Any]:
        box = None
        epoch, idx = decode_item_index(idx, len(self))  # EpochSampler encodes the epoch in the index
        item = idx
        if self.triples is not None:
            idx, _, _, box = self.triples[idx]
        s = self.samples[idx]
        img = self._decode(idx)
        if self.augment is not None:
            self.augment.reseed(item_seed(self.seed, epoch, item))  # resumable, worker-count independent
            img = self.augment(img)
        mask = None
        if self.with_masks:
            hw = self.image_size
            mask_np = read_mask(s.mask_path, s.image_path, hw) if s.mask_path else np.zeros(hw, np.float32)
            mask = torch.from_numpy(mask_np)[None]  # (1,H,W)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1),  # (H,W,3) -> (3,H,W) uint8
            "mask": mask,
            "label": s.label,
            "sample_id": s.sample_id,
            "lighting": s.lighting,
            "tile_box": None if box is None else torch.tensor(box, dtype=torch.long),
        }


def collate_batch(items: list[dict[str, Any]]) -> Batch:
    """Stack dataset items into a `Batch` (images (B,3,H,W) uint8, masks (B,1,H,W) or None)."""
    masks = [it["mask"] for it in items]
    boxes = [it["tile_box"] for it in items]
    return Batch(
        image=torch.stack([it["image"] for it in items]),
        label=torch.tensor([it["label"] for it in items], dtype=torch.long),
        sample_id=[it["sample_id"] for it in items],
        lighting=[it["lighting"] for it in items],
        mask=None if masks[0] is None else torch.stack(masks),
        tile_box=None if boxes[0] is None else torch.stack(boxes),  # (B,4)
    )


