"""threshold.method=pseudo_f1 end to end: fitted after fit without test labels, used for every mask, compared."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import yaml

from hybridad.demo import demo_config
from hybridad.train import train

FAST = ["trainer.max_epochs=1", "trainer.max_steps=3", "trainer.limit_val_batches=2", "trainer.log_every_n_steps=1",
        "threshold.pseudo_repeats=2", "data.cut_paste.library_size=2"]


def _test_public_maps(run: Path, root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every test_public pixel: the cached (float16) score as float32 and the ground truth, flattened."""
    from data_modules.listing import list_samples, read_mask

    maps, gts = [], []
    for s in list_samples(root, "can", "test_public"):
        amap = tifffile.imread(run / "maps" / f"{s.sample_id}.tiff").astype(np.float32)
        gt = (read_mask(s.mask_path, s.image_path, amap.shape) > 0 if s.mask_path is not None
              else np.zeros(amap.shape, bool))
        maps.append(amap.ravel())
        gts.append(gt.ravel())
    return np.concatenate(maps), np.concatenate(gts)


def _pooled_f1(maps: np.ndarray, gts: np.ndarray, value: np.float32) -> float:
    pred = maps >= value
    tp = int((pred & gts).sum())
    return 2 * tp / (int(pred.sum()) + int(gts.sum())) if pred.any() or gts.any() else 0.0


def _best_pooled_f1(maps: np.ndarray, gts: np.ndarray) -> float:
    """max over every threshold t of F1(maps >= t): one pass over the distinct values, highest first."""
    order = np.argsort(-maps, kind="stable")
    values, hits = maps[order], gts[order]
    last = np.r_[values[1:] != values[:-1], True]  # the last pixel of each run of equal values
    tp, predicted = np.cumsum(hits)[last], np.flatnonzero(last) + 1
    return float((2 * tp / (predicted + gts.sum())).max())


def test_pseudo_f1_threshold_drives_the_masks_and_the_candidates_are_scored(synthetic_root: Path,
                                                                             tmp_path: Path) -> None:
    from hybridad.report import write_report

    run = train(demo_config("can", synthetic_root, tmp_path, [*FAST, "threshold.method=pseudo_f1"]))
    thr = yaml.safe_load((run / "thresholds.yaml").read_text())
    assert (thr["method"], thr["tuned_on_test"]) == ("pseudo_f1", False)
    assert thr["value"] == thr["candidates"]["pseudo_f1"]["value"]
    stats = thr["candidates"]["mean_std"]["stats"]
    assert thr["candidates"]["mean_std"]["value"] == pytest.approx(stats["mean"] + 3.0 * stats["std"])
    # the private masks were binarised with the pseudo_f1 threshold (can: no mask post-processing here)
    amap = tifffile.imread(run / "maps" / "test_private" / "000_regular.tiff").astype(np.float32)
    mask = cv2.imread(str(run / "masks" / "test_private" / "000_regular.png"), cv2.IMREAD_UNCHANGED)
    # the model binarises the float16-rounded map: every mask pixel is exactly `cached map >= threshold`
    assert np.array_equal(mask > 0, amap >= np.float32(thr["value"]))
    metrics = json.loads((run / "metrics.json").read_text())
    # re-scoring the cached maps at the run's own threshold gives the run's own SegF1 (the same float16 maps)
    assert metrics["test_public/threshold=pseudo_f1/seg_f1"] == pytest.approx(metrics["test_public/seg_f1"],
                                                                                abs=1e-12)
    # each candidate's SegF1 is the brute-force pooled F1 at its value; f1_optimal's is the best of all values
    maps, gts = _test_public_maps(run, synthetic_root)
    for rule in ("mean_std", "pseudo_f1", "f1_optimal"):
        value = np.float32(metrics[f"test_public/threshold={rule}/value"])
        assert metrics[f"test_public/threshold={rule}/seg_f1"] == pytest.approx(_pooled_f1(maps, gts, value),
                                                                                 abs=1e-12), rule
    assert metrics["test_public/threshold=f1_optimal/seg_f1"] == pytest.approx(_best_pooled_f1(maps, gts),
                                                                                abs=1e-12)
    assert "| can | " in write_report([run], tmp_path / "report", num_overlays=0).split("## Threshold rules")[1]
