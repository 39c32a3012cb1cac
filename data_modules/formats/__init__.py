"""Dataset layouts (`data.format`): one reader per layout, registered once in `READERS`.

A reader turns one category of a tree on disk into `Listing`: the samples of every split the layout has
(`train` and `test_public` always; `validation`, `test_private`, `test_private_mixed` where they exist), with
labels, mask pairing and each image's defect type. Everything downstream (the deep check, the DataModule,
evaluate, report) goes through `list_splits`, which also carves a seeded validation fraction out of the
normal training images when the layout has no validation split.

| format      | tree (one category)                                                                         |
|-------------|---------------------------------------------------------------------------------------------|
| `mvtec_ad2` | `<root>/<cat>/{train/good, validation/good, test_public/{good,bad,ground_truth/bad}, ...}`   |
| `mvtec_ad`  | `<root>/<cat>/{train/good, test/<type>, ground_truth/<type>/<stem>_mask.png}`               |
| `visa`      | `<root>/split_csv/1cls.csv` (object, split, label, image, mask) naming files below `<root>` |
| `realiad`   | `<root>/realiad_jsons/realiad_jsons/<cat>.json` naming files below `<root>/realiad_1024/<cat>` |
| `folder`    | `<root>/<cat>/{normal, abnormal[/<type>], masks, [normal_test]}` masks paired by stem        |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from data_modules.formats import folder, mvtec_ad, mvtec_ad2, realiad, visa
from data_modules.formats.common import LayoutConfig, Listing
from hybridad.errors import UserError
from hybridad.types import Sample, Split

if TYPE_CHECKING:
    from data_modules.datamodule import DataConfig

Reader = Callable[[Path, str, LayoutConfig], Listing]

# the one registration of every layout: `data.format` -> its reader
READERS: dict[str, Reader] = {
    "mvtec_ad2": mvtec_ad2.read,
    "mvtec_ad": mvtec_ad.read,
    "visa": visa.read,
    "realiad": realiad.read,
    "folder": folder.read,
}


def reader(fmt: str) -> Reader:
    """The reader of `data.format`; `UserError` naming the valid ones."""
    if fmt not in READERS:
        raise UserError(f"unknown data.format '{fmt}'; valid: {', '.join(READERS)}")
    return READERS[fmt]


def list_splits(data: DataConfig) -> Listing:
    """Every split of `data.category` in `data.format`, a validation split carved when the layout has none.

    Carving: `data.validation_fraction x N` rounded half up (at least 1) of the N normal training images,
    drawn with `data.validation_seed`, become the validation split; they are never trained on.

    Raises:
        UserError: unknown format, missing folder or index file, a row naming a missing file, a bad image
            without its mask or a mask without its image, two images with one name, no train/test images.
    """
    layout = data.layout if isinstance(data.layout, LayoutConfig) else LayoutConfig(**dict(data.layout))
    listing = reader(data.format)(Path(data.root), data.category, layout)
    for split in (Split.TRAIN, Split.TEST_PUBLIC):
        if not listing.splits.get(split):
            raise UserError(f"{data.category} ({data.format} layout at {listing.folder}) has no {split.value} "
                            "images")
    if Split.VALIDATION not in listing.splits:
        train, val = carve_validation(listing.splits[Split.TRAIN], data.validation_fraction, data.validation_seed)
        listing.splits[Split.TRAIN], listing.splits[Split.VALIDATION] = train, val
        listing.carved = val
        listing.splits = {s: listing.splits[s] for s in Split if s in listing.splits}  # train, validation, ...
    for samples in listing.splits.values():
        _check_unique(samples)
    return listing


def list_split(data: DataConfig, split: Split | str) -> list[Sample]:
    """The samples of one split; `UserError` if the layout does not have it."""
    split = Split(split)
    listing = list_splits(data)
    if split not in listing.splits:
        raise UserError(f"{data.category} ({data.format} layout at {listing.folder}) has no {split.value} split")
    return listing.splits[split]


def carve_validation(train: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(train, validation): a seeded `fraction` of the normal training images (at least 1) moved to validation."""
    n = len(train)
    k = max(1, int(n * fraction + 0.5))  # rounded half up
    if n - k < 1:
        where = train[0].image_path.parent if train else "?"
        raise UserError(f"{n} normal training image(s) in {where}: carving a validation split "
                        f"(data.validation_fraction={fraction}) needs at least 2")
    picked = set(np.random.default_rng(seed).permutation(n)[:k].tolist())
    keep = [s for i, s in enumerate(train) if i not in picked]
    val = [replace(s, split=Split.VALIDATION, sample_id="validation/" + s.sample_id.split("/", 1)[1])
           for i, s in enumerate(train) if i in picked]
    return keep, val


def _check_unique(samples: list[Sample]) -> None:
    seen: dict[str, Path] = {}
    for s in samples:
        if s.sample_id in seen:
            raise UserError(f"images {seen[s.sample_id]} and {s.image_path} get one name ({s.sample_id}): "
                            "rename one (same stem with another suffix, or in two folders of one type)")
        seen[s.sample_id] = s.image_path
