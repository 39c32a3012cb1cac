"""Update and log the metric suite (`hybridad.metrics.suite`) on test_public: AU-PRO(0.05), SegF1, ..."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch

from hybridad.metrics import GroupedMetrics, group_keys
from hybridad.run_dir import RunDir
from hybridad.types import AnomalyOutput, Batch


class MetricsCallback(L.Callback):
    """Streams test_public outputs into the suite's `Metric`s and logs `test_public/<name>` at epoch end.

    Every metric of `metric_suite()` is computed for the group kinds it declares (`all`, `lighting=<tag>`,
    `defect=<type>`, `good`/`bad`); those reading the predicted mask only once a threshold exists.
    Results also go to `<run>/metrics.json`. Metrics sync under DDP through torchmetrics.
    """

    def __init__(self, run_dir: Path | None = None, prefix: str = "test_public") -> None:
        self.run_dir = RunDir(run_dir) if run_dir is not None else None
        self.prefix = prefix
        self.metrics = GroupedMetrics()
        self.results: dict[str, float] = {}

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.metrics = GroupedMetrics(device=pl_module.device)
        self.metrics.metrics_for("all")

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        if not isinstance(outputs, AnomalyOutput) or not isinstance(batch, Batch) or batch.mask is None:
            return
        maps, masks = outputs.anomaly_map, batch.mask > 0.5  # (B,1,H,W) each
        preds = outputs.pred_mask
        types = batch.defect_type or [""] * len(batch)
        for i, (label, lighting, defect) in enumerate(zip(batch.label.tolist(), batch.lighting, types)):
            item = slice(i, i + 1)
            inputs = {"map": maps[item], "mask": masks[item], "pred": None if preds is None else preds[item],
                      "score": outputs.image_score[item], "label": batch.label[item]}
            self.metrics.update(group_keys(label, lighting, defect), inputs)

    def _all_group_keys(self) -> list[str]:
        """Group keys seen on any rank, sorted, so every rank computes (and syncs) the same metrics."""
        keys = set(self.metrics.groups)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[list[str] | None] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, sorted(keys))
            keys = {k for part in gathered for k in (part or [])}
        return sorted(keys)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        has_masks = math.isfinite(float(getattr(pl_module, "threshold", float("nan"))))
        without = () if has_masks else ("pred",)  # no threshold yet: no binary masks
        results = self.metrics.compute(self.prefix, self._all_group_keys(), without)
        self.results = results
        pl_module.log_dict({k: v for k, v in results.items()}, sync_dist=False)
        if self.run_dir is not None and trainer.is_global_zero:
            self.run_dir.write_metrics(results)
