"""Functional forms of the evaluation metrics, and the float16 histogram primitives they share.

Every pixel-level metric here can run in two ways:

- exact on float16 values (default): each map is cast to float16, as the MVTec AD 2 server reads float16
  TIFFs, and only per-value histograms over the 65536 float16 bit patterns are kept. The result is exactly
  what a global sort of the float16-cast maps gives, in O(pixels) time and memory independent of the number
  of images.
- exact on full-precision values (`quantize=None` for AU-PRO): all values are stacked and sorted globally.

Speed: per image, the raw float16 bit patterns are counted once (`np.bincount` over 65536 bins); no ordering
key is computed per pixel. Only the anomalous pixels (found in the bounding box of the mask) are gathered and
labelled. The bins are permuted into score order once per `update`/call (`keys_from_bits`). CPU maps take a
numpy path, single-threaded on purpose: small per-image torch ops wake the OpenMP pool, whose spinning threads
made evaluation ~20x slower on a machine busy with other jobs. Maps on a GPU stay there (torch path).

Score order uses *ordering keys* in [0, 65536): key order equals value order, -0 is folded onto +0,
-inf/+inf get the lowest/highest keys, NaN is rejected.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import lru_cache
from typing import Union

import cv2
import numpy as np
import scipy.ndimage as ndi
import torch
from torch import Tensor

from hybridad.errors import UserError

NUM_KEYS = 65536  # one bin per float16 bit pattern
_SIGN = 0x8000
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)

ArrayLike = Union[Tensor, np.ndarray]
MapInput = Union[ArrayLike, Sequence[ArrayLike]]
Hist = Union[Tensor, np.ndarray]  # (65536,) histogram, numpy on the CPU, torch on a device


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
_NEG_ZERO_BITS = 0x8000  # bit pattern of -0 (+0 is 0)
_NAN_BITS = (slice(0x7C01, 0x8000), slice(0xFC01, NUM_KEYS))  # bit patterns of NaNs (both signs)
_NAN_MESSAGE = "anomaly map contains NaN; fix the model output before evaluating it"


def float16_key_values(device: torch.device | str | None = None) -> Tensor:
    """(65536,) float32 value of every key (NaN for the keys of NaN bit patterns)."""
    keys = torch.arange(NUM_KEYS, dtype=torch.int32, device=device)
    bits = torch.where(keys >= _SIGN, keys - _SIGN, 0xFFFF - keys)  # inverse of float16_keys, in [0, 65535]
    signed = torch.where(bits >= _SIGN, bits - NUM_KEYS, bits).to(torch.int16)  # two's complement int16
    return signed.view(torch.float16).to(torch.float32)


@lru_cache(maxsize=1)
def _key_values_numpy() -> np.ndarray:
    """(65536,) float64 value of every key, numpy (NaN for NaN keys)."""
    return float16_key_values().numpy().astype(np.float64)


def key_histogram(keys: Tensor, weights: Tensor | None = None) -> Tensor:
    """(N,) keys [+ (N,) weights] -> (65536,) float64 per-key count (or weight sum), on the keys' device.

    -0 is counted as +0 (they are one score). Raises ValueError if a key is a NaN pattern.
    """
    w = None if weights is None else weights.to(torch.float64)
    hist = torch.bincount(keys.reshape(-1), weights=w, minlength=NUM_KEYS).to(torch.float64)
    if bool(hist[:_NAN_LOW].any() | hist[_NAN_HIGH:].any()):
        raise ValueError(_NAN_MESSAGE)
    hist[_POS_ZERO_KEY] += hist[_NEG_ZERO_KEY]
    hist[_NEG_ZERO_KEY] = 0.0
    return hist


# -------------------------------------------------------------------------------------- bit-pattern histograms


def float16_bits(x: ArrayLike) -> Hist:
    """Raw float16 bit patterns of the float16-cast values of `x`, flattened.

    Returns:
        (N,) uint16 numpy array (a view when `x` already is float16) for numpy input and CPU tensors; (N,)
        int32 tensor with values in [0, 65536) on the device for tensors on an accelerator.
    """
    if isinstance(x, Tensor):
        x = x.detach()
        if x.device.type != "cpu":
            return x.to(torch.float16).reshape(-1).view(torch.int16).to(torch.int32) & 0xFFFF  # (N,)
        x = x.numpy() if x.dtype in (torch.float16, torch.float32, torch.float64) else x.float().numpy()
    a = np.asarray(x)
    if a.dtype != np.float16:
        a = a.astype(np.float16)  # round to nearest even, as torch's cast
    return np.ascontiguousarray(a).reshape(-1).view(np.uint16)


def bit_histogram(bits: Hist, weights: Hist | None = None) -> Hist:
    """(N,) bit patterns [+ (N,) weights] -> (65536,) count (int64) or weight sum (float64), in bit order."""
    if isinstance(bits, Tensor):
        w = None if weights is None else weights.to(torch.float64)
        return torch.bincount(bits, weights=w, minlength=NUM_KEYS)
    return np.bincount(bits, weights=weights, minlength=NUM_KEYS)


def _check_no_nan(hist_bits: Hist) -> None:
    if any(bool(hist_bits[s].any()) for s in _NAN_BITS):
        raise ValueError(_NAN_MESSAGE)


def keys_from_bits(hist_bits: Hist) -> Hist:
    """(65536,) histogram in bit order -> (65536,) float64 in key (score) order, -0 folded onto +0.

    Raises ValueError if a NaN bit pattern was counted. Numpy in, numpy out; tensor in, tensor out.
    """
    _check_no_nan(hist_bits)
    if isinstance(hist_bits, Tensor):
        h = hist_bits.to(torch.float64)
        keys = torch.cat([h[_SIGN:].flip(0), h[:_SIGN]])  # negatives (bits 0xFFFF..0x8000), then 0..0x7FFF
    else:
        h = hist_bits.astype(np.float64)
        keys = np.concatenate([h[: _SIGN - 1 : -1], h[:_SIGN]])  # same permutation, numpy views
    keys[_POS_ZERO_KEY] += keys[_NEG_ZERO_KEY]
    keys[_NEG_ZERO_KEY] = 0.0
    return keys


def add_keys_into(state: Tensor, hist_keys: Hist) -> None:
    """`state += hist_keys` for a (65536,) float64 metric state, whatever device either lives on."""
    if state.device.type == "cpu" and isinstance(hist_keys, np.ndarray):
        view = state.numpy()  # shares memory: a numpy add, no torch thread pool for a per-update vector op
        np.add(view, hist_keys, out=view)
    else:
        state += torch.as_tensor(hist_keys).to(state.device, state.dtype)


def _add(acc: Hist | None, h: Hist) -> Hist:
    """Running sum of histograms; the first one (taken over, not copied) fixes the kind: numpy or device."""
    if acc is None:
        return h
    if isinstance(acc, Tensor):
        acc += torch.as_tensor(h).to(acc.device, acc.dtype)
    else:
        acc += h.cpu().numpy() if isinstance(h, Tensor) else h
    return acc


def _scatter_add(hist: Hist, bits: Hist, values: Hist | float) -> None:
    """hist[bits] += values in place, repeated bits accumulating (few pixels: no 65536-bin temporary)."""
    if isinstance(hist, Tensor):
        v = torch.as_tensor(values, dtype=hist.dtype, device=hist.device).expand(bits.shape)
        hist.index_add_(0, bits.to(hist.device).long(), v)
    else:
        np.add.at(hist, bits.cpu().numpy() if isinstance(bits, Tensor) else bits, values)


# ------------------------------------------------------------------------------------------- input handling


def _as_tensor(x: ArrayLike) -> Tensor:
    return x if isinstance(x, Tensor) else torch.from_numpy(np.ascontiguousarray(x))


def as_map_list(x: MapInput, name: str = "maps") -> list[ArrayLike]:
    """Lists of (H,W)/(1,H,W) arrays, or one (H,W)/(B,H,W)/(B,1,H,W) array -> list of (H,W) arrays.

    Items keep their kind (numpy array or tensor, and device): no copy, no per-image torch op.
    """
    if isinstance(x, (Tensor, np.ndarray)):
        t = x
        if t.ndim == 4:
            if t.shape[1] != 1:
                raise ValueError(f"{name}: expected (B,1,H,W), got {tuple(t.shape)}")
            t = t[:, 0]  # (B,H,W)
        elif t.ndim == 2:
            t = t[None]  # (1,H,W)
        elif t.ndim != 3:
            raise ValueError(f"{name}: expected (H,W), (B,H,W) or (B,1,H,W), got {tuple(t.shape)}")
        return [t[i] for i in range(t.shape[0])]  # (H,W) views
    out = []
    for item in x:
        t = item if isinstance(item, (Tensor, np.ndarray)) else np.asarray(item)
        if t.ndim == 3 and t.shape[0] == 1:
            t = t[0]  # (H,W)
        if t.ndim != 2:
            raise ValueError(f"{name}: each item must be (H,W) or (1,H,W), got {tuple(t.shape)}")
        out.append(t)
    return out


def iter_pairs(maps: MapInput, masks: MapInput) -> Iterator[tuple[ArrayLike, ArrayLike]]:
    """Yield `(map (H,W), mask (H,W))` pairs; see `as_map_list` for the accepted layouts."""
    map_list, mask_list = as_map_list(maps, "anomaly_maps"), as_map_list(masks, "masks")
    if len(map_list) != len(mask_list):
        raise ValueError(f"{len(map_list)} anomaly maps but {len(mask_list)} masks")
    for m, g in zip(map_list, mask_list):
        if tuple(m.shape) != tuple(g.shape):
            raise ValueError(f"anomaly map {tuple(m.shape)} and mask {tuple(g.shape)} differ in size")
        yield m, g


def check_aupro_args(fpr_limit: float, quantize: str | None) -> None:
    if not 0.0 < fpr_limit <= 1.0:
        raise UserError(f"AU-PRO fpr_limit must be in (0, 1], got {fpr_limit}")
    if quantize not in ("float16", None):
        raise UserError(f"AU-PRO quantize must be 'float16' or None, got {quantize!r}")


# ----------------------------------------------------------------------------------------------- regions


def _mask_numpy(mask: ArrayLike) -> np.ndarray:
    """(H,W) mask as a CPU numpy array (no copy for numpy input and CPU tensors)."""
    if isinstance(mask, Tensor):
        mask = mask.detach()
        if mask.device.type != "cpu":
            mask = (mask != 0).cpu()  # one device op, bool copy
        return mask.numpy() if mask.dtype != torch.bfloat16 else mask.float().numpy()
    return np.asarray(mask)


def _anomalous_box(mask: np.ndarray) -> tuple[np.ndarray, int, int] | None:
    """Bounding box of the nonzero pixels of an (H,W) mask: (h,w) bool crop, top row, left column; None if
    the mask is empty. OpenCV's `boundingRect` scans the mask once (sequential SIMD, no thread pool)."""
    if mask.dtype in (np.uint8, np.int8, np.bool_):
        m8 = np.ascontiguousarray(mask).view(np.uint8)
    else:
        m8 = (mask != 0).view(np.uint8)
    x, y, w, h = cv2.boundingRect(m8)
    if w == 0 or h == 0:
        return None
    return m8[y : y + h, x : x + w] != 0, y, x


