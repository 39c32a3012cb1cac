"""The MVTec AD 2 dataset: native images (eval) or tile crops of (image, level, tile) triples (training)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from data_modules.augment import AugmentConfig, build_augment
from data_modules.cache import DecodedCache
from data_modules.listing import image_header, read_image, read_mask
from data_modules.tilers import train_tile_boxes
from data_modules.train_sampler import decode_item_index, item_seed
from hybridad.errors import UserError
from hybridad.types import Batch, Sample, Split


def _chw_tensor(img: np.ndarray) -> torch.Tensor:
    """(h,w,C) uint8 -> (C,h,w) uint8 tensor (a permuted view), copied once.

    In a DataLoader worker the copy lands directly in shared memory, so sending the batch to the main process
    copies nothing more (the default path would copy into shared memory a second time).
    """
    if torch.utils.data.get_worker_info() is None:
        return torch.from_numpy(np.array(img)).permute(2, 0, 1)  # (h,w,C) -> (C,h,w)
    storage = torch.UntypedStorage._new_shared(img.nbytes)  # what torch's default_collate does in workers
    out = torch.empty(0, dtype=torch.uint8).set_(storage).view(img.shape)  # (h,w,C)
    np.copyto(out.numpy(), img)
    return out.permute(2, 0, 1)  # (h,w,C) -> (C,h,w)


def _seed_worker(worker_id: int) -> None:
    """Give each DataLoader worker its own augmentation stream (torch seeds workers differently)."""
    info = torch.utils.data.get_worker_info()
    augment = getattr(info.dataset, "augment", None) if info is not None else None
    if augment is not None:
        augment.reseed(torch.initial_seed() % 2**32)


class MVTecAD2Dataset(Dataset):
    """MVTec AD 2 images: whole native images (eval) or native-size tile crops (training).

    Args:
        samples: from `data_modules.formats.list_split`; of one size with `cache`, else any sizes (each
            image is tiled on its own grid).
        train_levels: when given, items are (image, level, tile) triples over these levels (training);
            otherwise one item per image.
        augment: CPU augmentations (training only), applied to each tile crop.
        seed: seed of the augmentation pipeline.
        cache: the split's decoded images (`DecodedCache`); items then slice only their box out of it
            instead of decoding the PNG. Without it every item decodes its PNG.
        keep_gray: training crops of a gray category stay 1-channel, (1,h,w), when no CPU augmentation runs
            (a third of the bytes to ship; the device hook expands them to 3 channels). Needs `cache`.
        one_size: every image must have the first one's size (MVTec AD 2); false: mixed sizes are read as
            they are.

    Items are dicts: `image` (3,h,w) uint8 (training: the tile's native crop, h,w = box size, (1,h,w) with
    `keep_gray`; eval: the whole image), `mask` (1,H,W) float or None, `label`, `sample_id`, `split` (the
    `Split` value), `lighting`, `tile_box` (4,) long native (y0,x0,y1,x1) (training) or None.
    """

    def __init__(
        self,
        samples: list[Sample],
        train_levels: list | None = None,
        augment: AugmentConfig | None = None,
        seed: int | None = None,
        cache: DecodedCache | None = None,
        keep_gray: bool = False,
        one_size: bool = True,
    ) -> None:
        if not samples:
            raise ValueError("no samples")
        self.samples = samples
        self.with_masks = samples[0].split == Split.TEST_PUBLIC  # the only split with ground truth
        self.cache = cache
        if cache is not None:
            if cache.shape[0] != len(samples):
                raise ValueError(f"cache holds {cache.shape[0]} images for {len(samples)} samples")
            h, w = cache.shape[1:3]
            self.sizes = [(h, w)] * len(samples)
        elif train_levels is not None:
            self.sizes = [image_header(s.image_path)[:2] for s in samples]  # (H,W) per image, from headers
        else:
            self.sizes = []  # eval: each image is read at its own size
        self.image_size = self.sizes[0] if self.sizes else image_header(samples[0].image_path)[:2]
        self.triples = None
        if train_levels is not None:
            boxes_of = {hw: train_tile_boxes(*hw, train_levels) for hw in set(self.sizes)}
            # (sample index, level index, tile index, box): one epoch = every tile of every image once
            self.triples = [(i, li, ti, box) for i, hw in enumerate(self.sizes) for (li, ti, box) in boxes_of[hw]]
        train = augment is not None and train_levels is not None
        self.augment = build_augment(augment, seed) if train else None
        self.keep_gray = keep_gray and self.augment is None and cache is not None and cache.shape[3] == 1
        self._last: tuple[int, np.ndarray] | None = None  # last decoded image (uncached path)
        self.seed = seed or 0
        self.one_size = one_size

    def __len__(self) -> int:
        return len(self.triples) if self.triples is not None else len(self.samples)

    def _decode(self, index: int) -> np.ndarray:
        """(H,W,3) uint8 of sample `index`, decoded from its PNG (the uncached path)."""
        if self._last is not None and self._last[0] == index:
            return self._last[1]
        s = self.samples[index]
        img = read_image(s.image_path)
        expected = self.image_size if self.one_size else (self.sizes[index] if self.sizes else None)
        if expected is not None and img.shape[:2] != expected:
            ref = self.samples[0].image_path if self.one_size else "its header"
            raise UserError(
                f"image {s.image_path} is {img.shape[1]}x{img.shape[0]} but {ref} is "
                f"{expected[1]}x{expected[0]}; all images of a category must have one size"
            )
        self._last = (index, img)
        return img

    def _pixels(self, index: int, box: tuple[int, int, int, int] | None) -> np.ndarray:
        """(h,w,3) uint8 (or (h,w,1), see `keep_gray`): the box of image `index` (whole image for None), from
        the cache or the PNG. May be a read-only view: copy before writing."""
        if self.cache is not None:
            if box is None:
                return self.cache.image(index)
            if self.augment is None:  # no copy here: `_chw_tensor` makes the only one
                return self.cache.view(index, box, not self.keep_gray)
            return self.cache.crop(index, box)
        img = self._decode(index)
        if box is None:
            return img
        y0, x0, y1, x1 = box
        return img[y0:y1, x0:x1]  # (th,tw,3) view

    def __getitem__(self, idx: int) -> dict[str, Any]:
        box = None
        epoch, idx = decode_item_index(idx, len(self))  # EpochSampler encodes the epoch in the index
        item = idx
        if self.triples is not None:
            idx, _, _, box = self.triples[idx]
        s = self.samples[idx]
        img = self._pixels(idx, box)
        if self.augment is not None:
            self.augment.reseed(item_seed(self.seed, epoch, item))  # resumable, worker-count independent
            img = self.augment(np.array(img))  # per tile, on a writable copy
        mask = None
        if self.with_masks:
            hw = tuple(img.shape[:2])
            mask_np = read_mask(s.mask_path, s.image_path, hw) if s.mask_path else np.zeros(hw, np.float32)
            mask = torch.from_numpy(mask_np)[None]  # (1,H,W)
        return {
            "image": _chw_tensor(img),  # (C,h,w) uint8
            "mask": mask,
            "label": s.label,
            "sample_id": s.sample_id,
            "split": s.split.value,
            "lighting": s.lighting,
            "defect_type": s.defect_type,
            "tile_box": None if box is None else torch.tensor(box, dtype=torch.long),
        }


def collate_batch(items: list[dict[str, Any]]) -> Batch:
    """Dataset items -> `Batch`.

    Eval items: `image` (B,3,H,W) uint8, `mask` (B,1,H,W) or None. Training items (with `tile_box`): `image`
    is the list of the B tile crops, each (3,h_i,w_i) (or (1,h_i,w_i), see `keep_gray`) uint8 at native size,
    so only tile-sized data is pinned and sent to the device; `tile_box` (B,4).
    """
    masks = [it["mask"] for it in items]
    boxes = [it["tile_box"] for it in items]
    images = [it["image"] for it in items]
    return Batch(
        image=images if boxes[0] is not None else torch.stack(images),
        label=torch.tensor([it["label"] for it in items], dtype=torch.long),
        sample_id=[it["sample_id"] for it in items],
        split=[it["split"] for it in items],
        lighting=[it["lighting"] for it in items],
        defect_type=[it.get("defect_type", "") for it in items],
        mask=None if masks[0] is None else torch.stack(masks),
        tile_box=None if boxes[0] is None else torch.stack(boxes),  # (B,4)
    )
