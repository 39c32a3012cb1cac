"""Training data feed at true MVTec AD 2 sizes: tiles/s of the loader against full-PNG decodes/s, one run.

For each category, a few synthetic images (smooth pattern + noise, about as compressible as the real photos;
gray for gray categories) are written as PNG at the category's native size, and the category's winning tiling
and augmentations are read from `experiments/categories/<category>.yaml`. Measured side by side:

- `decodes/s`: full-PNG decodes per second, one thread, in the main process.
- `before` (main's former path): every item decodes its whole PNG (one-image memo), augments the whole native
  image and ships it to the device; shuffled batches rarely reuse the memo.
- `after` (decoded cache): the split is decoded once into a uint8 memmap (`data_modules/cache.py`); each item
  slices its tile box, augments the tile and ships only the tile crop.

Both read shuffled epochs of (image, level, tile) triples with `--workers` DataLoader workers and batch 16.
`ratio` = tiles/s from epoch 2 on / decodes/s (the target is >= 5, aim 10). `MB/step` is what one batch
carries to the device. `hook ms/step` is the after path's device hook (resize + cut-paste) run on this CPU.

    python -m bench --only data        python -m bench.bench_data --categories can --images 8
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from data_modules.augment import AugmentConfig
from data_modules.cut_paste import CutPasteConfig
from data_modules.datamodule import DataConfig, MVTecAD2DataModule
from data_modules.dataset import MVTecAD2Dataset, _seed_worker
from data_modules.listing import decode_image, list_samples
from data_modules.tilers import TilingConfig
from hybridad.tile_grid import TileLevel
from hybridad.types import GRAY_CATEGORIES, Batch

REPO = Path(__file__).resolve().parents[1]
NATIVE_SIZE = {  # (W, H) of MVTec AD 2 images
    "can": (2232, 1024), "fabric": (2448, 2048), "fruit_jelly": (2100, 1520), "rice": (2448, 2048),
    "sheet_metal": (4224, 1056), "vial": (1400, 1900), "wallplugs": (2448, 2048), "walnuts": (2448, 2048),
}  # fmt: skip
DEFAULT_CATEGORIES = ("can", "fabric", "sheet_metal")


def winning_data_config(category: str) -> tuple[list[TileLevel], AugmentConfig]:
    """Training levels and augmentations of `experiments/categories/<category>.yaml`."""
    yaml = OmegaConf.load(REPO / "experiments" / "categories" / f"{category}.yaml")
    data = OmegaConf.merge(OmegaConf.structured(DataConfig), yaml.get("data", {}))
    cfg: DataConfig = OmegaConf.to_object(data)  # type: ignore[assignment]
    return list(cfg.tiling.train_levels), cfg.augment


def _write_images(folder: Path, n: int, width: int, height: int, gray: bool) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    folder.mkdir(parents=True)
    for i in range(n):
        base = 110 + 60 * np.sin(xx / (40 + 5 * i)) * np.cos(yy / 70)  # (H,W)
        shape = (height, width) if gray else (height, width, 3)
        img = (base if gray else base[..., None]) + rng.normal(0, 6, shape)
        cv2.imwrite(str(folder / f"{i:03d}_regular.png"), np.clip(img, 0, 255).astype(np.uint8))


class _WholeImageItems(MVTecAD2Dataset):
    """Main's former training item: the whole decoded, augmented native image plus its tile box."""

    def __getitem__(self, idx: int) -> dict[str, Any]:
        i, _, _, box = self.triples[idx]  # type: ignore[index]
        img = self._decode(i)  # (H,W,3): a PNG decode unless the previous item was the same image
        if self.augment is not None:
            img = self.augment(img)
        image = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)  # (3,H,W)
        return {"image": image, "tile_box": torch.tensor(box), "sample_id": self.samples[i].sample_id}


def _collate_whole(items: list[dict[str, Any]]) -> Batch:
    return Batch(
        image=torch.stack([it["image"] for it in items]),  # (B,3,H,W) native
        label=torch.zeros(len(items), dtype=torch.long), sample_id=[it["sample_id"] for it in items],
        split=[it["split"] for it in items],
        lighting=["regular"] * len(items), tile_box=torch.stack([it["tile_box"] for it in items]),
    )  # fmt: skip


def _batch_bytes(batch: Batch) -> int:
    images = batch.image if isinstance(batch.image, list) else [batch.image]
    return sum(t.numel() * t.element_size() for t in images)


