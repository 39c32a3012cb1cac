"""`realiad`: Real-IAD's per-category JSON split (as INP-Former's `RealIADDataset` reads it).

    <root>/realiad_jsons/realiad_jsons/<category>.json   {"train": [...], "test": [...]} (other keys ignored)
    <root>/realiad_1024/<category>/...                   the files the entries name

Each entry: `image_path` and `mask_path` relative to `<root>/realiad_1024/<category>/`, `anomaly_class`
(`OK` = normal, else the defect type, e.g. `AK`, `QS`). `data.layout.index` (JSON folder) and
`data.layout.images` (image folder) point elsewhere, both relative to <root> (e.g. realiad_256). No validation
split (carved from train), no private splits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from data_modules.formats.common import LayoutConfig, Listing, make_sample
from hybridad.errors import UserError
from hybridad.types import Sample, Split

DEFAULT_INDEX = "realiad_jsons/realiad_jsons"
DEFAULT_IMAGES = "realiad_1024"
NORMAL = "OK"


def _load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"Real-IAD index {path} not found: data.root must hold {DEFAULT_INDEX}/<category>.json "
                        "(or set data.layout.index)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("train", "test")):
        raise UserError(f"{path}: expected an object with 'train' and 'test' lists")
    return data


def read(root: Path, category: str, layout: LayoutConfig) -> Listing:
    root = Path(root)
    index = root / (layout.index or DEFAULT_INDEX) / f"{category}.json"
    data = _load(index)
    folder = root / (layout.images or DEFAULT_IMAGES) / category
    splits: dict[Split, list[Sample]] = {Split.TRAIN: [], Split.TEST_PUBLIC: []}
    for key, split in (("train", Split.TRAIN), ("test", Split.TEST_PUBLIC)):
        for i, entry in enumerate(data[key]):
            where = f"{index} {key}[{i}]"
            if not isinstance(entry, dict) or not entry.get("image_path") or not entry.get("anomaly_class"):
                raise UserError(f"{where}: expected image_path and anomaly_class")
            image = folder / str(entry["image_path"])
            if not image.is_file():
                raise UserError(f"{where} names image {image}, which does not exist")
            defect = str(entry["anomaly_class"])
            name = Path(str(entry["image_path"])).with_suffix("").name
            if defect == NORMAL:
                splits[split].append(make_sample(category, split, image, None, "good", name))
                continue
            if split == Split.TRAIN:
                raise UserError(f"{where}: training image {image} is anomalous ({defect}); training uses "
                                f"{NORMAL} images")
            if not entry.get("mask_path"):
                raise UserError(f"{where}: anomalous image {image} has no mask_path")
            mask = folder / str(entry["mask_path"])
            if not mask.is_file():
                raise UserError(f"{where} names mask {mask}, which does not exist")
            splits[split].append(make_sample(category, split, image, mask, defect, f"{defect}/{name}"))
    for samples in splits.values():
        samples.sort(key=lambda s: (s.label, s.sample_id))
    return Listing(folder, splits)
