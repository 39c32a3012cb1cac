"""End to end on the synthetic tree: train -> run directory -> evaluate -> sweep command -> submission."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import yaml

from hybridad.demo import demo_config
from hybridad.train import train

ROOT = Path(__file__).resolve().parents[2]
FAST = ["trainer.max_epochs=1", "trainer.max_steps=3", "trainer.limit_val_batches=2", "trainer.log_every_n_steps=1"]


@pytest.fixture(scope="module")
def can_run(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    # mean + 3 std (not the INP-Former default capped_faint): this run checks the per-validation threshold log
    return train(demo_config("can", synthetic_root, runs, [*FAST, "logging.wandb=true", "threshold.method=mean_std"]))


def _stems(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.png"))


def _brute_force_metrics(run: Path, root: Path) -> tuple[float, float, float]:
    """(SegF1, ClassF1, pixel AUROC) of a run's test_public from its mask PNGs, map TIFFs and the GT masks.

    SegF1: 2TP / (2TP + FP + FN) pooled over every pixel; ClassF1: the same over images (anomalous iff the
    mask has a positive pixel); pixel AUROC: Mann-Whitney U with average ranks for ties, over the float16 maps.
    """
    from scipy.stats import rankdata

    from data_modules.listing import list_samples, read_mask

    tp = fp = fn = 0
    image_pred, image_label, scores, labels = [], [], [], []
    for s in list_samples(root, "can", "test_public"):
        amap = tifffile.imread(run / "maps" / f"{s.sample_id}.tiff").astype(np.float64)
        pred = cv2.imread(str(run / "masks" / f"{s.sample_id}.png"), cv2.IMREAD_UNCHANGED) > 0
        gt = (read_mask(s.mask_path, s.image_path, amap.shape) > 0 if s.mask_path is not None
              else np.zeros(amap.shape, bool))
        tp, fp, fn = tp + int((pred & gt).sum()), fp + int((pred & ~gt).sum()), fn + int((~pred & gt).sum())
        image_pred.append(bool(pred.any()))
        image_label.append(bool(s.label))
        scores.append(amap.ravel())
        labels.append(gt.ravel())
    p, y = np.array(image_pred), np.array(image_label)
    class_f1 = 2 * (p & y).sum() / (2 * (p & y).sum() + (p & ~y).sum() + (~p & y).sum())
    score, label = np.concatenate(scores), np.concatenate(labels)
    ranks = rankdata(score)  # average ranks: a tie counts one half
    n_pos, n_neg = int(label.sum()), int((~label).sum())
    auroc = (ranks[label].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return 2 * tp / (2 * tp + fp + fn), float(class_f1), float(auroc)


def test_run_directory_holds_every_native_map_and_the_metrics(can_run: Path, synthetic_root: Path) -> None:
    data = synthetic_root / "can"
    for sub in ("good", "bad"):
        for stem in _stems(data / "test_public" / sub):
            image = cv2.imread(str(data / "test_public" / sub / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
            amap = tifffile.imread(can_run / "maps" / "test_public" / sub / f"{stem}.tiff")
            assert amap.dtype == np.float16 and amap.shape == image.shape[:2]
            mask = cv2.imread(str(can_run / "masks" / "test_public" / sub / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
            assert mask.shape == image.shape[:2] and set(np.unique(mask)) <= {0, 255}
    for split in ("test_private", "test_private_mixed"):
        assert sorted(p.stem for p in (can_run / "maps" / split).glob("*.tiff")) == _stems(data / split)
        assert sorted(p.stem for p in (can_run / "masks" / split).glob("*.png")) == _stems(data / split)
    metrics = json.loads((can_run / "metrics.json").read_text())
    # SegF1, ClassF1 and pixel AUROC recomputed by brute force from the written masks and cached maps
    seg_f1, class_f1, pixel_auroc = _brute_force_metrics(can_run, synthetic_root)
    assert metrics["test_public/seg_f1"] == pytest.approx(seg_f1, abs=1e-12)
    assert metrics["test_public/class_f1"] == pytest.approx(class_f1, abs=1e-12)
    assert metrics["test_public/pixel_auroc"] == pytest.approx(pixel_auroc, abs=1e-9)
    assert 0.0 <= metrics["test_public/aupro_0.05"] <= 1.0 and 0.0 <= metrics["test_public/image_auroc"] <= 1.0
    assert any(k.startswith("test_public/lighting=") for k in metrics)
    thr = yaml.safe_load((can_run / "thresholds.yaml").read_text())
    assert thr["source"] == "validation" and np.isfinite(thr["value"])
    assert (can_run / "config.yaml").is_file() and (can_run / "checkpoints" / "final.ckpt").is_file()
    assert list((can_run / "wandb").glob("offline-run-*")), "W&B logs offline by default"
    assert list((can_run / "overlays" / "test_public").glob("*.png"))
    header = (can_run / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss", "val/loss", "val/threshold", "test_public/aupro_0.05"} <= set(header)


def test_evaluate_rescores_cached_maps_and_sweep_command_runs_offline(can_run: Path) -> None:
    sweep = yaml.safe_load((ROOT / "experiments" / "sweeps" / "threshold.yaml").read_text())
    args = ["threshold.k=2.0", "postprocess.closing_kernel=3", "postprocess.fill_holes=true",
            "postprocess.min_area=4", "threshold.method=mean_std"]
    command: list[str] = []
    for part in sweep["command"]:  # the project's .venv/bin/python -> this interpreter (a worktree has no .venv)
        command += {".venv/bin/python": [sys.executable], "${args_no_hyphens}": args}.get(part, [part])
    env = {**os.environ, "HYBRIDAD_RUN_DIR": str(can_run), "WANDB_MODE": "offline"}
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    folder = Path(proc.stdout.splitlines()[-1])
    assert folder.parent == can_run / "evaluations" and (folder / "metrics.json").is_file()
    scored = json.loads((folder / "metrics.json").read_text())
    assert scored["threshold_source"] == "validation"
    # the same maps, so the threshold-free metric matches the run's own
    run_metrics = json.loads((can_run / "metrics.json").read_text())
    assert scored["test_public/aupro_0.05"] == pytest.approx(run_metrics["test_public/aupro_0.05"], abs=1e-6)


def test_missing_weights_or_data_stop_before_anything_is_written(synthetic_root: Path, tmp_path: Path) -> None:
    from hybridad.config import load_config
    from hybridad.errors import UserError

    runs = tmp_path / "runs"
    cfg = load_config([f"data.root={synthetic_root}", "data.category=can", f"out_dir={runs}",
                       f"inp_former.weights={tmp_path / 'nope.pth'}"])
    with pytest.raises(UserError, match="nope.pth"):
        train(cfg)
    cfg = load_config([f"data.root={tmp_path / 'no_data'}", "data.category=vial", f"out_dir={runs}",
                       "cpr.preset=tiny"])
    with pytest.raises(UserError, match="mvtec-ad-2"):
        train(cfg)
    assert not runs.exists()


def test_every_configured_path_is_checked_before_any_image_is_decoded(
        synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bad weight, checkpoint, defect-folder or data paths (and an unreadable weight file) stop `train` before
    the deep data check decodes a single PNG."""
    import data_modules.checks
    from hybridad.config import load_config
    from hybridad.errors import UserError

    def no_decoding(*args: object, **kwargs: object) -> str:
        raise AssertionError("the data set was decoded before the paths were checked")

    monkeypatch.setattr(data_modules.checks, "validate_category", no_decoding)
    runs = tmp_path / "runs"
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    base = [f"data.root={synthetic_root}", "data.category=can", f"out_dir={runs}",
            "inp_former.encoder=vit_small_patch14_dinov2"]
    cases = {  # override -> what the one-line error names
        f"inp_former.weights={tmp_path / 'nope.pth'}": "inp_former.weights: file .*nope.pth' not found",
        f"inp_former.checkpoint={tmp_path / 'no_ckpt.pt'}":
            "inp_former.checkpoint: file .*no_ckpt.pt' not found",
        f"data.cut_paste.defect_dir={tmp_path / 'no_crops'}": "defect_dir: folder .*no_crops' not found",
        f"inp_former.weights={garbage}": "cannot read .*garbage.pth",
    }
    for override, message in cases.items():
        weights = [] if override.startswith("inp_former.weights") else [f"inp_former.weights={garbage}"]
        with pytest.raises(UserError, match=message):
            train(load_config([*base, *weights, override]))
    with pytest.raises(UserError, match="data root .*no_data does not exist"):
        train(load_config([*base, f"data.root={tmp_path / 'no_data'}", f"inp_former.weights={garbage}"]))
    cfg = load_config([f"data.root={synthetic_root}", "data.category=vial", f"out_dir={runs}",
                       f"cpr.weights={tmp_path / 'densenet.pth'}"])
    with pytest.raises(UserError, match="cpr.weights: file .*densenet.pth' not found"):
        train(cfg)
    assert not runs.exists()


