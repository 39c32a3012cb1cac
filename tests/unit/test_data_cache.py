"""Decoded-image cache: content, tile slices, invalidation, killed builds, concurrent builders, workers."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from test_data_layer import H, W, make_tree  # tests/unit is on sys.path (no __init__.py)

from data_modules.cache import DecodedCache, prune_cache
from data_modules.datamodule import DataConfig, MVTecAD2DataModule
from data_modules.dataset import MVTecAD2Dataset
from data_modules.listing import decode_image, list_samples, read_image
from data_modules.tilers import TilingConfig
from hybridad.errors import UserError
from hybridad.tile_grid import TileLevel, level_boxes


def _open(root: Path, cache_root: Path, category: str = "can") -> DecodedCache:
    samples = list_samples(root, category, "train")
    return DecodedCache.open_or_build(cache_root, root, category, "train", samples, progress=False, threads=2)


def _files(cache_root: Path) -> list[str]:
    return sorted(p.name for p in cache_root.glob("*/*") if p.suffix != ".lock")


def test_cache_equals_direct_decode_rgb_and_gray(tmp_path):
    for category, gray, channels in (("can", False, 3), ("sheet_metal", True, 1)):
        root = make_tree(tmp_path / category, category, gray=gray)
        cache = _open(root, tmp_path / "cache", category)
        samples = list_samples(root, category, "train")
        assert cache.shape == (3, H, W, channels) and cache.built_seconds > 0
        for i, s in enumerate(samples):
            assert np.array_equal(cache.array[i], decode_image(s.image_path))  # (H,W,C), gray stored once
            assert np.array_equal(cache.image(i), read_image(s.image_path))  # (H,W,3) RGB
        assert cache.nbytes == 3 * H * W * channels


def test_tile_item_equals_crop_of_decoded_image(tmp_path):
    root = make_tree(tmp_path / "data")
    samples = list_samples(root, "can", "train")
    levels = [TileLevel(), TileLevel(2, 2, 0.1), TileLevel(4, 1)]
    cached = MVTecAD2Dataset(samples, levels, cache=_open(root, tmp_path / "cache"))
    direct = MVTecAD2Dataset(samples, levels)  # no cache: decodes the PNG
    boxes = [b for lv in levels for b in level_boxes(H, W, lv)]
    assert len(cached) == 3 * len(boxes) == len(direct)
    for k in range(len(cached)):
        item = cached[k]
        i, (y0, x0, y1, x1) = k // len(boxes), boxes[k % len(boxes)]
        expected = torch.from_numpy(read_image(samples[i].image_path)[y0:y1, x0:x1]).permute(2, 0, 1)
        assert item["tile_box"].tolist() == [y0, x0, y1, x1] and item["sample_id"] == samples[i].sample_id
        assert item["image"].shape == (3, y1 - y0, x1 - x0) and torch.equal(item["image"], expected)
        assert torch.equal(direct[k]["image"], expected)


def test_cache_reused_then_invalidated_when_a_file_changes(tmp_path):
    root = make_tree(tmp_path / "data")
    cache_root = tmp_path / "cache"
    first = _open(root, cache_root)
    again = _open(root, cache_root)
    assert again.built_seconds == 0 and again.path == first.path  # reused, not rebuilt
    path = root / "can/train/good/001_regular.png"
    new = np.full((H, W, 3), 77, np.uint8)
    cv2.imwrite(str(path), new)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    rebuilt = _open(root, cache_root)
    assert rebuilt.built_seconds > 0 and np.array_equal(rebuilt.array[1], new)
    (root / "can/train/good/002_regular.png").unlink()  # a file removed: rebuilt with 2 images
    assert _open(root, cache_root).shape[0] == 2


def test_touch_without_change_of_content_still_rebuilds(tmp_path):
    root = make_tree(tmp_path / "data")
    _open(root, tmp_path / "cache")
    path = root / "can/train/good/000_regular.png"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert _open(root, tmp_path / "cache").built_seconds > 0  # size + mtime key: conservative


def test_failed_build_leaves_nothing_under_final_names(tmp_path):
    root = make_tree(tmp_path / "data")
    cache_root = tmp_path / "cache"
    _open(root, cache_root)
    bad = root / "can/train/good/002_regular.png"
    data = bytearray(bad.read_bytes())
    data[data.index(b"IDAT") + 20] ^= 0xFF  # corrupt pixel data, end marker intact
    bad.write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"cannot decode image {bad}"):
        _open(root, cache_root)
    assert _files(cache_root) == ["source.txt", "train.npy"]  # old array kept, its index removed: invalid
    entry = next(cache_root.glob("can-*"))
    host = socket.gethostname().replace("-", "_")
    dead = _dead_pid()
    (entry / f"train.npy.tmp-{host}-{dead}").write_bytes(b"half")  # what a killed build here leaves
    (entry / "train.npy.tmp-othernode-1").write_bytes(b"live?")  # another node's build: maybe alive
    (entry / f"train.npy.tmp-{host}-{os.getppid()}").write_bytes(b"x")  # a live process here: kept too
    make_tree(tmp_path / "data")  # restore the files
    cache = _open(root, cache_root)
    assert cache.built_seconds > 0
    assert _files(cache_root) == sorted(["source.txt", "train.json", "train.npy", "train.npy.tmp-othernode-1",
                                         f"train.npy.tmp-{host}-{os.getppid()}"])


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _build_in_child(args: tuple[str, str]) -> float:
    root, cache_root = args
    return _open(Path(root), Path(cache_root)).built_seconds


def test_concurrent_builders_build_once(tmp_path):
    root = make_tree(tmp_path / "data", n_train=6)
    with mp.get_context("fork").Pool(3) as pool:
        built = pool.map(_build_in_child, [(str(root), str(tmp_path / "cache"))] * 3)
    assert sum(b > 0 for b in built) == 1  # one process built; the others waited on the lock and reused it


def test_a_build_never_deletes_other_entries(tmp_path):
    """A source folder missing here may be another node's staged copy: its entry stays (issue 18, item 10)."""
    cache_root = tmp_path / "cache"
    gone = make_tree(tmp_path / "gone")
    _open(gone, cache_root)
    shutil.rmtree(gone)
    _open(make_tree(tmp_path / "data"), cache_root)
    assert len(list(cache_root.iterdir())) == 2


