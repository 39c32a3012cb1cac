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
    # (the model binarised float32 maps; only a value just below the threshold can round up to it in float16)
    differ = (mask > 0) != (amap >= np.float32(thr["value"]))
    assert np.all(amap[differ] == np.float32(thr["value"])) and not (mask > 0)[differ].any()
    metrics = json.loads((run / "metrics.json").read_text())
    # re-scoring the cached maps at the run's own threshold gives the run's own SegF1, up to the pixels that the
    # float16 cache moves across the threshold (the model path binarised the float32 maps)
    assert metrics["test_public/threshold=pseudo_f1/seg_f1"] == pytest.approx(metrics["test_public/seg_f1"],
                                                                                abs=5e-3)
    assert metrics["test_public/threshold=f1_optimal/seg_f1"] >= metrics["test_public/threshold=mean_std/seg_f1"]
    assert "| can | " in write_report([run], tmp_path / "report", num_overlays=0).split("## Threshold rules")[1]
