"""Deep validation of a category in any layout: `hybridad data check` and train's check before the first step."""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
from tqdm import tqdm

from data_modules.datamodule import DataConfig
from data_modules.formats import list_splits
from data_modules.listing import decode_image, image_header, imread, mask_to_binary
from hybridad.errors import UserError
from hybridad.types import CATEGORIES, GRAY_CATEGORIES, Sample, Split


def _check_sample(sample: Sample) -> tuple[int, int, int]:
    """Fully decode one image (and its mask): (H, W, channels); UserError naming the file on any problem."""
    image_header(sample.image_path)  # header (+ PNG end marker) first: the clearer message for a truncated file
    img = decode_image(sample.image_path)  # (H,W,C): decodes every row, so corrupt pixel data fails here
    h, w, c = img.shape
    if sample.mask_path is not None:
        image_header(sample.mask_path, "mask")
        raw = imread(sample.mask_path, cv2.IMREAD_UNCHANGED)
        if raw is None:
            raise UserError(f"cannot decode mask {sample.mask_path} (truncated or corrupt PNG): re-extract")
        if raw.shape[:2] != (h, w):
            raise UserError(
                f"mask {sample.mask_path} is {raw.shape[1]}x{raw.shape[0]} but its image {sample.image_path} "
                f"is {w}x{h}; a mask must have its image's size"
            )
        mask_to_binary(raw, sample.mask_path)
    return h, w, c


def _decode_all(samples: list[Sample], desc: str, progress: bool, threads: int) -> list[tuple[int, int, int]]:
    """`_check_sample` over `samples` in a thread pool (cv2 releases the GIL); raises the first problem."""
    results: list[tuple[int, int, int]] = []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        try:
            bar = tqdm(pool.map(_check_sample, samples), total=len(samples), desc=desc, disable=not progress,
                       unit="img", leave=False)  # fmt: skip
            results.extend(bar)  # map yields in order, re-raising a worker's UserError at its sample
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return results


def validate_data(
    data: DataConfig,
    splits: Iterable[Split | str] | None = None,
    progress: bool = True,
    threads: int | None = None,
) -> str:
    """List `data.category` in `data.format` and decode every image and mask of the listed splits fully.

    Checks: the layout lists (missing folders, index rows naming missing files, bad images without masks,
    masks without images, unknown format: `data_modules.formats`); each image and mask decodes completely
    (truncated or corrupt pixel data fails); each mask has its image's size and binary values (0 plus one of
    1, 255 or, 16-bit, 65535); sizes: MVTec AD 2 images all have one size; in other layouts mixed sizes are
    read as they are (each image tiled on its own grid) unless `data.eval_batch_size` > 1 would stack them.

    Args:
        data: the run's data settings (root, category, format, layout, tiling, eval batch size).
        splits: the splits to check (a run checks those it reads); splits the layout lacks are skipped.
            Default: every split the layout has.
        progress: show a tqdm bar per split.
        threads: decoding threads (default: CPU count, at most 16).

    Returns:
        A short summary: image size, gray or RGB, then one line per split (images, good/bad, defect types).

    Raises:
        UserError: on the first problem (in listing order), naming the file and the fix.
    """
    threads = threads or min(16, os.cpu_count() or 1)
    listing = list_splits(data)
    wanted = [Split(s) for s in (splits if splits is not None else listing.splits)]
    ref: tuple[Path, int, int] | None = None
    channels: set[int] = set()
    sizes: set[tuple[int, int]] = set()
    lines = []
    category = data.category
    for split in wanted:
        samples = listing.splits.get(split)
        if not samples:
            continue  # a private split this layout does not have: nothing to predict
        decoded = _decode_all(samples, f"check {category}/{split.value}", progress, threads)
        for s, (h, w, c) in zip(samples, decoded):
            channels.add(c)
            sizes.add((h, w))
            if ref is None:
                ref = (s.image_path, h, w)
            elif listing.one_size and (h, w) != ref[1:]:
                raise UserError(
                    f"image {s.image_path} is {w}x{h} but {ref[0]} is {ref[2]}x{ref[1]}; all images of a "
                    "category must have one size (re-extract or remove the odd file)"
                )
        lines.append(f"  {split.value:<19} {len(samples):5d}{_split_detail(split, samples, listing.carved, data)}")
    if ref is None:
        raise UserError(f"no split given to check for {category}")
    if len(sizes) > 1 and data.eval_batch_size > 1:
        raise UserError(f"{category} has images of {len(sizes)} sizes but data.eval_batch_size="
                        f"{data.eval_batch_size} stacks images of one size: set data.eval_batch_size=1")
    mode = "gray" if channels <= {1} else "RGB"
    expected = "gray" if category in GRAY_CATEGORIES else "RGB"
    note = f" (MVTec AD 2 {category} is {expected})" if listing.one_size and category in CATEGORIES and \
        mode != expected else ""
    if len(sizes) == 1:
        size, agree = f"{ref[2]}x{ref[1]}", "sizes agree"
    else:
        lo, hi = min(sizes, key=lambda hw: hw[0] * hw[1]), max(sizes, key=lambda hw: hw[0] * hw[1])
        lv, s = data.tiling.test_level, data.tiling.input_size
        size = f"{len(sizes)} sizes ({lo[1]}x{lo[0]} to {hi[1]}x{hi[0]})"
        agree = (f"mixed sizes: each image is cut into its own {lv.cols}x{lv.rows} grid, every tile resized to "
                 f"{s}x{s}, maps stitched back at the image's own size; training decodes each image (no cache)")
    head = (f"{category} ({data.format}) at {listing.folder}: {size} {mode}{note}; every image decodes, {agree}, "
            "masks binary and fit")
    return "\n".join([head, *lines])


def _split_detail(split: Split, samples: list[Sample], carved: list[Sample], data: DataConfig) -> str:
    """What a summary line says beyond the count: good/bad and defect types, or where validation came from."""
    if split == Split.VALIDATION and carved:
        return (f" (carved from train: data.validation_fraction={data.validation_fraction}, "
                f"data.validation_seed={data.validation_seed})")
    if split != Split.TEST_PUBLIC:
        return ""
    n_bad = sum(s.label == 1 for s in samples)
    types: dict[str, int] = {}
    for s in samples:
        if s.label == 1 and s.defect_type not in ("", "bad"):
            types[s.defect_type] = types.get(s.defect_type, 0) + 1
    listed = "; types: " + ", ".join(f"{t} {n}" for t, n in sorted(types.items())) if types else ""
    return f" ({len(samples) - n_bad} good, {n_bad} bad with masks{listed})"


def validate_category(
    root: str | Path,
    category: str,
    splits: Iterable[Split | str] = tuple(Split),
    progress: bool = True,
    threads: int | None = None,
) -> str:
    """`validate_data` of an MVTec AD 2 tree (`<root>/<category>/<split>/...`)."""
    return validate_data(DataConfig(root=str(root), category=category), splits, progress, threads)


def check_dataset(root: str | Path, category: str, data: DataConfig | None = None) -> str:
    """`validate_data` over every split the layout has (what `hybridad data check` runs); `data` gives the
    format and layout (default: MVTec AD 2)."""
    data = data or DataConfig()
    data.root, data.category = str(root), category
    return validate_data(data, None)