def anomalous_pixels(mask: ArrayLike) -> np.ndarray:
    """(P,) int64 flat indices of the nonzero pixels of an (H,W) mask, row-major (searched in their box)."""
    m = _mask_numpy(mask)
    box = _anomalous_box(m)
    if box is None:
        return np.zeros(0, np.int64)
    crop, r0, c0 = box
    rr, cc = np.nonzero(crop)
    return (rr + r0).astype(np.int64) * m.shape[1] + (cc + c0)


def region_pixels(mask: ArrayLike) -> tuple[np.ndarray, np.ndarray, int]:
    """8-connected GT regions of an (H,W) mask (nonzero = anomalous), labelled single-threaded (scipy).

    Returns:
        (P,) int64 flat indices of the anomalous pixels, (P,) float64 weight 1/|r| of each (r its region),
        and the number of regions R.
    """
    m = _mask_numpy(mask)
    box = _anomalous_box(m)
    if box is None:
        return np.zeros(0, np.int64), np.zeros(0, np.float64), 0
    crop, r0, c0 = box
    labels, n = ndi.label(crop, structure=_EIGHT_CONNECTED)  # (h,w) int32, 1..n
    rr, cc = np.nonzero(crop)
    lab = labels[rr, cc]  # gather: (P,)
    areas = np.bincount(lab, minlength=n + 1)
    return (rr + r0).astype(np.int64) * m.shape[1] + (cc + c0), 1.0 / areas[lab], int(n)


