"""Every `data.format` layout listed exactly on trees written here: paths, labels, mask pairing, defect types,
odd names, upper-case suffixes, nested types; faults (a missing mask, a mask without image, a row naming a
missing file, an unknown format, mixed sizes) are one-line errors; the seeded validation carve."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from own_data_trees import folder_tree, mvtec_ad_tree, realiad_tree, visa_tree, write_image, write_mask

from data_modules.checks import check_dataset
from data_modules.datamodule import DataConfig, MVTecAD2DataModule
from data_modules.formats import carve_validation, list_splits
from data_modules.formats.common import LayoutConfig
from hybridad.errors import UserError
from hybridad.types import Split


def _data(root: Path, category: str, fmt: str, **layout: str) -> DataConfig:
    return DataConfig(root=str(root), category=category, format=fmt, layout=LayoutConfig(**layout),
                      validation_fraction=0.25)


def _rows(samples: list) -> list[tuple]:
    """(sample id, label, defect type, image relative to its root-ish folder name, mask file name or None)."""
    return [(s.sample_id, s.label, s.defect_type, s.image_path.name, s.mask_path.name if s.mask_path else None)
            for s in samples]


def _error(data: DataConfig) -> str:
    with pytest.raises(UserError) as e:
        list_splits(data)
    assert "\n" not in str(e.value)
    return str(e.value)


# ------------------------------------------------------------------------------------------------- mvtec_ad


def test_mvtec_ad_lists_types_masks_and_any_suffix(tmp_path: Path) -> None:
    listing = list_splits(_data(mvtec_ad_tree(tmp_path), "bottle", "mvtec_ad"))
    assert set(listing.splits) == {Split.TRAIN, Split.TEST_PUBLIC, Split.VALIDATION}  # carved, no private
    assert _rows(listing.splits[Split.TEST_PUBLIC]) == [
        ("test_public/bad/crack/000", 1, "crack", "000.BMP", "000_mask.png"),
        ("test_public/bad/cut/deep/odd name.v2", 1, "cut", "odd name.v2.png", "odd name.v2_mask.png"),
        ("test_public/good/000", 0, "good", "000.png", None),
        ("test_public/bad/scratch/000", 1, "scratch", "000.png", "000_mask.png"),
        ("test_public/bad/scratch/001", 1, "scratch", "001.PNG", "001_mask.png"),
    ]
    nested = listing.splits[Split.TEST_PUBLIC][1]
    assert nested.mask_path == tmp_path / "bottle/ground_truth/cut/deep/odd name.v2_mask.png"
    train_val = listing.splits[Split.TRAIN] + listing.splits[Split.VALIDATION]
    assert sorted(s.image_path.name for s in train_val) == ["000.png", "001.JPG", "002.bmp", "003.png"]
    assert len(listing.splits[Split.VALIDATION]) == 1 and listing.carved == listing.splits[Split.VALIDATION]
    assert all(s.label == 0 and s.lighting == "" for s in train_val)


def test_mvtec_ad_missing_mask_and_orphan_mask_are_errors(tmp_path: Path) -> None:
    root = mvtec_ad_tree(tmp_path)
    mask = root / "bottle/ground_truth/scratch/001_mask.png"
    mask.unlink()
    msg = _error(_data(root, "bottle", "mvtec_ad"))
    assert msg == (f"image {root / 'bottle/test/scratch/001.PNG'} has no mask: expected {mask} "
                   "(or <stem>.png beside it)")
    write_mask(mask)
    write_mask(root / "bottle/ground_truth/crack/007_mask.png")
    msg = _error(_data(root, "bottle", "mvtec_ad"))
    assert msg.startswith(f"mask {root / 'bottle/ground_truth/crack/007_mask.png'} has no image")


# ---------------------------------------------------------------------------------------------------- visa


def test_visa_reads_the_split_csv_of_one_object_with_defect_types(tmp_path: Path) -> None:
    root = visa_tree(tmp_path)
    listing = list_splits(_data(root, "candle", "visa"))
    assert _rows(listing.splits[Split.TEST_PUBLIC]) == [
        ("test_public/good/0100", 0, "good", "0100.JPG", None),
        ("test_public/bad/spot/001", 1, "spot", "001.JPG", "001.png"),
        ("test_public/bad/wax melded out of the candle/000", 1, "wax melded out of the candle", "000.JPG",
         "000.png"),
    ]
    names = sorted(s.image_path.name for s in listing.splits[Split.TRAIN] + listing.splits[Split.VALIDATION])
    assert names == ["0000.JPG", "0001.JPG", "0002.JPG", "0003.JPG"], "capsules rows are not candle's"
    (root / "candle/image_anno.csv").unlink()  # without the per-image annotations the type is the CSV label
    types = {s.defect_type for s in list_splits(_data(root, "candle", "visa")).splits[Split.TEST_PUBLIC]}
    assert types == {"good", "anomaly"}


def test_visa_faults_name_the_csv_line(tmp_path: Path) -> None:
    root = visa_tree(tmp_path)
    assert _error(_data(root, "pcb9", "visa")) == (
        f"{root / 'split_csv/1cls.csv'} has no rows for object 'pcb9'; objects: candle, capsules")
    (root / "candle/Data/Masks/Anomaly/001.png").unlink()
    assert _error(_data(root, "candle", "visa")) == (
        f"{root / 'split_csv/1cls.csv'} line 8 names mask {root / 'candle/Data/Masks/Anomaly/001.png'}, "
        "which does not exist")
    (root / "candle/Data/Images/Normal/0002.JPG").unlink()
    assert _error(_data(root, "candle", "visa")) == (
        f"{root / 'split_csv/1cls.csv'} line 4 names image {root / 'candle/Data/Images/Normal/0002.JPG'}, "
        "which does not exist")
    assert "VisA index" in _error(_data(tmp_path / "nowhere", "candle", "visa"))


# ------------------------------------------------------------------------------------------------- realiad


def test_realiad_reads_the_category_json(tmp_path: Path) -> None:
    root = realiad_tree(tmp_path)
    listing = list_splits(_data(root, "audiojack", "realiad"))
    assert listing.folder == root / "realiad_1024/audiojack"
    assert _rows(listing.splits[Split.TEST_PUBLIC]) == [
        ("test_public/good/audiojack_0010_OK_C2_2023", 0, "good", "audiojack_0010_OK_C2_2023.jpg", None),
        ("test_public/bad/AK/audiojack_0020_NG_AK_C1_2023", 1, "AK", "audiojack_0020_NG_AK_C1_2023.jpg",
         "audiojack_0020_NG_AK_C1_2023.png"),
        ("test_public/bad/QS/audiojack_0021_NG_QS_C1_2023", 1, "QS", "audiojack_0021_NG_QS_C1_2023.jpg",
         "audiojack_0021_NG_QS_C1_2023.png"),
    ]
    assert len(listing.splits[Split.TRAIN]) + len(listing.splits[Split.VALIDATION]) == 3


def test_realiad_entry_naming_a_missing_mask_is_an_error(tmp_path: Path) -> None:
    root = realiad_tree(tmp_path)
    index = root / "realiad_jsons/realiad_jsons/audiojack.json"
    data = json.loads(index.read_text())
    data["test"][2]["mask_path"] = "NG/QS/gone.png"
    index.write_text(json.dumps(data))
    assert _error(_data(root, "audiojack", "realiad")) == (
        f"{index} test[2] names mask {root / 'realiad_1024/audiojack/NG/QS/gone.png'}, which does not exist")


# -------------------------------------------------------------------------------------------------- folder


def test_folder_pairs_masks_by_stem_with_nested_types(tmp_path: Path) -> None:
    root = folder_tree(tmp_path)
    listing = list_splits(_data(root, "bracket", "folder", normal_test="normal_test"))
    assert _rows(listing.splits[Split.TEST_PUBLIC]) == [
        ("test_public/good/ok_0", 0, "good", "ok_0.jpg", None),
        ("test_public/good/ok_1", 0, "good", "ok_1.jpg", None),
        ("test_public/bad/scratch/deep/d1", 1, "scratch/deep", "d1.png", "d1.png"),
        ("test_public/bad/scratch/s1", 1, "scratch", "s1.PNG", "s1_mask.png"),
        ("test_public/bad/scratch/s2", 1, "scratch", "s2.bmp", "s2.png"),
        ("test_public/bad/abnormal/top", 1, "abnormal", "top.png", "top.png"),
    ]
    train = listing.splits[Split.TRAIN]
    assert len(train) == 7 and len(listing.splits[Split.VALIDATION]) == 3  # 10 normal x 0.25 = 2.5 -> 3
    assert train[0].sample_id == "train/good/part 00.v2" and train[0].image_path.suffix == ".PNG"
    without = list_splits(_data(root, "bracket", "folder"))  # no normal test folder given
    assert [s.label for s in without.splits[Split.TEST_PUBLIC]] == [1, 1, 1, 1]


def test_folder_faults_are_one_line(tmp_path: Path) -> None:
    root = folder_tree(tmp_path)
    (root / "bracket/masks/scratch/deep/d1.png").unlink()
    assert _error(_data(root, "bracket", "folder")).startswith(
        f"image {root / 'bracket/abnormal/scratch/deep/d1.png'} has no mask: expected "
        f"{root / 'bracket/masks/scratch/deep/d1.png'}")
    write_mask(root / "bracket/masks/scratch/deep/d1.png")
    write_mask(root / "bracket/masks/extra.png")
    assert _error(_data(root, "bracket", "folder")).startswith(
        f"mask {root / 'bracket/masks/extra.png'} has no image")
    (root / "bracket/masks/extra.png").unlink()
    write_image(root / "bracket/abnormal/top.jpg", defect=True)  # same stem, another suffix: one name for two
    assert "get one name (test_public/bad/abnormal/top)" in _error(_data(root, "bracket", "folder"))
    assert _error(_data(root, "bracket", "folder", abnormal="ng")).startswith(
        f"abnormal (data.layout.abnormal) folder {root / 'bracket/ng'} does not exist")
    assert _error(_data(root, "bracket", "coco")) == (
        "unknown data.format 'coco'; valid: mvtec_ad2, mvtec_ad, visa, realiad, folder")


# -------------------------------------------------------------------------- mvtec_ad2 with missing splits


def test_mvtec_ad2_own_category_without_validation_and_private_splits(tmp_path: Path) -> None:
    from test_data_layer import make_tree

    root = make_tree(tmp_path / "d", "bracket", n_train=4)
    shutil.rmtree(root / "bracket/validation")
    for split in ("test_private", "test_private_mixed"):
        shutil.rmtree(root / "bracket" / split)
    data = DataConfig(root=str(root), category="bracket")
    listing = list_splits(data)
    assert sorted(s.value for s in listing.splits) == ["test_public", "train", "validation"]
    assert [s.sample_id.split("/")[0] for s in listing.carved] == ["validation"]
    assert MVTecAD2DataModule(data).predict_splits == ()
    text = check_dataset(root, "bracket")
    assert "validation" in text and "carved from train" in text and "test_private" not in text


def test_carve_is_seeded_disjoint_and_keeps_training_images(tmp_path: Path) -> None:
    root = folder_tree(tmp_path, n_normal=20)
    samples = list_splits(_data(root, "bracket", "folder")).splits
    everything = samples[Split.TRAIN] + samples[Split.VALIDATION]
    a_train, a_val = carve_validation(sorted(everything, key=lambda s: s.sample_id), 0.2, seed=3)
    b_train, b_val = carve_validation(sorted(everything, key=lambda s: s.sample_id), 0.2, seed=3)
    assert [s.sample_id for s in a_val] == [s.sample_id for s in b_val] and len(a_val) == 4
    assert {s.image_path for s in a_val}.isdisjoint(s.image_path for s in a_train)
    assert all(s.split == Split.VALIDATION and s.sample_id.startswith("validation/good/") for s in a_val)
    _, c_val = carve_validation(sorted(everything, key=lambda s: s.sample_id), 0.2, seed=4)
    assert {s.sample_id for s in c_val} != {s.sample_id for s in a_val}
    with pytest.raises(UserError, match="needs at least 2"):
        carve_validation(everything[:1], 0.1, 0)


# ----------------------------------------------------------------------------------------------- data check


@pytest.mark.parametrize(
    ("fmt", "make", "category", "layout", "counts"),
    [
        ("mvtec_ad", mvtec_ad_tree, "bottle", {}, {"train": 3, "validation": 1, "test_public": 5}),
        ("visa", visa_tree, "candle", {}, {"train": 3, "validation": 1, "test_public": 3}),
        ("realiad", realiad_tree, "audiojack", {}, {"train": 2, "validation": 1, "test_public": 3}),
        ("folder", folder_tree, "bracket", {"normal_test": "normal_test"},
         {"train": 7, "validation": 3, "test_public": 6}),
    ],
)
def test_data_check_decodes_every_layout(tmp_path: Path, fmt: str, make, category: str, layout: dict,
                                         counts: dict) -> None:
    root = make(tmp_path)
    text = check_dataset(root, category, _data(root, category, fmt, **layout))
    head, *lines = text.splitlines()
    assert head.startswith(f"{category} ({fmt}) at ") and "every image decodes, sizes agree" in head
    assert {ln.split()[0]: int(ln.split()[1]) for ln in lines} == counts


def test_data_check_says_what_tiling_does_with_mixed_sizes(tmp_path: Path) -> None:
    root = folder_tree(tmp_path)
    write_image(root / "bracket/normal/big.png", 40, 48)
    data = _data(root, "bracket", "folder")
    head = check_dataset(root, "bracket", data).splitlines()[0]
    assert "2 sizes (32x24 to 48x40)" in head
    assert "each image is cut into its own 1x1 grid, every tile resized to 448x448" in head
    data.eval_batch_size = 2
    with pytest.raises(UserError, match="2 sizes but data.eval_batch_size=2 stacks images of one size"):
        check_dataset(root, "bracket", data)


def test_data_check_a_corrupt_jpeg_is_one_line(tmp_path: Path) -> None:
    root = mvtec_ad_tree(tmp_path)
    path = root / "bottle/train/good/001.JPG"
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(UserError) as e:
        check_dataset(root, "bottle", _data(root, "bottle", "mvtec_ad"))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_mixed_size_training_tiles_each_image_on_its_own_grid(tmp_path: Path) -> None:
    from hybridad.tile_grid import TileLevel

    root = folder_tree(tmp_path, n_normal=3)
    write_image(root / "bracket/normal/big.png", 40, 48)
    data = _data(root, "bracket", "folder")
    data.validation_fraction, data.cache_dir = 0.2, str(tmp_path / "cache")
    data.tiling.train_levels = [TileLevel(cols=2, rows=1)]
    ds = MVTecAD2DataModule(data).dataset(Split.TRAIN)
    assert ds.cache is None  # one array per split needs one size
    boxes = {(ds.samples[i].image_path.name, box) for i, _, _, box in ds.triples}
    assert ("big.png", (0, 0, 40, 24)) in boxes and ("big.png", (0, 24, 40, 48)) in boxes
    item = next(ds[j] for j, (i, _, _, box) in enumerate(ds.triples) if ds.samples[i].image_path.name == "big.png")
    assert tuple(item["image"].shape) == (3, 40, 24)


def test_cli_data_check_with_format_and_layout_items(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hybridad.cli import main

    root = folder_tree(tmp_path)
    args = ["data", "check", "--root", str(root), "--category", "bracket", "--format", "folder"]
    with pytest.raises(SystemExit) as e:
        main([*args, "data.layout.normal_test=normal_test", "data.validation_fraction=0.2"])
    out = capsys.readouterr().out
    lines = {ln.split()[0]: ln.split(None, 2)[1:] for ln in out.splitlines()[1:]}
    assert e.value.code == 0 and lines["test_public"] == [
        "6", "(2 good, 4 bad with masks; types: abnormal 1, scratch 2, scratch/deep 1)"]
    assert lines["validation"][0] == "2" and lines["validation"][1].startswith("(carved from train")
    with pytest.raises(SystemExit) as e:
        main([*args, "data.layout.masks=nowhere"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("hybridad: error: mask (data.layout.masks) folder") and "\n" not in err


def test_jpeg_and_bmp_training_images_go_through_the_decoded_cache(tmp_path: Path) -> None:
    import cv2
    import numpy as np

    root = mvtec_ad_tree(tmp_path)
    data = _data(root, "bottle", "mvtec_ad")
    data.cache_dir = str(tmp_path / "cache")
    ds = MVTecAD2DataModule(data).dataset(Split.TRAIN)
    assert ds.cache is not None and ds.cache.shape == (3, 24, 32, 3)
    for i, s in enumerate(ds.samples):  # the cache holds exactly what OpenCV decodes (JPEG, BMP, PNG alike)
        want = cv2.cvtColor(cv2.imread(str(s.image_path)), cv2.COLOR_BGR2RGB)
        assert np.array_equal(ds.cache.image(i), want), s.image_path.name
