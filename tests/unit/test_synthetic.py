"""The synthetic MVTec AD 2 generator: layout, naming, counts, determinism, masks, lighting, CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from data_modules.synthetic import PUBLIC_LIGHTINGS, category_size, render, write_synthetic_dataset
from hybridad.errors import UserError
from hybridad.types import CATEGORIES, GRAY_CATEGORIES

REPO = Path(__file__).resolve().parents[2]

# spec/mvtec_ad2.md table 1.1, typed in again here:
# (train, val, public good, public bad, private, private mixed)
TABLE = {
    "can": (412, 46, 72, 90, 321, 321),
    "fabric": (387, 43, 66, 90, 314, 314),
    "fruit_jelly": (263, 37, 20, 60, 255, 255),
    "rice": (313, 35, 42, 90, 277, 277),
    "sheet_metal": (137, 19, 24, 90, 142, 142),
    "vial": (291, 41, 35, 105, 276, 276),
    "wallplugs": (293, 33, 60, 90, 232, 232),
    "walnuts": (432, 48, 60, 90, 228, 228),
}
NATIVE = {
    "can": (2232, 1024),
    "fabric": (2448, 2048),
    "fruit_jelly": (2100, 1520),
    "rice": (2448, 2048),
    "sheet_metal": (4224, 1056),
    "vial": (1400, 1900),
    "wallplugs": (2448, 2048),
    "walnuts": (2448, 2048),
}


def _read(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert img is not None, path
    return img


def _files(tree: Path) -> set[str]:
    return {p.relative_to(tree).as_posix() for p in tree.rglob("*") if p.is_file()}


def _split_counts(tree: Path) -> tuple[int, ...]:
    def n(folder: str) -> int:
        return len(list((tree / folder).glob("*.png")))

    return (
        n("train/good"),
        n("validation/good"),
        n("test_public/good"),
        n("test_public/bad"),
        n("test_private"),
        n("test_private_mixed"),
    )


def test_layout_and_names_one_category(synthetic_root: Path) -> None:
    stems = [
        f"{i:03d}_{t}"
        for i, t in enumerate(("regular", "overexposed", "underexposed", "shift_1", "shift_2", "shift_3"))
    ]
    expected = {f"train/good/{i:03d}_regular.png" for i in range(8)}
    expected |= {f"validation/good/{i:03d}_regular.png" for i in range(4)}
    expected |= {f"test_public/good/{s}.png" for s in stems[:4]}
    expected |= {f"test_public/bad/{s}.png" for s in stems}
    expected |= {f"test_public/ground_truth/bad/{s}_mask.png" for s in stems}
    expected |= {f"test_private/{i:03d}_regular.png" for i in range(6)}
    expected |= {f"test_private_mixed/{i:03d}_mixed.png" for i in range(6)}
    assert _files(synthetic_root / "can") == expected
    assert sorted(p.name for p in synthetic_root.iterdir()) == ["can", "sheet_metal", "vial"]  # no .tmp left


def test_sizes_channels_and_masks_every_category(synthetic_root_all: Path) -> None:
    for category in CATEGORIES:
        nw, nh = NATIVE[category]
        w, h = round(nw * 64 / max(nw, nh)), round(nh * 64 / max(nw, nh))
        tree = synthetic_root_all / category
        masks = sorted((tree / "test_public/ground_truth/bad").glob("*.png"))
        images = [p for p in tree.rglob("*.png") if "ground_truth" not in p.parts]
        assert len(images) == 8 + 4 + 4 + 6 + 6 + 6 and len(masks) == 6
        for path in images:
            img = _read(path)
            assert img.dtype == np.uint8
            assert img.shape == ((h, w) if category in GRAY_CATEGORIES else (h, w, 3)), (category, path.name)
        bad_stems = sorted(p.stem for p in (tree / "test_public/bad").glob("*.png"))
        assert [m.name.removesuffix("_mask.png") for m in masks] == bad_stems
        for path in masks:
            mask = _read(path)
            assert mask.shape == (h, w) and mask.dtype == np.uint8
            assert set(np.unique(mask)) == {0, 255}, path  # binary and never empty
            assert (mask > 0).mean() < 0.25


def test_categories_look_different(synthetic_root_all: Path) -> None:
    small = []
    for category in CATEGORIES:
        img = cv2.imread(str(synthetic_root_all / category / "train/good/000_regular.png"), cv2.IMREAD_COLOR)
        small.append(cv2.resize(img, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32))
    for i in range(len(small)):
        for j in range(i + 1, len(small)):
            assert np.abs(small[i] - small[j]).mean() > 8.0, (CATEGORIES[i], CATEGORIES[j])


def test_training_images_differ_but_stay_similar(synthetic_root: Path) -> None:
    for category in ("can", "vial", "sheet_metal"):
        imgs = [
            _read(p).astype(np.float32) for p in sorted((synthetic_root / category / "train/good").glob("*"))
        ]
        for other in imgs[1:]:
            assert not np.array_equal(imgs[0], other)
            assert abs(imgs[0].mean() - other.mean()) < 10.0


@pytest.fixture(scope="module")
def official_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All 8 categories with the official counts at 16 x 8 px (about 8700 tiny files, a few seconds)."""
    root = tmp_path_factory.mktemp("official")
    write_synthetic_dataset(root, size=(16, 8), counts="official", verbose=False)
    return root