def label_regions(mask: ArrayLike) -> tuple[Tensor, Tensor]:
    """8-connected components of a (H,W) mask (nonzero = anomalous), labelled on the CPU.

    Returns:
        (H,W) int32 labels (0 = normal, 1..R = regions) and (R+1,) float64 region areas (entry 0 is the normal
        pixel count), on the mask's device (CPU for numpy input).
    """
    m = _mask_numpy(mask) != 0
    labels, n = ndi.label(m, structure=_EIGHT_CONNECTED)
    areas = np.bincount(labels.reshape(-1), minlength=n + 1).astype(np.float64)
    device = mask.device if isinstance(mask, Tensor) else "cpu"
    return torch.from_numpy(labels.astype(np.int32)).to(device), torch.from_numpy(areas).to(device)


def region_pixel_weights(mask: ArrayLike) -> tuple[Tensor, int]:
    """(H,W) mask -> (H,W) float64 weight 1/|r| for pixels of region r (0 on normal pixels), and R."""
    labels, areas = label_regions(mask)
    inv = 1.0 / areas
    inv[0] = 0.0
    return inv[labels.long()], areas.numel() - 1  # gather: (H,W)


def _gather(bits: Hist, idx: np.ndarray) -> Hist:
    """bits[idx] on the bits' side (numpy, or the bits' device)."""
    if isinstance(bits, Tensor):
        return bits[torch.from_numpy(idx).to(bits.device)]  # gather: (P,)
    return bits[idx]  # gather: (P,)


