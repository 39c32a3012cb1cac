"""Submission tree: write from run directories, every rule of the official checker, packing, CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import yaml

import hybridad.submission as submission
from hybridad.errors import UserError
from hybridad.run_dir import RunDir
from hybridad.submission import check_submission, pack_submission, write_submission
from hybridad.types import CATEGORIES

REPO = Path(__file__).resolve().parents[2]
SMALL = {c: 2 for c in CATEGORIES}  # files per private split in the small trees


def make_run(root: Path, category: str, count: int, masks: bool = True,
             size: tuple[int, int] = (6, 8)) -> Path:
    """A fake run directory with `count` private maps (and masks) per private split."""
    run = RunDir(root / f"run_{category}")
    run.write_text("config.yaml", f"branch: inp_former\ndata:\n  category: {category}\n")
    run.write_state("completed")
    rng = np.random.default_rng(len(category))
    for split, tag in (("test_private", "regular"), ("test_private_mixed", "mixed")):
        for i in range(count):
            sid = f"{split}/{i:03d}_{tag}"
            amap = rng.random(size).astype(np.float32) * 10
            run.write_map(sid, amap)
            if masks:
                run.write_mask(sid, amap > 5)
    return run.path


@pytest.fixture
def small_tree(tmp_path: Path) -> Path:
    runs = [make_run(tmp_path / "runs", c, 2) for c in CATEGORIES]
    out = tmp_path / "sub"
    write_submission(runs, out)
    return out


def test_written_tree_passes_check_and_matches_runs(small_tree: Path, tmp_path: Path) -> None:
    assert check_submission(small_tree, SMALL) == []
    assert sorted(p.name for p in small_tree.iterdir()) == ["anomaly_images", "anomaly_images_thresholded"]
    run = RunDir(tmp_path / "runs" / "run_vial")
    tiff = tifffile.imread(small_tree / "anomaly_images/vial/test_private_mixed/001_mixed.tiff")
    assert tiff.dtype == np.float16 and tiff.shape == (6, 8)
    np.testing.assert_array_equal(tiff.astype(np.float32), run.read_map("test_private_mixed/001_mixed"))
    png = cv2.imread(str(small_tree / "anomaly_images_thresholded/vial/test_private/000_regular.png"),
                     cv2.IMREAD_UNCHANGED)
    assert png.dtype == np.uint8 and png.ndim == 2
    np.testing.assert_array_equal(png, np.where(run.read_mask("test_private/000_regular"), 255, 0))
    assert not list(tmp_path.glob("sub.tmp-*"))


def test_official_counts_one_category(tmp_path: Path) -> None:
    run = make_run(tmp_path, "sheet_metal", 142, size=(2, 3))
    write_submission([run], tmp_path / "sub")
    names = sorted(p.name for p in (tmp_path / "sub/anomaly_images/sheet_metal/test_private_mixed").iterdir())
    assert names == [f"{i:03d}_mixed.tiff" for i in range(142)]
    assert check_submission(tmp_path / "sub", {"sheet_metal": 142}) == []
    problems = check_submission(tmp_path / "sub", {"sheet_metal": 143})
    missing = f"{tmp_path}/sub/anomaly_images/sheet_metal/test_private/142_regular.tiff: missing file"
    assert missing in problems


def test_reencodes_float32_and_channel_first_maps(tmp_path: Path) -> None:
    run = make_run(tmp_path, "can", 1)
    path = RunDir(run).map_path("test_private/000_regular")
    tifffile.imwrite(path, np.full((1, 6, 8), 1e5, np.float32))  # (1,H,W) float32, beyond float16 range
    write_submission([run], tmp_path / "sub")
    arr = tifffile.imread(tmp_path / "sub/anomaly_images/can/test_private/000_regular.tiff")
    assert arr.dtype == np.float16 and arr.shape == (6, 8) and float(arr.max()) == 65504.0


def _tiff(rel: str, arr: np.ndarray):
    return lambda root: tifffile.imwrite(root / rel, arr)


def _png(rel: str, arr: np.ndarray):
    return lambda root: cv2.imwrite(str(root / rel), arr)


M = "anomaly_images"
T = "anomaly_images_thresholded"
BROKEN = {
    "extra file": (lambda r: (r / M / "can/test_private/notes.txt").write_text("x"),
                   [f"{M}/can/test_private/notes.txt: superfluous file"]),
    "extra top-level file": (lambda r: (r / "README.md").write_text("x"), ["README.md: superfluous file"]),
    "float32 tiff": (_tiff(f"{M}/rice/test_private/000_regular.tiff", np.zeros((6, 8), np.float32)),
                     [f"{M}/rice/test_private/000_regular.tiff: dtype float32, must be float16"]),
    "3-channel tiff": (_tiff(f"{M}/rice/test_private/001_regular.tiff", np.zeros((6, 8, 3), np.float16)),
                       [f"{M}/rice/test_private/001_regular.tiff: not a single-channel 2-D image "
                        "(shape (6, 8, 3))"]),
    "nan map": (_tiff(f"{M}/can/test_private/000_regular.tiff", np.full((6, 8), np.nan, np.float16)),
                [f"{M}/can/test_private/000_regular.tiff: contains NaN (not checked by MVTec's checker, "
                 "but breaks AU-PRO)"]),
    "mask value 128": (_png(f"{T}/fabric/test_private_mixed/000_mixed.png", np.full((6, 8), 128, np.uint8)),
                       [f"{T}/fabric/test_private_mixed/000_mixed.png: values [128] not in {{0, 255}}"]),
    "3-channel mask": (_png(f"{T}/fabric/test_private/000_regular.png", np.zeros((6, 8, 3), np.uint8)),
                       [f"{T}/fabric/test_private/000_regular.png: not a single-channel 2-D image "
                        "(shape (6, 8, 3))"]),
    "mask size": (_png(f"{T}/walnuts/test_private/001_regular.png", np.zeros((6, 9), np.uint8)),
                  [f"{T}/walnuts/test_private/001_regular.png: mask size (6, 9) differs from its map's "
                   "(6, 8)"]),
    "missing file": (lambda r: (r / M / "walnuts/test_private_mixed/001_mixed.tiff").unlink(),
                     [f"{M}/walnuts/test_private_mixed/001_mixed.tiff: missing file"]),
    "wrong name": (lambda r: os.replace(r / M / "vial/test_private/001_regular.tiff",
                                        r / M / "vial/test_private/1_regular.tiff"),
                   [f"{M}/vial/test_private/1_regular.tiff: superfluous file",
                    f"{M}/vial/test_private/001_regular.tiff: missing file"]),
    "wrong suffix": (lambda r: os.replace(r / T / "vial/test_private/001_regular.png",
                                          r / T / "vial/test_private/001_regular.tiff"),
                     [f"{T}/vial/test_private/001_regular.tiff: superfluous file",
                      f"{T}/vial/test_private/001_regular.png: missing file"]),
    "extra split folder": (lambda r: (r / M / "can/test_public").mkdir(),
                           [f"{M}/can/test_public: superfluous folder"]),
    "missing category": (lambda r: shutil.rmtree(r / M / "fruit_jelly"),
                         [f"{M}/fruit_jelly: missing folder"]),
    "missing split in masks": (lambda r: shutil.rmtree(r / T / "can/test_private_mixed"),
                               [f"{T}/can/test_private_mixed: missing folder"]),
    "extra category": (lambda r: (r / T / "screws").mkdir(), [f"{T}/screws: superfluous folder"]),
}


@pytest.mark.parametrize("rule", list(BROKEN))
def test_each_broken_rule_is_reported_with_its_path(small_tree: Path, rule: str) -> None:
    breaker, expected = BROKEN[rule]
    breaker(small_tree)
    assert check_submission(small_tree, SMALL) == [f"{small_tree}/{line}" for line in expected]


def test_many_missing_files_are_summarised(small_tree: Path) -> None:
    problems = check_submission(small_tree, {**SMALL, "can": 14})
    folder = small_tree / M / "can/test_private"
    assert [p for p in problems if p.startswith((f"{folder}/", f"{folder}:"))] == (
        [f"{folder}/{i:03d}_regular.tiff: missing file" for i in range(2, 12)]
        + [f"{folder}: 2 more missing files (up to 013_regular.tiff)"]
    )


def test_missing_thresholded_folder_is_only_a_warning(small_tree: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    shutil.rmtree(small_tree / T)
    assert check_submission(small_tree, SMALL) == []
    assert "SegF1 = 0 and ClassF1 = 0" in capsys.readouterr().err


def test_missing_maps_folder_and_not_a_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert check_submission(tmp_path / "empty", SMALL) == [f"{tmp_path}/empty/anomaly_images: missing folder"]
    assert check_submission(tmp_path / "nope", SMALL) == [f"{tmp_path}/nope: not a folder"]


def test_write_rejects_duplicate_category_and_missing_split(tmp_path: Path) -> None:
    a = make_run(tmp_path / "a", "can", 1)
    b = make_run(tmp_path / "b", "can", 1)
    with pytest.raises(UserError, match="both 'can'"):
        write_submission([a, b], tmp_path / "sub")
    shutil.rmtree(Path(a) / "maps/test_private_mixed")
    with pytest.raises(UserError, match=f"run {a} has no maps for split test_private_mixed"):
        write_submission([a], tmp_path / "sub")
    assert not (tmp_path / "sub").exists()


def test_write_refuses_non_empty_out_unless_overwrite(tmp_path: Path) -> None:
    run = make_run(tmp_path, "can", 1)
    out = tmp_path / "sub"
    out.mkdir()
    write_submission([run], out)  # an empty folder is fine
    with pytest.raises(UserError, match="not empty"):
        write_submission([run], out)
    (out / "anomaly_images" / "stale.txt").write_text("old")  # a stale tree is replaced whole
    write_submission([run], out, overwrite=True)
    assert not (out / "anomaly_images" / "stale.txt").exists()
    assert sorted(p.name for p in out.iterdir()) == ["anomaly_images", "anomaly_images_thresholded"]
    # no temporary tree or backup left; the provenance sits beside the tree
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run_can", "sub", "sub.provenance.yaml"]


def test_write_refuses_incomplete_runs_and_records_run_provenance(tmp_path: Path) -> None:
    runs = [make_run(tmp_path / "runs", c, 1) for c in ("can", "vial")]
    RunDir(runs[0]).write_thresholds({"value": 0.25, "method": "f1_optimal", "tuned_on_test": True,
                                      "source": "test_public (threshold tuned on test)"})
    RunDir(runs[1]).write_thresholds({"value": 0.5, "method": "mean_std", "source": "validation",
                                      "tuned_on_test": False})
    RunDir(runs[1]).write_metrics({"test_public/seg_f1": 0.4, "threshold_source": "validation"})
    provenance = yaml.safe_load(write_submission(runs, tmp_path / "sub").read_text())
    assert provenance["tuned_on_test"] == ["can"] and provenance["label"] == "threshold tuned on test"
    vial = provenance["categories"]["vial"]
    assert vial == {"run": str(runs[1].resolve()), "evaluation": None, "masks": "written by training",
                    "overrides": [], "tuned_on_test": False, "threshold_source": "validation",
                    "thresholds": {"test_private": 0.5, "test_private_mixed": 0.5},
                    "test_public": {"seg_f1": 0.4}}
    RunDir(runs[1]).write_state("failed", "CUDA out of memory")
    with pytest.raises(UserError, match=f"submission write: run {runs[1]} is not complete "
                                        r"\(state failed: CUDA out of memory\)"):
        write_submission(runs, tmp_path / "sub2")
    assert not (tmp_path / "sub2").exists() and not (tmp_path / "sub2.provenance.yaml").exists()


def test_write_failure_midway_leaves_no_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = [make_run(tmp_path / "runs", c, 2) for c in ("can", "rice")]
    calls = {"n": 0}
    real = submission._reencode_map

    def flaky(src: Path) -> bytes:
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full")
        return real(src)

    monkeypatch.setattr(submission, "_reencode_map", flaky)
    with pytest.raises(OSError, match="disk full"):
        write_submission(runs, tmp_path / "sub")
    assert calls["n"] >= 5  # files already being written on other threads finish; queued ones are cancelled
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_pack_writes_official_layout(small_tree: Path, tmp_path: Path) -> None:
    archive = pack_submission(small_tree, tmp_path / "out.tar.gz", expected_counts=SMALL)
    assert archive == tmp_path / "out.tar.gz"
    with tarfile.open(archive) as tar:
        names = sorted(tar.getnames())
        member = tar.extractfile("sub/anomaly_images/can/test_private/000_regular.tiff")
        assert member is not None
        arr = tifffile.imread(member)
    expected = sorted(
        f"sub/{root}/{c}/{split}/{i:03d}_{tag}.{ext}"
        for root, ext in ((M, "tiff"), (T, "png")) for c in CATEGORIES
        for split, tag in (("test_private", "regular"), ("test_private_mixed", "mixed")) for i in range(2)
    )
    assert names == expected
    assert arr.dtype == np.float16 and arr.shape == (6, 8)
    flat = pack_submission(small_tree, tmp_path / "flat.tar.gz", expected_counts=SMALL, arc_root="")
    with tarfile.open(flat) as tar:
        assert sorted(tar.getnames()) == [n.removeprefix("sub/") for n in expected]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_pack_refuses_a_failing_tree(small_tree: Path, tmp_path: Path) -> None:
    (small_tree / M / "can/test_private/000_regular.tiff").unlink()
    expected = "fails the submission check \\(1 problems\\).*000_regular.tiff: missing"
    with pytest.raises(UserError, match=expected):
        pack_submission(small_tree, tmp_path / "out.tar.gz", expected_counts=SMALL)
    assert not (tmp_path / "out.tar.gz").exists()


def test_cli_check_bad_tree_exits_1_without_traceback(small_tree: Path) -> None:
    (small_tree / M / "can/test_public").mkdir()
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, "-m", "hybridad", "submission", "check", str(small_tree)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert f"{small_tree}/{M}/can/test_public: superfluous folder" in proc.stderr
    # the official counts apply on the command line: 2 files per split are far too few
    assert f"{small_tree}/{M}/can/test_private/002_regular.tiff: missing file" in proc.stderr


def _runs_from_synthetic(tmp_path: Path, categories: list[str]) -> list[Path]:
    """Fake runs whose private maps are named after, and sized like, a synthetic `counts="official"` tree."""
    from data_modules.synthetic import write_synthetic_dataset

    data = tmp_path / "data"
    write_synthetic_dataset(data, categories, size=(16, 8), counts="official", seed=0, verbose=False)
    runs = []
    for category in categories:
        run = RunDir(tmp_path / "runs" / category)
        run.write_text("config.yaml", f"data:\n  category: {category}\n  root: {data}\n")
        run.write_state("completed")
        for split in ("test_private", "test_private_mixed"):
            for png in sorted((data / category / split).glob("*.png")):
                h, w = cv2.imread(str(png), cv2.IMREAD_UNCHANGED).shape[:2]
                amap = np.linspace(0, 1, h * w, dtype=np.float32).reshape(h, w)  # (H*W,) -> (H,W)
                run.write_map(f"{split}/{png.stem}", amap)
                run.write_mask(f"{split}/{png.stem}", amap > 0.9)
        runs.append(run.path)
    return runs


def test_synthetic_official_private_names_pass_check_one_category(tmp_path: Path) -> None:
    runs = _runs_from_synthetic(tmp_path, ["sheet_metal"])
    write_submission(runs, tmp_path / "sub")
    counts = {"sheet_metal": submission.OFFICIAL_COUNTS["sheet_metal"]}
    assert check_submission(tmp_path / "sub", counts) == []
    tiff = tifffile.imread(tmp_path / "sub" / M / "sheet_metal/test_private/000_regular.tiff")
    assert tiff.shape == (8, 16)


@pytest.mark.slow
def test_synthetic_official_private_names_pass_official_check(tmp_path: Path) -> None:
    runs = _runs_from_synthetic(tmp_path, list(CATEGORIES))
    write_submission(runs, tmp_path / "sub")
    assert check_submission(tmp_path / "sub") == []
    assert len(list((tmp_path / "sub" / M).rglob("*.tiff"))) == 2 * sum(submission.OFFICIAL_COUNTS.values())


def test_cli_pack_takes_categories_and_data_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`submission pack --categories CAT --data-root ROOT` checks a one-category tree against ROOT's
    counts."""
    from hybridad.cli import main

    write_submission([make_run(tmp_path / "runs", "can", 2)], tmp_path / "sub")
    for split in ("test_private", "test_private_mixed"):
        (tmp_path / "data/can" / split).mkdir(parents=True)
    for i in range(2):
        (tmp_path / "data/can/test_private" / f"{i:03d}_regular.png").write_bytes(b"")
    archive = tmp_path / "sub.tar.gz"
    with pytest.raises(SystemExit) as done:  # all 8 categories at the official counts: refused
        main(["submission", "pack", str(tmp_path / "sub"), "--out", str(archive)])
    assert done.value.code == 2 and not archive.exists()
    assert "fails the submission check" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        main(["submission", "pack", str(tmp_path / "sub"), "--out", str(archive), "--categories", "can",
              "--data-root", str(tmp_path / "data")])
    assert done.value.code == 0
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert len(names) == 8 and "sub/anomaly_images/can/test_private/001_regular.tiff" in names


