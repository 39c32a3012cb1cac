"""Functional forms of the evaluation metrics, and the float16 histogram primitives they share.

Every pixel-level metric here can run in two ways:

- exact on float16 values (default): each map is cast to float16, as the MVTec AD 2 server reads float16
  TIFFs, and only per-value histograms over the 65536 float16 bit patterns are kept. The result is exactly
  what a global sort of the float16-cast maps gives, in O(pixels) time and memory independent of the number
  of images.
- exact on full-precision values (`quantize=None` for AU-PRO): all values are stacked and sorted globally.

Float16 bit patterns are mapped to an *ordering key* in [0, 65536): key order equals value order, -0 is folded
onto +0, -inf/+inf get the lowest/highest keys, NaN is rejected.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Union

import cv2
import numpy as np
import torch
from torch import Tensor

from hybridad.errors import UserError

NUM_KEYS = 65536  # one bin per float16 bit pattern
_SIGN = 0x8000

ArrayLike = Union[Tensor, np.ndarray]
MapInput = Union[ArrayLike, Sequence[ArrayLike]]


# ----------------------------------------------------------------------------------------------- float16 keys


def float16_keys(x: Tensor) -> Tensor:
    """Ordering keys of the float16-cast values of `x`, on `x`'s device.

    Args:
        x: any shape, any real dtype.

    Returns:
        int32 tensor of the same shape, values in [0, 65536), ordered like the float16 values. Bit order is
        kept: -0 has key 0x7FFF and +0 key 0x8000, NaN keys lie below -inf's and above +inf's;
        `key_histogram` folds -0 onto +0 and rejects NaN.
    """
    b = x.detach().to(torch.float16).view(torch.int16).to(torch.int32)  # signed bit pattern
    # b >= 0 (sign bit clear): key = b + 0x8000 = b ^ 0x8000; b < 0: key = 0xFFFF - (b + 0x10000) = ~b
    flip = b >> 31  # 0 or -1
    flip |= 0x8000
    b ^= flip
    return b


_NEG_ZERO_KEY, _POS_ZERO_KEY = 0x7FFF, 0x8000
_NAN_LOW, _NAN_HIGH = 0x3FF, 0xFC01  # keys < _NAN_LOW or >= _NAN_HIGH are NaN bit patterns


def float16_key_values(device: torch.device | str | None = None) -> Tensor:
    """(65536,) float32 value of every key (NaN for the keys of NaN bit patterns)."""
    keys = torch.arange(NUM_KEYS, dtype=torch.int32, device=device)
    bits = torch.where(keys >= _SIGN, keys - _SIGN, 0xFFFF - keys)  # inverse of float16_keys, in [0, 65535]
    signed = torch.where(bits >= _SIGN, bits - NUM_KEYS, bits).to(torch.int16)  # two's complement int16
    return signed.view(torch.float16).to(torch.float32)


def key_histogram(keys: Tensor, weights: Tensor | None = None) -> Tensor:
    """(N,) keys [+ (N,) weights] -> (65536,) float64 per-key count (or weight sum), on the keys' device.

    -0 is counted as +0 (they are one score). Raises ValueError if a key is a NaN pattern.
    """
    w = None if weights is None else weights.to(torch.float64)
    hist = torch.bincount(keys.reshape(-1), weights=w, minlength=NUM_KEYS).to(torch.float64)
    if bool(hist[:_NAN_LOW].any() | hist[_NAN_HIGH:].any()):
        raise ValueError("anomaly map contains NaN; fix the model output before evaluating it")
    hist[_POS_ZERO_KEY] += hist[_NEG_ZERO_KEY]
    hist[_NEG_ZERO_KEY] = 0.0
    return hist


# ------------------------------------------------------------------------------------------- input handling


def _as_tensor(x: ArrayLike) -> Tensor:
    return x if isinstance(x, Tensor) else torch.from_numpy(np.ascontiguousarray(x))


def as_map_list(x: MapInput, name: str = "maps") -> list[Tensor]:
    """Lists of (H,W)/(1,H,W) arrays, or one (H,W)/(B,H,W)/(B,1,H,W) array -> list of (H,W) tensors."""
    if isinstance(x, (Tensor, np.ndarray)):
        t = _as_tensor(x)
        if t.ndim == 4:
            if t.shape[1] != 1:
                raise ValueError(f"{name}: expected (B,1,H,W), got {tuple(t.shape)}")
            t = t[:, 0]  # (B,H,W)
        elif t.ndim == 2:
            t = t[None]  # (1,H,W)
        elif t.ndim != 3:
            raise ValueError(f"{name}: expected (H,W), (B,H,W) or (B,1,H,W), got {tuple(t.shape)}")
        return list(t.unbind(0))
    out = []
    for item in x:
        t = _as_tensor(item)
        if t.ndim == 3 and t.shape[0] == 1:
            t = t[0]  # (H,W)
        if t.ndim != 2:
            raise ValueError(f"{name}: each item must be (H,W) or (1,H,W), got {tuple(t.shape)}")
        out.append(t)
    return out


def iter_pairs(maps: MapInput, masks: MapInput) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield `(map (H,W), mask (H,W))` pairs; see `as_map_list` for the accepted layouts."""
    map_list, mask_list = as_map_list(maps, "anomaly_maps"), as_map_list(masks, "masks")
    if len(map_list) != len(mask_list):
        raise ValueError(f"{len(map_list)} anomaly maps but {len(mask_list)} masks")
    for m, g in zip(map_list, mask_list):
        if m.shape != g.shape:
            raise ValueError(f"anomaly map {tuple(m.shape)} and mask {tuple(g.shape)} differ in size")
        yield m, g