def test_prune_removes_only_entries_unused_for_the_given_age(tmp_path, capsys):
    from hybridad.cli import main

    cache_root = tmp_path / "cache"
    old_root, new_root = make_tree(tmp_path / "old"), make_tree(tmp_path / "new")
    _open(old_root, cache_root)
    _open(new_root, cache_root)
    old_entry, new_entry = (next(p for p in cache_root.iterdir() if (p / "source.txt").read_text().startswith(
        str(r.resolve()))) for r in (old_root, new_root))
    ten_days = 10 * 86400
    for f in [*old_entry.iterdir(), *new_entry.iterdir()]:
        os.utime(f, (f.stat().st_atime - ten_days, f.stat().st_mtime - ten_days))
    _open(new_root, cache_root)  # opening a valid entry stamps it as used
    with pytest.raises(SystemExit) as stop:
        main(["cache", "prune", "--older-than", "7", "--cache-dir", str(cache_root), "--dry-run"])
    assert stop.value.code == 0 and f"would remove {old_entry}" in capsys.readouterr().out
    assert old_entry.is_dir()
    with pytest.raises(SystemExit):
        main(["cache", "prune", "--older-than", "7", "--cache-dir", str(cache_root)])
    assert not old_entry.exists() and new_entry.is_dir()
    with pytest.raises(SystemExit):
        main(["cache", "prune", "--older-than", "0", "--cache-dir", str(cache_root)])
    assert not new_entry.exists()
    with pytest.raises(UserError, match="older-than"):
        prune_cache(cache_root, float("nan"))


def test_unwritable_cache_dir_is_one_line(tmp_path):
    root = make_tree(tmp_path / "data")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError) as e:
        _open(root, blocker / "cache")
    msg = str(e.value)
    assert "\n" not in msg and str(blocker / "cache") in msg and "data.cache_dir" in msg


def test_loader_with_two_workers_reads_the_cache(tmp_path):
    root = make_tree(tmp_path / "data")
    tiling = TilingConfig(input_size=16, train_levels=[TileLevel(), TileLevel(2, 2)])
    cfg = DataConfig(root=str(root), category="can", batch_size=5, num_workers=2, tiling=tiling,
                     cache_dir=str(tmp_path / "cache"))  # fmt: skip
    dm = MVTecAD2DataModule(cfg, seed=0)
    dm.prepare_data()
    assert _files(tmp_path / "cache") == ["source.txt", "train.json", "train.npy"]
    decoded = {s.sample_id: read_image(s.image_path) for s in list_samples(root, "can", "train")}
    seen = 0
    for batch in dm.train_dataloader():
        for crop, sid, (y0, x0, y1, x1) in zip(batch.image, batch.sample_id, batch.tile_box.tolist()):
            assert torch.equal(crop, torch.from_numpy(decoded[sid][y0:y1, x0:x1]).permute(2, 0, 1))
            seen += 1
        tiles = dm.train_transform(batch).image
        assert tiles.shape == (5, 3, 16, 16)
    assert seen == 15


