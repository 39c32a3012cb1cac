"""`mvtec_ad2`: MVTec AD 2's release layout (`data_modules.listing`), any category name.

    <root>/<category>/train/good/*.png, validation/good/*.png, test_public/{good,bad}/*.png,
    test_public/ground_truth/bad/<stem>_mask.png, test_private/*.png, test_private_mixed/*.png

`validation/` and the private splits are optional: without `validation/` a seeded fraction of train is
carved (`list_splits`); without private folders nothing is predicted for them.
"""

from __future__ import annotations

from pathlib import Path

from data_modules.formats.common import LayoutConfig, Listing
from data_modules.listing import category_dir, list_samples
from hybridad.errors import UserError
from hybridad.types import PRIVATE_SPLITS, Split


def read(root: Path, category: str, layout: LayoutConfig) -> Listing:
    folder = category_dir(root, category)
    splits = {s: list_samples(root, category, s) for s in (Split.TRAIN, Split.TEST_PUBLIC)}
    for split in (Split.VALIDATION, *PRIVATE_SPLITS):
        if (folder / split.value).is_dir():
            splits[split] = list_samples(root, category, split)
    bad = {s.image_path.stem for s in splits[Split.TEST_PUBLIC] if s.label == 1}
    for mask in sorted((folder / "test_public" / "ground_truth" / "bad").glob("*_mask.png")):
        if mask.name[: -len("_mask.png")] not in bad:
            raise UserError(f"mask {mask} has no image: expected {folder}/test_public/bad/"
                            f"{mask.name[: -len('_mask.png')]}.png")
    ordered = dict(sorted(splits.items(), key=lambda kv: list(Split).index(kv[0])))
    return Listing(folder, ordered, one_size=True)