@pytest.mark.parametrize("category", CATEGORIES)
def test_official_counts(official_root: Path, category: str) -> None:
    tree = official_root / category
    assert _split_counts(tree) == TABLE[category]
    assert len(list((tree / "test_public/ground_truth/bad").glob("*_mask.png"))) == TABLE[category][3]


def test_official_lighting_tags_cycle(official_root: Path) -> None:
    bad = sorted(p.stem for p in (official_root / "sheet_metal/test_public/bad").glob("*.png"))
    assert bad[:7] == [
        "000_regular",
        "001_overexposed",
        "002_underexposed",
        "003_shift_1",
        "004_shift_2",
        "005_shift_3",
        "006_regular",
    ]
    assert bad[-1] == "089_shift_3"
    good = sorted(p.stem for p in (official_root / "sheet_metal/test_public/good").glob("*.png"))
    assert good[0] == "000_regular" and good[-1] == "023_shift_3"


def test_same_seed_is_byte_identical_other_seed_differs(tmp_path: Path) -> None:
    def tree_bytes(root: Path, seed: int) -> dict[str, bytes]:
        write_synthetic_dataset(root, ["can", "wallplugs"], size=(48, 24), seed=seed, verbose=False)
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*.png")}

    a, b, c = tree_bytes(tmp_path / "a", 0), tree_bytes(tmp_path / "b", 0), tree_bytes(tmp_path / "c", 1)
    assert a == b
    assert a.keys() == c.keys()
    assert sum(a[k] != c[k] for k in a) > 0.9 * len(a)


def test_written_masks_are_exactly_the_changed_pixels(synthetic_root: Path) -> None:
    for category in ("can", "vial", "sheet_metal"):
        tree = synthetic_root / category
        size = category_size(category, 96)
        for i, lighting in enumerate(PUBLIC_LIGHTINGS):
            out = render(
                category, size, seed=0, stream="test_public/bad", index=i, lighting=lighting, defective=True
            )
            written = _read(tree / f"test_public/bad/{i:03d}_{lighting}.png")
            mask = _read(tree / f"test_public/ground_truth/bad/{i:03d}_{lighting}_mask.png")
            assert np.array_equal(written, out.image.squeeze(-1) if out.image.shape[-1] == 1 else out.image)
            clean = out.clean.reshape(out.image.shape)  # (H, W, C)
            changed = np.any(out.image != clean, axis=-1)  # (H, W)
            assert np.array_equal(changed, mask > 0)
            assert np.array_equal(out.image[~changed], clean[~changed])  # outside: the defect-free render
            assert mask.any()


@pytest.mark.parametrize("category", CATEGORIES)
def test_mask_matches_changes_under_every_lighting(category: str) -> None:
    size = category_size(category, 64)
    for i, lighting in enumerate(PUBLIC_LIGHTINGS):
        out = render(
            category, size, seed=3, stream="test_public/bad", index=i, lighting=lighting, defective=True
        )
        clean_again = render(category, size, seed=3, stream="test_public/bad", index=i, lighting=lighting)
        assert np.array_equal(out.clean, clean_again.image)  # clean and defective share the RNG state
        inside = out.mask > 0
        assert inside.any()
        assert np.all(np.any(out.image[inside] != out.clean[inside], axis=-1))
        assert np.array_equal(out.image[~inside], out.clean[~inside])


