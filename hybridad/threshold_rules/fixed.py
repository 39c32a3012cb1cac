"""A fixed threshold from the config (`threshold.value`)."""

from __future__ import annotations

import math

from hybridad.errors import UserError
from hybridad.threshold_rules.base import RuleInputs, ThresholdRule
from hybridad.thresholds import ThresholdConfig


class Fixed(ThresholdRule):
    name = "fixed"
    label = "fixed"
    params = ("value",)
    required = {"value": "0.5"}

    def fit(self, cfg: ThresholdConfig, inputs: RuleInputs) -> float:
        if cfg.value is None or not math.isfinite(cfg.value):
            raise UserError(f"threshold.method=fixed needs a finite threshold.value (got {cfg.value!r})")
        return float(cfg.value)
