"""`mvtec_ad`: MVTec AD's release layout (and MVTec-style sets: MPDD, BTAD, VisA converted by INP-Former).

    <root>/<category>/train/good/*.{png,jpg,bmp,...}
    <root>/<category>/test/good/*                      normal test images
    <root>/<category>/test/<type>/[<sub>/]*            defective images; the first folder is the defect type
    <root>/<category>/ground_truth/<type>/[<sub>/]<stem>_mask.png   (or <stem>.png)

Read as MVTec AD's own release and INP-Former's `MVTecDataset` read it; suffixes in any case (`.JPG`, `.bmp`).
No validation split (carved from train by `list_splits`), no private splits.
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

LAYOUT = "mvtec_ad layout: <root>/<category>/{train/good, test/<type>, ground_truth/<type>/<stem>_mask.png}"


def read(root: Path, category: str, layout: LayoutConfig) -> Listing:
    folder = require_dir(Path(root) / category, "category", LAYOUT)
    train_dir = require_dir(folder / "train" / "good", "training", LAYOUT)
    train = good_samples(category, Split.TRAIN, train_dir)
    test_dir = require_dir(folder / "test", "test", LAYOUT)
    gt_dir = folder / "ground_truth"
    masks, used = mask_index(gt_dir), set()
    test: list[Sample] = []
    for type_dir in sorted(p for p in test_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        defect = type_dir.name
        for p in images_in(type_dir, recursive=True):
            rel = p.relative_to(type_dir).with_suffix("").as_posix()
            if defect == "good":
                test.append(make_sample(category, Split.TEST_PUBLIC, p, None, "good", rel))
                continue
            rel_folder = p.parent.relative_to(test_dir).as_posix()
            expected = gt_dir / rel_folder / f"{p.stem}_mask.png"
            mask = pair_mask(masks, rel_folder, p, expected, used)
            test.append(make_sample(category, Split.TEST_PUBLIC, p, mask, defect, f"{defect}/{rel}"))
    check_orphan_masks(masks, used, f"{test_dir}/<type>/")
    return Listing(folder, {Split.TRAIN: train, Split.TEST_PUBLIC: test})
