"""Under 2-process CPU DDP every (image, level, tile) is trained on exactly once per epoch.

The tiny tree has 4 train images x (1 + 4) tiles = 20 items and batch 5, so Lightning's DistributedSampler
gives each rank 10 items (no padding, since 20 is even) and the loader's drop_last drops nothing: the union of
both ranks must be every triple exactly once. Validation has 2 images, one per rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from hybridad.tile_grid import TileLevel, level_boxes

REPO = Path(__file__).resolve().parents[2]
H, W = 16, 32


def _write_tree(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("validation", 2)):
        folder = root / "can" / split / "good"
        folder.mkdir(parents=True)
        for i in range(n):
            cv2.imwrite(str(folder / f"{i:03d}_regular.png"), rng.integers(0, 256, (H, W, 3), dtype=np.uint8))


@pytest.mark.slow
def test_ddp_every_tile_exactly_once(tmp_path):
    _write_tree(tmp_path / "data")
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    script = REPO / "tests" / "integration" / "ddp_data_script.py"
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "data"), str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]

    boxes = level_boxes(H, W, TileLevel()) + level_boxes(H, W, TileLevel(2, 2))
    expected = {(f"train/good/{i:03d}_regular", *b) for i in range(4) for b in boxes}
    seen = [tuple(item) for r in ranks for item in r["train"]]
    assert len(expected) == 20
    assert Counter(seen) == Counter(expected)  # every triple once, none twice
    assert all(len(r["train"]) == 10 for r in ranks)  # split evenly across ranks
    assert all(r["shapes"] == [[5, 3, 16, 16]] for r in ranks)  # the hook ran: batch_size tiles of input_size
    val = [sid for r in ranks for sid in r["val"]]
    assert sorted(val) == ["validation/good/000_regular", "validation/good/001_regular"]
