"""Write native-resolution float16 maps (and binary masks) of every eval step into the run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn

from hybridad.run_dir import RunDir
from hybridad.types import AnomalyOutput, Batch, Split


class MapWriterCallback(L.Callback):
    """Caches maps of validation, test_public and the private splits as `<run>/maps/<split>/<rel>.tiff`.

    Binary masks (`<run>/masks/...png`, 0/255) are written where the module produced them (a threshold is set),
    so the PNGs are exactly what SegF1 was computed from.
    """

    def __init__(self, run_dir: Path, splits: tuple[str, ...] = (
        Split.VALIDATION.value, Split.TEST_PUBLIC.value, Split.TEST_PRIVATE.value, Split.TEST_PRIVATE_MIXED.value,
    )) -> None:
        self.run_dir = RunDir(run_dir)
        self.splits = set(splits)

    def _write(self, outputs: Any, batch: Batch) -> None:
        if not isinstance(outputs, AnomalyOutput):
            return
        maps = outputs.anomaly_map.detach().float().cpu()  # (B,1,H,W)
        masks = outputs.pred_mask.detach().cpu() if outputs.pred_mask is not None else None
        for i, sample_id in enumerate(batch.sample_id):
            if sample_id.split("/", 1)[0] not in self.splits:
                continue
            self.run_dir.write_map(sample_id, maps[i, 0])
            if masks is not None:
                self.run_dir.write_mask(sample_id, masks[i, 0].numpy())

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:  # the stand-alone validate() after fit, not every epoch
            self._write(outputs, batch)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._write(outputs, batch)

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        self._write(outputs, batch)