def _weights_like(bits: Hist, w: np.ndarray) -> Hist:
    return torch.from_numpy(w).to(bits.device) if isinstance(bits, Tensor) else w


class ProHistograms:
    """Running float16 AU-PRO statistics of a set of images, in bit order.

    `normal` (65536,) int64 normal-pixel count per bit pattern, `region` (65536,) float64 sum over region
    pixels of 1/|r|, `n_regions` the number of regions. numpy for CPU maps, tensors on the maps' device otherwise.
    """

    def __init__(self) -> None:
        self.normal: Hist | None = None
        self.region: Hist | None = None
        self.n_regions = 0

    def add(self, anomaly_map: ArrayLike, mask: ArrayLike) -> None:
        """One (H,W) map and its (H,W) mask: one bincount over the map, a gather over the anomalous pixels."""
        bits = float16_bits(anomaly_map)  # (H*W,)
        counts = bit_histogram(bits)  # the one pass over every pixel; fresh, so updated in place below
        idx, w, n = region_pixels(mask)
        if n:
            b_a = _gather(bits, idx)  # (P,)
            _scatter_add(counts, b_a, -1)  # anomalous pixels are not normal
            if self.region is None:
                self.region = torch.zeros(NUM_KEYS, dtype=torch.float64, device=bits.device) \
                    if isinstance(bits, Tensor) else np.zeros(NUM_KEYS)  # fmt: skip
            _scatter_add(self.region, b_a, _weights_like(bits, w))
            self.n_regions += n
        self.normal = _add(self.normal, counts)

    def key_order(self) -> tuple[Hist, Hist]:
        """(normal, region) as float64 in key order (-0 folded, NaN rejected); zeros if nothing was added."""
        normal = keys_from_bits(self.normal) if self.normal is not None else np.zeros(NUM_KEYS)
        region = keys_from_bits(self.region) if self.region is not None else np.zeros(NUM_KEYS)
        return normal, region


