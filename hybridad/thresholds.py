"""Threshold rules. (stub: contract only, helper fills in)"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ThresholdConfig:
    method: str = "mean_std"  # "mean_std" | "percentile" | "f1_optimal" | "fixed"
    k: float = 3.0  # mean_std: mean + k * std of validation pixel scores
    percentile: float = 99.0  # percentile: q-th percentile of validation scores ...
    factor: float = 1.0  # ... times factor
    value: float = 0.0  # fixed
