"""Save one row per image of every evaluated split: `<run>/scores/<split>.csv`."""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning as L
import torch.distributed as dist
from lightning.pytorch.trainer.states import TrainerFn

from hybridad.run_dir import atomic_write_bytes
from hybridad.types import AnomalyOutput, Batch

SCORE_COLUMNS = ("sample_id", "label", "defect_type", "lighting", "image_score", "anomalous_pixels")


class ScoreWriterCallback(L.Callback):
    """Per-image scores of validation, test and predict runs, one CSV per split, sorted by sample id.

    Columns: `sample_id`, `label` (0 good, 1 bad, empty where unknown), `defect_type` (`good`, the layout's
    defect type, `bad` in MVTec AD 2, empty where unknown), `lighting` (empty outside MVTec AD 2),
    `image_score` (the
    branch's image score of the smoothed native map), `anomalous_pixels` (positive pixels of the predicted
    mask, empty before a threshold exists). In-training validation epochs are skipped, like the map cache; a
    split evaluated again replaces its file. Under DDP the rows of every rank are gathered and rank 0 writes.
    """

    def __init__(self, run_dir: Path) -> None:
        self.folder = Path(run_dir) / "scores"
        self.rows: dict[str, list[tuple]] = defaultdict(list)

    def _collect(self, outputs: Any, batch: Any) -> None:
        if not isinstance(outputs, AnomalyOutput) or not isinstance(batch, Batch):
            return
        scores = outputs.image_score.detach().float().cpu().tolist()  # (B,)
        areas = (outputs.pred_mask.flatten(1).sum(1).cpu().tolist()  # (B,1,H,W) -> (B,)
                 if outputs.pred_mask is not None else [None] * len(scores))
        labels = batch.label.tolist()
        types = batch.defect_type or [""] * len(labels)
        for sid, split, label, defect, light, score, area in zip(batch.sample_id, batch.split, labels, types,
                                                                 batch.lighting, scores, areas):
            row = (sid, label if label >= 0 else None, defect, light, score, None if area is None else int(area))
            self.rows[split].append(row)

    def _flush(self, trainer: L.Trainer) -> None:
        rows, self.rows = self.rows, defaultdict(list)
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            gathered: list[Any] = [None] * trainer.world_size
            dist.all_gather_object(gathered, dict(rows))
            rows = defaultdict(list)
            for part in gathered:
                for split, items in part.items():
                    rows[split].extend(items)
        if not trainer.is_global_zero:
            return
        for split, items in rows.items():
            buf = io.StringIO()
            writer = csv.writer(buf, lineterminator="\n")
            writer.writerow(SCORE_COLUMNS)
            for sid, label, defect, light, score, area in sorted(items, key=lambda r: r[0]):
                writer.writerow([sid, "" if label is None else label, defect, light, f"{score:.9g}",
                                 "" if area is None else area])
            atomic_write_bytes(self.folder / f"{split}.csv", buf.getvalue().encode("utf-8"))

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:  # the stand-alone validate() after fit
            self._collect(outputs, batch)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:
            self._flush(trainer)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._collect(outputs, batch)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flush(trainer)

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        self._collect(outputs, batch)

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flush(trainer)
