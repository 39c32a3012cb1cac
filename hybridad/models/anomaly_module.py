"""The eval path both branches share: tiles -> tile maps -> native-resolution `AnomalyOutput`."""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import Tensor

from hybridad.postprocess import PostProcessConfig, binarize, smooth
from hybridad.tile_grid import untile
from hybridad.types import AnomalyOutput, Batch


class AnomalyModule(L.LightningModule):
    """Base LightningModule: a branch implements `tile_maps`, `training_step` and `configure_optimizers`.

    The threshold lives here as a buffer (fitted by `ThresholdCallback`, saved in checkpoints), and the
    post-processing that predictions need runs inside `predict_batch`, so every callback sees the same masks.

    Args:
        postprocess: map smoothing and mask post-processing settings.
        top_ratio: image score = mean of the top `top_ratio` fraction of the native map.
    """

    def __init__(self, postprocess: PostProcessConfig | None = None, top_ratio: float = 0.01) -> None:
        super().__init__()
        self.postprocess = postprocess or PostProcessConfig()
        self.top_ratio = top_ratio
        self.register_buffer("threshold", torch.tensor(float("nan")))

    def tile_maps(self, tiles: Tensor) -> Tensor:
        """(N,3,S,S) float tiles in [0,1] -> (N,1,h,w) anomaly maps (any h,w; untile resizes)."""
        raise NotImplementedError

    def image_score(self, anomaly_map: Tensor) -> Tensor:
        """(B,1,H,W) -> (B,) mean of the top `top_ratio` pixels."""
        flat = anomaly_map.flatten(1)  # (B, H*W)
        k = max(1, int(math.ceil(flat.shape[1] * self.top_ratio)))
        return flat.topk(k, dim=1).values.mean(dim=1)

    def set_threshold(self, value: float) -> None:
        self.threshold.fill_(value)

    @torch.no_grad()
    def predict_batch(self, batch: Batch) -> AnomalyOutput:
        assert batch.tiles is not None and batch.layout is not None, "eval batches must be tiled by the DataModule"
        tile_maps = self.tile_maps(batch.tiles).float()  # (N,1,h,w)
        maps = untile(tile_maps, batch.layout)  # (B,1,H,W) native
        maps = smooth(maps, self.postprocess)
        scores = self.image_score(maps)
        thr = float(self.threshold)
        pred = binarize(maps, thr, self.postprocess) if math.isfinite(thr) else None
        return AnomalyOutput(maps, scores, pred)

    def validation_step(self, batch: Batch, batch_idx: int) -> AnomalyOutput:
        return self.predict_batch(batch)

    def test_step(self, batch: Batch, batch_idx: int) -> AnomalyOutput:
        return self.predict_batch(batch)

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> AnomalyOutput:
        return self.predict_batch(batch)
