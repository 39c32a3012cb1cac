"""Training data throughput on the CPU: DataLoader (decode, collate) and the device hook (tiles, cut-paste).

A synthetic tree of a few smooth, noisy RGB images is written to a temporary folder; one training epoch of
(image, level, tile) triples is read with batch 16 tiles at input 448 over two pyramid levels (1x1 and 2x2),
with cut-paste off and on. Figures are tiles per second; the hook runs on the CPU here (a GPU does it faster).

    python -m bench.bench_data
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from data_modules.cut_paste import CutPasteConfig
from data_modules.datamodule import DataConfig, MVTecAD2DataModule
from data_modules.tilers import TilingConfig
from hybridad.tile_grid import TileLevel


def _write_tree(root: Path, n: int, height: int, width: int) -> None:
    """n train images (smooth gradient + noise, PNG-compressible like real photos) and 1 validation image."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    for split, count in (("train", n), ("validation", 1)):
        folder = root / "can" / split / "good"
        folder.mkdir(parents=True)
        for i in range(count):
            base = 90 + 60 * np.sin(xx / (40 + 5 * i)) * np.cos(yy / 70)  # (H,W)
            img = base[..., None] + rng.normal(0, 6, (height, width, 3))  # (H,W,3)
            cv2.imwrite(str(folder / f"{i:03d}_regular.png"), np.clip(img, 0, 255).astype(np.uint8))


def _epoch(dm: MVTecAD2DataModule, hook: bool) -> tuple[int, float, float]:
    """One epoch: (tiles, total seconds, seconds spent in the hook)."""
    tiles, hook_s = 0, 0.0
    t0 = time.perf_counter()
    for step, batch in enumerate(dm.train_dataloader()):
        if hook:
            t1 = time.perf_counter()
            gen = torch.Generator().manual_seed(step)
            batch = dm.train_transform(batch, gen)
            hook_s += time.perf_counter() - t1
        tiles += len(batch)
    return tiles, time.perf_counter() - t0, hook_s


def run(
    n_images: int = 16, height: int = 512, width: int = 1024, batch_size: int = 16, input_size: int = 448,
    num_workers: int = 0,
) -> list[dict]:  # fmt: skip
    """Measure loader-only and loader+hook throughput with cut-paste off and on; one row per variant."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        _write_tree(Path(tmp), n_images, height, width)
        levels = [TileLevel(), TileLevel(2, 2)]
        for cut_paste in (False, True):
            cfg = DataConfig(
                root=tmp, category="can", batch_size=batch_size, num_workers=num_workers,
                tiling=TilingConfig(input_size=input_size, train_levels=levels, test_level=TileLevel(2, 2)),
                cut_paste=CutPasteConfig(enabled=cut_paste),
            )  # fmt: skip
            dm = MVTecAD2DataModule(cfg, seed=0)
            variants = [("loader+hook", True)] if cut_paste else [("loader", False), ("loader+hook", True)]
            for name, hook in variants:
                tiles, seconds, hook_s = _epoch(dm, hook)
                rows.append(
                    dict(
                        variant=name,
                        cut_paste=cut_paste,
                        image=f"{width}x{height}",
                        tiles=tiles,
                        tiles_per_s=round(tiles / seconds, 1),
                        hook_ms_per_batch=round(1000 * hook_s / (tiles // batch_size), 1) if hook else None,
                        workers=num_workers,
                        threads=torch.get_num_threads(),
                    )
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    rows = run(n_images=args.images, num_workers=args.workers)
    cols = list(rows[0])
    print(" | ".join(f"{c:>17}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r[c]!s:>17}" for c in cols))


if __name__ == "__main__":
    main()
