"""Our own numpy rendering of MVTec's AU-PRO computation and of their toy data set, for tests and benchmarks.

Written from the published description (`/work/shared/spec/mvtec_ad2.md` section 2.3), not from their code:
per image, 8-connected GT regions (scipy.ndimage.label, all-ones 3x3 structure); one global descending sort of
every pixel score; each normal pixel adds 1/N_ok to the FPR, each pixel of region r adds 1/(|r| R) to the PRO;
cumulative sums; of tied scores only the last point kept; both clipped to 1; (0,0) prepended, (1,1) appended;
trapezoid up to the limit with y interpolated there; divided by the limit. Its cost structure (per-pixel
float64 change arrays, one argsort over all pixels, cumulative sums over all pixels) is the one of their code,
so it stands in for "MVTec's code" as the speed baseline.

The toy set follows their `generate_toy_dataset` description: `num_images` maps of uniform random scores of
`image_height` x `image_width`, each with one `gt_size` x `gt_size` anomalous square at a random position. Our
random stream differs from theirs (numpy Generator, our seed), so values are compared with this reference, not
with their printed numbers.
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage as ndi


def toy_dataset(
    num_images: int = 200, image_width: int = 500, image_height: int = 300, gt_size: int = 10, seed: int = 1338
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """`num_images` (H,W) float64 uniform maps and (H,W) uint8 masks, one square region each."""
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    for _ in range(num_images):
        maps.append(rng.random((image_height, image_width)))
        mask = np.zeros((image_height, image_width), np.uint8)
        y = int(rng.integers(0, image_height - gt_size))
        x = int(rng.integers(0, image_width - gt_size))
        mask[y : y + gt_size, x : x + gt_size] = 1
        masks.append(mask)
    return maps, masks


def pro_curve(maps: list[np.ndarray], masks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) points of the global-sort construction, (0,0) first and (1,1) last."""
    structure = np.ones((3, 3), dtype=int)
    n_pixels = sum(m.size for m in maps)
    fp_changes = np.zeros(n_pixels, np.uint32)  # 1 on normal pixels
    pro_changes = np.zeros(n_pixels, np.float64)  # 1/|r| on pixels of region r, divided by R below
    n_ok, n_regions, start = 0, 0, 0
    for m, g in zip(maps, masks):
        labels, n = ndi.label(np.asarray(g) != 0, structure)
        flat = labels.ravel()
        ok = flat == 0
        fp_changes[start : start + flat.size][ok] = 1
        n_ok += int(ok.sum())
        if n:
            sizes = np.bincount(flat, minlength=n + 1).astype(np.float64)
            inv = np.where(np.arange(n + 1) > 0, 1.0 / np.maximum(sizes, 1), 0.0)
            pro_changes[start : start + flat.size] = inv[flat]
        n_regions += n
        start += flat.size
    scores = np.concatenate([np.asarray(m).ravel() for m in maps])
    order = np.argsort(scores)[::-1]  # descending
    scores = scores[order]
    fpr = np.cumsum(fp_changes[order], dtype=np.float64) / n_ok
    pro = np.cumsum(pro_changes[order]) / n_regions
    keep = np.append(np.diff(scores) != 0, True)  # last point of every run of tied scores
    fpr = np.clip(fpr[keep], None, 1.0)
    pro = np.clip(pro[keep], None, 1.0)
    return np.concatenate([[0.0], fpr, [1.0]]), np.concatenate([[0.0], pro, [1.0]])


def trapezoid_to_limit(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Area under y(x) from x[0] to `limit` (x sorted), y linearly interpolated at `limit` inside the curve."""
    inside = x <= limit
    area = float(np.sum(0.5 * (y[inside][1:] + y[inside][:-1]) * np.diff(x[inside])))
    i = int(np.searchsorted(x, limit, side="right"))  # first point past the limit
    if 0 < i < x.size and x[i - 1] < limit:
        y_lim = y[i - 1] + (y[i] - y[i - 1]) * (limit - x[i - 1]) / (x[i] - x[i - 1])
        area += 0.5 * (y[i - 1] + y_lim) * (limit - x[i - 1])
    return area


def au_pro_reference(maps: list[np.ndarray], masks: list[np.ndarray], limit: float = 0.05) -> float:
    """AU-PRO up to `limit`, divided by the limit, by MVTec's global-sort construction."""
    fpr, pro = pro_curve(maps, masks)
    return trapezoid_to_limit(fpr, pro, limit) / limit


def _sorted_counts(maps: list[np.ndarray], masks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative (true positives, false positives) at each distinct score, highest first: one global sort."""
    scores = np.concatenate([np.asarray(m).ravel() for m in maps])
    labels = np.concatenate([np.asarray(g).ravel() != 0 for g in masks])
    order = np.argsort(scores)[::-1]
    scores, labels = scores[order], labels[order]
    keep = np.append(np.diff(scores) != 0, True)  # last index of each run of tied scores
    return np.cumsum(labels, dtype=np.float64)[keep], np.cumsum(~labels, dtype=np.float64)[keep]


def pixel_roc_auc_by_sort(maps: list[np.ndarray], masks: list[np.ndarray]) -> float:
    """Pixel ROC AUC by one global descending sort (ties collapsed, trapezoid): the usual construction
    (sklearn's roc_curve does the same), our baseline for the histogram form. Not MVTec code."""
    tps, fps = _sorted_counts(maps, masks)
    tpr = np.concatenate([[0.0], tps / tps[-1]])
    fpr = np.concatenate([[0.0], fps / fps[-1]])
    return float(np.trapezoid(tpr, fpr))


def pixel_f1_max_by_sort(maps: list[np.ndarray], masks: list[np.ndarray]) -> float:
    """Best pooled pixel F1 over every distinct score (predict score >= t), by one global sort. Not MVTec code."""
    tp, fp = _sorted_counts(maps, masks)
    fn = tp[-1] - tp  # tp[-1]: every positive pixel
    return float(np.max(2 * tp / (2 * tp + fp + fn)))
