"""Two-process CPU DDP run that records which training tiles and validation images each rank sees.

Usage: `python tests/integration/ddp_data_script.py <data_root> <out_dir>`; writes `<out_dir>/rank<r>.json`.
Lightning's DDP launcher re-runs this script for rank 1, so all work sits under `__main__`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
from torch import nn

from data_modules.datamodule import DataConfig, MVTecAD2DataModule
from data_modules.tilers import TilingConfig
from hybridad.tile_grid import TileLevel
from hybridad.types import Batch

INPUT_SIZE = 16


class Recorder(L.LightningModule):
    """A trivial model that logs the (sample id, tile box) of every training item and every validation id."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.train_seen: list[list] = []
        self.val_seen: list[str] = []
        self.train_shapes: set[tuple[int, ...]] = set()

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        self.train_shapes.add(tuple(batch.image.shape))
        self.train_seen += [[sid, *box] for sid, box in zip(batch.sample_id, batch.tile_box.tolist())]
        return (self.weight * batch.image.mean()).sum()

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        assert batch.tiles is not None and batch.layout is not None
        self.val_seen += batch.sample_id

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main(root: str, out_dir: str) -> None:
    levels = [TileLevel(), TileLevel(2, 2)]
    tiling = TilingConfig(input_size=INPUT_SIZE, train_levels=levels, test_level=TileLevel(2, 1))
    config = DataConfig(root=root, category="can", batch_size=5, num_workers=0, tiling=tiling)
    model = Recorder()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=MVTecAD2DataModule(config, seed=1))
    record = {"train": model.train_seen, "val": model.val_seen, "shapes": sorted(model.train_shapes)}
    Path(out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
