"""Log a few test_public anomaly-map overlays as images (W&B when present; PNGs in the run directory)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger

from hybridad.visualize import overlay_panel
from hybridad.run_dir import write_png
from hybridad.types import AnomalyOutput, Batch


class OverlayLoggerCallback(L.Callback):
    """The first `num_overlays` bad test_public images: input | heat map with GT (magenta) and prediction
    (white) | colour bar."""

    def __init__(self, run_dir: Path, num_overlays: int = 4) -> None:
        self.out = Path(run_dir) / "overlays" / "test_public"
        self.num_overlays = num_overlays
        self.logged = 0

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.logged = 0

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        if not (isinstance(outputs, AnomalyOutput) and isinstance(batch, Batch)) or not trainer.is_global_zero:
            return
        for i, sample_id in enumerate(batch.sample_id):
            if self.logged >= self.num_overlays or int(batch.label[i]) != 1:
                continue
            image = batch.image[i].permute(1, 2, 0).cpu().numpy()[:, :, ::-1]  # (H,W,3) RGB -> BGR
            gt = batch.mask[i, 0].cpu().numpy() if batch.mask is not None else None
            pred = outputs.pred_mask[i, 0].cpu().numpy() if outputs.pred_mask is not None else None
            panel = overlay_panel(image.copy(), outputs.anomaly_map[i, 0].float().cpu().numpy(), gt, pred)
            name = sample_id.replace("/", "_")
            write_png(self.out / f"{name}.png", panel)  # raises (naming the file) where imwrite returned False
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_image(key=f"test_public/overlay/{name}", images=[panel[:, :, ::-1].copy()])
            self.logged += 1
