"""The threshold benchmark's summary rows: means over textures, and over those where the model detects."""

from __future__ import annotations

import pytest
import torch

from bench.bench_thresholds import DETECTS_AUROC, _means, f1_optimal, texture_optimal
from hybridad.postprocess import PostProcessConfig


def _row(texture: str, rule: str, f1: float, ratio: float, auroc: float) -> dict:
    return {"texture": texture, "defects": "novel families", "rule": rule, "SegF1 %": f1,
            "ratio to F1-opt": ratio, "pixel AUROC %": auroc}


def test_means_over_all_textures_and_over_textures_the_model_detects() -> None:
    hi, lo = 100 * DETECTS_AUROC + 10, 100 * DETECTS_AUROC - 10
    rows = [_row("brick", "mean_std", 20.0, 0.9, hi), _row("grass", "mean_std", 1.0, 0.2, lo),
            _row("moon", "mean_std", 10.0, 0.7, hi)]
    means = _means(rows)
    every, detects = means
    assert every["texture"] == "**mean**" and every["runs"] == 3
    assert every["SegF1 %"] == round((20 + 1 + 10) / 3, 2) and every["ratio to F1-opt"] == 0.6
    assert "detects" in detects["texture"] and detects["runs"] == 2
    assert detects["SegF1 %"] == 15.0 and detects["ratio to F1-opt"] == 0.8  # grass (at chance) left out


def test_no_detecting_texture_gives_no_detects_row() -> None:
    rows = [_row("grass", "mean_std", 1.0, 0.2, 100 * DETECTS_AUROC - 1)]
    assert [r["texture"] for r in _means(rows)] == ["**mean**"]


def _family(defect_score: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(2,1,4,4) maps and GT: a good image with one normal spike at 0.375, and a bad image whose two defect
    pixels score `defect_score` (every value exact in float16)."""
    maps = torch.zeros(2, 1, 4, 4)
    maps[0, 0, 0, 0] = 0.375
    maps[1, 0, 2, 1:3] = defect_score
    gts = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    gts[1, 0, 2, 1:3] = True
    return maps, gts


def test_texture_oracle_is_the_best_single_threshold_over_families() -> None:
    """Hand-computed: family A's defect pixels score 0.75, family B's 0.25, the normal spike 0.375. Per family:
    A reaches F1 1 above the spike, B 0.8 below it (2 TP, the spike as 1 FP). One threshold for both: at or
    below 0.25 both give 0.8 (mean 0.8); above the spike A gives 1 and B 0 (mean 0.5); so the texture oracle is
    0.8, under the per-family mean of 0.9."""
    pp = PostProcessConfig()
    subsets = {"A": _family(0.75), "B": _family(0.25)}
    assert f1_optimal(*subsets["A"], pp)[0] == pytest.approx(1.0)
    assert f1_optimal(*subsets["B"], pp)[0] == pytest.approx(0.8)
    f1, threshold = texture_optimal(subsets, pp, extra=[float("nan")])
    assert f1 == pytest.approx(0.8)
    assert 0 < threshold <= 0.25


def test_texture_oracle_also_tries_the_rules_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the maps' own grid reduced to one useless value (above every score), the rules' thresholds passed
    as `extra` still give the best value (0.25: both defect pixels, the one spike as FP: F1 0.8)."""
    import bench.bench_thresholds as bench

    monkeypatch.setattr(bench, "_oracle_grid", lambda maps: [0.875])
    subsets, pp = {"B": _family(0.25)}, PostProcessConfig()
    assert bench.texture_optimal(subsets, pp)[0] == 0.0
    assert bench.texture_optimal(subsets, pp, extra=[0.25]) == (pytest.approx(0.8), 0.25)
