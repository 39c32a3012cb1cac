"""`MVTecAD2DataModule`: loaders for one category plus the device-side tiling and cut-paste.

The dataset decodes PNGs on the CPU (gray categories become 3 identical channels) and, for training,
enumerates (image, pyramid level, tile) triples so one epoch sees every tile once and `data.batch_size` counts
tiles. Tiling, resizing and cut-paste run in `on_after_batch_transfer` on the batch's device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader

from data_modules.augment import AugmentConfig
from data_modules.cut_paste import CutPaste, CutPasteConfig
from data_modules.dataset import MVTecAD2Dataset, _seed_worker, collate_batch
from data_modules.listing import list_samples
from data_modules.tilers import EvalTiler, TilingConfig, TrainTiler
from data_modules.train_sampler import EpochSampler, ResumableLoader
from hybridad.errors import UserError
from hybridad.types import PRIVATE_SPLITS, Batch, Split


@dataclass
class DataConfig:
    root: str = "data/mvtec_ad2"
    category: str = "can"
    batch_size: int = 16  # tiles per training step on each device (DDP: the global batch is devices x this)
    global_batch_size: int = 0  # > 0: tiles per step over all devices (batch_size = this / world size)
    eval_batch_size: int = 1  # native images per eval step
    num_workers: int = 2
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    cut_paste: CutPasteConfig = field(default_factory=CutPasteConfig)





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
            started_batches=started_batches,
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
