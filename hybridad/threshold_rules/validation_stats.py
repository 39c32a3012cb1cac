"""Rules fitted from the validation pixel-score statistics: mean + k std and percentile x factor."""

from __future__ import annotations

from typing import Any

from hybridad.threshold_rules.base import Need, RuleInputs, ThresholdRule
from hybridad.thresholds import ThresholdConfig, mean_std_threshold, percentile_threshold


class MeanStd(ThresholdRule):
    """mean + k std of the validation pixel scores (the MVTec AD 2 paper's baseline with k = 3)."""

    name = "mean_std"
    label = "mean + k std"
    needs = frozenset({Need.VALIDATION_STATS})
    params = ("k",)
    compared = True
    style = ("tab:orange", "--")

    def fit(self, cfg: ThresholdConfig, inputs: RuleInputs) -> float:
        assert inputs.stats is not None
        return float(mean_std_threshold(inputs.stats.mean, inputs.stats.std, cfg.k))

    def candidate(self, cfg: ThresholdConfig, inputs: RuleInputs) -> dict[str, Any] | None:
        """The value, k and the statistics (so `evaluate` can recompute it with another k)."""
        assert inputs.stats is not None
        mean, std = float(inputs.stats.mean), float(inputs.stats.std)
        stats = {"mean": mean, "std": std}
        return {"value": mean_std_threshold(mean, std, cfg.k), "k": cfg.k, "stats": stats}

    def stored_value(self, thresholds: dict[str, Any], cfg: ThresholdConfig) -> float | None:
        """Recomputed with `cfg.k` from the stored statistics (older runs: the top-level `stats`)."""
        entry = (thresholds.get("candidates") or {}).get(self.name)
        entry = entry if isinstance(entry, dict) else {}
        stats = entry.get("stats") or thresholds.get("stats") or {}
        if "mean" in stats and "std" in stats:
            return mean_std_threshold(float(stats["mean"]), float(stats["std"]), cfg.k)
        return float(entry["value"]) if entry.get("value") is not None else None


class Percentile(ThresholdRule):
    """factor x the q-th percentile of the float16-cast validation pixel scores."""

    name = "percentile"
    label = "percentile x factor"
    needs = frozenset({Need.VALIDATION_STATS})
    params = ("percentile", "factor", "percentile_method")

    def fit(self, cfg: ThresholdConfig, inputs: RuleInputs) -> float:
        assert inputs.stats is not None
        return float(percentile_threshold(inputs.stats, cfg.percentile, cfg.factor, cfg.percentile_method))
