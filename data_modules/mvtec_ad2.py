"""MVTec AD 2 samples, dataset and DataModule.

Disk layout (one category):
    <root>/<category>/train/good/*.png, validation/good/*.png, test_public/{good,bad}/*.png,
    test_public/ground_truth/bad/<stem>_mask.png, test_private/*.png, test_private_mixed/*.png

The dataset decodes PNGs at native size on the CPU (gray categories become 3 identical channels) and, for
training, enumerates (image, pyramid level, tile) triples so one epoch sees every tile once and
`data.batch_size` counts tiles. Tiling, resizing and cut-paste run in `on_after_batch_transfer` on the batch's
device.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from data_modules.cut_paste import CutPaste, CutPasteConfig
from data_modules.tiling import EvalTiler, TilingConfig, TrainTiler, train_tile_boxes
from hybridad.errors import UserError
from hybridad.types import CATEGORIES, GRAY_CATEGORIES, PRIVATE_SPLITS, Batch, Sample, Split

DOWNLOAD_URL = "https://www.mvtec.com/company/research/datasets/mvtec-ad-2"
_LAYOUT = (
    "<root>/<category>/{train/good, validation/good, test_public/{good,bad,ground_truth/bad}, "
    "test_private, test_private_mixed}"
)


@dataclass
class AugmentConfig:
    """CPU augmentations for training (albumentations); all off by default."""

    hflip: float = 0.0
    vflip: float = 0.0
    scale: float = 0.0  # max relative zoom jitter
    brightness: float = 0.0  # max relative brightness jitter
    exposure: float = 0.0  # max |u| of an exposure factor 2**u
    probability: float = 0.5


@dataclass
class DataConfig:
    root: str = "data/mvtec_ad2"
    category: str = "can"
    batch_size: int = 16  # tiles per training step
    eval_batch_size: int = 1  # native images per eval step
    num_workers: int = 2
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    cut_paste: CutPasteConfig = field(default_factory=CutPasteConfig)


# ----------------------------------------------------------------------------------------------- listing


def _lighting(stem: str) -> str:
    """`000_regular` -> `regular`, `000_shift_2` -> `shift_2`, `000_mixed` -> `mixed`."""
    parts = stem.split("_", 1)
    return parts[1] if len(parts) == 2 and parts[1] else "unknown"


def _category_dir(root: str | Path, category: str) -> Path:
    if category not in CATEGORIES:
        raise UserError(f"unknown category '{category}'; valid: {', '.join(CATEGORIES)}")
    root = Path(root)
    hint = (
        f"download MVTec AD 2 from {DOWNLOAD_URL} and unpack it so that "
        f"{root}/{category}/train/good/*.png exists"
    )
    if not root.is_dir():
        raise UserError(f"data root {root} does not exist: {hint} (layout: {_LAYOUT})")
    if not (root / category).is_dir():
        raise UserError(f"category folder {root / category} does not exist: {hint} (layout: {_LAYOUT})")
    return root / category


def _pngs(folder: Path, split: Split) -> list[Path]:
    if not folder.is_dir():
        raise UserError(f"split folder {folder} is missing (split '{split.value}'; layout: {_LAYOUT})")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png" and p.is_file())
    if not files:
        raise UserError(f"split folder {folder} holds no .png images (split '{split.value}')")
    return files


def list_samples(root: str | Path, category: str, split: Split | str) -> list[Sample]:
    """Every image of one split, in a sorted, deterministic order (test_public: good first, then bad).

    Raises:
        UserError: missing root/category/split folder, empty split, unknown category, bad image without mask.
    """
    try:
        split = Split(split)
    except ValueError:
        raise UserError(f"unknown split '{split}'; valid: {', '.join(s.value for s in Split)}") from None
    cat_dir = _category_dir(root, category)
    if split in PRIVATE_SPLITS:
        return [
            Sample(category, split, p, None, -1, _lighting(p.stem), f"{split.value}/{p.stem}")
            for p in _pngs(cat_dir / split.value, split)
        ]
    kinds = ("good", "bad") if split == Split.TEST_PUBLIC else ("good",)
    samples = []
    for kind in kinds:
        for p in _pngs(cat_dir / split.value / kind, split):
            mask = None
            if kind == "bad":
                mask = cat_dir / split.value / "ground_truth" / "bad" / f"{p.stem}_mask.png"
                if not mask.is_file():
                    raise UserError(f"bad image {p} has no mask: expected {mask}")
            label = int(kind == "bad")
            sample_id = f"{split.value}/{kind}/{p.stem}"
            samples.append(Sample(category, split, p, mask, label, _lighting(p.stem), sample_id))
    return samples


# ----------------------------------------------------------------------------------------------- decoding


def png_size(path: Path) -> tuple[int, int, int]:
    """(height, width, channels) from a PNG's header, without decoding; checks the file is complete (IEND)."""
    channels_of = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}  # PNG colour type -> channels (palette counts as RGB)
    try:
        with open(path, "rb") as f:
            head = f.read(29)
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 12))
            tail = f.read(12)
    except OSError as err:
        raise UserError(f"cannot read image {path} ({err.strerror})") from None
    if len(head) < 29 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise UserError(f"{path} is not a PNG image (unreadable or corrupt)")
    if tail[4:8] != b"IEND":
        raise UserError(f"image {path} is truncated (no PNG end marker); re-extract the dataset")
    width, height = struct.unpack(">II", head[16:24])
    return height, width, channels_of.get(head[25], 0)