def _epochs(loader: DataLoader, epochs: int) -> tuple[list[float], float]:
    """Tiles/s of each epoch and the mean MB per batch."""
    rates, mb = [], []
    for _ in range(epochs):
        tiles, t0 = 0, time.perf_counter()
        for batch in loader:
            tiles += len(batch)
            mb.append(_batch_bytes(batch) / 2**20)
        rates.append(tiles / (time.perf_counter() - t0))
    return rates, float(np.mean(mb))


def _decodes_per_s(paths: list[Path], passes: int = 2) -> float:
    t0 = time.perf_counter()
    for _ in range(passes):
        for p in paths:
            decode_image(p)
    return passes * len(paths) / (time.perf_counter() - t0)


def _bench_category(
    category: str, root: Path, n_images: int, epochs: int, workers: int, batch_size: int, input_size: int
) -> list[dict]:
    width, height = NATIVE_SIZE[category]
    _write_images(root / category / "train" / "good", n_images, width, height, category in GRAY_CATEGORIES)
    levels, augment = winning_data_config(category)
    samples = list_samples(root, category, "train")
    decodes = _decodes_per_s([s.image_path for s in samples])
    tiling = TilingConfig(input_size=input_size, train_levels=levels, test_level=levels[-1])
    cfg = DataConfig(
        root=str(root), category=category, batch_size=batch_size, num_workers=workers, tiling=tiling,
        augment=augment, cut_paste=CutPasteConfig(enabled=True), cache_dir=str(root / "cache"),
    )  # fmt: skip
    dm = MVTecAD2DataModule(cfg, seed=0)
    t0 = time.perf_counter()
    cache = dm.decoded_cache("train", progress=False)
    build_s = time.perf_counter() - t0
    loader_args = dict(batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers,
                       persistent_workers=workers > 0, worker_init_fn=_seed_worker)  # fmt: skip
    before = _WholeImageItems(samples, levels, augment, seed=0)
    rows = []
    levels_txt = " + ".join(f"{lv.cols}x{lv.rows}" for lv in levels)
    tiles_per_image = len(before) // len(samples)
    for path, loader, n_epochs in (
        ("before: decode per tile", DataLoader(before, collate_fn=_collate_whole, **loader_args), 2),
        ("after: decoded cache", dm.train_dataloader(), epochs),
    ):
        rates, mb = _epochs(loader, n_epochs)  # the before path's rate does not change after epoch 2
        steady = float(np.mean(rates[1:])) if len(rates) > 1 else rates[0]
        row = dict(
            category=category, image=f"{width}x{height}", levels=levels_txt, tiles_per_image=tiles_per_image,
            path=path, workers=workers, decodes_per_s=round(decodes, 1),
            epoch1_tiles_per_s=round(rates[0], 1), tiles_per_s=round(steady, 1),
            ratio=round(steady / decodes, 1), mb_per_step=round(mb, 1),
        )  # fmt: skip
        if path.startswith("after"):
            batch = next(iter(loader))
            t1 = time.perf_counter()
            dm.train_transform(batch, torch.Generator().manual_seed(0))
            row.update(hook_ms_per_step=round(1000 * (time.perf_counter() - t1)),
                       cache_gib=round(cache.nbytes / 2**30, 3), cache_build_s=round(build_s, 1))  # fmt: skip
        rows.append(row)
        del loader
    return rows


def run(
    categories: tuple[str, ...] = DEFAULT_CATEGORIES, n_images: int = 8, epochs: int = 3, workers: int = 2,
    batch_size: int = 16, input_size: int = 448,
) -> list[dict]:  # fmt: skip
    """One 'before' and one 'after' row per category (see the module docstring)."""
    torch.set_num_threads(1)
    rows = []
    for category in categories:
        with tempfile.TemporaryDirectory() as tmp:
            rows += _bench_category(category, Path(tmp), n_images, epochs, workers, batch_size, input_size)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--categories", nargs="*", default=list(DEFAULT_CATEGORIES), choices=list(NATIVE_SIZE))
    parser.add_argument("--images", type=int, default=8, help="synthetic train images per category")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    from bench.table import markdown_table

    print(markdown_table(run(tuple(args.categories), args.images, args.epochs, args.workers)))


if __name__ == "__main__":
    main()
