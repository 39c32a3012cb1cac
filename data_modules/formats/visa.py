"""`visa`: the VisA release, split by its CSV (`split_csv/1cls.csv`: object, split, label, image, mask).

    <root>/split_csv/1cls.csv                          rows name files relative to <root>
    <root>/<object>/Data/Images/{Normal,Anomaly}/*.JPG
    <root>/<object>/Data/Masks/Anomaly/*.png
    <root>/<object>/image_anno.csv                     optional: image, label (the defect type), mask

`label` is `normal` or `anomaly`; the defect type is the label of `<object>/image_anno.csv` when the release
has it, else `anomaly`. `data.layout.index` names another CSV of these columns (relative to <root>). No
validation split (carved from train), no private splits.
"""

from __future__ import annotations

import csv
from pathlib import Path

from data_modules.formats.common import LayoutConfig, Listing, make_sample
from hybridad.errors import UserError
from hybridad.types import Sample, Split

DEFAULT_INDEX = "split_csv/1cls.csv"
COLUMNS = ("object", "split", "label", "image", "mask")
SPLITS = {"train": Split.TRAIN, "test": Split.TEST_PUBLIC}


def _rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise UserError(f"VisA index {path} not found: data.root must hold the release's {DEFAULT_INDEX} "
                        "(or set data.layout.index)")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"{path} lacks column(s) {', '.join(missing)}: expected {', '.join(COLUMNS)}")
        return [{k: (v or "").strip() for k, v in row.items() if k} for row in reader]


def _defect_types(root: Path, category: str) -> dict[str, str]:
    """image path (relative to root) -> defect label from `<object>/image_anno.csv`, where the release has it."""
    path = root / category / "image_anno.csv"
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        return {(r.get("image") or "").strip(): (r.get("label") or "").strip() for r in csv.DictReader(f)}


def read(root: Path, category: str, layout: LayoutConfig) -> Listing:
    root = Path(root)
    index = root / (layout.index or DEFAULT_INDEX)
    rows = _rows(index)
    objects = sorted({r["object"] for r in rows})
    if category not in objects:
        raise UserError(f"{index} has no rows for object '{category}'; objects: {', '.join(objects)}")
    types = _defect_types(root, category)
    splits: dict[Split, list[Sample]] = {Split.TRAIN: [], Split.TEST_PUBLIC: []}
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        if row["object"] != category:
            continue
        where = f"{index} line {line}"
        split = SPLITS.get(row["split"].lower())
        if split is None:
            raise UserError(f"{where}: split '{row['split']}' is not train or test")
        label = row["label"].lower()
        if label not in ("normal", "anomaly"):
            raise UserError(f"{where}: label '{row['label']}' is not normal or anomaly")
        image = root / row["image"]
        if not row["image"] or not image.is_file():
            raise UserError(f"{where} names image {image}, which does not exist")
        name = Path(row["image"]).with_suffix("").name
        if label == "normal":
            splits[split].append(make_sample(category, split, image, None, "good", name))
            continue
        if split == Split.TRAIN:
            raise UserError(f"{where}: training image {image} is labelled anomaly; training uses normal images")
        mask = root / row["mask"] if row["mask"] else None
        if mask is None:
            raise UserError(f"{where}: anomalous image {image} has no mask (empty mask column)")
        if not mask.is_file():
            raise UserError(f"{where} names mask {mask}, which does not exist")
        defect = types.get(row["image"]) or "anomaly"
        splits[split].append(make_sample(category, split, image, mask, defect, f"{defect}/{name}"))
    for samples in splits.values():
        samples.sort(key=lambda s: (s.label, s.sample_id))
    return Listing(root / category, splits)
