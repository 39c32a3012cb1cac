"""The threshold benchmark's summary rows: means over textures, and over those where the model detects."""

from __future__ import annotations

from bench.bench_thresholds import DETECTS_AUROC, _means


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
