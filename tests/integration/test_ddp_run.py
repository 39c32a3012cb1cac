"""Two-process CPU (gloo) DDP runs through Lightning's launcher, torchrun and SLURM's variables, without `name=`.

Each must give one run directory, every image of every split written (maps and masks, no extras), metrics
equal to a one-process re-score of the cached maps, and a submission that passes the official checks.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import torch
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


def _logged_test_metrics(run: Path) -> dict[str, float]:
    """The last `test_public/*` values the CSV logger got from `MetricsCallback` (synced over the ranks)."""
    values: dict[str, float] = {}
    with open(run / "csv" / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            values.update({k: float(v) for k, v in row.items() if k.startswith("test_public/") and v != ""})
    return values


def _check_run(out: Path, data: Path, mask_splits: tuple[str, ...], synced_masks: bool = True) -> Path:
    """Checks one run of the job; `mask_splits`: the splits with masks; `synced_masks`: whether test_public
    had a threshold during test (not with f1_optimal, whose threshold comes after test_public)."""
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
    # the values the metrics synced over both ranks, as logged at the end of test (metrics.json may have been
    # re-scored by rank 0 since: f1_optimal), against a one-process re-score of the cached maps
    synced = _logged_test_metrics(run)
    single = evaluate_run(run, [])
    compared = sorted(set(synced) & set(single))
    want = {"test_public/aupro_0.05", *(("test_public/seg_f1", "test_public/class_f1") if synced_masks else ())}
    assert want <= set(compared) and any("/lighting=" in k for k in compared), compared
    for key in compared:  # Lightning logs float32: equal up to its rounding
        assert synced[key] == pytest.approx(single[key], rel=1e-6, abs=1e-7), key
    sub = out / "submission"
    write_submission([run], sub)
    assert check_submission(sub, expected_counts={"can": 6}) == []
    return run


def test_ddp_through_lightnings_launcher_shares_one_run_and_the_tuned_threshold(
    synthetic_root: Path, tmp_path: Path
) -> None:
    _run([sys.executable, "-m", "hybridad", "train", *_args(synthetic_root, tmp_path),
          "threshold.method=f1_optimal"])
    run = _check_run(tmp_path, synthetic_root, SPLITS[1:], synced_masks=False)
    value = np.float32(yaml.safe_load((run / "thresholds.yaml").read_text())["value"])
    for split in ("test_private", "test_private_mixed"):  # both ranks binarised their share with it
        for path in (run / "maps" / split).glob("*.tiff"):
            mask = cv2.imread(str(run / "masks" / split / f"{path.stem}.png"), cv2.IMREAD_UNCHANGED) > 0
            amap = tifffile.imread(path).astype(np.float32)  # the model binarised these float16-rounded values
            assert np.array_equal(mask, amap >= value), path.name


def test_ddp_through_torchrun_shares_one_run(synthetic_root: Path, tmp_path: Path) -> None:
    """Also a per-split rule that reads the split's own maps: fitted once after both ranks predicted."""
    from hybridad.threshold_rules.split_scores import matched_threshold
    from hybridad.thresholds import ScoreStats

    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "hybridad",
          "train", *_args(synthetic_root, tmp_path), "threshold.test_private_mixed.method=split_matched"])
    run = _check_run(tmp_path, synthetic_root, SPLITS[1:])
    record = yaml.safe_load((run / "thresholds.yaml").read_text())
    mixed = record["splits"]["test_private_mixed"]
    assert mixed["method"] == "split_matched" and record["splits"]["test_private"]["value"] == record["value"]
    stats = {split: ScoreStats() for split in ("validation", "test_private_mixed")}
    for split, acc in stats.items():  # every rank's maps, read by one process
        for path in (run / "maps" / split).rglob("*.tiff"):
            acc.update(torch.from_numpy(tifffile.imread(path).astype(np.float32)))
    assert mixed["value"] == pytest.approx(matched_threshold(record["value"], *stats.values()), rel=1e-6)
    for path in (run / "maps" / "test_private_mixed").glob("*.tiff"):
        mask = cv2.imread(str(run / "masks" / "test_private_mixed" / f"{path.stem}.png"), cv2.IMREAD_UNCHANGED) > 0
        assert np.array_equal(mask, tifffile.imread(path).astype(np.float32) >= np.float32(mixed["value"]))


def test_ddp_through_slurm_variables_shares_one_run(synthetic_root: Path, tmp_path: Path) -> None:
    """Two local processes started as `srun` would start them: SLURM's variables, no launcher."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "SLURM_NTASKS": "2",
           "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_JOB_NAME": "hybridad",
           "SLURM_JOB_ID": "4242", "SLURM_NODELIST": "127.0.0.1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "HYBRIDAD_CLAIMED_RUN", "TORCHELASTIC_RUN_ID"):
        env.pop(key, None)
    command = [sys.executable, "-m", "hybridad", "train", *_args(synthetic_root, tmp_path)]
    procs = [subprocess.Popen(command, cwd=ROOT, env={**env, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (stdout, stderr) in zip(procs, outs):
        assert p.returncode == 0, stderr[-4000:]
    assert outs[0][0].strip().splitlines()[-1].startswith("run directory: ")
    _check_run(tmp_path, synthetic_root, SPLITS[1:])
