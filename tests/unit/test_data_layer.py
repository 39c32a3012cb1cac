"""MVTec AD 2 listing, decoding, errors, `data check` CLI and the DataModule on tiny trees."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from data_modules.cut_paste import CutPasteConfig
from data_modules.augment import AugmentConfig
from data_modules.checks import check_dataset
from data_modules.datamodule import DataConfig, MVTecAD2DataModule
from data_modules.dataset import MVTecAD2Dataset, collate_batch
from data_modules.listing import list_samples, read_image
from data_modules.tilers import TilingConfig
from hybridad.errors import UserError
from hybridad.tile_grid import TileLevel, level_boxes, untile
from hybridad.types import Split

REPO = Path(__file__).resolve().parents[2]
H, W = 24, 48


def make_tree(root: Path, category: str = "can", gray: bool = False, n_train: int = 3) -> Path:
    """A tiny MVTec AD 2 tree: pixel (0,0) of every image encodes its index, so decoding can be checked."""
    rng = np.random.default_rng(0)

    def write(path: Path, value: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        img = rng.integers(0, 256, (H, W) if gray else (H, W, 3), dtype=np.uint8)
        img[0, 0] = value
        cv2.imwrite(str(path), img)

    cat = root / category
    for i in range(n_train):
        write(cat / "train" / "good" / f"{i:03d}_regular.png", i)
    for i in range(2):
        write(cat / "validation" / "good" / f"{i:03d}_regular.png", 100 + i)
    for i, light in enumerate(["regular", "shift_2"]):
        write(cat / "test_public" / "good" / f"{i:03d}_{light}.png", 150 + i)
    for i, light in enumerate(["regular", "overexposed", "underexposed"]):
        write(cat / "test_public" / "bad" / f"{i:03d}_{light}.png", 200 + i)
        mask = np.zeros((H, W), np.uint8)
        mask[2 + i : 6 + i, 3:9] = 255
        (cat / "test_public" / "ground_truth" / "bad").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(cat / "test_public" / "ground_truth" / "bad" / f"{i:03d}_{light}_mask.png"), mask)
    for i in range(2):
        write(cat / "test_private" / f"{i:03d}_regular.png", 230 + i)
        write(cat / "test_private_mixed" / f"{i:03d}_mixed.png", 240 + i)
    return root


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "data")


# ----------------------------------------------------------------------------------------------- listing


def test_list_samples_public(tree):
    s = list_samples(tree, "can", "test_public")
    assert [x.sample_id for x in s] == [
        "test_public/good/000_regular",
        "test_public/good/001_shift_2",
        "test_public/bad/000_regular",
        "test_public/bad/001_overexposed",
        "test_public/bad/002_underexposed",
    ]
    assert [x.label for x in s] == [0, 0, 1, 1, 1]
    assert [x.lighting for x in s] == ["regular", "shift_2", "regular", "overexposed", "underexposed"]
    assert s[0].mask_path is None
    assert s[3].mask_path == tree / "can/test_public/ground_truth/bad/001_overexposed_mask.png"
    assert all(x.split == Split.TEST_PUBLIC and x.category == "can" for x in s)


def test_list_samples_other_splits(tree):
    train = list_samples(tree, "can", Split.TRAIN)
    assert [x.sample_id for x in train] == [f"train/good/{i:03d}_regular" for i in range(3)]
    assert all(x.label == 0 and x.mask_path is None for x in train)
    val = list_samples(tree, "can", "validation")
    assert [x.sample_id for x in val] == ["validation/good/000_regular", "validation/good/001_regular"]
    priv = list_samples(tree, "can", "test_private")
    assert [(x.sample_id, x.label, x.lighting) for x in priv] == [
        ("test_private/000_regular", -1, "regular"),
        ("test_private/001_regular", -1, "regular"),
    ]
    mixed = list_samples(tree, "can", "test_private_mixed")
    assert [(x.sample_id, x.label, x.lighting) for x in mixed] == [
        ("test_private_mixed/000_mixed", -1, "mixed"),
        ("test_private_mixed/001_mixed", -1, "mixed"),
    ]


# ----------------------------------------------------------------------------------------------- errors


def test_error_root_missing(tmp_path):
    with pytest.raises(UserError) as e:
        list_samples(tmp_path / "nowhere", "can", "train")
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg and "mvtec-ad-2" in msg and "train/good/*.png" in msg
    assert "\n" not in msg


def test_error_unknown_category(tree):
    # any category name is valid: a missing folder names itself and the categories found at the root
    with pytest.raises(UserError, match=r"category folder .*cans does not exist \(found: can\)"):
        list_samples(tree, "cans", "train")


def test_error_unknown_split(tree):
    with pytest.raises(UserError, match="unknown split 'tests'"):
        list_samples(tree, "can", "tests")


def test_error_category_folder_missing(tree):
    with pytest.raises(UserError, match="category folder .*rice does not exist"):
        list_samples(tree, "rice", "train")


def test_error_split_missing_or_empty(tree):
    import shutil

    shutil.rmtree(tree / "can" / "test_private")
    with pytest.raises(UserError, match=r"split folder .*test_private is missing"):
        list_samples(tree, "can", "test_private")
    for f in (tree / "can" / "validation" / "good").iterdir():
        f.unlink()
    with pytest.raises(UserError, match=r"validation/good holds no .png"):
        list_samples(tree, "can", "validation")


def test_error_bad_without_mask(tree):
    mask = tree / "can/test_public/ground_truth/bad/001_overexposed_mask.png"
    mask.unlink()
    with pytest.raises(UserError) as e:
        list_samples(tree, "can", "test_public")
    assert str(tree / "can/test_public/bad/001_overexposed.png") in str(e.value) and str(mask) in str(e.value)


def test_error_truncated_image_when_decoding(tree):
    path = tree / "can/train/good/001_regular.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    ds = MVTecAD2Dataset(list_samples(tree, "can", "train"))
    ds[0]
    with pytest.raises(UserError, match=f"cannot decode image {path}"):
        ds[1]
    with pytest.raises(UserError, match=f"image {path} is truncated"):
        check_dataset(tree, "can")


def test_error_mask_size_differs(tree):
    mask = tree / "can/test_public/ground_truth/bad/000_regular_mask.png"
    cv2.imwrite(str(mask), np.zeros((H, W + 2), np.uint8))
    ds = MVTecAD2Dataset(list_samples(tree, "can", "test_public"))
    with pytest.raises(UserError) as e:
        ds[2]
    assert str(mask) in str(e.value) and f"{W + 2}x{H}" in str(e.value) and f"{W}x{H}" in str(e.value)
    assert "000_regular.png" in str(e.value)
    with pytest.raises(UserError, match=f"mask {mask} is {W + 2}x{H}"):
        check_dataset(tree, "can")


def test_error_image_size_differs(tree):
    path = tree / "can/validation/good/001_regular.png"
    cv2.imwrite(str(path), np.zeros((H, W - 4, 3), np.uint8))
    with pytest.raises(UserError, match=f"image {path} is {W - 4}x{H}"):
        check_dataset(tree, "can")
    with pytest.raises(UserError, match=f"image {path} is {W - 4}x{H}"):
        MVTecAD2Dataset(list_samples(tree, "can", "validation"))[1]


def test_check_dataset_summary(tree):
    text = check_dataset(tree, "can")
    assert f"{W}x{H} RGB" in text
    lines = text.splitlines()
    assert len(lines) == 6
    assert lines[1].split() == ["train", "3"]
    assert "test_public" in lines[3] and "(2 good, 3 bad with masks)" in lines[3]
    assert lines[5].split() == ["test_private_mixed", "2"]


def test_check_dataset_gray(tmp_path):
    root = make_tree(tmp_path / "d", "vial", gray=True)
    assert f"{W}x{H} gray" in check_dataset(root, "vial").splitlines()[0]


def test_cli_data_check_bad_root(tmp_path):
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "hybridad", "data", "check", "--root", str(tmp_path / "x"),
         "--category", "can"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and str(tmp_path / "x") in proc.stderr


# ----------------------------------------------------------------------------------------------- decoding


def test_decoding_native_rgb_and_gray(tree, tmp_path):
    ds = MVTecAD2Dataset(list_samples(tree, "can", "test_public"))
    item = ds[3]
    assert item["image"].shape == (3, H, W) and item["image"].dtype == torch.uint8
    assert item["image"][:, 0, 0].tolist() == [201, 201, 201]  # pixel (0,0) set on all channels
    ref = cv2.cvtColor(cv2.imread(str(ds.samples[3].image_path)), cv2.COLOR_BGR2RGB)
    assert torch.equal(item["image"].permute(1, 2, 0), torch.from_numpy(ref))  # RGB order
    assert item["mask"].shape == (1, H, W) and item["mask"].sum() == 24
    assert item["mask"][0, 3:7, 3:9].eq(1).all()  # bad/001's defect rows 3..6, columns 3..8
    assert ds[0]["mask"].sum() == 0 and ds[0]["label"] == 0  # good image in test_public: zero mask
    gray_root = make_tree(tmp_path / "g", "wallplugs", gray=True)
    img = read_image(list_samples(gray_root, "wallplugs", "train")[1].image_path)
    assert img.shape == (H, W, 3) and np.array_equal(img[..., 0], img[..., 2]) and img[0, 0, 1] == 1


def test_collate_masks_none_without_gt(tree):
    ds = MVTecAD2Dataset(list_samples(tree, "can", "validation"))
    b = collate_batch([ds[0], ds[1]])
    assert b.mask is None and b.image.shape == (2, 3, H, W) and b.label.tolist() == [0, 0]
    assert b.sample_id == ["validation/good/000_regular", "validation/good/001_regular"]
    assert b.split == ["validation", "validation"]
    ds = MVTecAD2Dataset(list_samples(tree, "can", "test_public"))
    b = collate_batch([ds[1], ds[2]])
    assert b.mask.shape == (2, 1, H, W) and b.mask[0].sum() == 0 and b.mask[1].sum() == 24
    assert b.label.tolist() == [0, 1] and b.lighting == ["shift_2", "regular"] and b.split == ["test_public"] * 2


def test_batch_split_is_set_per_item_by_the_loaders_not_parsed_from_sample_ids(tree):
    """Dataset items carry their `Split`; new images given to predict carry NO_SPLIT; a Batch whose split list
    does not match its ids is refused."""
    from hybridad.predict import NewImages
    from hybridad.types import NO_SPLIT, Batch

    samples = list_samples(tree, "can", "test_private")
    b = collate_batch([MVTecAD2Dataset(samples)[0]])
    assert b.split == ["test_private"]
    path = samples[0].image_path
    assert collate_batch([NewImages([path], ["test_public/good/looks_like_a_split"])[0]]).split == [NO_SPLIT]
    with pytest.raises(ValueError, match="2 splits for 1 sample ids"):
        Batch(image=b.image, label=b.label, sample_id=b.sample_id, lighting=b.lighting, split=["train", "train"])


def test_augment_keeps_size_and_changes_pixels(tree):
    aug = AugmentConfig(hflip=1.0, scale=0.2, brightness=0.2, exposure=0.5, probability=1.0)
    ds = MVTecAD2Dataset(list_samples(tree, "can", "train"), [TileLevel()], aug, seed=0)
    plain = MVTecAD2Dataset(list_samples(tree, "can", "train"), [TileLevel()])
    a, p = ds[0]["image"], plain[0]["image"]
    assert a.shape == p.shape and not torch.equal(a, p)
    flip_only = MVTecAD2Dataset(list_samples(tree, "can", "train"), [TileLevel()], AugmentConfig(hflip=1.0))
    assert torch.equal(flip_only[0]["image"], p.flip(-1))


# ----------------------------------------------------------------------------------------------- DataModule


def _config(root: Path, **kw) -> DataConfig:
    levels = [TileLevel(), TileLevel(2, 2, 0.1)]
    tiling = TilingConfig(input_size=16, train_levels=levels, test_level=TileLevel(4, 2))
    args = {"root": str(root), "category": "can", "batch_size": 4, "num_workers": 0, "tiling": tiling,
            "cache_dir": str(root.parent / "cache"), **kw}  # fmt: skip
    return DataConfig(**args)


def test_train_epoch_covers_every_tile_once(tree):
    dm = MVTecAD2DataModule(_config(tree, batch_size=5), seed=0)
    ds = dm.dataset("train")
    assert len(ds) == 3 * (1 + 4)
    loader = dm.train_dataloader()
    seen = []
    for batch in loader:
        seen += [(sid, tuple(box)) for sid, box in zip(batch.sample_id, batch.tile_box.tolist())]
    boxes = [(0, 0, H, W)] + level_boxes(H, W, TileLevel(2, 2, 0.1))
    expected = {(f"train/good/{i:03d}_regular", b) for i in range(3) for b in boxes}
    assert len(seen) == 15 and set(seen) == expected


def test_train_hook_makes_batch_size_tiles(tree):
    cp = CutPasteConfig(
        enabled=True, probability=1.0, scale_min=0.2, scale_max=0.5, library_size=2, patch_size=16
    )
    dm = MVTecAD2DataModule(_config(tree, cut_paste=cp), seed=0)
    raw = next(iter(dm.train_dataloader()))
    assert raw.tile_box.shape == (4, 4) and len(raw.image) == 4  # tile crops at native size, not images
    for crop, (y0, x0, y1, x1) in zip(raw.image, raw.tile_box.tolist()):
        assert crop.shape == (3, y1 - y0, x1 - x0) and crop.dtype == torch.uint8
    index = {s.sample_id: s for s in list_samples(tree, "can", "train")}
    native = torch.stack([torch.from_numpy(read_image(index[sid].image_path)).permute(2, 0, 1)
                          for sid in raw.sample_id])  # (4,3,H,W)  # fmt: skip
    batch = dm.train_transform(raw, torch.Generator().manual_seed(0))
    assert batch.image.shape == (4, 3, 16, 16) and batch.image.dtype == torch.float32
    assert batch.mask.shape == (4, 1, 16, 16) and batch.label.tolist() == [1, 1, 1, 1]
    plain = MVTecAD2DataModule(_config(tree), seed=0).train_transform(
        collate_batch([dm.dataset("train")[0]]), None
    )
    assert plain.mask.sum() == 0 and plain.label.tolist() == [0]
    tiles = dm.train_tiler(native, batch.tile_box)
    assert torch.equal((batch.image != tiles).any(1, keepdim=True).float(), batch.mask)


def test_eval_hook_tiles_and_layout_untile_to_native(tree):
    dm = MVTecAD2DataModule(_config(tree, eval_batch_size=2), seed=0)
    batch = dm.on_after_batch_transfer(next(iter(dm.test_dataloader())), 0)  # no trainer: eval path
    assert batch.image.shape == (2, 3, H, W) and batch.tiles.shape == (16, 3, 16, 16)
    assert batch.layout.num_images == 2 and batch.layout.image_size == (H, W)
    assert untile(batch.tiles[:, :1], batch.layout).shape == (2, 1, H, W)
    loaders = dm.predict_dataloader()
    assert [s.value for s in dm.predict_splits] == ["test_private", "test_private_mixed"]
    first = [next(iter(ld)).sample_id[0] for ld in loaders]
    assert first == ["test_private/000_regular", "test_private_mixed/000_mixed"]
    assert next(iter(dm.val_dataloader())).mask is None


def test_batch_size_larger_than_epoch_is_an_error(tree):
    dm = MVTecAD2DataModule(_config(tree, batch_size=99), seed=0)
    with pytest.raises(UserError, match="data.batch_size=99"):
        dm.train_dataloader()


def _fake_trainer(micro_batch: int, global_step: int = 3):
    """The trainer attributes the training hook reads (micro-batch index: Lightning's completed batches)."""
    from types import SimpleNamespace

    progress = SimpleNamespace(total=SimpleNamespace(completed=micro_batch))
    return SimpleNamespace(training=True, global_step=global_step, global_rank=0,
                           fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)))


