"""The rule registry: what each rule declares decides its provenance; the sweep and older checkpoints fit it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from callbacks.threshold_fit import ThresholdCallback
from hybridad.errors import UserError
from hybridad.threshold_rules import (
    Need,
    RuleInputs,
    ThresholdRule,
    all_rules,
    compared_rules,
    get_rule,
    register_rule,
    rule_names,
    unregister_rule,
)
from hybridad.thresholds import TUNED_ON_TEST, ThresholdConfig

ROOT = Path(__file__).resolve().parents[2]


def test_needs_decide_the_source_and_the_tuned_on_test_mark() -> None:
    assert rule_names() == ("mean_std", "percentile", "f1_optimal", "fixed", "pseudo_f1", "pseudo_faint",
                            "capped_faint", "split_matched")
    sources = {r.name: r.source for r in all_rules()}
    assert sources == {"mean_std": "validation", "percentile": "validation", "fixed": "config",
                       "f1_optimal": f"test_public ({TUNED_ON_TEST})", "pseudo_f1": "validation + pseudo-anomalies",
                       "pseudo_faint": "validation + pseudo-anomalies",
                       "capped_faint": "validation + pseudo-anomalies",
                       "split_matched": "validation + the split's own maps"}
    assert [r.name for r in all_rules() if r.tuned_on_test] == ["f1_optimal"]
    assert [r.name for r in all_rules() if Need.TEST_LABELS in r.needs] == ["f1_optimal"]
    # the report's columns: label-free first, then the rules tuned on test
    assert [r.label for r in compared_rules()] == ["mean + k std", "pseudo_f1", "pseudo_faint", "capped_faint",
                                                   "F1-optimal (tuned on test)"]


def test_registering_twice_and_unknown_names_are_errors() -> None:
    class Zero(ThresholdRule):
        name, label = "zero", "zero"

        def fit(self, cfg: ThresholdConfig, inputs: RuleInputs) -> float:
            return 0.0

    register_rule(Zero())
    try:
        assert get_rule("zero").source == "config" and "zero" in rule_names()
        with pytest.raises(ValueError, match="registered already"):
            register_rule(Zero())
    finally:
        unregister_rule("zero")
    assert "zero" not in rule_names()
    with pytest.raises(UserError, match="threshold.method must be one of"):
        get_rule("zero")


def test_the_sweep_names_a_rule_and_only_its_parameters() -> None:
    sweep = yaml.safe_load((ROOT / "experiments/sweeps/threshold.yaml").read_text())
    params = sweep["parameters"]
    rule = get_rule(params["threshold.method"]["value"])
    swept = {k.split(".", 1)[1] for k in params if k.startswith("threshold.") and k != "threshold.method"}
    assert swept and swept <= set(rule.params), (rule.name, swept)
    assert not rule.tuned_on_test and not rule.fitted_with_model  # re-scorable from the cached maps


def _trainer() -> SimpleNamespace:
    return SimpleNamespace(sanity_checking=False, is_global_zero=True)


def test_state_round_trip_and_checkpoints_of_the_two_former_callbacks(tmp_path: Path) -> None:
    cb = ThresholdCallback(ThresholdConfig())
    result = {"value": 0.5, "method": "mean_std", "source": "validation", "tuned_on_test": False}
    candidates = {"mean_std": {"value": 0.5, "k": 3.0, "stats": {"mean": 0.2, "std": 0.1}}}
    cb.result, cb.candidates = result, candidates
    again = ThresholdCallback(ThresholdConfig())
    again.load_state_dict(cb.state_dict())
    assert (again.result, again.candidates) == (result, candidates)
    # before the merge: `ThresholdCallback` held the result, `PseudoThresholdCallback` the candidates
    old = {"callbacks": {"ThresholdCallback": {"result": result}, "PseudoThresholdCallback": {"candidates": candidates}}}
    loaded = ThresholdCallback(ThresholdConfig())
    assert loaded.state_key == "ThresholdCallback"
    loaded.on_load_checkpoint(_trainer(), None, old)  # Lightning calls this, then load_state_dict per key
    loaded.load_state_dict(old["callbacks"][loaded.state_key])
    assert (loaded.result, loaded.candidates) == (result, candidates)
