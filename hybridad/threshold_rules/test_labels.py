"""The oracle: the threshold maximising pooled pixel F1 on labelled test_public maps (tuned on test)."""

from __future__ import annotations

from hybridad.metrics.segmentation import PixelF1Max
from hybridad.threshold_rules.base import Need, RuleInputs, ThresholdRule
from hybridad.thresholds import ThresholdConfig, f1_optimal_threshold


class F1Optimal(ThresholdRule):
    """An upper bound for the label-free rules, never a default."""

    name = "f1_optimal"
    label = "F1-optimal (tuned on test)"
    needs = frozenset({Need.TEST_LABELS})
    compared = True
    style = ("tab:purple", ":")

    def fit(self, cfg: ThresholdConfig, inputs: RuleInputs) -> float:
        assert inputs.labelled is not None
        labelled = inputs.labelled
        thr, _ = f1_optimal_threshold(labelled if isinstance(labelled, PixelF1Max) else tuple(labelled))
        return float(thr)