@pytest.mark.slow
def test_ddp_training_on_two_cpu_processes_counts_every_test_image_once(synthetic_root: Path, tmp_path: Path) -> None:
    from hybridad.evaluate import evaluate_run

    args = [f"data.root={synthetic_root}", "data.category=can", f"out_dir={tmp_path}", "name=ddp",
            "inp_former.preset=tiny", "inp_former.weights=''", "data.tiling.input_size=112", "trainer.max_steps=2",
            "trainer.max_epochs=1", "data.batch_size=8", "data.num_workers=0", "logging.wandb=false",
            "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]
    proc = subprocess.run([sys.executable, "-m", "hybridad", "train", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "can" / "ddp"
    data = synthetic_root / "can"
    for split in ("test_public/good", "test_public/bad", "test_private", "test_private_mixed"):
        assert sorted(p.stem for p in (run / "maps" / split).glob("*.tiff")) == _stems(data / split)
    synced = json.loads((run / "metrics.json").read_text())["test_public/aupro_0.05"]
    single = evaluate_run(run, [])["test_public/aupro_0.05"]  # one process over the cached maps
    assert synced == pytest.approx(single, abs=1e-9)


def test_f1_optimal_threshold_is_fitted_on_test_and_labelled_everywhere(synthetic_root: Path, tmp_path: Path) -> None:
    from hybridad.report import write_report

    run = train(demo_config("can", synthetic_root, tmp_path, [*FAST, "threshold.method=f1_optimal"]))
    thr = yaml.safe_load((run / "thresholds.yaml").read_text())
    assert thr["tuned_on_test"] is True and thr["source"] == "test_public (threshold tuned on test)"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["threshold_source"] == thr["source"] and 0.0 <= metrics["test_public/seg_f1"] <= 1.0
    # test_public masks are written once the threshold exists (the cached float16 map >= it), and SegF1 is
    # reported per lighting as for the other threshold rules
    for split in ("test_public",):
        maps = sorted((run / "maps" / split).rglob("*.tiff"))
        assert maps
        for path in maps:
            rel = path.relative_to(run / "maps").with_suffix(".png")
            mask = cv2.imread(str(run / "masks" / rel), cv2.IMREAD_UNCHANGED)
            assert mask is not None, rel
            cached = tifffile.imread(path).astype(np.float32)  # float16 on disk
            assert np.array_equal(mask > 0, cached >= np.float32(thr["value"])), rel
    lightings = {k for k in metrics if k.startswith("test_public/lighting=") and k.endswith("/seg_f1")}
    assert lightings and all(0.0 <= metrics[k] <= 1.0 for k in lightings)
    # the private masks were binarised with the tuned threshold
    amap = tifffile.imread(run / "maps" / "test_private" / "000_regular.tiff").astype(np.float32)
    mask = cv2.imread(str(run / "masks" / "test_private" / "000_regular.png"), cv2.IMREAD_UNCHANGED)
    # the model binarises the float16-rounded map: every mask pixel is exactly `cached map >= threshold`
    assert np.array_equal(mask > 0, amap >= np.float32(thr["value"]))
    assert "threshold tuned on test" in write_report([run], tmp_path / "report")


def test_evaluate_refuses_to_smooth_maps_that_were_cached_smoothed(can_run: Path) -> None:
    from hybridad.errors import UserError
    from hybridad.evaluate import evaluate_run

    with pytest.raises(UserError, match="whole_map_blur_sigma"):
        evaluate_run(can_run, ["postprocess.whole_map_blur_sigma=2.0"])


def test_split_matched_mixed_threshold_is_fitted_after_predict(synthetic_root: Path, tmp_path: Path) -> None:
    """A tuned-on-test category threshold (fitted before predicting) carried over to test_private_mixed's own
    maps once they exist: the recorded value is numpy's median/90th-percentile match, the masks follow it."""
    rules = ["threshold.method=f1_optimal", "threshold.test_private_mixed.method=split_matched",
             "threshold.pseudo_repeats=0", "trainer.limit_predict_batches=2"]
    run = train(demo_config("can", synthetic_root, tmp_path, [*FAST, *rules]))

    def scores(split: str) -> np.ndarray:
        maps = sorted((run / "maps" / split).rglob("*.tiff"))
        return np.concatenate([tifffile.imread(p).ravel() for p in maps]).astype(np.float64)

    thr = yaml.safe_load((run / "thresholds.yaml").read_text())
    (m, p), (m2, p2) = (np.percentile(scores(s), [50, 90]) for s in ("validation", "test_private_mixed"))
    mixed = thr["splits"]["test_private_mixed"]
    assert mixed["method"] == "split_matched" and mixed["tuned_on_test"] is True  # its base is f1_optimal
    assert mixed["source"] == "validation + the split's own maps, from f1_optimal on test_public " \
                              "(threshold tuned on test)"
    assert mixed["value"] == pytest.approx(m2 + (thr["value"] - m) * (p2 - m2) / (p - m), rel=1e-6)
    assert thr["splits"]["test_private"]["value"] == thr["value"]
    moved = 0  # pixels whose mask the matched threshold changed (the provisional masks used the category's)
    for path in sorted((run / "maps" / "test_private_mixed").glob("*.tiff")):
        mask = cv2.imread(str(run / "masks/test_private_mixed" / f"{path.stem}.png"), cv2.IMREAD_UNCHANGED)
        amap = tifffile.imread(path).astype(np.float32)
        assert np.array_equal(mask > 0, amap >= np.float32(mixed["value"]))
        moved += int(((mask > 0) != (amap >= np.float32(thr["value"]))).sum())
    assert moved > 0
