"""Deep validation of a category's tree: `hybridad data check` and train's check before the first step."""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
from tqdm import tqdm

from data_modules.listing import decode_image, imread, list_samples, mask_to_binary, png_size
from hybridad.errors import UserError
from hybridad.types import GRAY_CATEGORIES, Sample, Split


def _check_sample(sample: Sample) -> tuple[int, int, int]:
    """Fully decode one image (and its mask): (H, W, channels); UserError naming the file on any problem."""
    png_size(sample.image_path)  # header + end marker first: the clearer message for a truncated file
    img = decode_image(sample.image_path)  # (H,W,C): decodes every row, so corrupt pixel data fails here
    h, w, c = img.shape
    if sample.mask_path is not None:
        png_size(sample.mask_path, "mask")
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


def validate_category(
    root: str | Path,
    category: str,
    splits: Iterable[Split | str] = tuple(Split),
    progress: bool = True,
    threads: int | None = None,
) -> str:
    """Decode every PNG of the listed splits fully and check sizes and masks.

    Checks: each image and mask decodes completely (truncated or corrupt pixel data fails); every image of the
    category has the size of the first one; each mask has its image's size and binary values (0 plus one of 1,
    255 or, 16-bit, 65535).

    Args:
        root: dataset root (`<root>/<category>/<split>/...`).
        category: MVTec AD 2 category.
        splits: the splits to check (a run checks those it will read).
        progress: show a tqdm bar per split.
        threads: decoding threads (default: CPU count, at most 16).

    Returns:
        A short summary: image size, gray or RGB, then images per split.

    Raises:
        UserError: on the first problem (in listing order), naming the file and the fix.
    """
    threads = threads or min(16, os.cpu_count() or 1)
    ref: tuple[Path, int, int] | None = None
    channels: set[int] = set()
    lines = []
    for split in [Split(s) for s in splits]:
        samples = list_samples(root, category, split)
        sizes = _decode_all(samples, f"check {category}/{split.value}", progress, threads)
        for s, (h, w, c) in zip(samples, sizes):
            channels.add(c)
            if ref is None:
                ref = (s.image_path, h, w)
            elif (h, w) != ref[1:]:
                raise UserError(
                    f"image {s.image_path} is {w}x{h} but {ref[0]} is {ref[2]}x{ref[1]}; all images of a "
                    "category must have one size (re-extract or remove the odd file)"
                )
        n_bad = sum(s.label == 1 for s in samples)
        public = split == Split.TEST_PUBLIC
        detail = f" ({len(samples) - n_bad} good, {n_bad} bad with masks)" if public else ""
        lines.append(f"  {split.value:<19} {len(samples):5d}{detail}")
    if ref is None:
        raise UserError(f"no split given to check for {category}")
    mode = "gray" if channels <= {1} else "RGB"
    expected = "gray" if category in GRAY_CATEGORIES else "RGB"
    note = "" if mode == expected else f" (MVTec AD 2 {category} is {expected})"
    head = (
        f"{category} at {Path(root) / category}: {ref[2]}x{ref[1]} {mode}{note}; every PNG decodes, "
        "sizes agree, masks binary and fit"
    )
    return "\n".join([head, *lines])


def check_dataset(root: str | Path, category: str) -> str:
    """`validate_category` over all five splits (what `hybridad data check` runs)."""
    return validate_category(root, category, tuple(Split))