def check_aupro_args(fpr_limit: float, quantize: str | None) -> None:
    if not 0.0 < fpr_limit <= 1.0:
        raise UserError(f"AU-PRO fpr_limit must be in (0, 1], got {fpr_limit}")
    if quantize not in ("float16", None):
        raise UserError(f"AU-PRO quantize must be 'float16' or None, got {quantize!r}")


# ----------------------------------------------------------------------------------------------- regions


def label_regions(mask: Tensor) -> tuple[Tensor, Tensor]:
    """8-connected components of a (H,W) mask (nonzero = anomalous), labelled on the CPU with OpenCV.

    Returns:
        (H,W) int32 labels on the mask's device (0 = normal, 1..R = regions) and (R+1,) float64 region areas
        (entry 0 is the normal pixel count).
    """
    m = (mask.detach() != 0).to("cpu", torch.uint8).numpy()
    _, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8, ltype=cv2.CV_32S)
    areas = torch.from_numpy(stats[:, cv2.CC_STAT_AREA].astype(np.float64)).to(mask.device)
    return torch.from_numpy(labels).to(mask.device), areas


def region_pixel_weights(mask: Tensor) -> tuple[Tensor, int]:
    """(H,W) mask -> (H,W) float64 weight 1/|r| for pixels of region r (0 on normal pixels), and R."""
    labels, areas = label_regions(mask)
    inv = 1.0 / areas
    inv[0] = 0.0
    return inv[labels.long()], areas.numel() - 1  # gather: (H,W)


def pro_histograms(anomaly_map: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, int]:
    """Float16 AU-PRO statistics of one image.

    Returns:
        (65536,) normal-pixel count per key, (65536,) sum over regions of (pixels of r at that key)/|r|,
        and the number of regions R_i of this image.
    """
    keys = float16_keys(anomaly_map).reshape(-1)  # (H*W,)
    counts = key_histogram(keys)
    mask = mask.to(anomaly_map.device)
    idx = (mask != 0).reshape(-1).nonzero().squeeze(1)  # (P,) anomalous pixels, usually few
    if idx.numel() == 0:
        return counts, torch.zeros_like(counts), 0
    labels, areas = label_regions(mask)
    weights = 1.0 / areas[labels.reshape(-1)[idx].long()]  # gather: (P,)
    k_a = keys[idx]  # gather: (P,)
    return counts - key_histogram(k_a), key_histogram(k_a, weights), areas.numel() - 1


