"""Adding a threshold rule (docs/extending_rules.md): a rule defined here only, registered with one call, runs
through train, evaluate and report; its needs decide whether it is marked tuned on test."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml

from hybridad.demo import demo_config
from hybridad.threshold_rules import (
    Need,
    RuleInputs,
    ThresholdRule,
    compared_rules,
    fit_threshold,
    register_rule,
    unregister_rule,
)
from hybridad.thresholds import TUNED_ON_TEST, ThresholdConfig, f1_optimal_threshold
from hybridad.train import train

FAST = ["trainer.max_epochs=1", "trainer.max_steps=2", "trainer.limit_val_batches=2", "trainer.log_every_n_steps=1",
        "threshold.pseudo_repeats=0", "predict_private=false"]


class Quantile999(ThresholdRule):
    """The 99.9th percentile of the validation pixel scores (float16 values, linear interpolation)."""

    name = "quantile_999"
    label = "99.9th percentile"
    needs = frozenset({Need.VALIDATION_STATS})
    compared = True  # fitted for every run and shown in the report's rules table

    def fit(self, cfg: ThresholdConfig, inputs: RuleInputs) -> float:
        assert inputs.stats is not None
        return inputs.stats.percentile(99.9)


class HalfOracle(ThresholdRule):
    """Half the F1-optimal threshold: it reads test labels, so it is tuned on test."""

    name = "half_oracle"
    label = "half oracle"
    needs = frozenset({Need.TEST_LABELS})
    compared = True

    def fit(self, cfg: ThresholdConfig, inputs: RuleInputs) -> float:
        assert inputs.labelled is not None
        return 0.5 * f1_optimal_threshold(inputs.labelled)[0]


@pytest.fixture(scope="module")
def toy_rules() -> Iterator[None]:
    register_rule(Quantile999())
    register_rule(HalfOracle())
    yield
    unregister_rule("quantile_999")
    unregister_rule("half_oracle")


@pytest.fixture(scope="module")
def toy_run(toy_rules: None, synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    return train(demo_config("can", synthetic_root, runs, [*FAST, "threshold.method=quantile_999"]))


def _validation_quantile(run: Path) -> float:
    """Brute force: numpy's 99.9th percentile of every cached (float16) validation map value."""
    values = [tifffile.imread(p).astype(np.float64).ravel() for p in sorted((run / "maps/validation").rglob("*.tiff"))]
    assert values, "the run caches its validation maps"
    return float(np.quantile(np.concatenate(values), 0.999))


def test_toy_rule_runs_through_train_evaluate_and_report(toy_run: Path, tmp_path: Path) -> None:
    from hybridad.evaluate import create_evaluation
    from hybridad.report import write_report

    expected = _validation_quantile(toy_run)
    thr = yaml.safe_load((toy_run / "thresholds.yaml").read_text())
    assert (thr["method"], thr["source"], thr["tuned_on_test"]) == ("quantile_999", "validation", False)
    assert thr["value"] == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert thr["candidates"]["quantile_999"]["value"] == thr["value"]  # compared: stored as a candidate
    metrics = json.loads((toy_run / "metrics.json").read_text())
    assert metrics["test_public/threshold=quantile_999/value"] == thr["value"]
    assert 0.0 <= metrics["test_public/threshold=quantile_999/seg_f1"] <= 1.0
    # the run's own SegF1 is the candidate's: the same threshold on the same float16 maps
    assert metrics["test_public/threshold=quantile_999/seg_f1"] == pytest.approx(metrics["test_public/seg_f1"],
                                                                                  abs=1e-12)

    folder = create_evaluation(toy_run, ["threshold.method=quantile_999"])
    evaluated = yaml.safe_load((folder / "thresholds.yaml").read_text())
    assert evaluated["value"] == pytest.approx(expected, rel=1e-12, abs=1e-12)  # from the cached maps
    assert evaluated["tuned_on_test"] is False and "label" not in evaluated
    assert yaml.safe_load((folder / "evaluation.yaml").read_text())["tuned_on_test"] is False

    table = write_report([toy_run], tmp_path / "report", num_overlays=0).split("## Threshold rules")[1]
    header = next(line for line in table.splitlines() if line.startswith("| category"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    # label-free first (the toy after the built-in ones), then the rules tuned on test
    assert columns == ["category", "mean + k std", "pseudo_f1", "pseudo_faint", "capped_faint", "99.9th percentile",
                       "F1-optimal (tuned on test)", "half oracle"]


def test_a_rule_that_needs_test_labels_is_marked_tuned_on_test(toy_run: Path) -> None:
    from hybridad.evaluate import create_evaluation

    assert [r.name for r in compared_rules()][-2:] == ["f1_optimal", "half_oracle"]
    from hybridad.metrics.functional import float16_keys, key_histogram

    pos = key_histogram(float16_keys(torch.tensor([0.5, 0.5, 0.5])))  # defects score 0.5, normal pixels 0.25:
    neg = key_histogram(float16_keys(torch.tensor([0.25] * 5)))  # F1-optimal at 0.5, half of it 0.25
    result = fit_threshold(ThresholdConfig(method="half_oracle"), labelled=(pos, neg))
    assert result.value == 0.25 and result.tuned_on_test and TUNED_ON_TEST in result.source

    folder = create_evaluation(toy_run, ["threshold.method=half_oracle"])
    evaluation = yaml.safe_load((folder / "evaluation.yaml").read_text())
    assert evaluation["tuned_on_test"] is True
    assert evaluation["tuned_on_test_because"][0] == "validation threshold fitted by half_oracle on test_public"
    assert yaml.safe_load((folder / "thresholds.yaml").read_text())["label"] == TUNED_ON_TEST
