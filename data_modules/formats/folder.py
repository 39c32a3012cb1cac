"""`folder`: plain folders of one product (anomalib's Folder idea), masks paired by stem.

    <root>/<category>/normal/*                  normal images: training (a seeded fraction: validation)
    <root>/<category>/abnormal/[<type>/...]*    defective test images; sub-folders are defect types
                                                (nested ones too: abnormal/scratch/deep -> 'scratch/deep')
    <root>/<category>/masks/[<type>/...]<stem>.png or <stem>_mask.png   one per abnormal image
    <root>/<category>/normal_test/*             optional normal test images (data.layout.normal_test)

Folder names come from `data.layout.{normal,abnormal,masks,normal_test}` (relative to <root>/<category>, or
absolute). Images directly in the abnormal folder get its name as defect type ('abnormal'). A mask is
looked up beside the
image's relative folder first, then at the top of the mask folder. No private splits.
"""

from __future__ import annotations

from pathlib import Path

from data_modules.formats.common import (
    LayoutConfig,
    Listing,
    check_orphan_masks,
    good_samples,
    images_in,
    make_sample,
    mask_index,
    pair_mask,
    require_dir,
)
from hybridad.types import Sample, Split

LAYOUT = "folder layout: <root>/<category>/{normal, abnormal[/<type>], masks[, normal_test]}"


def read(root: Path, category: str, layout: LayoutConfig) -> Listing:
    folder = require_dir(Path(root) / category, "category", LAYOUT)
    normal = require_dir(folder / layout.normal, "normal (data.layout.normal)", LAYOUT)
    abnormal = require_dir(folder / layout.abnormal, "abnormal (data.layout.abnormal)", LAYOUT)
    mask_dir = require_dir(folder / layout.masks, "mask (data.layout.masks)", LAYOUT)
    train = good_samples(category, Split.TRAIN, normal)
    test: list[Sample] = []
    if layout.normal_test:
        normal_test = require_dir(folder / layout.normal_test, "normal test (data.layout.normal_test)", LAYOUT)
        test += good_samples(category, Split.TEST_PUBLIC, normal_test)
    masks, used = mask_index(mask_dir), set()
    for p in images_in(abnormal, recursive=True):
        rel_folder = p.parent.relative_to(abnormal).as_posix()
        defect = abnormal.name if rel_folder == "." else rel_folder
        expected = mask_dir / rel_folder / f"{p.stem}.png"
        mask = pair_mask(masks, rel_folder, p, expected, used)
        test.append(make_sample(category, Split.TEST_PUBLIC, p, mask, defect, f"{defect}/{p.stem}"))
    check_orphan_masks(masks, used, str(abnormal))
    return Listing(folder, {Split.TRAIN: train, Split.TEST_PUBLIC: test})
