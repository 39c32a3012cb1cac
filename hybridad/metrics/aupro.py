"""Streaming AU-PRO (MVTec AD 2 definition) as a torchmetrics `Metric`."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from hybridad.metrics.functional import (
    NUM_KEYS,
    ProHistograms,
    add_keys_into,
    au_pro_from_histograms,
    au_pro_from_pixels,
    check_aupro_args,
    iter_pairs,
    region_pixel_weights,
)


class AUPRO(Metric):
    """Area under the PRO curve up to `fpr_limit`, divided by the limit, over everything passed to `update`.

    With `quantize="float16"` (default) the state is two (65536,) float64 histograms (normal pixels per
    float16 value; per-value sum of 1/|region| over region pixels) and a region counter, all sum-reduced:
    memory does not grow with the number of images and DDP sync is a sum. The value is exactly the MVTec
    AU-PRO of the float16-cast maps, which is what the server reads. `quantize=None` keeps every pixel (list
    states) and sorts them globally in `compute`; use it for small sets only.

    `compute` returns NaN when no anomalous region was seen.

    Args:
        fpr_limit: integration limit in (0, 1] (MVTec AD 2 reports 0.05).
        quantize: "float16" or None.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, fpr_limit: float = 0.05, quantize: str | None = "float16", **kwargs) -> None:
        super().__init__(**kwargs)
        check_aupro_args(fpr_limit, quantize)
        self.fpr_limit = fpr_limit
        self.quantize = quantize
        n0 = torch.tensor(0, dtype=torch.int64)
        self.add_state("num_regions", n0, dist_reduce_fx="sum", persistent=True)
        if quantize == "float16":
            zeros = torch.zeros(NUM_KEYS, dtype=torch.float64)
            self.add_state("normal_hist", zeros.clone(), dist_reduce_fx="sum", persistent=True)
            self.add_state("region_hist", zeros.clone(), dist_reduce_fx="sum", persistent=True)
        else:
            self.add_state("scores", [], dist_reduce_fx="cat")
            self.add_state("weights", [], dist_reduce_fx="cat")

    def update(self, anomaly_maps: Tensor, masks: Tensor) -> None:
        """Add a batch: `anomaly_maps`, `masks` (B,1,H,W) or (B,H,W) tensors or numpy arrays; any nonzero mask
        pixel is anomalous. CPU maps are counted with numpy (no torch thread pool), device maps on their device.
        """
        if self.quantize == "float16":
            hists = ProHistograms()
            for m, g in iter_pairs(anomaly_maps, masks):
                hists.add(m, g)
            if hists.normal is None:
                return
            normal, region = hists.key_order()  # one permutation per batch
            add_keys_into(self.normal_hist, normal)
            add_keys_into(self.region_hist, region)
            self.num_regions += hists.n_regions
            return
        for m, g in iter_pairs(anomaly_maps, masks):
            m = torch.as_tensor(m)
            w, k = region_pixel_weights(torch.as_tensor(g).to(m.device))
            self.scores.append(m.detach().reshape(-1).float())  # (H*W,)
            self.weights.append(w.reshape(-1))  # (H*W,)
            self.num_regions += k

    def compute(self) -> Tensor:
        n_regions = int(self.num_regions)
        if self.quantize == "float16":
            return au_pro_from_histograms(self.normal_hist, self.region_hist, n_regions, self.fpr_limit)
        if isinstance(self.scores, list) and not self.scores:
            return torch.tensor(float("nan"), dtype=torch.float64)
        scores = self.scores if isinstance(self.scores, Tensor) else torch.cat(self.scores)
        weights = self.weights if isinstance(self.weights, Tensor) else torch.cat(self.weights)
        return au_pro_from_pixels(scores, weights, n_regions, self.fpr_limit)
