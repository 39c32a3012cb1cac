"""The photo threshold yardstick: deterministic trees with exact counts, masks that mark every change."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from data_modules.photos import (
    BANDS,
    FAMILIES,
    NOVEL_FAMILIES,
    SIDE,
    PhotoCounts,
    read_manifest,
    render_bad,
    render_normal,
    write_photo_dataset,
)
from hybridad.errors import UserError


def test_tree_counts_manifest_and_determinism(tmp_path: Path) -> None:
    counts = PhotoCounts(train=3, validation=2, public_good=2, bad_per_family=1, private=1)
    roots = write_photo_dataset(tmp_path / "a", ["brick"], counts=counts)
    tree = roots["brick"] / "fabric"
    n = {d: len(list((tree / d).glob("*.png"))) for d in
         ("train/good", "validation/good", "test_public/good", "test_public/bad", "test_public/ground_truth/bad",
          "test_private", "test_private_mixed")}
    assert n == {"train/good": 3, "validation/good": 2, "test_public/good": 2, "test_public/bad": len(FAMILIES),
                 "test_public/ground_truth/bad": len(FAMILIES), "test_private": 1, "test_private_mixed": 1}
    manifest = read_manifest(roots["brick"])
    assert sorted(manifest.values()) == sorted(FAMILIES)  # one bad image per family
    again = write_photo_dataset(tmp_path / "b", ["brick"], counts=counts)["brick"] / "fabric"
    for f in sorted(tree.rglob("*.png")):
        assert f.read_bytes() == (again / f.relative_to(tree)).read_bytes(), f
    img = cv2.imread(str(tree / "train/good/000_regular.png"), cv2.IMREAD_UNCHANGED)
    assert img.shape == (SIDE, SIDE, 3) and img.dtype == np.uint8
    assert json.loads((roots["brick"] / "manifest.json").read_text())["test_public/bad/000_regular"]["family"] \
        == FAMILIES[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_defect_changes_only_its_mask_and_crops_are_real_photo_pixels(family: str) -> None:
    import skimage.data

    img, mask, defect = render_bad("gravel", family, 0)
    assert img.shape == mask.shape == (SIDE, SIDE) and mask.any() and defect.family == family
    assert 0.15 <= defect.strength <= 1.0
    # the same crop without the defect: find it in the photo's test band (no resampling, exact pixels)
    src = skimage.data.gravel()
    lo, hi = BANDS["test"]
    outside = ~mask
    hits = [(y, x) for y in range(lo, hi - SIDE + 1) for x in range(0, src.shape[1] - SIDE + 1)
            if np.array_equal(src[y : y + SIDE, x : x + SIDE][outside], img[outside])]
    assert len(hits) >= 1  # outside the mask the image is the normal crop, pixel for pixel
    y, x = hits[0]
    assert (src[y : y + SIDE, x : x + SIDE][mask] != img[mask]).mean() > (0.05 if family in NOVEL_FAMILIES else 0.5)


def test_split_bands_are_disjoint_and_unknown_names_are_user_errors() -> None:
    spans = sorted(BANDS.values())
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert render_normal("grass", "validation", 3).shape == (SIDE, SIDE)
    with pytest.raises(UserError, match="texture"):
        render_normal("marble", "train", 0)
    with pytest.raises(UserError, match="family"):
        render_bad("brick", "rust", 0)


def test_colour_photo_becomes_its_luminance_and_old_textures_keep_their_crops() -> None:
    import skimage.data

    from data_modules.photos import TEXTURES, normal_crop
    from data_modules.photos import _rng as photo_rng

    grey = cv2.cvtColor(skimage.data.immunohistochemistry(), cv2.COLOR_RGB2GRAY)  # (512,512) uint8
    crop, x0, y0 = normal_crop("immunohistochemistry", "validation", photo_rng(0, "immunohistochemistry",
                                                                              "validation", 2))
    assert crop.shape == (SIDE, SIDE) and BANDS["validation"][0] <= y0 <= BANDS["validation"][1] - SIDE
    np.testing.assert_array_equal(np.round(crop * 255).astype(np.uint8), grey[y0 : y0 + SIDE, x0 : x0 + SIDE])
    # textures added later are appended: the first three keep their seeds, hence their crops
    assert TEXTURES[:3] == ("brick", "grass", "gravel")
    assert render_normal("moon", "train", 0).shape == (SIDE, SIDE)


def test_larger_photograph_gives_its_centre() -> None:
    import skimage.data

    from data_modules.photos import normal_crop
    from data_modules.photos import _rng as photo_rng

    grey = cv2.cvtColor(skimage.data.hubble_deep_field(), cv2.COLOR_RGB2GRAY)  # (872,1000) uint8
    centre = grey[180:692, 244:756]  # rows (872 - 512) / 2.., columns (1000 - 512) / 2..
    crop, x0, y0 = normal_crop("hubble_deep_field", "test", photo_rng(0, "hubble_deep_field", "test", 1))
    assert BANDS["test"][0] <= y0 <= BANDS["test"][1] - SIDE and 0 <= x0 <= 512 - SIDE
    np.testing.assert_array_equal(np.round(crop * 255).astype(np.uint8), centre[y0 : y0 + SIDE, x0 : x0 + SIDE])
