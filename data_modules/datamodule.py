"""`MVTecAD2DataModule`: loaders for one category plus the device-side tiling and cut-paste.

Training reads the split's decoded-image cache (`data_modules/cache.py`, built once on first use; each PNG is
decoded once, not once per tile) and enumerates (image, pyramid level, tile) triples so one epoch sees every
tile once and `data.batch_size` counts tiles. Workers slice each tile's native box out of the cache and
augment it; only these crops (pinned on CUDA) cross to the device, where resizing and cut-paste run in
`on_after_batch_transfer`. Evaluation decodes each image once per pass and batches whole native images.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader

from data_modules.augment import AugmentConfig
from data_modules.cache import DecodedCache, default_cache_root
from data_modules.cut_paste import CutPaste, CutPasteConfig
from data_modules.dataset import MVTecAD2Dataset, _seed_worker, collate_batch
from data_modules.formats import list_split, list_splits
from data_modules.formats.common import LayoutConfig
from data_modules.listing import image_header, read_image
from data_modules.tilers import EvalTiler, TilingConfig, TrainTiler, train_tile_boxes
from data_modules.train_sampler import EpochSampler, ResumableLoader
from hybridad.errors import UserError
from hybridad.training_seed import micro_batch_seed, trainer_micro_batch
from hybridad.types import PRIVATE_SPLITS, Batch, Split


@dataclass
class DataConfig:
    root: str = "data/mvtec_ad2"
    category: str = "can"  # any name: <root>/<category>/ (a layout's index names it otherwise)
    format: str = "mvtec_ad2"  # layout: mvtec_ad2 | mvtec_ad | visa | realiad | folder (data_modules.formats)
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    validation_fraction: float = 0.1  # without a validation split: this share of train becomes validation
    validation_seed: int = 0  # seed of that draw
    batch_size: int = 16  # tiles per training step on each device (DDP: the global batch is devices x this)
    global_batch_size: int = 0  # > 0: tiles per step over all devices (batch_size = this / world size)
    eval_batch_size: int = 1  # native images per eval step
    num_workers: int = 2
    cache: bool = True  # training reads a decoded uint8 cache (each PNG decoded once), not the PNGs
    cache_dir: str = ""  # "" = $HYBRIDAD_CACHE_DIR, $XDG_CACHE_HOME/hybridad or ~/.cache/hybridad
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    cut_paste: CutPasteConfig = field(default_factory=CutPasteConfig)





class MVTecAD2DataModule(L.LightningDataModule):
    """Loaders for one category plus the device-side tiling and cut-paste.

    Args:
        config: data settings.
        seed: seeds the augmentations and the per-micro-batch cut-paste generator.

    `predict_dataloader` returns one loader per split in `predict_splits`: the private splits the layout has
    (test_private, test_private_mixed; none outside MVTec AD 2).
    """

    def __init__(self, config: DataConfig, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        self.seed = seed
        tl = config.tiling
        self.train_tiler = TrainTiler(tl.input_size, tl.antialias)
        self.eval_tiler = EvalTiler(tl.test_level, tl.input_size, tl.antialias)
        self.cut_paste = CutPaste(config.cut_paste) if config.cut_paste.enabled else None

    @property
    def predict_splits(self) -> tuple[Split, ...]:
        """The private splits this category has on disk."""
        return tuple(s for s in PRIVATE_SPLITS if s in list_splits(self.config).splits)

    def decoded_cache(self, split: Split | str = Split.TRAIN, progress: bool = True) -> DecodedCache:
        """The split's decoded-image cache, built (once, under a lock) when missing or stale."""
        split = Split(split)
        cfg = self.config
        listing = list_splits(cfg)
        samples = listing.splits[split]
        root = cfg.cache_dir or default_cache_root()
        folder = listing.folder  # keys the cache entry: <folder.parent>/<folder.name>
        return DecodedCache.open_or_build(root, folder.parent, folder.name, split.value, samples, progress)

    def _one_size(self, split: Split) -> bool:
        """Whether every image of the split has one size (the decoded cache holds one size)."""
        return len({image_header(s.image_path)[:2] for s in list_split(self.config, split)}) == 1

    def prepare_data(self) -> None:
        """Build the training cache once per node before the ranks open it (Lightning hook; fit only)."""
        fitting = self.trainer is None or self.trainer.state.fn == TrainerFn.FITTING
        if self.config.cache and fitting and self._one_size(Split.TRAIN):
            self.decoded_cache(Split.TRAIN)

    def dataset(self, split: Split | str, keep_gray: bool = False) -> MVTecAD2Dataset:
        """The dataset of one split (training triples of tile crops for `train`; see its `keep_gray`)."""
        split = Split(split)
        listing = list_splits(self.config)
        samples = list_split(self.config, split)
        if split == Split.TRAIN:
            # mixed sizes: each image is tiled on its own grid and decoded per item (the cache holds one size)
            cache = self.decoded_cache(split) if self.config.cache and self._one_size(split) else None
            levels, augment = self.config.tiling.train_levels, self.config.augment
            return MVTecAD2Dataset(samples, levels, augment, self.seed, cache=cache, keep_gray=keep_gray,
                                   one_size=listing.one_size)
        return MVTecAD2Dataset(samples, one_size=listing.one_size)

    def reference_tiles(self) -> Iterator[tuple[str, tuple[int, int, int, int], torch.Tensor]]:
        """Every training tile of every whole, un-augmented training image (from the decoded cache when
        `data.cache`), in (image, level, tile) order: (sample id, native box (y0,x0,y1,x1), (3,h,w) uint8 crop).

        For a branch that stores clean references (CPR), not for training: no augmentation, no cut-paste."""
        cfg = self.config
        samples = list_split(cfg, Split.TRAIN)
        cache = self.decoded_cache(Split.TRAIN) if cfg.cache and self._one_size(Split.TRAIN) else None
        for i, sample in enumerate(samples):
            image = cache.image(i) if cache is not None else read_image(sample.image_path)  # (H,W,3) uint8
            h, w = image.shape[:2]
            for _, _, (y0, x0, y1, x1) in train_tile_boxes(h, w, cfg.tiling.train_levels):
                crop = torch.from_numpy(np.ascontiguousarray(image[y0:y1, x0:x1])).permute(2, 0, 1)  # (3,h,w)
                yield sample.sample_id, (y0, x0, y1, x1), crop

    def _pin_memory(self) -> bool:
        """Pin host batches (`Batch.pin_memory` pins the tile crops) when the Trainer runs on CUDA."""
        return self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"

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
            pin_memory=self._pin_memory(),
            worker_init_fn=_seed_worker if train else None,
        )

    def train_dataloader(self) -> DataLoader:
        ds = self.dataset(Split.TRAIN, keep_gray=True)  # gray crops expanded to RGB on the device
        if len(ds) < self.config.batch_size:
            bs = self.config.batch_size
            raise UserError(f"train split has {len(ds)} tiles, fewer than data.batch_size={bs}")
        return self._resumable_loader(ds)

    def _resumable_loader(self, ds: MVTecAD2Dataset) -> ResumableLoader:
        """Training loader whose order is a function of (seed, epoch, rank) and whose position is checkpointed."""
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        workers = self.config.num_workers

        def started_batches() -> int:
            assert self.trainer is not None
            return int(self.trainer.fit_loop.epoch_loop.batch_progress.current.ready)

        return ResumableLoader(
            ds, batch_size=self.config.batch_size, sampler=EpochSampler(ds, self.seed, world, rank), drop_last=True,
            num_workers=workers, collate_fn=collate_batch, persistent_workers=workers > 0,
            pin_memory=self._pin_memory(), started_batches=started_batches,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset(Split.VALIDATION), self.config.eval_batch_size, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset(Split.TEST_PUBLIC), self.config.eval_batch_size, train=False)

    def predict_dataloader(self) -> list[DataLoader]:
        bs = self.config.eval_batch_size
        return [self._loader(self.dataset(s), bs, train=False) for s in self.predict_splits]

    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        if self.trainer is not None and self.trainer.training:
            device = batch.image[0].device if isinstance(batch.image, list) else batch.image.device
            return self.train_transform(batch, self._step_generator(device))
        return self.eval_transform(batch)

    def _step_generator(self, device: torch.device) -> torch.Generator:
        """A generator on `device` seeded from (seed, micro-batch index, global_rank) (`hybridad.training_seed`)."""
        seed = micro_batch_seed(self.seed, trainer_micro_batch(self.trainer), self.trainer.global_rank)
        return torch.Generator(device=device).manual_seed(seed)

    def train_transform(self, batch: Batch, generator: torch.Generator | None = None) -> Batch:
        """Tile crops (list of (3,h,w) uint8) + boxes -> (B,3,S,S) tiles, then cut-paste (masks, labels too).

        A (B,3,H,W) tensor of whole native images is accepted too (each item cut at its box).
        """
        assert batch.tile_box is not None, "training batches carry tile_box"
        tiles = self._resize_crops(batch.image, batch.tile_box)  # (B,3,S,S) float [0,1]
        if self.cut_paste is None:
            masks = tiles.new_zeros((tiles.shape[0], 1, *tiles.shape[-2:]))  # (B,1,S,S)
        else:
            tiles, masks = self.cut_paste.to(tiles.device)(tiles, generator)
        batch.image, batch.mask = tiles, masks
        batch.label = masks.flatten(1).amax(dim=1).long()  # (B,) 1 where a patch changed pixels
        return batch

    def _resize_crops(self, images: torch.Tensor | list[torch.Tensor], boxes: torch.Tensor) -> torch.Tensor:
        """Run the train tiler on crops of equal size together; output in item order, (B,3,S,S)."""
        if isinstance(images, torch.Tensor):
            return self.train_tiler(images, boxes)  # whole native images, cut at the boxes
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, crop in enumerate(images):
            groups.setdefault(tuple(crop.shape), []).append(i)
        out: list[torch.Tensor | None] = [None] * len(images)
        for (_, h, w), idx in groups.items():
            stack = torch.stack([images[i] for i in idx])  # (n,C,h,w) uint8, C = 1 (gray) or 3
            stack = stack.expand(-1, 3, -1, -1)  # (n,3,h,w): a view for gray
            local = torch.tensor([[0, 0, h, w]] * len(idx), dtype=torch.long)  # (n,4) box of the whole crop
            for i, tile in zip(idx, self.train_tiler(stack, local)):
                out[i] = tile  # (3,S,S)
        return torch.stack(out)  # type: ignore[arg-type]  # (B,3,S,S)

    def eval_transform(self, batch: Batch) -> Batch:
        """Tile every native image with the test level into `batch.tiles` and `batch.layout`."""
        batch.tiles, batch.layout = self.eval_tiler(batch.image)
        return batch