def test_make_submission_passes_categories_data_root_and_overwrite() -> None:
    """`make submission` forwards CATEGORIES, DATA_ROOT and OVERWRITE to write, check and pack (a dry run)."""
    proc = subprocess.run(["make", "-n", "submission", "STAMP=Makefile", "RUN_DIRS=runs/a runs/b",
                           "CATEGORIES=can vial", "DATA_ROOT=/d", "OVERWRITE=1"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if "hybridad submission" in line]
    assert [line.split("hybridad submission ", 1)[1] for line in lines] == [
        "write runs/a runs/b --out submission --overwrite",
        "check submission --categories can vial --data-root /d",
        "pack submission --out submission.tar.gz --categories can vial --data-root /d",
    ]
    ignored = subprocess.run(["git", "check-ignore", "submission/x.tiff", "submission.provenance.yaml",
                              "submission.tar.gz"], cwd=REPO, capture_output=True, text=True)
    assert ignored.stdout.split() == ["submission/x.tiff", "submission.provenance.yaml", "submission.tar.gz"]


def test_submission_files_are_written_on_several_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """About 4,000 maps per submission: they are re-encoded in parallel, not one by one on the main thread."""
    import threading

    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    runs = [make_run(tmp_path / "runs", c, 3) for c in ("can", "rice")]
    threads: set[int] = set()
    real = submission._reencode_map

    def record(src: Path) -> bytes:
        threads.add(threading.get_ident())
        return real(src)

    monkeypatch.setattr(submission, "_reencode_map", record)
    write_submission(runs, tmp_path / "sub")
    assert threads and threading.get_ident() not in threads
    assert check_submission(tmp_path / "sub", {"can": 3, "rice": 3}) == []
