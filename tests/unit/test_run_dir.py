"""RunDir: layout, float16 round trips, atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import torch

from hybridad.errors import UserError
from hybridad.run_dir import FLOAT16_MAX, RunDir


@pytest.mark.parametrize(
    ("sample_id", "rel"),
    [
        ("test_public/good/000_regular", "test_public/good/000_regular"),
        ("test_public/bad/000_regular", "test_public/bad/000_regular"),
        ("validation/good/012_regular", "validation/good/012_regular"),
        ("train/good/001_regular", "train/good/001_regular"),
        ("test_private/000_regular", "test_private/000_regular"),
        ("test_private_mixed/007_mixed", "test_private_mixed/007_mixed"),
    ],
)
def test_sample_id_path_round_trip(tmp_path: Path, sample_id: str, rel: str) -> None:
    run = RunDir(tmp_path)
    assert run.map_path(sample_id) == tmp_path / "maps" / f"{rel}.tiff"
    assert run.mask_path(sample_id) == tmp_path / "masks" / f"{rel}.png"
    run.write_map(sample_id, np.zeros((3, 4), np.float32))
    run.write_mask(sample_id, np.zeros((3, 4), bool))
    split = sample_id.split("/")[0]
    assert list(run.iter_maps(split)) == [(sample_id, run.map_path(sample_id))]
    assert list(run.iter_masks(split)) == [(sample_id, run.mask_path(sample_id))]


@pytest.mark.parametrize(
    "bad_id",
    ["000_regular", "test_public/000_regular", "test_private/good/000_regular", "test_public/odd/000_regular",
     "test_private/../x", "/test_private/000_regular", "nosplit/good/000_regular"],
)
def test_malformed_sample_ids_raise(tmp_path: Path, bad_id: str) -> None:
    with pytest.raises(ValueError, match="malformed sample id"):
        RunDir(tmp_path).map_path(bad_id)


def test_iter_maps_sorted_and_split_scoped(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    ids = ["test_public/good/001_regular", "test_public/bad/000_regular", "test_public/good/000_regular"]
    for sid in ids:
        run.write_map(sid, np.ones((2, 2)))
    run.write_map("test_private/000_regular", np.ones((2, 2)))
    (tmp_path / "maps/test_public/bad/.000_regular.tiff.x.tmp").write_bytes(b"partial")  # a write in flight
    assert [sid for sid, _ in run.iter_maps("test_public")] == sorted(ids)
    assert [sid for sid, _ in run.iter_maps("test_private")] == ["test_private/000_regular"]
    assert list(run.iter_maps("test_private_mixed")) == []


def test_float16_round_trip_is_exact(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    rng = np.random.default_rng(0)
    values = (rng.standard_normal((17, 23)) * 100).astype(np.float16)  # every value exactly representable
    values[0, :4] = [0.0, FLOAT16_MAX, -FLOAT16_MAX, np.finfo(np.float16).tiny]
    run.write_map("test_public/bad/000_regular", torch.from_numpy(values.astype(np.float32))[None])  # (1,H,W)
    back = run.read_map("test_public/bad/000_regular")
    assert back.dtype == np.float32 and back.shape == (17, 23)
    np.testing.assert_array_equal(back, values.astype(np.float32))
    on_disk = tifffile.imread(run.map_path("test_public/bad/000_regular"))
    assert on_disk.dtype == np.float16 and on_disk.ndim == 2


def test_write_map_rounds_to_nearest_float16_and_clips(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    raw = np.array([[0.1, 1e6, -1e6, np.inf, -np.inf, 70000.0]], np.float32)
    run.write_map("test_private/000_regular", raw)
    back = run.read_map("test_private/000_regular")
    m = FLOAT16_MAX
    np.testing.assert_array_equal(back, np.array([[np.float16(0.1), m, -m, m, -m, m]], np.float32))
    assert np.isfinite(back).all()


def test_write_map_rejects_nan_and_bad_shapes(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    with pytest.raises(ValueError, match="NaN"):
        run.write_map("test_private/000_regular", np.full((2, 2), np.nan))
    with pytest.raises(ValueError, match="shape"):
        run.write_map("test_private/000_regular", np.zeros((3, 2, 2)))
    assert not run.map_path("test_private/000_regular").exists()


def test_mask_round_trip_is_binary_png(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    mask = np.zeros((5, 7), bool)
    mask[1:3, 2:6] = True
    run.write_mask("test_public/bad/003_overexposed", torch.from_numpy(mask))
    img = cv2.imread(str(run.mask_path("test_public/bad/003_overexposed")), cv2.IMREAD_UNCHANGED)
    assert img.dtype == np.uint8 and img.shape == (5, 7)
    assert set(np.unique(img)) == {0, 255}
    np.testing.assert_array_equal(run.read_mask("test_public/bad/003_overexposed"), mask)


def test_atomic_write_leaves_no_temp_on_success(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    run.write_map("test_private/000_regular", np.ones((4, 4)))
    run.write_metrics({"a": 1})
    assert sorted(p.name for p in (tmp_path / "maps/test_private").iterdir()) == ["000_regular.tiff"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maps", "metrics.json"]


def test_failed_write_leaves_nothing_and_keeps_old_file(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    run = RunDir(tmp_path)
    run.write_map("test_private/001_regular", np.full((4, 4), 7.0))

    def crash(fd: int) -> None:  # the bytes are in the temp file, the process dies before the rename
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        run.write_map("test_private/000_regular", np.ones((4, 4)))
    with pytest.raises(OSError, match="disk full"):
        run.write_map("test_private/001_regular", np.zeros((4, 4)))
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "maps/test_private").iterdir()) == ["001_regular.tiff"]
    np.testing.assert_array_equal(run.read_map("test_private/001_regular"), np.full((4, 4), 7.0, np.float32))


def test_metrics_merge_and_numpy_values(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    run.write_metrics({"test_public/aupro_0.05": np.float32(0.5), "test_public/seg_f1": 0.25})
    run.write_metrics({"test_public/seg_f1": torch.tensor(0.75), "threshold_source": "validation"})
    assert run.read_metrics() == {"test_public/aupro_0.05": 0.5, "test_public/seg_f1": 0.75,
                                  "threshold_source": "validation"}


def test_thresholds_round_trip(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert run.read_thresholds() == {}
    th = {"value": np.float64(1.25), "method": "mean_std", "source": "validation", "tuned_on_test": False,
          "stats": {"mean": 0.5, "std": np.float32(0.25)}}
    run.write_thresholds(th)
    assert run.read_thresholds() == {"value": 1.25, "method": "mean_std", "source": "validation",
                                     "tuned_on_test": False, "stats": {"mean": 0.5, "std": 0.25}}


def test_category_from_config(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    with pytest.raises(UserError, match="config.yaml not found"):
        _ = run.category
    run.write_text("config.yaml", "branch: cpr\ndata:\n  category: vial\n  root: /nowhere\n")
    assert run.category == "vial"
    assert run.read_config()["branch"] == "cpr"


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_written_files_honour_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        path = RunDir(tmp_path).write_text("config.yaml", "a: 1\n")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode


def test_a_full_disk_names_the_file_and_keeps_the_old_checkpoint(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from callbacks.checkpoint import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as err:
        io.save_checkpoint({"step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(path)
    assert os.listdir(path.parent) == ["last.ckpt"]  # no temporary file, no truncated checkpoint
    assert torch.load(path, weights_only=True)["step"] == 1