def test_micro_batches_of_one_optimiser_step_get_their_own_pastes(tree):
    """accumulate_grad_batches > 1: global_step stays fixed over the window; every micro-batch must draw its
    own pastes (and the same micro-batch index the same ones)."""
    cp = CutPasteConfig(enabled=True, probability=1.0, library_size=4, patch_size=16)
    dm = MVTecAD2DataModule(_config(tree, cut_paste=cp), seed=0)
    items = [dm.dataset("train")[i] for i in range(4)]
    masks = []
    for micro_batch in (6, 7, 6):
        dm.trainer = _fake_trainer(micro_batch, global_step=3)
        masks.append(dm.on_after_batch_transfer(collate_batch(items), 0).mask)
    assert torch.equal(masks[0], masks[2]) and not torch.equal(masks[0], masks[1])


def test_hook_training_path_with_trainer_flag(tree):

    cp = CutPasteConfig(enabled=True, probability=0.5, library_size=2, patch_size=16)
    dm = MVTecAD2DataModule(_config(tree, cut_paste=cp), seed=0)
    raw = next(iter(dm.train_dataloader()))
    dm.trainer = _fake_trainer(3)
    a = dm.on_after_batch_transfer(collate_batch([dm.dataset("train")[i] for i in range(4)]), 0)
    b = dm.on_after_batch_transfer(collate_batch([dm.dataset("train")[i] for i in range(4)]), 0)
    assert a.image.shape == (4, 3, 16, 16) and a.tiles is None
    assert torch.equal(a.image, b.image) and torch.equal(a.mask, b.mask)  # same (seed, step, rank)
    assert raw.tile_box is not None