def read_image(path: Path) -> np.ndarray:
    """Decode a PNG at native size -> (H,W,3) uint8 RGB; gray becomes 3 identical channels."""
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise UserError(f"cannot decode image {path} (unreadable or truncated PNG)")
    if img.dtype == np.uint16:
        img = (img // 257).astype(np.uint8)
    if img.ndim == 2:
        return np.repeat(img[:, :, None], 3, axis=2)  # (H,W,3)
    if img.ndim == 3 and img.shape[2] == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if img.ndim == 3 and img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    raise UserError(f"image {path} has unsupported shape {img.shape} (expected gray or RGB)")


def read_mask(path: Path, image_path: Path, image_hw: tuple[int, int]) -> np.ndarray:
    """Decode a ground-truth mask -> (H,W) float32 {0,1}; checks it matches its image's size."""
    m = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if m is None:
        raise UserError(f"cannot decode mask {path} (unreadable or truncated PNG)")
    if m.shape != image_hw:
        h, w = image_hw
        raise UserError(f"mask {path} is {m.shape[1]}x{m.shape[0]} but its image {image_path} is {w}x{h}")
    return (m > 0).astype(np.float32)


def check_dataset(root: str | Path, category: str) -> str:
    """List all five splits, read every PNG header (size, channels, completeness) and every mask's size.

    Returns:
        A short summary: images per split, image size, gray or RGB.

    Raises:
        UserError: on the first problem, naming the file.
    """
    ref: tuple[Path, int, int] | None = None
    channels: set[int] = set()
    lines = []
    for split in Split:
        samples = list_samples(root, category, split)
        for s in samples:
            h, w, c = png_size(s.image_path)
            channels.add(c)
            if ref is None:
                ref = (s.image_path, h, w)
            elif (h, w) != ref[1:]:
                msg = f"image {s.image_path} is {w}x{h} but {ref[0]} is {ref[2]}x{ref[1]}; sizes must match"
                raise UserError(msg)
            if s.mask_path is not None:
                mh, mw, _ = png_size(s.mask_path)
                if (mh, mw) != (h, w):
                    msg = f"mask {s.mask_path} is {mw}x{mh} but its image {s.image_path} is {w}x{h}"
                    raise UserError(msg)
        n_bad = sum(s.label == 1 for s in samples)
        detail = ""
        if split == Split.TEST_PUBLIC:
            detail = f" ({len(samples) - n_bad} good, {n_bad} bad with masks)"
        lines.append(f"  {split.value:<19} {len(samples):5d}{detail}")
    assert ref is not None
    mode = "gray" if channels <= {1, 2} else "RGB"
    expected = "gray" if category in GRAY_CATEGORIES else "RGB"
    note = "" if mode == expected else f" (MVTec AD 2 {category} is {expected})"
    head = f"{category} at {Path(root) / category}: {ref[2]}x{ref[1]} {mode}{note}; PNGs complete, masks fit"
    return "\n".join([head, *lines])


# ----------------------------------------------------------------------------------------------- dataset


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
        if self.triples is not None:
            idx, _, _, box = self.triples[idx]
        s = self.samples[idx]
        img = self._decode(idx)
        if self.augment is not None:
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


# ----------------------------------------------------------------------------------------------- DataModule


class MVTecAD2DataModule(L.LightningDataModule):
    """Loaders for one category plus the device-side tiling and cut-paste.

    Args:
        config: data settings.
        seed: seeds the augmentations and the per-step cut-paste generator.

    `predict_dataloader` returns one loader per split in `predict_splits` (test_private, test_private_mixed).
    """

    predict_splits: tuple[Split, ...] = PRIVATE_SPLITS

    def __init__(self, config: DataConfig, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        self.seed = seed
        self.train_tiler = TrainTiler(config.tiling.input_size)
        self.eval_tiler = EvalTiler(config.tiling.test_level, config.tiling.input_size)
        self.cut_paste = CutPaste(config.cut_paste) if config.cut_paste.enabled else None

    def dataset(self, split: Split | str) -> MVTecAD2Dataset:
        """The dataset of one split (training triples for `train`)."""
        split = Split(split)
        samples = list_samples(self.config.root, self.config.category, split)
        if split == Split.TRAIN:
            return MVTecAD2Dataset(samples, self.config.tiling.train_levels, self.config.augment, self.seed)
        return MVTecAD2Dataset(samples)

    def _loader(self, ds: MVTecAD2Dataset, batch_size: int, train: bool) -> DataLoader:
        workers = self.config.num_workers
        sampler = None
        if not train and self.trainer is not None and self.trainer.world_size > 1:
            # every eval image exactly once across ranks (Lightning's default sampler pads with repeats,
            # which would count some images twice in the metrics)
            sampler = UnrepeatedDistributedSampler(
                ds, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False
            )
        return DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=train,
            sampler=sampler,
            drop_last=train,
            num_workers=workers,
            collate_fn=collate_batch,
            persistent_workers=workers > 0,
            worker_init_fn=_seed_worker if train else None,
        )

    def train_dataloader(self) -> DataLoader:
        ds = self.dataset(Split.TRAIN)
        if len(ds) < self.config.batch_size:
            bs = self.config.batch_size
            raise UserError(f"train split has {len(ds)} tiles, fewer than data.batch_size={bs}")
        return self._loader(ds, self.config.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset(Split.VALIDATION), self.config.eval_batch_size, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset(Split.TEST_PUBLIC), self.config.eval_batch_size, train=False)

    def predict_dataloader(self) -> list[DataLoader]:
        bs = self.config.eval_batch_size
        return [self._loader(self.dataset(s), bs, train=False) for s in self.predict_splits]

    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        if self.trainer is not None and self.trainer.training:
            return self.train_transform(batch, self._step_generator(batch.image.device))
        return self.eval_transform(batch)

    def _step_generator(self, device: torch.device) -> torch.Generator:
        """A generator on `device` seeded from (seed, global_step, global_rank)."""
        step, rank = self.trainer.global_step, self.trainer.global_rank
        seed = ((self.seed * 1_000_003 + step) * 1009 + rank) % 2**62
        return torch.Generator(device=device).manual_seed(seed)

    def train_transform(self, batch: Batch, generator: torch.Generator | None = None) -> Batch:
        """Native images + tile boxes -> (B,3,S,S) tiles, then cut-paste (masks and labels follow)."""
        assert batch.tile_box is not None, "training batches carry tile_box"
        tiles = self.train_tiler(batch.image, batch.tile_box)  # (B,3,S,S) float [0,1]
        if self.cut_paste is None:
            masks = tiles.new_zeros((tiles.shape[0], 1, *tiles.shape[-2:]))  # (B,1,S,S)
        else:
            tiles, masks = self.cut_paste.to(tiles.device)(tiles, generator)
        batch.image, batch.mask = tiles, masks
        batch.label = masks.flatten(1).amax(dim=1).long()  # (B,) 1 where a patch changed pixels
        return batch

    def eval_transform(self, batch: Batch) -> Batch:
        """Tile every native image with the test level into `batch.tiles` and `batch.layout`."""
        batch.tiles, batch.layout = self.eval_tiler(batch.image)
        return batch