class PixelHistograms:
    """Running float16 positive / negative pixel counts of images, (65536,) int64 each, in bit order."""

    def __init__(self) -> None:
        self.pos: Hist | None = None
        self.neg: Hist | None = None

    def add(self, anomaly_map: ArrayLike, mask: ArrayLike) -> None:
        """One (H,W) map and its (H,W) mask (nonzero = positive)."""
        bits = float16_bits(anomaly_map)  # (H*W,)
        counts = bit_histogram(bits)
        idx = anomalous_pixels(mask)
        if idx.size:
            b_a = _gather(bits, idx)  # (P,)
            _scatter_add(counts, b_a, -1)
            if self.pos is None:
                self.pos = torch.zeros(NUM_KEYS, dtype=torch.int64, device=bits.device) \
                    if isinstance(bits, Tensor) else np.zeros(NUM_KEYS, np.int64)  # fmt: skip
            _scatter_add(self.pos, b_a, 1)
        self.neg = _add(self.neg, counts)

    def key_order(self) -> tuple[Hist, Hist]:
        """(pos, neg) as float64 in key order (-0 folded, NaN rejected); zeros if nothing was added."""
        pos = keys_from_bits(self.pos) if self.pos is not None else np.zeros(NUM_KEYS)
        neg = keys_from_bits(self.neg) if self.neg is not None else np.zeros(NUM_KEYS)
        return pos, neg


# ----------------------------------------------------------------------------------------------- curves


def _np64(x: Hist) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy().astype(np.float64, copy=False)
    return np.asarray(x, np.float64)