# ----------------------------------------------------------------------------------------------- curves


def area_to_limit(x: Tensor, y: Tensor, limit: float) -> Tensor:
    """Trapezoid area under y(x) from x[0] to `limit`, y linearly interpolated at `limit` if it falls inside.

    `x` must be non-decreasing and reach at least `limit` (both float64, 1-D).
    """
    n_in = int(torch.searchsorted(x, torch.tensor([limit], dtype=x.dtype, device=x.device), right=True))
    xs, ys = x[:n_in], y[:n_in]
    area = (0.5 * (ys[1:] + ys[:-1]) * (xs[1:] - xs[:-1])).sum()
    if n_in < x.numel() and float(xs[-1]) < limit:
        x0, x1, y0, y1 = xs[-1], x[n_in], ys[-1], y[n_in]
        y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area = area + 0.5 * (y_lim + y0) * (limit - x0)
    return area


def _au_pro_from_curve(fp_cum: Tensor, pro_cum: Tensor, n_ok: float, n_regions: int, limit: float) -> Tensor:
    """Cumulative (FP count, region-weight sum) at each distinct threshold, descending -> AU-PRO."""
    if n_regions == 0 or n_ok <= 0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64, device=fp_cum.device)
    one = torch.ones(1, dtype=torch.float64, device=fp_cum.device)
    fpr = torch.cat([zero, (fp_cum / n_ok).clamp(max=1.0), one])
    pro = torch.cat([zero, (pro_cum / n_regions).clamp(max=1.0), one])
    return (area_to_limit(fpr, pro, limit) / limit).cpu()


def au_pro_from_histograms(normal: Tensor, region: Tensor, n_regions: int, fpr_limit: float = 0.05) -> Tensor:
    """AU-PRO from float16 histograms: (65536,) normal counts, (65536,) region weights, total region count."""
    normal_desc, region_desc = normal.flip(0), region.flip(0)  # highest score first
    present = (normal_desc > 0) | (region_desc > 0)  # one curve point per distinct value (ties collapsed)
    fp_cum = normal_desc.cumsum(0)[present]
    pro_cum = region_desc.cumsum(0)[present]
    return _au_pro_from_curve(fp_cum, pro_cum, float(normal.sum()), n_regions, fpr_limit)


def au_pro_from_pixels(scores: Tensor, weights: Tensor, n_regions: int, fpr_limit: float = 0.05) -> Tensor:
    """Exact AU-PRO by a global sort: (N,) scores, (N,) weights 1/|r| (0 on normal pixels), region count."""
    scores, order = torch.sort(scores.reshape(-1), descending=True)
    w = weights.reshape(-1)[order].to(torch.float64)  # gather: (N,)
    fp_cum = (w == 0).to(torch.float64).cumsum(0)
    pro_cum = w.cumsum(0)
    last_of_tie = torch.ones_like(scores, dtype=torch.bool)
    last_of_tie[:-1] = scores[1:] != scores[:-1]
    n_ok = float(fp_cum[-1]) if fp_cum.numel() else 0.0
    return _au_pro_from_curve(fp_cum[last_of_tie], pro_cum[last_of_tie], n_ok, n_regions, fpr_limit)