def test_cache_off_decodes_pngs(tmp_path):
    root = make_tree(tmp_path / "data")
    tiling = TilingConfig(input_size=16, train_levels=[TileLevel(2, 1)])
    cfg = DataConfig(root=str(root), category="can", cache=False, cache_dir=str(tmp_path / "c"),
                     tiling=tiling)  # fmt: skip
    ds = MVTecAD2DataModule(cfg).dataset("train")
    assert ds.cache is None and not (tmp_path / "c").exists()
    right_half = read_image(ds.samples[0].image_path)[:, W // 2 :]  # (H,W/2,3): tile 1 of the 2x1 level
    assert torch.equal(ds[1]["image"], torch.from_numpy(right_half).permute(2, 0, 1))


def test_gray_crops_ship_one_channel_and_become_rgb_on_the_device(tmp_path):
    root = make_tree(tmp_path / "data", "sheet_metal", gray=True)
    tiling = TilingConfig(input_size=16, train_levels=[TileLevel(), TileLevel(4, 1)])
    cfg = DataConfig(root=str(root), category="sheet_metal", batch_size=15, num_workers=0, tiling=tiling,
                     cache_dir=str(tmp_path / "cache"))  # fmt: skip
    dm = MVTecAD2DataModule(cfg, seed=0)
    batch = next(iter(dm.train_dataloader()))
    assert {tuple(c.shape[:1]) for c in batch.image} == {(1,)}  # a third of the bytes of RGB crops
    rgb = [c.expand(3, -1, -1) for c in batch.image]
    reference = dm.train_transform(dataclasses.replace(batch, image=rgb)).image  # (15,3,16,16)
    assert torch.equal(dm.train_transform(batch).image, reference)
    assert dm.dataset("train")[0]["image"].shape == (3, H, W)  # direct items (e.g. CPR's references) stay RGB


def test_batch_pin_memory_pins_every_crop(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "data")
    tiling = TilingConfig(input_size=16, train_levels=[TileLevel(), TileLevel(2, 2)])
    cfg = DataConfig(root=str(root), category="can", batch_size=5, num_workers=0, tiling=tiling,
                     cache_dir=str(tmp_path / "cache"))  # fmt: skip
    batch = next(iter(MVTecAD2DataModule(cfg).train_dataloader()))
    pinned: list[int] = []

    def fake_pin(t: torch.Tensor) -> torch.Tensor:  # no CUDA here: record the call, return a copy
        pinned.append(t.numel())
        return t.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    out = batch.pin_memory()
    assert len(pinned) == 5 + 2  # five crops, label, tile_box (mask and tiles are None)
    assert all(torch.equal(a, b) and a is not b for a, b in zip(out.image, batch.image))
    assert out.sample_id == batch.sample_id and torch.equal(out.tile_box, batch.tile_box)


def test_default_cache_root_order_and_tests_never_use_the_home_cache(monkeypatch, tmp_path):
    """`$HYBRIDAD_CACHE_DIR`, else `$XDG_CACHE_HOME/hybridad`, else `~/.cache/hybridad`; the test session
    points the first at a temp folder (tests/conftest.py), so `make test` leaves ~/.cache/hybridad alone."""
    from data_modules.cache import default_cache_root

    session = default_cache_root()
    assert session == Path(os.environ["HYBRIDAD_CACHE_DIR"])
    assert Path.home() / ".cache" not in session.parents and session.is_dir()
    monkeypatch.setenv("HYBRIDAD_CACHE_DIR", str(tmp_path / "own"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_root() == tmp_path / "own"
    monkeypatch.delenv("HYBRIDAD_CACHE_DIR")
    assert default_cache_root() == tmp_path / "xdg" / "hybridad"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_root() == tmp_path / "home" / ".cache" / "hybridad"


@pytest.mark.parametrize("device,pinned", [("cuda", True), ("cpu", False)])
def test_training_and_eval_loaders_pin_batches_on_cuda_only(tmp_path, device: str, pinned: bool):
    from types import SimpleNamespace

    root = make_tree(tmp_path / "data")
    tiling = TilingConfig(input_size=16, train_levels=[TileLevel()])
    cfg = DataConfig(root=str(root), category="can", batch_size=2, num_workers=0, tiling=tiling,
                     cache_dir=str(tmp_path / "cache"))  # fmt: skip
    dm = MVTecAD2DataModule(cfg)
    assert not dm.train_dataloader().pin_memory  # no Trainer: nothing to pin for
    # a Trainer whose strategy runs on `device` (mocked: no CUDA on this machine)
    dm.trainer = SimpleNamespace(world_size=1, global_rank=0,
                                 strategy=SimpleNamespace(root_device=torch.device(device)))
    assert dm.train_dataloader().pin_memory is pinned
    assert dm.val_dataloader().pin_memory is pinned
