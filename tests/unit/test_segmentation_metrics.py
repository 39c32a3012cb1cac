"""SegF1 / ClassF1 / PixelF1Max / PixelAUROC / ImageAUROC against numpy references and hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hybridad.metrics import ClassF1, ImageAUROC, PixelAUROC, PixelF1Max, SegF1, group_keys
from hybridad.metrics.functional import class_f1, image_auroc, pixel_auroc, pixel_f1_max, seg_f1


def mann_whitney_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(pos > neg) + P(pos == neg) / 2 by pairwise comparison."""
    diff = pos[:, None] - neg[None, :]
    return float(np.mean(diff > 0) + 0.5 * np.mean(diff == 0))


def brute_f1_max(x16: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    best, best_t = -1.0, None
    for t in np.unique(x16)[::-1]:  # descending: the first maximum is the highest threshold
        pred = x16 >= t
        tp = np.sum(pred & gt)
        f1 = 2 * tp / (2 * tp + np.sum(pred & ~gt) + np.sum(~pred & gt))
        if f1 > best:
            best, best_t = f1, float(t)
    return best, best_t


def test_seg_f1_hand_case_and_pooling() -> None:
    pred = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    gt = torch.zeros(2, 1, 4, 4)
    gt[0, 0, :2, :2] = 1  # 4 GT pixels
    pred[0, 0, :2, :1] = True  # 2 TP
    pred[1, 0, 3, 3] = True  # 1 FP on a good image
    # pooled: TP 2, FP 1, FN 2 -> 4 / 7 (a per-image mean would give (2/3 + 0) / 2)
    metric = SegF1()
    metric.update(pred[:1], gt[:1])
    metric.update(pred[1:], gt[1:])
    assert metric.compute().item() == pytest.approx(4 / 7)
    assert seg_f1(pred, gt) == pytest.approx(4 / 7)
    assert seg_f1(torch.zeros(1, 3, 3), torch.zeros(1, 3, 3)) == 0.0


def test_seg_f1_random_vs_numpy() -> None:
    rng = np.random.default_rng(0)
    pred, gt = rng.random((5, 1, 16, 20)) > 0.7, rng.random((5, 1, 16, 20)) > 0.8
    tp, fp, fn = np.sum(pred & gt), np.sum(pred & ~gt), np.sum(~pred & gt)
    metric = SegF1()
    metric.update(torch.from_numpy(pred), torch.from_numpy(gt).float())
    assert metric.compute().item() == pytest.approx(2 * tp / (2 * tp + fp + fn))


def test_class_f1_hand_case() -> None:
    pred = torch.zeros(4, 1, 3, 3)
    gt = torch.zeros(4, 1, 3, 3)
    pred[0, 0, 0, 0] = 1  # TP
    gt[0, 0, 2, 2] = 1  # (no overlap needed at image level)
    pred[1, 0, 1, 1] = 1  # FP (good image)
    gt[2, 0, 1, 1] = 1  # FN
    # image 3: TN.  TP 1, FP 1, FN 1 -> 2/4
    metric = ClassF1()
    metric.update(pred, gt)
    assert metric.compute().item() == pytest.approx(0.5)
    labels = [1, 0, 1, 0]
    metric2 = ClassF1()
    metric2.update(pred[:, 0], labels=torch.tensor(labels))
    assert metric2.compute().item() == pytest.approx(0.5)
    assert class_f1(pred, gt) == pytest.approx(0.5)
    assert class_f1(pred, labels=labels) == pytest.approx(0.5)


@pytest.mark.parametrize("seed", range(4))
def test_pixel_f1_max_vs_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    gt = rng.random((3, 1, 12, 14)) > 0.85
    maps = (rng.random(gt.shape) + 0.5 * gt).astype(np.float32)
    if seed % 2:
        maps = np.round(maps * 8) / 8  # ties
    x16 = maps.astype(np.float16)
    f1, thr = brute_f1_max(x16, gt)
    metric = PixelF1Max()
    metric.update(torch.from_numpy(maps[:2]), torch.from_numpy(gt[:2]))
    metric.update(torch.from_numpy(maps[2:]), torch.from_numpy(gt[2:]))
    got_f1, got_thr = metric.compute().tolist()
    assert got_f1 == pytest.approx(f1, abs=1e-12)
    assert got_thr == thr
    assert pixel_f1_max(maps, gt) == pytest.approx((f1, thr))


def test_pixel_f1_max_perfect_and_no_positive() -> None:
    gt = np.zeros((1, 4, 4), bool)
    gt[0, 1:3, 1:3] = True
    maps = np.where(gt, 0.75, 0.25).astype(np.float32)
    assert pixel_f1_max(maps, gt) == (1.0, 0.75)
    assert pixel_f1_max(maps, np.zeros_like(gt)) == (0.0, float("inf"))


@pytest.mark.parametrize("seed", range(4))
def test_pixel_auroc_vs_mann_whitney(seed: int) -> None:
    rng = np.random.default_rng(seed)
    gt = rng.random((4, 1, 10, 11)) > 0.8
    maps = (rng.normal(size=gt.shape) + gt).astype(np.float32)
    if seed % 2:
        maps = np.round(maps * 4) / 4
    x16 = maps.astype(np.float16).astype(np.float64)
    expected = mann_whitney_auc(x16[gt], x16[~gt])
    metric = PixelAUROC()
    for i in range(4):
        metric.update(torch.from_numpy(maps[i : i + 1]), torch.from_numpy(gt[i : i + 1]))
    assert metric.compute().item() == pytest.approx(expected, abs=1e-12)
    assert pixel_auroc(maps, gt) == pytest.approx(expected, abs=1e-12)


def test_image_auroc_ties_and_large_scores() -> None:
    scores = np.array([30.0, 40.0, 40.0, 10.0, 50.0, 20.0])  # beyond [0,1]: no sigmoid squashing here
    labels = np.array([1, 1, 0, 0, 1, 0])
    expected = mann_whitney_auc(scores[labels == 1], scores[labels == 0])
    metric = ImageAUROC()
    metric.update(torch.from_numpy(scores[:3]), torch.from_numpy(labels[:3]))
    metric.update(torch.from_numpy(scores[3:]), torch.from_numpy(labels[3:]))
    assert metric.compute().item() == pytest.approx(expected)
    assert image_auroc(scores, labels) == pytest.approx(expected)
    assert np.isnan(image_auroc(scores, np.ones(6)))


def test_group_keys() -> None:
    assert group_keys(1, "regular") == ["all", "lighting=regular", "bad"]  # test_public/bad/000_regular
    assert group_keys(0, "shift_1") == ["all", "lighting=shift_1", "good"]  # test_public/good/003_shift_1
    assert group_keys(-1, "mixed") == ["all", "lighting=mixed"]  # test_private_mixed/012_mixed: unlabelled


def test_toy_set_pixel_auroc_and_f1_max_vs_global_sort() -> None:
    from bench.mvtec_reference import pixel_f1_max_by_sort, pixel_roc_auc_by_sort, toy_dataset

    maps, masks = toy_dataset(num_images=8)
    maps16 = [(m + 0.3 * g).astype(np.float16) for m, g in zip(maps, masks)]  # some signal, float16 ties
    assert pixel_auroc(maps16, masks) == pytest.approx(pixel_roc_auc_by_sort(maps16, masks), abs=1e-9)
    assert pixel_f1_max(maps16, masks)[0] == pytest.approx(pixel_f1_max_by_sort(maps16, masks), abs=1e-9)
    metric = PixelAUROC()
    metric.update(torch.from_numpy(np.stack(maps16[:5])), torch.from_numpy(np.stack(masks[:5])))
    metric.update(np.stack(maps16[5:]), np.stack(masks[5:]))  # numpy batches too
    assert metric.compute().item() == pytest.approx(pixel_roc_auc_by_sort(maps16, masks), abs=1e-9)


def test_negative_zero_is_one_threshold_with_positive_zero() -> None:
    gt = np.array([[1, 1, 0, 0, 0]], bool)
    maps = np.array([[0.5, -0.0, 0.0, -0.0, 0.25]], np.float32)
    # thresholds 0.5: TP1 FP0 FN1 -> 2/3; 0.25: TP1 FP1 FN1 -> 1/2; 0 (= -0): TP2 FP3 -> 4/7
    assert pixel_f1_max(maps, gt) == (pytest.approx(2 / 3), 0.5)
    expected = mann_whitney_auc(np.array([0.5, 0.0]), np.array([0.0, 0.0, 0.25]))
    assert pixel_auroc(maps, gt) == pytest.approx(expected)


def test_f1_counts_accept_numpy_and_tensors() -> None:
    pred = np.zeros((2, 5, 5), bool)
    gt = np.zeros((2, 5, 5), np.uint8)
    pred[0, 1:3, 1:3] = True  # 4 predicted, 2 of them right
    gt[0, 1:3, 1:2] = 255
    gt[1, 4, 4] = 255  # missed
    metric = SegF1()
    metric.update(torch.from_numpy(pred[:1]), torch.from_numpy(gt[:1]))
    metric.update(pred[1:], gt[1:])
    assert metric.compute().item() == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))
    cls = ClassF1()
    cls.update(pred, gt)  # image 0 TP, image 1 FN
    assert cls.compute().item() == pytest.approx(2 / 3)