def au_pro(
    anomaly_maps: MapInput, masks: MapInput, fpr_limit: float = 0.05, quantize: str | None = "float16"
) -> float:
    """Area under the per-region-overlap curve up to `fpr_limit`, divided by the limit (MVTec AD 2 AU-PRO).

    Regions are 8-connected GT components per image; FPR is over all normal pixels of all images (good images
    included); PRO is the unweighted mean of per-region recall; tied scores give one curve point.

    Args:
        anomaly_maps: list of (H,W)/(1,H,W) arrays or tensors (sizes may differ), or one (B,H,W)/(B,1,H,W).
        masks: same layout as `anomaly_maps`; any nonzero pixel is anomalous.
        fpr_limit: integration limit in (0, 1].
        quantize: "float16" (exact for float16-cast maps, bounded memory) or None (full precision, global
            sort).

    Returns:
        AU-PRO in [0, 1]; NaN when there is no anomalous region (or no normal pixel) at all.
    """
    check_aupro_args(fpr_limit, quantize)
    n_regions = 0
    if quantize == "float16":
        normal = region = None
        for m, g in iter_pairs(anomaly_maps, masks):
            n_i, r_i, k = pro_histograms(m, g)
            normal = n_i if normal is None else normal + n_i
            region = r_i if region is None else region + r_i
            n_regions += k
        if normal is None:
            return float("nan")
        return float(au_pro_from_histograms(normal, region, n_regions, fpr_limit))
    scores, weights = [], []
    for m, g in iter_pairs(anomaly_maps, masks):
        w, k = region_pixel_weights(g.to(m.device))
        scores.append(m.reshape(-1).float())
        weights.append(w.reshape(-1))
        n_regions += k
    if not scores:
        return float("nan")
    return float(au_pro_from_pixels(torch.cat(scores), torch.cat(weights), n_regions, fpr_limit))


# ----------------------------------------------------------------------------------------------- F1 / AUROC


def _binary_counts(pred: Tensor, target: Tensor) -> tuple[int, int, int]:
    pred, target = pred.bool(), target.bool()
    tp = int((pred & target).sum())
    return tp, int(pred.sum()) - tp, int(target.sum()) - tp


def f1_from_counts(tp: float, fp: float, fn: float) -> float:
    """2TP / (2TP + FP + FN); 0.0 when the denominator is 0 (nothing predicted, nothing to find)."""
    den = 2 * tp + fp + fn
    return 2 * tp / den if den > 0 else 0.0


def seg_f1(pred_masks: MapInput, gt_masks: MapInput) -> float:
    """Pooled pixel F1 over every pixel of every image (MVTec AD 2 SegF1); nonzero = positive."""
    tp = fp = fn = 0
    for p, g in iter_pairs(pred_masks, gt_masks):
        a, b, c = _binary_counts(p != 0, g != 0)
        tp, fp, fn = tp + a, fp + b, fn + c
    return f1_from_counts(tp, fp, fn)


def class_f1(
    pred_masks: MapInput, gt_masks: MapInput | None = None, labels: ArrayLike | Sequence[int] | None = None
) -> float:
    """Image-level F1: an image is predicted anomalous iff its binary mask has a positive pixel.

    Args:
        pred_masks: binary masks (any layout `as_map_list` accepts).
        gt_masks: GT masks in the same layout (label = any positive pixel); or give `labels` instead.
        labels: one 0/1 label per image.
    """
    preds = torch.tensor([bool((p != 0).any()) for p in as_map_list(pred_masks, "pred_masks")])
    if labels is not None:
        target = _as_tensor(np.asarray(labels)).reshape(-1).bool()
    elif gt_masks is not None:
        target = torch.tensor([bool((g != 0).any()) for g in as_map_list(gt_masks, "gt_masks")])
    else:
        raise ValueError("class_f1 needs gt_masks or labels")
    if preds.numel() != target.numel():
        raise ValueError(f"{preds.numel()} predictions but {target.numel()} labels")
    return f1_from_counts(*_binary_counts(preds, target))


