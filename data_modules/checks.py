"""`hybridad data check`: validate a category's tree before training."""

from __future__ import annotations

from pathlib import Path

from data_modules.listing import list_samples, png_size
from hybridad.errors import UserError
from hybridad.types import GRAY_CATEGORIES, Split


def check_dataset(root: str | Path, category: str) -> str:
    """List all five splits, read every PNG header (size, channels, completeness) and every mask's size.

    Returns:
        A short summary: images per split, image size, gray or RGB.

    Raises:
        UserError: on the first problem, naming the file.
    """
    ref: tuple[Path, int, int] | None = None
    channels: set[int] = set()
    lines = []
    for split in Split:
        samples = list_samples(root, category, split)
        for s in samples:
            h, w, c = png_size(s.image_path)
            channels.add(c)
            if ref is None:
                ref = (s.image_path, h, w)
            elif (h, w) != ref[1:]:
                msg = f"image {s.image_path} is {w}x{h} but {ref[0]} is {ref[2]}x{ref[1]}; sizes must match"
                raise UserError(msg)
            if s.mask_path is not None:
                mh, mw, _ = png_size(s.mask_path)
                if (mh, mw) != (h, w):
                    msg = f"mask {s.mask_path} is {mw}x{mh} but its image {s.image_path} is {w}x{h}"
                    raise UserError(msg)
        n_bad = sum(s.label == 1 for s in samples)
        detail = ""
        if split == Split.TEST_PUBLIC:
            detail = f" ({len(samples) - n_bad} good, {n_bad} bad with masks)"
        lines.append(f"  {split.value:<19} {len(samples):5d}{detail}")
    assert ref is not None
    mode = "gray" if channels <= {1, 2} else "RGB"
    expected = "gray" if category in GRAY_CATEGORIES else "RGB"
    note = "" if mode == expected else f" (MVTec AD 2 {category} is {expected})"
    head = f"{category} at {Path(root) / category}: {ref[2]}x{ref[1]} {mode}{note}; PNGs complete, masks fit"
    return "\n".join([head, *lines])