def area_to_limit(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under y(x) from x[0] to `limit`, y linearly interpolated at `limit` if it falls inside.

    `x` must be non-decreasing and reach at least `limit` (both float64, 1-D numpy).
    """
    n_in = int(np.searchsorted(x, limit, side="right"))
    xs, ys = x[:n_in], y[:n_in]
    area = float(np.sum(0.5 * (ys[1:] + ys[:-1]) * (xs[1:] - xs[:-1])))
    if n_in < x.size and float(xs[-1]) < limit:
        x0, x1, y0, y1 = xs[-1], x[n_in], ys[-1], y[n_in]
        y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += float(0.5 * (y_lim + y0) * (limit - x0))
    return area


def _au_pro_from_curve(
    fp_cum: np.ndarray, pro_cum: np.ndarray, n_ok: float, n_regions: int, limit: float
) -> Tensor:
    """Cumulative (FP count, region-weight sum) at each distinct threshold, descending -> AU-PRO."""
    if n_regions == 0 or n_ok <= 0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    fpr = np.concatenate([[0.0], np.minimum(fp_cum / n_ok, 1.0), [1.0]])
    pro = np.concatenate([[0.0], np.minimum(pro_cum / n_regions, 1.0), [1.0]])
    return torch.tensor(area_to_limit(fpr, pro, limit) / limit, dtype=torch.float64)


def au_pro_from_histograms(normal: Hist, region: Hist, n_regions: int, fpr_limit: float = 0.05) -> Tensor:
    """AU-PRO from float16 histograms in key order: (65536,) normal counts, (65536,) region weights, region
    count. Computed with numpy on the CPU (two 65536-vectors; no device round trips)."""
    normal_desc, region_desc = _np64(normal)[::-1], _np64(region)[::-1]  # highest score first
    present = (normal_desc > 0) | (region_desc > 0)  # one curve point per distinct value (ties collapsed)
    fp_cum = np.cumsum(normal_desc)[present]
    pro_cum = np.cumsum(region_desc)[present]
    return _au_pro_from_curve(fp_cum, pro_cum, float(normal_desc.sum()), n_regions, fpr_limit)


def au_pro_from_pixels(scores: Tensor, weights: Tensor, n_regions: int, fpr_limit: float = 0.05) -> Tensor:
    """Exact AU-PRO by a global sort: (N,) scores, (N,) weights 1/|r| (0 on normal pixels), region count."""
    scores, order = torch.sort(scores.reshape(-1), descending=True)
    w = weights.reshape(-1)[order].to(torch.float64)  # gather: (N,)
    fp_cum = (w == 0).to(torch.float64).cumsum(0)
    pro_cum = w.cumsum(0)
    last_of_tie = torch.ones_like(scores, dtype=torch.bool)
    last_of_tie[:-1] = scores[1:] != scores[:-1]
    n_ok = float(fp_cum[-1]) if fp_cum.numel() else 0.0
    fp, pro = _np64(fp_cum[last_of_tie]), _np64(pro_cum[last_of_tie])
    return _au_pro_from_curve(fp, pro, n_ok, n_regions, fpr_limit)


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
    if quantize == "float16":
        hists = ProHistograms()
        for m, g in iter_pairs(anomaly_maps, masks):
            hists.add(m, g)
        if hists.normal is None:
            return float("nan")
        normal, region = hists.key_order()
        return float(au_pro_from_histograms(normal, region, hists.n_regions, fpr_limit))
    scores, weights, n_regions = [], [], 0
    for m, g in iter_pairs(anomaly_maps, masks):
        m = _as_tensor(m)
        w, k = region_pixel_weights(_as_tensor(g).to(m.device))
        scores.append(m.reshape(-1).float())
        weights.append(w.reshape(-1))
        n_regions += k
    if not scores:
        return float("nan")
    return float(au_pro_from_pixels(torch.cat(scores), torch.cat(weights), n_regions, fpr_limit))


# ----------------------------------------------------------------------------------------------- F1 / AUROC


def binary_counts(pred: ArrayLike, target: ArrayLike) -> tuple[int, int, int]:
    """(TP, FP, FN) of two same-shape arrays (nonzero = positive); numpy counting for CPU input."""
    if isinstance(pred, Tensor) and pred.device.type != "cpu":
        p, t = pred != 0, _as_tensor(target).to(pred.device) != 0
        tp = int((p & t).sum())
        return tp, int(p.sum()) - tp, int(t.sum()) - tp
    p, t = _mask_numpy(pred) != 0, _mask_numpy(target) != 0
    tp = int(np.count_nonzero(p & t))
    return tp, int(np.count_nonzero(p)) - tp, int(np.count_nonzero(t)) - tp


def f1_from_counts(tp: float, fp: float, fn: float) -> float:
    """2TP / (2TP + FP + FN); 0.0 when the denominator is 0 (nothing predicted, nothing to find)."""
    den = 2 * tp + fp + fn
    return 2 * tp / den if den > 0 else 0.0


def seg_f1(pred_masks: MapInput, gt_masks: MapInput) -> float:
    """Pooled pixel F1 over every pixel of every image (MVTec AD 2 SegF1); nonzero = positive."""
    tp = fp = fn = 0
    for p, g in iter_pairs(pred_masks, gt_masks):
        a, b, c = binary_counts(p, g)
        tp, fp, fn = tp + a, fp + b, fn + c
    return f1_from_counts(tp, fp, fn)


def any_positive(masks: MapInput, name: str = "masks") -> np.ndarray:
    """(B,) bool: whether each mask has a nonzero pixel."""
    out = []
    for m in as_map_list(masks, name):
        out.append(bool((m != 0).any()) if isinstance(m, Tensor) and m.device.type != "cpu"
                   else bool(np.count_nonzero(_mask_numpy(m))))  # fmt: skip
    return np.array(out, dtype=bool)


def class_f1(
    pred_masks: MapInput, gt_masks: MapInput | None = None, labels: ArrayLike | Sequence[int] | None = None
) -> float:
    """Image-level F1: an image is predicted anomalous iff its binary mask has a positive pixel.

    Args:
        pred_masks: binary masks (any layout `as_map_list` accepts).
        gt_masks: GT masks in the same layout (label = any positive pixel); or give `labels` instead.
        labels: one 0/1 label per image.
    """
    preds = any_positive(pred_masks, "pred_masks")
    if labels is not None:
        lab = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
        target = lab.reshape(-1) != 0
    elif gt_masks is not None:
        target = any_positive(gt_masks, "gt_masks")
    else:
        raise ValueError("class_f1 needs gt_masks or labels")
    if preds.size != target.size:
        raise ValueError(f"{preds.size} predictions but {target.size} labels")
    return f1_from_counts(*binary_counts(preds, target))


def pixel_histograms(anomaly_map: MapInput, mask: MapInput) -> tuple[Hist, Hist]:
    """Maps and masks (any layout `as_map_list` accepts) -> (65536,) float64 counts of positive and of
    negative pixels per float16 key (numpy for CPU maps, tensors on the maps' device otherwise)."""
    hists = PixelHistograms()
    for m, g in iter_pairs(anomaly_map, mask):
        hists.add(m, g)
    return hists.key_order()


def f1_max_from_histograms(pos: Hist, neg: Hist) -> tuple[float, float]:
    """Best pooled F1 over thresholds `float16(x) >= t`, t running over every present float16 value.

    Args:
        pos, neg: (65536,) positive / negative pixel counts in key order (numpy or tensors, any device).

    Returns:
        (f1_max, threshold); the highest threshold wins ties; (0.0, inf) when no pixel is positive.
    """
    pos_desc, neg_desc = _np64(pos)[::-1], _np64(neg)[::-1]
    present = (pos_desc > 0) | (neg_desc > 0)
    tp = np.cumsum(pos_desc)
    fp = np.cumsum(neg_desc)
    fn = pos_desc.sum() - tp
    den = 2 * tp + fp + fn
    f1 = np.where(present & (den > 0), 2 * tp / np.maximum(den, 1e-300), -1.0)
    best = int(np.argmax(f1))  # first maximum = highest threshold
    if float(f1[best]) <= 0.0:
        return 0.0, float("inf")
    return float(f1[best]), float(_key_values_numpy()[::-1][best])


def auroc_from_histograms(pos: Hist, neg: Hist) -> float:
    """Exact ROC AUC of float16-keyed scores (ties collapsed, trapezoid); NaN if a class is empty."""
    pos_desc, neg_desc = _np64(pos)[::-1], _np64(neg)[::-1]
    present = (pos_desc > 0) | (neg_desc > 0)
    n_pos, n_neg = float(pos_desc.sum()), float(neg_desc.sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    tpr = np.concatenate([[0.0], np.cumsum(pos_desc)[present] / n_pos])
    fpr = np.concatenate([[0.0], np.cumsum(neg_desc)[present] / n_neg])
    return float(np.trapezoid(tpr, fpr))


def pixel_f1_max(anomaly_maps: MapInput, masks: MapInput) -> tuple[float, float]:
    """Oracle pixel F1 over float16 thresholds: (f1_max, threshold). See `f1_max_from_histograms`."""
    if not as_map_list(anomaly_maps, "anomaly_maps"):
        return 0.0, float("inf")
    return f1_max_from_histograms(*pixel_histograms(anomaly_maps, masks))


def pixel_auroc(anomaly_maps: MapInput, masks: MapInput) -> float:
    """Pixel ROC AUC of the float16-cast maps, in bounded memory."""
    if not as_map_list(anomaly_maps, "anomaly_maps"):
        return float("nan")
    return auroc_from_histograms(*pixel_histograms(anomaly_maps, masks))


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