def pixel_histograms(anomaly_map: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(..,H,W) map and mask -> (65536,) float64 counts of positive and of negative pixels per float16 key."""
    keys = float16_keys(anomaly_map).reshape(-1)  # (N,)
    idx = (mask.to(anomaly_map.device) != 0).reshape(-1).nonzero().squeeze(1)  # (P,)
    pos = key_histogram(keys[idx])  # gather: (P,)
    return pos, key_histogram(keys) - pos


def f1_max_from_histograms(pos: Tensor, neg: Tensor) -> tuple[float, float]:
    """Best pooled F1 over thresholds `float16(x) >= t`, t running over every present float16 value.

    Returns:
        (f1_max, threshold); the highest threshold wins ties; (0.0, inf) when no pixel is positive.
    """
    pos_desc, neg_desc = pos.flip(0), neg.flip(0)
    present = (pos_desc > 0) | (neg_desc > 0)
    tp = pos_desc.cumsum(0)
    fp = neg_desc.cumsum(0)
    fn = pos.sum() - tp
    den = 2 * tp + fp + fn
    f1 = torch.where(present & (den > 0), 2 * tp / den.clamp(min=1e-300), torch.full_like(tp, -1.0))
    best = int(torch.argmax(f1))  # first maximum = highest threshold
    if float(f1[best]) <= 0.0:
        return 0.0, float("inf")
    values = float16_key_values(pos.device).flip(0)
    return float(f1[best]), float(values[best])


def auroc_from_histograms(pos: Tensor, neg: Tensor) -> float:
    """Exact ROC AUC of float16-keyed scores (ties collapsed, trapezoid); NaN if a class is empty."""
    pos_desc, neg_desc = pos.flip(0), neg.flip(0)
    present = (pos_desc > 0) | (neg_desc > 0)
    n_pos, n_neg = float(pos.sum()), float(neg.sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    zero = torch.zeros(1, dtype=torch.float64, device=pos.device)
    tpr = torch.cat([zero, pos_desc.cumsum(0)[present] / n_pos])
    fpr = torch.cat([zero, neg_desc.cumsum(0)[present] / n_neg])
    return float(torch.trapezoid(tpr, fpr))


def pixel_f1_max(anomaly_maps: MapInput, masks: MapInput) -> tuple[float, float]:
    """Oracle pixel F1 over float16 thresholds: (f1_max, threshold). See `f1_max_from_histograms`."""
    pos = neg = None
    for m, g in iter_pairs(anomaly_maps, masks):
        p, n = pixel_histograms(m, g)
        pos, neg = (p, n) if pos is None else (pos + p, neg + n)
    if pos is None:
        return 0.0, float("inf")
    return f1_max_from_histograms(pos, neg)


def pixel_auroc(anomaly_maps: MapInput, masks: MapInput) -> float:
    """Pixel ROC AUC of the float16-cast maps, in bounded memory."""
    pos = neg = None
    for m, g in iter_pairs(anomaly_maps, masks):
        p, n = pixel_histograms(m, g)
        pos, neg = (p, n) if pos is None else (pos + p, neg + n)
    return float("nan") if pos is None else auroc_from_histograms(pos, neg)


def image_auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Exact ROC AUC of image scores (full precision, ties collapsed); NaN if a class is empty.

    Written out rather than taken from torchmetrics' BinaryAUROC, which squashes scores outside [0,1] with a
    sigmoid and so creates ties between large raw anomaly scores.
    """
    s = _as_tensor(scores).reshape(-1).to(torch.float64)
    y = _as_tensor(labels).reshape(-1).bool()
    if s.numel() != y.numel():
        raise ValueError(f"{s.numel()} scores but {y.numel()} labels")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    if torch.isnan(s).any():
        raise ValueError("image scores contain NaN")
    s, order = torch.sort(s, descending=True)
    y = y[order]  # gather: (N,)
    last_of_tie = torch.ones_like(y)
    last_of_tie[:-1] = s[1:] != s[:-1]
    zero = torch.zeros(1, dtype=torch.float64, device=s.device)
    tpr = torch.cat([zero, y.double().cumsum(0)[last_of_tie] / n_pos])
    fpr = torch.cat([zero, (~y).double().cumsum(0)[last_of_tie] / n_neg])
    return float(torch.trapezoid(tpr, fpr))
