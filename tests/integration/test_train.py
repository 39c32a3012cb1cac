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
    for key in ("aupro_0.05", "seg_f1", "class_f1", "image_auroc", "pixel_auroc"):
        assert 0.0 <= metrics[f"test_public/{key}"] <= 1.0, key
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
    cfg = load_config([f"data.root={tmp_path / 'no_data'}", "data.category=vial", f"out_dir={runs}"])
    with pytest.raises(UserError, match="mvtec-ad-2"):
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
    # the private masks were binarised with the tuned threshold
    amap = tifffile.imread(run / "maps" / "test_private" / "000_regular.tiff").astype(np.float32)
    mask = cv2.imread(str(run / "masks" / "test_private" / "000_regular.png"), cv2.IMREAD_UNCHANGED)
    differ = (mask > 0) != (amap >= np.float32(thr["value"]))  # the model binarised the float32 map
    assert np.all(np.abs(amap[differ] - thr["value"]) <= 1e-3)  # so only float16 rounding at the edge differs
    assert "threshold tuned on test" in write_report([run], tmp_path / "report")


def test_evaluate_refuses_to_smooth_maps_that_were_cached_smoothed(can_run: Path) -> None:
    from hybridad.errors import UserError
    from hybridad.evaluate import evaluate_run

    with pytest.raises(UserError, match="gaussian_sigma"):
        evaluate_run(can_run, ["postprocess.gaussian_sigma=2.0"])
