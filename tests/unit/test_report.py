"""Report: exact table numbers, lighting deltas, threshold rules, the PRO curve, the HTML and its images."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from hybridad.errors import UserError
from hybridad.report import best_and_worst, lighting_table, pro_curve, write_report
from hybridad.run_dir import RunDir
from hybridad.visualize import BAR_LABEL_WIDTH, BAR_WIDTH, GT_COLOUR, PRED_COLOUR


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
         "test_public/lighting=regular/seg_f1": 0.5, "test_public/lighting=shift_1/seg_f1": 0.125,
         "test_public/threshold=mean_std/seg_f1": 0.25, "test_public/threshold=mean_std/value": 0.5,
         "test_public/threshold=f1_optimal/seg_f1": 0.375, "test_public/threshold=f1_optimal/value": 0.25},
        {"value": 2.0, "method": "f1_optimal", "source": "test_public (threshold tuned on test)",
         "tuned_on_test": True},
    )
    can = make_run(
        tmp_path / "can", "can", "inp_former",
        {"test_public/aupro_0.05": 0.61234, "test_public/seg_f1": 0.1, "test_public/class_f1": 0.8,
         "test_public/image_auroc": 0.75, "test_public/pixel_auroc": 0.95, "test_public/pixel_f1_max": 0.2,
         "test_public/lighting=overexposed/seg_f1": 0.05, "test_public/lighting=regular/seg_f1": 0.2,
         "test_public/lighting=regular/aupro_0.05": 0.5, "test_public/lighting=overexposed/aupro_0.05": 0.625,
         "test_public/threshold=mean_std/seg_f1": 0.1, "test_public/threshold=mean_std/value": 1.0,
         "test_public/threshold=pseudo_f1/seg_f1": 0.15, "test_public/threshold=pseudo_f1/value": 0.75,
         "test_public/threshold=f1_optimal/seg_f1": 0.2, "test_public/threshold=f1_optimal/value": 0.5,
         "threshold_source": "validation"},
        {"value": 1.0, "method": "mean_std", "source": "validation", "tuned_on_test": False,
         "splits": {"validation": {"value": 1.0, "method": "mean_std"},
                    "test_public": {"value": 1.0, "method": "mean_std"},
                    "test_private": {"value": 1.0, "method": "mean_std"},  # as the category's: not repeated
                    "test_private_mixed": {"value": 1.2345678, "method": "split_matched"}}},
    )
    return [vial, can]  # deliberately not in CATEGORIES order


def _table_after(lines: list[str], title: str, n: int) -> list[str]:
    start = lines.index(title) + 2
    return lines[start : start + n]


def test_main_table_exact_numbers_and_mean(two_runs: list[Path], tmp_path: Path) -> None:
    text = write_report(two_runs, tmp_path / "rep", num_overlays=0)
    assert (tmp_path / "rep/report.md").read_text() == text
    lines = text.splitlines()
    # means by hand: AU-PRO (61.234 + 50) / 2 = 55.617 -> 55.62; SegF1 (10 + 25) / 2 = 17.50;
    # ClassF1 only can -> 80.00*; image AUROC (75 + 87.5) / 2 = 81.25; pixel AUROC 97.00; F1-max 25.00
    assert _table_after(lines, "## test_public", 5) == [
        "| category | AU-PRO(0.05) % | SegF1 % | ClassF1 % | image AUROC % | pixel AUROC % | pixel F1-max % "
        "| threshold source | branch |",
        "|---|---|---|---|---|---|---|---|---|",
        "| can | 61.23 | 10.00 | 80.00 | 75.00 | 95.00 | 20.00 | mean_std on validation; test_private_mixed: "
        "split_matched @ 1.235 | inp_former |",
        "| vial | 50.00 | 25.00 | – | 87.50 | 99.00 | 30.00 | threshold tuned on test | cpr |",
        "| mean | 55.62 | 17.50 | 80.00* | 81.25 | 97.00 | 25.00 |  |  |",
    ]
    assert "\\* mean over the categories that have this metric." in lines


def test_paper_layout_table_beside_the_winners_numbers(two_runs: list[Path], tmp_path: Path) -> None:
    lines = write_report(two_runs, tmp_path / "rep", num_overlays=0).splitlines()
    title = "## Per category (layout of the winners' report, Tables 1 and 2)"
    # ISVL can: AU-PRO 46.55/40.67, SegF1 17.03/9.21; vial: 67.56/62.49, 44.01/42.12
    assert _table_after(lines, title, 5) == [
        "| category | AU-PRO(0.05) % test_public | ISVL priv | ISVL priv_mix | SegF1 % test_public | ISVL priv "
        "| ISVL priv_mix |",
        "|---|---|---|---|---|---|---|",
        "| can | 61.23 | 46.55 | 40.67 | 10.00 | 17.03 | 9.21 |",
        "| vial | 50.00 | 67.56 | 62.49 | 25.00 | 44.01 | 42.12 |",
        "| mean | 55.62 | 57.05 | 51.58 | 17.50 | 30.52 | 25.66 |",
    ]


def test_threshold_rules_table(two_runs: list[Path], tmp_path: Path) -> None:
    lines = write_report(two_runs, tmp_path / "rep", num_overlays=0).splitlines()
    assert _table_after(lines, "## Threshold rules: SegF1 on test_public", 5) == [
        "| category | mean + k std | pseudo_f1 | pseudo_faint | capped_faint | F1-optimal (tuned on test) |",
        "|---|---|---|---|---|---|",
        "| can | 10.00 @ 1 | 15.00 @ 0.75 | – | – | 20.00 @ 0.5 |",
        "| vial | 25.00 @ 0.5 | – | – | – | 37.50 @ 0.25 |",
        "| mean | 17.50 | 15.00* | – | – | 28.75 |",
    ]


def test_lighting_tables_show_the_drop_from_regular(two_runs: list[Path], tmp_path: Path) -> None:
    lines = write_report(two_runs, tmp_path / "rep", num_overlays=0).splitlines()
    assert _table_after(lines, "## Lighting robustness: SegF1 %", 5) == [
        "| category | regular | overexposed | shift_1 |",
        "|---|---|---|---|",
        "| can | 20.00 | 5.00 (−15.00) | – |",
        "| vial | 50.00 | – | 12.50 (−37.50) |",
        "| mean | 35.00 | 5.00* (−15.00) | 12.50* (−37.50) |",
    ]
    assert _table_after(lines, "## Lighting robustness: AU-PRO(0.05) %", 4)[2:] == [
        "| can | 50.00 | 62.50 (+12.50) | – |",
        "| vial | – | – | – |",
    ]
    text = lighting_table(two_runs)  # what `make demo` prints
    assert "### Lighting robustness: SegF1 %" in text and "| can | 20.00 | 5.00 (−15.00) | – |" in text


def test_default_out_missing_metrics_and_duplicates(tmp_path: Path) -> None:
    run = make_run(tmp_path / "rice", "rice", "inp_former", {"test_public/seg_f1": 0.5}, {})
    text = write_report([run])
    assert (run / "report/report.md").is_file() and (run / "report/index.html").is_file()
    assert "| rice | – | 50.00 | – | – | – | – | – | inp_former |" in text
    assert "- rice: plots and overlays skipped (dataset not found at /nowhere/rice)" in text
    other = make_run(tmp_path / "rice2", "rice", "cpr", {}, {})
    with pytest.raises(UserError, match="both 'rice'"):
        write_report([run, other])
    with pytest.raises(UserError, match="at least one"):
        write_report([])


def test_pro_curve_area_is_the_au_pro() -> None:
    from hybridad.metrics.functional import ProHistograms, au_pro

    gen = torch.Generator().manual_seed(0)
    maps = [torch.rand(24, 30, generator=gen) for _ in range(3)]
    masks = [torch.zeros(24, 30, dtype=torch.bool) for _ in range(3)]
    masks[0][2:6, 3:9] = True
    masks[1][10:12, 20:29] = True
    masks[1][18:20, 1:3] = True
    maps[1][10:12, 20:29] += 0.5  # one well-found region
    hists = ProHistograms()
    for m, g in zip(maps, masks):
        hists.add(m, g)
    fpr, pro = pro_curve(*hists.key_order(), hists.n_regions, 0.05)
    assert (fpr[0], pro[0], fpr[-1]) == (0.0, 0.0, 0.05) and np.all(np.diff(fpr) >= 0)
    assert float(np.trapezoid(pro, fpr)) / 0.05 == pytest.approx(au_pro(maps, masks, 0.05), abs=1e-12)


def test_best_and_worst_are_disjoint_and_ordered() -> None:
    scores = [(0.5, "b"), (0.9, "a"), (0.0, "d"), (0.9, "c"), (0.1, "e")]
    assert best_and_worst(scores, 2) == ([(0.9, "a"), (0.9, "c")], [(0.0, "d"), (0.1, "e")])
    assert best_and_worst(scores[:3], 2) == ([(0.9, "a"), (0.5, "b")], [(0.0, "d")])


def test_html_references_only_existing_images_and_overlays_rank_by_f1(tmp_path: Path) -> None:
    from data_modules.synthetic import write_synthetic_dataset

    data = tmp_path / "data"
    write_synthetic_dataset(data, ["wallplugs"], size=(40, 32), counts="small", seed=0, verbose=False)
    run = RunDir(make_run(tmp_path / "run", "wallplugs", "inp_former",
                          {"test_public/seg_f1": 0.5, "test_public/lighting=regular/seg_f1": 0.5},
                          {"value": 0.5, "method": "mean_std", "source": "validation"}, root=str(data)))
    bad = sorted((data / "wallplugs/test_public/bad").glob("*.png"))
    for i, png in enumerate(bad):  # the first two are found exactly, the others not at all
        gt = cv2.imread(str(data / f"wallplugs/test_public/ground_truth/bad/{png.stem}_mask.png"), 0) > 0
        found = i < 2
        run.write_map(f"test_public/bad/{png.stem}", gt.astype(np.float32) * (0.75 if found else 0.25))
        run.write_mask(f"test_public/bad/{png.stem}", gt if found else np.zeros_like(gt))
    for png in sorted((data / "wallplugs/test_public/good").glob("*.png")):
        run.write_map(f"test_public/good/{png.stem}", np.zeros((32, 40), np.float32))
    out = tmp_path / "rep"
    text = write_report([run.path], out, num_overlays=2)
    page = (out / "index.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert "pro_curves.png" in sources and "histograms/wallplugs.png" in sources
    for src in sources:
        image = cv2.imread(str(out / src), cv2.IMREAD_COLOR)
        assert image is not None and image.size > 0, src  # exists and decodes
    best = [f"overlays/wallplugs/best_{p.stem}.png" for p in bad[:2]]
    worst = [f"overlays/wallplugs/worst_{p.stem}.png" for p in bad[2:4]]
    assert [s for s in sources if s.startswith("overlays/")] == best + worst
    assert f"![wallplugs best test_public/bad/{bad[0].stem}]({best[0]})" in text
    panel = cv2.imread(str(out / best[0]), cv2.IMREAD_COLOR)
    assert panel.shape == (round(32 * 512 / 40), 2 * 512 + BAR_WIDTH + BAR_LABEL_WIDTH, 3)  # 40x32 -> 512x410
    assert (panel[:, :512] == GT_COLOUR).all(-1).any()  # GT contour on the input
    assert (panel[:, 512:1024] == PRED_COLOUR).all(-1).any()  # predicted contour on the heat map


def test_all_metrics_lists_every_key_and_thresholds_keep_their_digits(tmp_path: Path) -> None:
    metrics = {"test_public/seg_f1": 0.25, "test_public/threshold=mean_std/seg_f1": 0.125,
               "test_public/threshold=mean_std/value": 1.0039, "validation/mean": 0.981234567,
               "test_public/lighting=regular/aupro_0.05": 0.5, "test_private/threshold": 1.0039,
               "threshold_source": "validation", "tuned_on_test": False, "test_public/n_images": 10}
    run = make_run(tmp_path / "can", "can", "inp_former", metrics, {"value": 1.0039, "source": "validation"})
    text = write_report([run], tmp_path / "rep", num_overlays=0)
    page = (tmp_path / "rep" / "index.html").read_text()
    for key in metrics:
        assert f'<td class="">{key}</td>' in page and f"| {key} |" in text
    lines = text.splitlines()
    start = lines.index("## All metrics")
    assert lines[start + 2:start + 4] == ["| metrics.json key | can |", "|---|---|"]
    assert "| test_public/threshold=mean_std/value | 1.0039 |" in lines
    assert "| validation/mean | 0.981235 |" in lines and "| tuned_on_test | False |" in lines
    assert "| can | 12.50 @ 1.0039 | – | – | – | – |" in lines  # the rules table: 1.0039, not "@ 1"
