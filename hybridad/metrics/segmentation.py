"""Segmentation and classification metrics of the MVTec AD 2 leaderboard, as torchmetrics `Metric`s.

`SegF1` and `ClassF1` take binary predicted masks (what the thresholded PNGs hold); `PixelF1Max` and
`PixelAUROC` take continuous maps and keep float16 histograms (bounded memory, exact for float16-cast maps);
`ImageAUROC` takes one score per image.

Breakdowns (per lighting condition, defect type, good/bad) and which metric is computed where: see
`hybridad.metrics.suite`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from hybridad.metrics.functional import (
    NUM_KEYS,
    PixelHistograms,
    binary_counts,
    add_keys_into,
    any_positive,
    auroc_from_histograms,
    f1_from_counts,
    f1_max_from_histograms,
    image_auroc,
    iter_pairs,
)


class _CountF1(Metric):
    """Sum states TP/FP/FN and F1 = 2TP / (2TP + FP + FN) (0 when nothing is positive anywhere)."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("tp", "fp", "fn"):
            self.add_state(name, torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum", persistent=True)

    def _add(self, counts: tuple[int, int, int]) -> None:
        self.tp += counts[0]
        self.fp += counts[1]
        self.fn += counts[2]

    def compute(self) -> Tensor:
        return torch.tensor(f1_from_counts(int(self.tp), int(self.fp), int(self.fn)), dtype=torch.float64)


class SegF1(_CountF1):
    """Pooled pixel F1 over every pixel of every image (MVTec AD 2 SegF1)."""

    def update(self, pred_masks: Tensor, gt_masks: Tensor) -> None:
        """`pred_masks`, `gt_masks`: (B,1,H,W) or (B,H,W); nonzero = anomalous."""
        if tuple(pred_masks.shape) != tuple(gt_masks.shape):
            raise ValueError(f"pred {tuple(pred_masks.shape)} and GT {tuple(gt_masks.shape)} differ in shape")
        self._add(binary_counts(pred_masks, gt_masks))  # numpy counting for CPU input


class ClassF1(_CountF1):
    """Image-level F1: predicted anomalous iff the binary mask has any positive pixel."""

    def update(
        self, pred_masks: Tensor, gt_masks: Tensor | None = None, labels: Tensor | Sequence[int] | None = None
    ) -> None:
        """`pred_masks` (B,1,H,W)/(B,H,W); label from `labels` (B,) if given, else from `gt_masks` having a
        positive pixel."""
        pred = any_positive(pred_masks, "pred_masks")  # (B,)
        if labels is not None:
            lab = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
            target = lab.reshape(-1) != 0
        elif gt_masks is not None:
            target = any_positive(gt_masks, "gt_masks")
        else:
            raise ValueError("ClassF1.update needs gt_masks or labels")
        if target.size != pred.size:
            raise ValueError(f"{pred.size} predictions but {target.size} labels")
        self._add(binary_counts(pred, target))


class _PixelHistogram(Metric):
    """Per float16 value counts of positive and negative pixels, (65536,) float64 each, sum-reduced."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        zeros = torch.zeros(NUM_KEYS, dtype=torch.float64)
        self.add_state("pos_hist", zeros.clone(), dist_reduce_fx="sum", persistent=True)
        self.add_state("neg_hist", zeros.clone(), dist_reduce_fx="sum", persistent=True)

    def update(self, anomaly_maps: Tensor, gt_masks: Tensor) -> None:
        """`anomaly_maps` (B,1,H,W)/(B,H,W) continuous scores, `gt_masks` same shape (nonzero = anomalous)."""
        if tuple(anomaly_maps.shape) != tuple(gt_masks.shape):
            raise ValueError(f"maps {tuple(anomaly_maps.shape)} and GT {tuple(gt_masks.shape)} differ")
        hists = PixelHistograms()
        for m, g in iter_pairs(anomaly_maps, gt_masks):
            hists.add(m, g)
        pos, neg = hists.key_order()  # one permutation per batch
        add_keys_into(self.pos_hist, pos)
        add_keys_into(self.neg_hist, neg)


class PixelF1Max(_PixelHistogram):
    """Oracle pooled pixel F1 over every distinct float16 threshold (predict `float16(x) >= t`).

    `compute` returns a (2,) tensor `(f1_max, threshold)`; highest threshold on ties; `(0, inf)` without
    positives. Tuning a threshold on labelled test maps this way is an oracle: report it as such.
    """

    def compute(self) -> Tensor:
        return torch.tensor(f1_max_from_histograms(self.pos_hist, self.neg_hist), dtype=torch.float64)


class PixelAUROC(_PixelHistogram):
    """Exact pixel ROC AUC of the float16-cast maps (tie-collapsed ROC, trapezoid), bounded memory."""

    def compute(self) -> Tensor:
        return torch.tensor(auroc_from_histograms(self.pos_hist, self.neg_hist), dtype=torch.float64)


class ImageAUROC(Metric):
    """Exact ROC AUC of image scores at full precision (cat states; image level is small)."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("scores", [], dist_reduce_fx="cat")
        self.add_state("labels", [], dist_reduce_fx="cat")

    def update(self, scores: Tensor, labels: Tensor) -> None:
        """`scores` (B,) float, `labels` (B,) 0/1."""
        self.scores.append(scores.detach().reshape(-1).double())
        self.labels.append(torch.as_tensor(labels, device=scores.device).reshape(-1).long())

    def compute(self) -> Tensor:
        def cat(x: Tensor | list[Tensor]) -> Tensor:
            return x if isinstance(x, Tensor) else torch.cat(x) if x else torch.zeros(0)

        return torch.tensor(image_auroc(cat(self.scores), cat(self.labels)), dtype=torch.float64)
