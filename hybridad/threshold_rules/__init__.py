"""The threshold rules, by name: the one list that config validation, training, `evaluate`, the report and the
sweep read.

Each rule is a `ThresholdRule` (`base.py`) that declares what it needs; one file per family:
`validation_stats.py` (mean_std, percentile), `fixed.py`, `test_labels.py` (f1_optimal, tuned on test),
`pseudo_defects.py` (pseudo_f1, pseudo_faint, capped_faint), `split_scores.py` (split_matched, a private split's
own maps). Add a rule with a new file and one line in
`_BUILT_IN` (or `register_rule(MyRule())` from outside the package); docs/extending_rules.md.
`fit_threshold` fits the rule a config names; `rule_for_split` resolves a private split's override.
"""

from __future__ import annotations

import contextlib
from dataclasses import fields, replace
from typing import Union

from torch import Tensor

from hybridad.errors import UserError
from hybridad.metrics.segmentation import PixelF1Max
from hybridad.registry import Registry
from hybridad.threshold_rules.base import ModelInputs, Need, RuleInputs, ThresholdRule
from hybridad.threshold_rules.fixed import Fixed
from hybridad.threshold_rules.pseudo_defects import PSEUDO_F1, PSEUDO_FAINT, CappedFaint
from hybridad.threshold_rules.split_scores import SplitMatched
from hybridad.threshold_rules.test_labels import F1Optimal
from hybridad.threshold_rules.validation_stats import MeanStd, Percentile
from hybridad.thresholds import (
    OVERRIDABLE_SPLITS,
    ScoreStats,
    SplitThresholdConfig,
    ThresholdConfig,
    ThresholdResult,
)

_BUILT_IN: tuple[ThresholdRule, ...] = (
    MeanStd(), Percentile(), F1Optimal(), Fixed(), PSEUDO_F1, PSEUDO_FAINT, CappedFaint(), SplitMatched(),
)
_RULES: Registry[ThresholdRule] = Registry("threshold rule", lambda rule: rule.name)
_RULES.register_all(_BUILT_IN)


def register_rule(rule: ThresholdRule) -> ThresholdRule:
    """Make `rule` available as `threshold.method=<rule.name>` everywhere; returns it."""
    return _RULES.register(rule)


def unregister_rule(name: str) -> None:
    """Remove a rule added by `register_rule` (tests)."""
    _RULES.unregister(name)


def rule_names() -> tuple[str, ...]:
    return _RULES.names()


def all_rules() -> tuple[ThresholdRule, ...]:
    return _RULES.items()


def compared_rules() -> tuple[ThresholdRule, ...]:
    """The rules every run fits and scores on test_public: label-free first, then those tuned on test."""
    compared = [r for r in _RULES.items() if r.compared]
    return tuple(sorted(compared, key=lambda r: r.tuned_on_test))  # stable: registry order within each group


def get_rule(name: str, key: str = "threshold.method") -> ThresholdRule:
    """The rule named `name`; an unknown name is a `UserError` that lists the known ones."""
    rule = _RULES.find(name)
    if rule is None:
        raise UserError(f"{key} must be one of {rule_names()}, got {name!r}")
    return rule


def fit_threshold(
    cfg: ThresholdConfig,
    stats: ScoreStats | None = None,
    labelled: Union[PixelF1Max, tuple[Tensor, Tensor], None] = None,
    pseudo: float | None = None,
    split_stats: ScoreStats | None = None,
    base: ThresholdResult | None = None,
) -> ThresholdResult:
    """Fit the rule `cfg.method` names from what it needs.

    Args:
        cfg: the rule and its parameters.
        stats: validation pixel scores (rules that need `VALIDATION_STATS`); summed over DDP ranks here.
        labelled: labelled test_public histograms (rules that need `TEST_LABELS`: tuned on test).
        pseudo: the value of a rule fitted with the model at training time (stored in thresholds.yaml
            `candidates.<method>.value`).
        split_stats: pixel scores of the split's own (unlabelled) maps (rules that need `SPLIT_MAPS`); summed
            over DDP ranks here.
        base: the category's fitted threshold, which a `SPLIT_MAPS` rule carries over to the split; the result
            is tuned on test when the base was, and its source names the base's.
    """
    rule = get_rule(cfg.method)
    with contextlib.ExitStack() as stack:
        if not rule.fitted_with_model:
            if Need.VALIDATION_STATS in rule.needs:
                if stats is None:
                    raise UserError(f"threshold.method={rule.name} needs validation scores; none were "
                                    "collected")
                stack.enter_context(stats.sync_context())  # sums the states over DDP ranks; no-op alone
            if Need.TEST_LABELS in rule.needs:
                if labelled is None:
                    raise UserError(f"threshold.method={rule.name} needs labelled test_public maps (it is "
                                    "tuned on test); use mean_std")
                if isinstance(labelled, PixelF1Max):
                    stack.enter_context(labelled.sync_context())
            if Need.SPLIT_MAPS in rule.needs:
                if split_stats is None or base is None:
                    raise UserError(f"threshold.method={rule.name} needs a private split's own maps and the "
                                    f"category's threshold; set it per private split "
                                    f"(threshold.test_private_mixed.method={rule.name})")
                stack.enter_context(split_stats.sync_context())
        fitted = {rule.name: pseudo} if pseudo is not None else {}
        inputs = RuleInputs(stats=stats, labelled=labelled, fitted=fitted, split_stats=split_stats,
                            base=None if base is None else float(base.value))
        value = rule.fit(cfg, inputs)
    if Need.SPLIT_MAPS in rule.needs and base is not None:  # carried over from the category's threshold
        return ThresholdResult(float(value), rule.name, f"{rule.source}, from {base.method} on {base.source}",
                               rule.tuned_on_test or base.tuned_on_test)
    return ThresholdResult(float(value), rule.name, rule.source, rule.tuned_on_test)


def rule_for_split(cfg: ThresholdConfig, split: str) -> ThresholdConfig:
    """The rule `split` uses: the category's rule with the split's override (if any) on top.

    Validation and test_public always use the category's rule; the returned config has no overrides left.
    Setting a split's `value` without its `method` means a fixed threshold for that split.
    """
    base = replace(cfg, test_private=SplitThresholdConfig(), test_private_mixed=SplitThresholdConfig())
    if split not in OVERRIDABLE_SPLITS:
        return base
    override = getattr(cfg, split)
    changes = {f.name: getattr(override, f.name) for f in fields(override)
               if getattr(override, f.name) is not None}
    if "value" in changes and "method" not in changes:
        changes["method"] = Fixed.name
    if "method" in changes:
        get_rule(changes["method"], f"threshold.{split}.method")
    return replace(base, **changes)


__all__ = ["ModelInputs", "Need", "RuleInputs", "ThresholdRule", "all_rules", "compared_rules",
           "fit_threshold", "get_rule", "register_rule", "rule_for_split", "rule_names", "unregister_rule"]
