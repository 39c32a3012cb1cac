"""Rules fitted with the trained model on validation images with pasted pseudo-defects
(`hybridad.pseudo_defect_rules`: how they paste and pick) and the cap `capped_faint`."""

from __future__ import annotations

import math
from typing import Any

from hybridad.pseudo_defect_rules import RECIPES, PseudoRecipe, candidate_grid, capped_faint, pseudo_counts
from hybridad.threshold_rules.base import Need, RuleInputs, ThresholdRule
from hybridad.threshold_rules.validation_stats import MeanStd
from hybridad.thresholds import ThresholdConfig, mean_std_threshold

NEEDS = frozenset({Need.VALIDATION_STATS, Need.PSEUDO_DEFECTS})  # the grid of thresholds: from the statistics


class PseudoDefectRule(ThresholdRule):
    """Best pooled SegF1 on `threshold.pseudo_repeats` pasted copies of every validation image, through the
    run's post-processing, over a label-free grid of thresholds (`recipe` draws the pastes)."""

    needs = NEEDS
    params = ("pseudo_repeats", "pseudo_seed", "pseudo_scale_of")
    compared = True

    def __init__(self, recipe: PseudoRecipe, style: tuple[str, str]) -> None:
        self.recipe = recipe
        self.name = self.label = recipe.name  # type: ignore[misc]
        self.style = style  # type: ignore[misc]

    def fit(self, cfg: ThresholdConfig, inputs: RuleInputs) -> float:
        return self.fitted_value(inputs)

    def candidate(self, cfg: ThresholdConfig, inputs: RuleInputs) -> dict[str, Any] | None:
        """Scores the pastes with `inputs.model` (each rank a share of the images, counts summed)."""
        if cfg.pseudo_repeats <= 0 or inputs.model is None:
            return None
        assert inputs.stats is not None
        m = inputs.model
        counts = pseudo_counts(m.model, m.datamodule, cfg, candidate_grid(inputs.stats), self.recipe, m.rank,
                               m.world)
        for key in ("pos", "neg", "tp", "fp", "fn"):  # sum over ranks (each scored a share)
            setattr(counts, key, m.reduce_sum(getattr(counts, key)))
        thr, f1 = counts.pick(self.recipe)  # inf where nothing was pasted
        return {"value": thr if math.isfinite(thr) else None, "pseudo_seg_f1": f1,
                "repeats": cfg.pseudo_repeats, "seed": cfg.pseudo_seed, "scale_of": cfg.pseudo_scale_of,
                "pasted_pixels": float(counts.pos.sum())}


class CappedFaint(ThresholdRule):
    """min(mean + k std, pseudo_faint); mean + k std where nothing was pasted."""

    name = "capped_faint"
    label = "capped_faint"
    needs = NEEDS
    params = ("k", *PseudoDefectRule.params)
    compared = True
    style = ("tab:red", "-.")

    def fit(self, cfg: ThresholdConfig, inputs: RuleInputs) -> float:
        return self.fitted_value(inputs)

    def candidate(self, cfg: ThresholdConfig, inputs: RuleInputs) -> dict[str, Any] | None:
        """From the statistics and the pseudo_faint candidate found before it (none: not computed)."""
        faint = inputs.found.get("pseudo_faint")
        if faint is None:
            return None
        assert inputs.stats is not None
        mean_std = mean_std_threshold(float(inputs.stats.mean), float(inputs.stats.std), cfg.k)
        raw = faint["value"] if faint.get("value") is not None else float("inf")
        return {"value": capped_faint(mean_std, raw), "k": cfg.k}

    def stored_value(self, thresholds: dict[str, Any], cfg: ThresholdConfig) -> float | None:
        """Recomputed with `cfg.k` from the stored statistics and pseudo_faint."""
        stored = thresholds.get("candidates") or {}
        faint = PSEUDO_FAINT.stored_value(thresholds, cfg)
        if faint is None and isinstance(stored.get("pseudo_faint"), dict):
            faint = float("inf")  # computed, but nothing was pasted: mean + k std
        return capped_faint(MeanStd().stored_value(thresholds, cfg), faint)


PSEUDO_F1 = PseudoDefectRule(RECIPES["pseudo_f1"], ("tab:green", "--"))
PSEUDO_FAINT = PseudoDefectRule(RECIPES["pseudo_faint"], ("tab:olive", "-."))
