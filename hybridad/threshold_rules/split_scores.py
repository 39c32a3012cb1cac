"""A private split's threshold carried over to that split's own (unlabelled) score distribution.

MVTec AD 2's test_private_mixed changes the lighting of every image; the whole anomaly map moves with it, and
a threshold fitted on regular-lighting validation images then marks large normal areas. The winners raised the
mixed split's threshold by hand. `split_matched` does it without labels: it reads the split's own maps (no
ground truth exists for the private splits) and maps the category's threshold through the affine map that
takes the validation scores' median and 90th percentile onto the split's. Median and 90th percentile are
robust to the few percent of defect pixels a test split holds, and both lie in the normal bulk of the scores,
so the split's defects barely move them.
"""

from __future__ import annotations

from typing import Any

from hybridad.errors import UserError
from hybridad.threshold_rules.base import Need, RuleInputs, ThresholdRule
from hybridad.thresholds import ScoreStats, ThresholdConfig

ANCHORS = (50.0, 90.0)  # percentiles of the validation and split scores the affine map matches


def matched_threshold(base: float, validation: ScoreStats, split: ScoreStats) -> float:
    """`base` (a threshold on the validation scores' scale) mapped onto the split's scores.

    With (m, p) the median and 90th percentile of the validation scores and (m', p') the split's:
    `m' + (base - m) * (p' - m') / (p - m)`. A split whose scores are the validation scores under an increasing
    affine change a*x + b gets exactly a*base + b (up to the float16 percentiles).
    """
    lo_v, hi_v = (validation.percentile(q) for q in ANCHORS)
    lo_s, hi_s = (split.percentile(q) for q in ANCHORS)
    if not hi_v > lo_v:
        raise UserError("threshold rule split_matched: the validation scores' median and 90th percentile are "
                        f"equal ({lo_v:g}); the maps are flat, use mean_std or a fixed value")
    if not hi_s > lo_s:
        raise UserError("threshold rule split_matched: the split's scores have equal median and 90th percentile "
                        f"({lo_s:g}); its maps are flat, set threshold.<split>.value or use mean_std")
    return float(lo_s + (base - lo_v) * (hi_s - lo_s) / (hi_v - lo_v))


class SplitMatched(ThresholdRule):
    """For a private split: the category's threshold matched to the split's own unlabelled scores."""

    name = "split_matched"
    label = "matched to the split's scores"
    needs = frozenset({Need.VALIDATION_STATS, Need.SPLIT_MAPS})
    style = ("tab:brown", "-.")

    def fit(self, cfg: ThresholdConfig, inputs: RuleInputs) -> float:
        if inputs.base is None or inputs.stats is None or inputs.split_stats is None:
            raise UserError("threshold rule split_matched needs the category's threshold, the validation maps "
                            "and the split's own maps; set it for a private split only "
                            "(threshold.test_private_mixed.method=split_matched)")
        return matched_threshold(inputs.base, inputs.stats, inputs.split_stats)

    def candidate(self, cfg: ThresholdConfig, inputs: RuleInputs) -> dict[str, Any] | None:
        return None  # per split, fitted where the split's maps exist (never a training-time candidate)
