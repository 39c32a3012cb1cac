"""Report: exact table numbers, mean row, missing values, overlays."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from hybridad.errors import UserError
from hybridad.report import overlay_panel, write_report
from hybridad.run_dir import RunDir


def make_run(path: Path, category: str, branch: str, metrics: dict, thresholds: dict, root: str = "/nowhere"
             ) -> Path:
    run = RunDir(path)
    run.write_text("config.yaml", f"branch: {branch}\ndata:\n  category: {category}\n  root: {root}\n")
    run.write_metrics(metrics)
    if thresholds:
        run.write_thresholds(thresholds)
    return run.path


@pytest.fixture
def two_runs(tmp_path: Path) -> list[Path]:
    vial = make_run(
        tmp_path / "vial", "vial", "cpr",
        {"test_public/aupro_0.05": 0.5, "test_public/seg_f1": 0.25, "test_public/image_auroc": 0.875,
         "test_public/pixel_auroc": 0.99, "test_public/pixel_f1_max": 0.3,
         "test_public/lighting=regular/seg_f1": 0.5, "test_public/lighting=shift_1/seg_f1": 0.125},
        {"value": 2.0, "method": "f1_optimal", "source": "test_public (threshold tuned on test)",
         "tuned_on_test": True},
    )
    can = make_run(
        tmp_path / "can", "can", "inp_former",
        {"test_public/aupro_0.05": 0.61234, "test_public/seg_f1": 0.1, "test_public/class_f1": 0.8,
         "test_public/image_auroc": 0.75, "test_public/pixel_auroc": 0.95, "test_public/pixel_f1_max": 0.2,
         "test_public/lighting=overexposed/seg_f1": 0.05, "test_public/lighting=regular/seg_f1": 0.2,
         "threshold_source": "validation"},
        {"value": 1.0, "method": "mean_std", "source": "validation", "tuned_on_test": False},
    )
    return [vial, can]  # deliberately not in CATEGORIES order


def test_main_table_exact_numbers_and_mean(two_runs: list[Path], tmp_path: Path) -> None:
    text = write_report(two_runs, tmp_path / "rep", num_overlays=0)
    assert (tmp_path / "rep/report.md").read_text() == text
    lines = text.splitlines()
    start = lines.index("## test_public") + 2
    # means by hand: AU-PRO (61.234 + 50) / 2 = 55.617 -> 55.62; SegF1 (10 + 25) / 2 = 17.50;
    # ClassF1 only can -> 80.00*; image AUROC (75 + 87.5) / 2 = 81.25; pixel AUROC 97.00; F1-max 25.00
    assert lines[start : start + 5] == [
        "| category | AU-PRO(0.05) % | SegF1 % | ClassF1 % | image AUROC % | pixel AUROC % | pixel F1-max % "
        "| threshold source | branch |",
        "|---|---|---|---|---|---|---|---|---|",
        "| can | 61.23 | 10.00 | 80.00 | 75.00 | 95.00 | 20.00 | mean_std on validation | inp_former |",
        "| vial | 50.00 | 25.00 | – | 87.50 | 99.00 | 30.00 | threshold tuned on test | cpr |",
        "| mean | 55.62 | 17.50 | 80.00* | 81.25 | 97.00 | 25.00 |  |  |",
    ]
    assert "\\* mean over the categories that have this metric." in lines


def test_lighting_table(two_runs: list[Path], tmp_path: Path) -> None:
    lines = write_report(two_runs, tmp_path / "rep", num_overlays=0).splitlines()
    start = lines.index("### test_public: SegF1 % per lighting") + 2
    assert lines[start : start + 5] == [
        "| category | regular | overexposed | shift_1 |",
        "|---|---|---|---|",
        "| can | 20.00 | 5.00 | – |",
        "| vial | 50.00 | – | 12.50 |",
        "| mean | 35.00 | 5.00* | 12.50* |",
    ]
    assert "### test_public: AU-PRO(0.05) % per lighting" not in lines


def test_default_out_missing_metrics_and_duplicates(tmp_path: Path) -> None:
    run = make_run(tmp_path / "rice", "rice", "inp_former", {"test_public/seg_f1": 0.5}, {})
    text = write_report([run])
    assert (run / "report/report.md").is_file()
    assert "| rice | – | 50.00 | – | – | – | – | – | inp_former |" in text
    assert "- rice: overlays skipped (dataset not found at /nowhere/rice)" in text
    other = make_run(tmp_path / "rice2", "rice", "cpr", {}, {})
    with pytest.raises(UserError, match="both 'rice'"):
        write_report([run, other])


def test_overlays_written_when_dataset_exists(tmp_path: Path) -> None:
    from data_modules.synthetic import write_synthetic_dataset

    data = tmp_path / "data"
    write_synthetic_dataset(data, ["wallplugs"], size=(40, 32), counts="small", seed=0, verbose=False)
    run = RunDir(make_run(tmp_path / "run", "wallplugs", "inp_former", {"test_public/seg_f1": 0.5}, {},
                          root=str(data)))
    bad = sorted((data / "wallplugs/test_public/bad").glob("*.png"))
    for png in bad:
        gt = cv2.imread(str(data / f"wallplugs/test_public/ground_truth/bad/{png.stem}_mask.png"), 0)
        run.write_map(f"test_public/bad/{png.stem}", gt.astype(np.float32) / 255.0)
        run.write_mask(f"test_public/bad/{png.stem}", gt > 0)
    run.write_map("test_public/good/000_regular", np.zeros((32, 40)))
    text = write_report([run.path], tmp_path / "rep", num_overlays=2)
    written = sorted((tmp_path / "rep/overlays/wallplugs").iterdir())
    assert [p.name for p in written] == [f"bad_{p.stem}.png" for p in bad[:2]]
    assert f"![wallplugs test_public/bad/{bad[0].stem}](overlays/wallplugs/bad_{bad[0].stem}.png)" in text
    panel = cv2.imread(str(written[0]), cv2.IMREAD_COLOR)
    assert panel.shape == (32, 80, 3)
    left, right = panel[:, :40], panel[:, 40:]
    assert (left == (0, 255, 0)).all(-1).any()  # GT contour on the input
    assert (right == (0, 0, 255)).all(-1).any()  # predicted contour on the heat map


def test_overlay_panel_contours_follow_masks() -> None:
    image = np.full((20, 30, 3), 100, np.uint8)
    amap = np.zeros((10, 15), np.float32)  # half resolution: resized to the image
    amap[2:4, 3:6] = 1.0
    gt = np.zeros((20, 30), np.uint8)
    gt[5:10, 8:14] = 255
    panel = overlay_panel(image, amap, gt, None)
    assert panel.shape == (20, 60, 3)
    green = (panel[:, :30] == (0, 255, 0)).all(-1)
    ys, xs = np.nonzero(green)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (5, 9, 8, 13)  # the outline of the GT box
    assert not (panel[:, 30:] == (0, 0, 255)).all(-1).any()  # no prediction, no red contour
