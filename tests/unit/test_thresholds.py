"""Threshold rules and the streaming ScoreStats, against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hybridad.errors import UserError
from hybridad.metrics import PixelF1Max
from hybridad.threshold_rules import fit_threshold
from hybridad.thresholds import (
    ScoreStats,
    ThresholdConfig,
    mean_std_threshold,
    percentile_threshold,
)


def make_stats(chunks: list[np.ndarray]) -> ScoreStats:
    stats = ScoreStats()
    for c in chunks:
        stats.update(torch.from_numpy(c))
    return stats


@pytest.fixture
def scores() -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.gamma(2.0, 0.1, size=(6, 1, 17, 23)) - 0.05).astype(np.float32)  # some negatives


def test_mean_std_match_numpy(scores: np.ndarray) -> None:
    stats = make_stats([scores[:2], scores[2:3], scores[3:]])
    x = scores.astype(np.float64)
    assert stats.mean == pytest.approx(x.mean(), rel=1e-12)
    assert stats.std == pytest.approx(x.std(), rel=1e-10)
    assert mean_std_threshold(stats.mean, stats.std, 3.0) == pytest.approx(x.mean() + 3 * x.std(), rel=1e-10)


@pytest.mark.parametrize("q", [0.0, 12.5, 50.0, 95.0, 99.0, 99.9, 100.0])
@pytest.mark.parametrize("method", ["lower", "higher", "nearest", "linear"])
def test_percentile_matches_numpy_on_float16_values(scores: np.ndarray, q: float, method: str) -> None:
    stats = make_stats([scores[:4], scores[4:]])
    x16 = scores.astype(np.float16).astype(np.float64)
    expected = np.percentile(x16, q, method=method)
    assert stats.percentile(q, method) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_percentile_threshold_from_values_and_stats(scores: np.ndarray) -> None:
    x16 = scores.astype(np.float16).astype(np.float64)
    expected = 1.5 * np.percentile(x16, 99.0)
    assert percentile_threshold(scores, 99.0, 1.5) == pytest.approx(expected, rel=1e-12)
    assert percentile_threshold(make_stats([scores]), 99.0, 1.5) == pytest.approx(expected, rel=1e-12)


def test_merge_and_state_dict_roundtrip(scores: np.ndarray) -> None:
    a, b = make_stats([scores[:3]]), make_stats([scores[3:]])
    c = ScoreStats()
    c.load_state_dict(a.state_dict())
    c.merge_state(b)
    full = make_stats([scores])
    assert c.mean == pytest.approx(full.mean, rel=1e-14)
    assert c.std == pytest.approx(full.std, rel=1e-12)
    assert c.percentile(90) == full.percentile(90)
    assert set(a.state_dict()) >= {"count", "total", "total_sq", "hist"}


def test_fit_threshold_methods(scores: np.ndarray) -> None:
    stats = make_stats([scores])
    x = scores.astype(np.float64)
    r = fit_threshold(ThresholdConfig(method="mean_std", k=2.0), stats)
    assert r.value == pytest.approx(x.mean() + 2 * x.std(), rel=1e-10)
    assert (r.method, r.source, r.tuned_on_test) == ("mean_std", "validation", False)
    r = fit_threshold(ThresholdConfig(method="percentile", percentile=95.0, factor=1.421), stats)
    assert r.value == pytest.approx(1.421 * np.percentile(scores.astype(np.float16).astype(np.float64), 95))
    assert r.source == "validation"
    r = fit_threshold(ThresholdConfig(method="fixed", value=0.42))
    assert (r.value, r.source, r.tuned_on_test) == (0.42, "config", False)


def test_fit_threshold_f1_optimal() -> None:
    gt = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    gt[0, 0, :2, :2] = True
    maps = torch.where(gt, 0.75, 0.25)
    maps[0, 0, 3, 3] = 0.875  # one FP above the defect: best threshold is still 0.75 (F1 8/9 vs 0)
    labelled = PixelF1Max()
    labelled.update(maps, gt)
    r = fit_threshold(ThresholdConfig(method="f1_optimal"), None, labelled)
    assert r.value == 0.75 and r.tuned_on_test and r.source == "test_public (threshold tuned on test)"
    r2 = fit_threshold(ThresholdConfig(method="f1_optimal"), None, (labelled.pos_hist, labelled.neg_hist))
    assert r2.value == 0.75


def test_user_errors() -> None:
    with pytest.raises(UserError, match="threshold.method"):
        fit_threshold(ThresholdConfig(method="otsu"), ScoreStats())
    with pytest.raises(UserError, match="f1_optimal"):
        fit_threshold(ThresholdConfig(method="f1_optimal"))
    with pytest.raises(UserError, match="validation"):
        fit_threshold(ThresholdConfig(method="mean_std"), ScoreStats())
    with pytest.raises(UserError, match="percentile"):
        make_stats([np.ones((2, 2), np.float32)]).percentile(101)
