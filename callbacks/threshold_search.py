"""Fit the category's binarisation threshold from validation (defect-free) pixel scores."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L

from hybridad.run_dir import RunDir
from hybridad.thresholds import PSEUDO_METHODS, ScoreStats, ThresholdConfig, fit_threshold
from hybridad.types import AnomalyOutput


class ThresholdCallback(L.Callback):
    """Accumulates validation map statistics and sets `pl_module.threshold` at the end of each validation epoch.

    Validation-based rules (`mean_std`, `percentile`) and `fixed` are fitted here; `f1_optimal` needs test labels
    and is fitted from the cached test_public maps by `hybridad evaluate` (see `hybridad.train`).
    The result is stored in the checkpoint (the module's buffer and this callback's state) and in
    `<run>/thresholds.yaml`.
    """

    def __init__(self, cfg: ThresholdConfig, run_dir: Path | None = None) -> None:
        self.cfg = cfg
        self.run_dir = RunDir(run_dir) if run_dir is not None else None
        self.stats = ScoreStats()
        self.result: dict[str, Any] = {}

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.stats = ScoreStats().to(pl_module.device)

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if isinstance(outputs, AnomalyOutput):
            self.stats.update(outputs.anomaly_map)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.cfg.method in ("f1_optimal", *PSEUDO_METHODS):  # fitted elsewhere
            return
        result = fit_threshold(self.cfg, self.stats)
        with self.stats.sync_context():  # statistics over every rank's validation pixels
            mean, std = float(self.stats.mean), float(self.stats.std)
        pl_module.set_threshold(result.value)  # type: ignore[operator]
        self.result = {
            "value": float(result.value),
            "method": result.method,
            "source": result.source,
            "tuned_on_test": bool(result.tuned_on_test),
            "stats": {"mean": mean, "std": std},
        }
        pl_module.log("val/threshold", float(result.value), sync_dist=True)
        if self.run_dir is not None and trainer.is_global_zero:
            self.run_dir.write_thresholds(self.result)

    def state_dict(self) -> dict[str, Any]:
        return {"result": self.result}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.result = dict(state_dict.get("result", {}))
