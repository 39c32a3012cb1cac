"""Two-process CPU (gloo) DDP runs through Lightning's launcher and through torchrun, without `name=`.

Each must give one run directory, every image of every split written (maps and masks, no extras), metrics
equal to a one-process re-score of the cached maps, and a submission that passes the official checks.
"""

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

ROOT = Path(__file__).resolve().parents[2]
SPLITS = ("validation/good", "test_public/good", "test_public/bad", "test_private", "test_private_mixed")


def _args(data: Path, out: Path) -> list[str]:
    return [
        f"data.root={data}", "data.category=can", f"out_dir={out}", "inp_former.preset=tiny",
        "data.tiling.input_size=28", "data.batch_size=4", "data.num_workers=0", "logging.wandb=false",
        "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "trainer.max_epochs=1",
        "trainer.max_steps=2", "trainer.enable_progress_bar=false", "inp_former.warmup_steps=1",
    ]


def _run(command: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "HYBRIDAD_CLAIMED_RUN"):
        env.pop(key, None)
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("run directory: ")


def _check_run(out: Path, data: Path, mask_splits: tuple[str, ...]) -> Path:
    """Checks one run of the job; `mask_splits`: the splits binarised when they were predicted (validation
    maps come before any threshold; with f1_optimal the threshold comes after test_public)."""
    from hybridad.evaluate import evaluate_run
    from hybridad.submission import check_submission, write_submission

    runs = sorted(p for p in (out / "can").iterdir() if p.name != "latest")
    assert len(runs) == 1, f"one run directory for the whole job, got {[p.name for p in runs]}"
    run = runs[0]
    assert (out / "can" / "latest").resolve() == run.resolve()
    assert json.loads((run / "state.json").read_text())["state"] == "completed"
    for split in SPLITS:
        want = sorted(p.stem for p in (data / "can" / split).glob("*.png"))
        assert sorted(p.stem for p in (run / "maps" / split).glob("*.tiff")) == want, split
        if split in mask_splits:
            assert sorted(p.stem for p in (run / "masks" / split).glob("*.png")) == want, split
    synced = json.loads((run / "metrics.json").read_text())
    single = evaluate_run(run, [])  # one process over the cached maps
    for key in ("test_public/aupro_0.05", "test_public/seg_f1", "test_public/class_f1"):
        assert synced[key] == pytest.approx(single[key], abs=1e-9), key
    sub = out / "submission"
    write_submission([run], sub)
    assert check_submission(sub, expected_counts={"can": 6}) == []
    return run


def test_ddp_through_lightnings_launcher_shares_one_run_and_the_tuned_threshold(
    synthetic_root: Path, tmp_path: Path
) -> None:
    _run([sys.executable, "-m", "hybridad", "train", *_args(synthetic_root, tmp_path),
          "threshold.method=f1_optimal"])
    run = _check_run(tmp_path, synthetic_root, SPLITS[3:])
    value = np.float32(yaml.safe_load((run / "thresholds.yaml").read_text())["value"])
    for split in ("test_private", "test_private_mixed"):  # both ranks binarised their share with it
        for path in (run / "maps" / split).glob("*.tiff"):
            mask = cv2.imread(str(run / "masks" / split / f"{path.stem}.png"), cv2.IMREAD_UNCHANGED) > 0
            amap = tifffile.imread(path).astype(np.float32)  # the model binarised these float16-rounded values
            assert np.array_equal(mask, amap >= value), path.name


def test_ddp_through_torchrun_shares_one_run(synthetic_root: Path, tmp_path: Path) -> None:
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "hybridad",
          "train", *_args(synthetic_root, tmp_path)])
    _check_run(tmp_path, synthetic_root, SPLITS[1:])
