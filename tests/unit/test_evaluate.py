"""Per-split threshold rules (`threshold.test_private*.…`) and evaluation-directory ids."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hybridad.config import load_config
from hybridad.errors import UserError
from hybridad.evaluate import _claim, best_evaluation, list_evaluations
from hybridad.threshold_rules import fit_threshold, rule_for_split
from hybridad.thresholds import SplitThresholdConfig, ThresholdConfig, has_split_overrides


def test_split_rule_inherits_the_category_rule_and_value_means_fixed() -> None:
    cfg = ThresholdConfig(method="mean_std", k=3.0, test_private=SplitThresholdConfig(k=4.5),
                          test_private_mixed=SplitThresholdConfig(value=0.43))
    assert rule_for_split(cfg, "validation") == rule_for_split(cfg, "test_public") == ThresholdConfig()
    assert rule_for_split(cfg, "test_private") == ThresholdConfig(method="mean_std", k=4.5)
    assert rule_for_split(cfg, "test_private_mixed") == ThresholdConfig(method="fixed", k=3.0, value=0.43)
    assert fit_threshold(rule_for_split(cfg, "test_private_mixed")).value == 0.43
    assert has_split_overrides(cfg) and not has_split_overrides(ThresholdConfig(k=5.0))
    explicit = ThresholdConfig(test_private_mixed=SplitThresholdConfig(method="percentile", value=0.43))
    assert rule_for_split(explicit, "test_private_mixed").method == "percentile"  # an explicit method wins
    with pytest.raises(UserError, match="threshold.test_private.method must be one of"):
        rule_for_split(ThresholdConfig(test_private=SplitThresholdConfig(method="otsu")), "test_private")


def test_split_thresholds_through_the_config_schema() -> None:
    cfg = load_config(["threshold.test_private_mixed.value=0.5", "threshold.test_private.k=4"])
    assert cfg.threshold.test_private_mixed.value == 0.5 and cfg.threshold.test_private.k == 4.0
    assert cfg.threshold.test_private.method is None  # unset keys inherit
    with pytest.raises(UserError, match="threshold.test_private_mixed.valu"):
        load_config(["threshold.test_private_mixed.valu=0.5"])
    with pytest.raises(UserError, match="threshold.test_public"):
        load_config(["threshold.test_public.value=0.5"])  # only the private splits differ from the category


def _finished(root: Path, name: str, seg_f1: float | None) -> Path:
    folder = root / "evaluations" / name
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text("{}" if seg_f1 is None else f'{{"test_public/seg_f1": {seg_f1}}}')
    return folder


def test_best_evaluation_takes_the_highest_metric_and_the_earliest_of_ties(tmp_path: Path) -> None:
    _finished(tmp_path, "0001", 0.3)
    best = _finished(tmp_path, "0002", 0.5)
    _finished(tmp_path, "0010", 0.5)
    _finished(tmp_path, "0003", None)
    (tmp_path / "evaluations" / ".tmp-x").mkdir()  # an evaluation in progress is not listed
    assert [p.name for p in list_evaluations(tmp_path)] == ["0001", "0002", "0003", "0010"]
    assert best_evaluation(tmp_path, "test_public/seg_f1") == (best, 0.5, 3)


def test_claim_takes_the_next_free_counter_even_when_another_process_wins_the_race(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "evaluations"
    _finished(tmp_path, "0009", 0.1)
    tmp = root / ".tmp-1"
    tmp.mkdir()
    (tmp / "metrics.json").write_text("{}")
    real_rename, calls = os.rename, []

    def racing_rename(src: Path, dst: Path) -> None:
        if not calls:  # another agent finishes 0010 between our listing and our rename
            _finished(tmp_path, Path(dst).name, 0.2)
        calls.append(Path(dst).name)
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", racing_rename)
    assert _claim(root, tmp) == root / "0011" and calls == ["0010", "0011"]
    assert (root / "0011" / "metrics.json").read_text() == "{}"
    assert (root / "0010" / "metrics.json").read_text() == '{"test_public/seg_f1": 0.2}'  # not overwritten