def test_tiny_defects_exist(synthetic_root: Path) -> None:
    areas = []
    for mask_path in synthetic_root.glob("*/test_public/ground_truth/bad/*_mask.png"):
        _, _, stats, _ = cv2.connectedComponentsWithStats(_read(mask_path), connectivity=8)
        areas += list(stats[1:, cv2.CC_STAT_AREA])
    assert min(areas) < 30
    # and at the 256 px default, some components are 2-6 px across
    boxes = []
    for i in range(6):
        out = render(
            "fabric", category_size("fabric", 256), stream="test_public/bad", index=i, defective=True
        )
        _, _, stats, _ = cv2.connectedComponentsWithStats(out.mask, connectivity=8)
        boxes += [max(s[cv2.CC_STAT_WIDTH], s[cv2.CC_STAT_HEIGHT]) for s in stats[1:]]
    assert any(2 <= b <= 6 for b in boxes), boxes


def test_lighting_known_answers() -> None:
    size = category_size("can", 64)
    imgs = {
        t: render("can", size, stream="train", index=2, lighting=t).image.astype(np.float32)
        for t in PUBLIC_LIGHTINGS
    }
    regular = imgs["regular"]
    # both are rint() of the same float image: rint(0.6 f) vs 0.6 rint(f) differ by at most 0.8
    assert np.abs(imgs["underexposed"] - 0.6 * regular).max() <= 0.8 + 1e-6
    over = np.clip(1.4 * regular + 20.0, 0, 255)
    assert np.abs(imgs["overexposed"] - over).max() <= 1.4 * 0.5 + 0.5 + 1e-6
    for t in ("shift_1", "shift_2", "shift_3"):
        assert np.abs(imgs[t] - regular).mean() > 3.0, t
    # a colour shift changes the channel balance, not just the brightness
    ratio = imgs["shift_1"].mean(axis=(0, 1)) / regular.mean(axis=(0, 1))  # (3,) BGR
    assert ratio[2] - ratio[0] > 0.15


def test_private_splits_half_defective_and_share_scenes(synthetic_root: Path) -> None:
    tree, size = synthetic_root / "vial", category_size("vial", 96)
    defective = []
    for i in range(6):
        written = _read(tree / f"test_private/{i:03d}_regular.png")
        clean = render("vial", size, stream="test_private", index=i).image[..., 0]
        defective.append(not np.array_equal(written, clean))
        mixed = _read(tree / f"test_private_mixed/{i:03d}_mixed.png")
        assert mixed.shape == written.shape
    assert sum(defective) == 3
    assert not (tree / "test_private" / "ground_truth").exists()


def test_library_refuses_non_empty_target_and_unknown_category(tmp_path: Path) -> None:
    (tmp_path / "can").mkdir()
    (tmp_path / ".can.tmp" / "junk").mkdir(parents=True)  # left over by an interrupted run
    write_synthetic_dataset(tmp_path, ["can"], size=(32, 16), verbose=False)  # an empty target is fine
    assert not (tmp_path / ".can.tmp").exists()
    with pytest.raises(UserError, match="not empty"):
        write_synthetic_dataset(tmp_path, ["can"], size=(32, 16), verbose=False)
    with pytest.raises(UserError, match="unknown categories"):
        write_synthetic_dataset(tmp_path, ["cans"], verbose=False)
    before = (tmp_path / "can/train/good/000_regular.png").read_bytes()
    write_synthetic_dataset(tmp_path, ["can"], size=(32, 16), seed=5, overwrite=True, verbose=False)
    assert (tmp_path / "can/train/good/000_regular.png").read_bytes() != before


def test_cli_writes_then_refuses_to_overwrite(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "data_modules.synthetic",
        "--root",
        str(tmp_path),
        "--categories",
        "can",
        "--size",
        "64x32",
    ]
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("\n") == 1 and first.stdout.startswith("can")
    assert _read(tmp_path / "can/test_public/bad/000_regular.png").shape == (32, 64, 3)
    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2
    assert second.stderr.startswith("synthetic: error: ") and second.stderr.count("\n") == 1
    assert "Traceback" not in second.stderr


def test_texture_crops_stay_inside_the_source() -> None:
    from data_modules.synthetic import _TEXTURES

    for category, spec in _TEXTURES.items():
        w, h = NATIVE[category]
        cw, ch = (spec.src_long, spec.src_long * h / w) if w >= h else (spec.src_long * w / h, spec.src_long)
        assert spec.offset[0] + cw + 32 <= 512 and spec.offset[1] + ch + 32 <= 512, category
