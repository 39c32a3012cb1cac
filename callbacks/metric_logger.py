"""Update and log the evaluation metrics on test_public: AU-PRO(0.05), SegF1, ClassF1, AUROCs, F1-max."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torchmetrics import Metric

from hybridad.metrics import AUPRO, ClassF1, ImageAUROC, PixelAUROC, PixelF1Max, SegF1, group_keys
from hybridad.run_dir import RunDir
from hybridad.types import AnomalyOutput, Batch


def _group_metrics(with_aupro: bool, fpr_limit: float, device: torch.device) -> dict[str, Metric]:
    metrics: dict[str, Metric] = {"seg_f1": SegF1(), "class_f1": ClassF1()}
    if with_aupro:
        metrics[f"aupro_{fpr_limit:g}"] = AUPRO(fpr_limit=fpr_limit)
    return {name: m.to(device) for name, m in metrics.items()}


class MetricsCallback(L.Callback):
    """Streams test_public outputs into torchmetrics `Metric`s and logs `test_public/<name>` at epoch end.

    Groups: `all` (every metric), `lighting=<tag>`, `defect=<type>` and `good`/`bad` (SegF1, ClassF1; AU-PRO
    per lighting and per defect type).
    Results also go to `<run>/metrics.json`. Metrics sync under DDP through torchmetrics.
    """

    def __init__(self, run_dir: Path | None = None, prefix: str = "test_public", fpr_limit: float = 0.05) -> None:
        self.run_dir = RunDir(run_dir) if run_dir is not None else None
        self.prefix = prefix
        self.fpr_limit = fpr_limit
        self.groups: dict[str, dict[str, Metric]] = {}
        self.results: dict[str, float] = {}

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device = pl_module.device
        extra = {"image_auroc": ImageAUROC(), "pixel_auroc": PixelAUROC(), "pixel_f1_max": PixelF1Max()}
        self.groups = {"all": {**_group_metrics(True, self.fpr_limit, device),
                               **{name: m.to(device) for name, m in extra.items()}}}

    def _metrics_for(self, key: str, device: torch.device) -> dict[str, Metric]:
        if key not in self.groups:
            self.groups[key] = _group_metrics(key.startswith(("lighting=", "defect=")), self.fpr_limit, device)
        return self.groups[key]

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        if not isinstance(outputs, AnomalyOutput) or not isinstance(batch, Batch) or batch.mask is None:
            return
        maps, masks = outputs.anomaly_map, batch.mask > 0.5  # (B,1,H,W) each
        preds = outputs.pred_mask
        types = batch.defect_type or [""] * len(batch)
        for i, (sample_id, lighting, defect) in enumerate(zip(batch.sample_id, batch.lighting, types)):
            for key in group_keys(sample_id, lighting, defect):
                for name, metric in self._metrics_for(key, maps.device).items():
                    if name in ("seg_f1", "class_f1"):
                        if preds is not None:
                            metric.update(preds[i : i + 1], masks[i : i + 1])
                    elif name == "image_auroc":
                        metric.update(outputs.image_score[i : i + 1], batch.label[i : i + 1])
                    else:
                        metric.update(maps[i : i + 1], masks[i : i + 1])

    def _all_group_keys(self) -> list[str]:
        """Group keys seen on any rank, sorted, so every rank computes (and syncs) the same metrics."""
        keys = set(self.groups)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[list[str] | None] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, sorted(keys))
            keys = {k for part in gathered for k in (part or [])}
        return sorted(keys)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        results: dict[str, float] = {}
        has_masks = math.isfinite(float(getattr(pl_module, "threshold", float("nan"))))
        for key in self._all_group_keys():
            for name, metric in self._metrics_for(key, pl_module.device).items():
                if name in ("seg_f1", "class_f1") and not has_masks:
                    continue  # no threshold yet: no binary masks
                value = metric.compute()
                value = value.reshape(-1)[0]  # PixelF1Max returns (f1_max, threshold)
                prefix = self.prefix if key == "all" else f"{self.prefix}/{key}"
                results[f"{prefix}/{name}"] = float(value)
        self.results = results
        pl_module.log_dict({k: v for k, v in results.items()}, sync_dist=False)
        if self.run_dir is not None and trainer.is_global_zero:
            self.run_dir.write_metrics(results)
