"""The eval path both branches share: tiles -> tile maps -> native-resolution `AnomalyOutput`."""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import Tensor

from hybridad.errors import UserError
from hybridad.image_scores import ImageScoreRule
from hybridad.postprocess import PostProcessConfig, binarize, hsv_kmeans_foreground, smooth
from hybridad.tile_grid import native_tile_size, untile
from hybridad.types import AnomalyOutput, Batch, Split


class AnomalyModule(L.LightningModule):
    """Base LightningModule: a branch implements `tile_maps`, `training_step` and `configure_optimizers`
    (and `image_score_rule` when its image score is not the mean of the top `top_ratio` pixels).

    The threshold lives here as a buffer (fitted by `ThresholdCallback`, saved in checkpoints), and the
    post-processing that predictions need runs inside `predict_batch`, so every callback sees the same masks
    (including the per-split object mask of `postprocess.foreground_splits`, made from the batch image).

    Args:
        postprocess: map smoothing and mask post-processing settings.
        top_ratio: image score = mean of the top `top_ratio` fraction of the native map.
    """

    def __init__(self, postprocess: PostProcessConfig | None = None, top_ratio: float = 0.01) -> None:
        super().__init__()
        self.postprocess = postprocess or PostProcessConfig()
        valid = [s.value for s in Split]
        for split in self.postprocess.foreground_splits:
            if split not in valid:
                raise UserError(f"postprocess.foreground_splits: unknown split '{split}'; use one of {valid}")
        self.top_ratio = top_ratio
        # which images get the object mask: None = those of the dataset splits in `postprocess.foreground_splits`
        # (run eval); True / False = every image / none (`predict --foreground`: new images have no split)
        self.foreground_images: bool | None = None
        self.register_buffer("threshold", torch.tensor(float("nan")))

    def tile_maps(self, tiles: Tensor, native_size: tuple[int, int] | None = None) -> Tensor:
        """(N,3,S,S) float tiles in [0,1] -> (N,1,h,w) anomaly maps (any h,w; untile resizes each to its box).

        `native_size`: the (H, W) of the tiles' boxes in the native image, for a branch that upsamples there."""
        raise NotImplementedError

    def image_score_rule(self) -> ImageScoreRule:
        """The branch's image-score rule (`hybridad.image_scores`; an export stores it in its metadata):
        by default the mean of the top `top_ratio` pixels."""
        return ImageScoreRule("top_ratio_mean", {"top_ratio": self.top_ratio})

    def image_score(self, anomaly_map: Tensor) -> Tensor:
        """(B,1,H,W) native maps -> (B,) with `image_score_rule`."""
        return self.image_score_rule()(anomaly_map)

    def set_threshold(self, value: float) -> None:
        self.threshold.fill_(value)

    def foreground(self, batch: Batch) -> Tensor | None:
        """(B,1,H,W) bool object mask of the images that need one (True for the others), or None when none does.

        Which images: every one / none when `foreground_images` is True / False; otherwise (None, the run's own
        splits) those whose split is in `postprocess.foreground_splits`.
        `batch.image` is the native (B,3,H,W) uint8 image of eval batches."""
        pp = self.postprocess
        if self.foreground_images is None:
            picked = [i for i, split in enumerate(batch.split) if split in pp.foreground_splits]
        else:
            picked = list(range(len(batch.sample_id))) if self.foreground_images else []
        if not picked:
            return None
        b, _, h, w = batch.image.shape
        fg = torch.ones(b, 1, h, w, dtype=torch.bool, device=batch.image.device)
        fg[picked] = hsv_kmeans_foreground(batch.image[picked], pp.foreground_dilation, pp.foreground_seed)
        return fg

    @torch.no_grad()
    def predict_batch(self, batch: Batch) -> AnomalyOutput:
        assert batch.tiles is not None and batch.layout is not None, "eval batches must be tiled by the DataModule"
        tile_maps = self.tile_maps(batch.tiles, native_tile_size(batch.layout))  # (N,1,h,w)
        return self.output_from_tile_maps(tile_maps, batch)

    def output_from_tile_maps(self, tile_maps: Tensor, batch: Batch) -> AnomalyOutput:
        """(N,1,h,w) tile maps of an eval batch -> stitched native maps, image scores and masks."""
        assert batch.layout is not None
        maps = untile(tile_maps.float(), batch.layout)  # (B,1,H,W) native
        maps = smooth(maps, self.postprocess)
        scores = self.image_score(maps)
        thr = float(self.threshold)
        pred = binarize(maps, thr, self.postprocess, self.foreground(batch)) if math.isfinite(thr) else None
        return AnomalyOutput(maps, scores, pred)

    def validation_step(self, batch: Batch, batch_idx: int) -> AnomalyOutput:
        return self.predict_batch(batch)

    def test_step(self, batch: Batch, batch_idx: int) -> AnomalyOutput:
        return self.predict_batch(batch)

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> AnomalyOutput:
        return self.predict_batch(batch)
