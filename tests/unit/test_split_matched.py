"""`split_matched`: a private split's threshold carried over to that split's own (unlabelled) maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from hybridad.config import load_config, load_run_config
from hybridad.errors import UserError
from hybridad.evaluate import create_evaluation, fit_split_thresholds
from hybridad.postprocess import binarize
from hybridad.run_dir import RunDir
from hybridad.threshold_rules import fit_threshold, get_rule
from hybridad.threshold_rules.split_scores import matched_threshold
from hybridad.thresholds import TUNED_ON_TEST, ScoreStats, ThresholdConfig, ThresholdResult
from hybridad.types import Split

MIXED = "threshold.test_private_mixed.method=split_matched"


def _stats(values: np.ndarray) -> ScoreStats:
    stats = ScoreStats()
    stats.update(torch.from_numpy(values.astype(np.float32)))
    return stats


def test_an_affine_change_of_the_scores_carries_the_threshold_along() -> None:
    x = np.random.default_rng(0).gamma(2.0, 0.1, size=20_000)  # a long-tailed normal score distribution
    validation = _stats(x)
    for a, b in [(2.0, 0.1), (0.5, -0.03), (1.0, 0.0)]:
        got = matched_threshold(0.6, validation, _stats(a * x + b))
        assert got == pytest.approx(a * 0.6 + b, abs=2e-3 * a)  # float16 percentiles


def test_flat_validation_or_split_scores_are_one_user_error() -> None:
    with pytest.raises(UserError, match="median and 90th percentile are equal"):
        matched_threshold(0.5, _stats(np.zeros(100)), _stats(np.linspace(0, 1, 100)))
    with pytest.raises(UserError, match="split's scores have equal median"):  # else: the split's median
        matched_threshold(0.5, _stats(np.linspace(0, 1, 100)), _stats(np.full(100, 0.3)))


def test_it_needs_the_split_and_the_base_and_takes_the_base_provenance() -> None:
    cfg = ThresholdConfig(method="split_matched")
    x = np.linspace(0.0, 1.0, 1001)
    with pytest.raises(UserError, match="set it per private split"):
        fit_threshold(cfg, _stats(x))
    oracle = ThresholdResult(0.5, "f1_optimal", f"test_public ({TUNED_ON_TEST})", True)
    result = fit_threshold(cfg, _stats(x), split_stats=_stats(3 * x), base=oracle)
    assert result.value == pytest.approx(1.5, abs=2e-3)
    assert result.tuned_on_test and TUNED_ON_TEST in result.source  # carried over from an oracle: still one
    assert result.source.startswith("validation + the split's own maps")
    label_free = fit_threshold(cfg, _stats(x), split_stats=_stats(3 * x),
                               base=ThresholdResult(0.5, "mean_std", "validation", False))
    assert not label_free.tuned_on_test and label_free.source == \
        "validation + the split's own maps, from mean_std on validation"
    assert get_rule("split_matched").source == "validation + the split's own maps"  # from its needs


def test_config_allows_it_per_private_split_only() -> None:
    with pytest.raises(UserError, match="threshold.test_private_mixed.method=split_matched") as err:
        load_config(["threshold.method=split_matched"])
    assert "\n" not in str(err.value)
    assert load_config([MIXED]).threshold.test_private_mixed.method == "split_matched"
    assert load_config(["threshold.test_private.method=split_matched"]).threshold.test_private.method \
        == "split_matched"
    with pytest.raises(UserError, match="threshold.test_private_mixed.k.*has no effect"):
        load_config([MIXED, "threshold.test_private_mixed.k=4"])  # the category's k decides: say so


def _fake_run(tmp_path: Path, shift: bool = True) -> tuple[RunDir, np.ndarray]:
    """A completed run of a synthetic `can` tree: validation and test_private maps X, test_private_mixed maps
    2 X + 0.1 (X uniform, 4 maps of 8x16), test_public maps with labels."""
    from data_modules.formats import list_splits
    from data_modules.synthetic import write_synthetic_dataset

    data = tmp_path / "data"
    write_synthetic_dataset(data, ["can"], size=(16, 8), counts="small", seed=0, verbose=False)
    run = RunDir(tmp_path / "run")
    run.write_text("config.yaml", f"data:\n  category: can\n  root: {data}\n")
    run.write_state("completed")
    rng = np.random.default_rng(1)
    x = rng.random((4, 8, 16)).astype(np.float16).astype(np.float32)  # the cached (float16) values
    splits = list_splits(load_run_config(run.path).data).splits
    for i in range(4):
        run.write_map(splits[Split.VALIDATION][i].sample_id, x[i])
        run.write_map(splits[Split.TEST_PRIVATE][i].sample_id, x[i])
        if shift:
            run.write_map(splits[Split.TEST_PRIVATE_MIXED][i].sample_id, 2 * x[i] + 0.1)
    for sample in splits[Split.TEST_PUBLIC]:
        run.write_map(sample.sample_id, rng.random((8, 16)).astype(np.float32))
    return run, x


def test_evaluate_matches_the_mixed_split_and_writes_its_masks(tmp_path: Path) -> None:
    run, x = _fake_run(tmp_path)
    overrides = ["threshold.k=1", MIXED]
    thresholds = fit_split_thresholds(run, load_run_config(run.path, overrides))
    t = float(x.mean() + x.std())  # mean_std, k = 1, of the validation maps
    assert thresholds["test_public"].value == pytest.approx(t, rel=1e-6)
    assert thresholds["test_private"].value == pytest.approx(t, rel=1e-6)
    assert thresholds["test_private_mixed"].value == pytest.approx(2 * t + 0.1, abs=3e-3)

    folder = create_evaluation(run.path, overrides, write_masks=True)
    record = yaml.safe_load((folder / "thresholds.yaml").read_text())
    mixed = record["splits"]["test_private_mixed"]
    assert mixed["method"] == "split_matched" and not mixed["tuned_on_test"]
    assert mixed["source"] == "validation + the split's own maps, from mean_std on validation"
    assert record["splits"]["test_private"]["method"] == "mean_std" and record["method"] == "mean_std"
    assert mixed["value"] == pytest.approx(2 * t + 0.1, abs=3e-3)
    cfg = load_run_config(run.path, overrides)
    written = RunDir(folder)
    for sid, _ in run.iter_maps(Split.TEST_PRIVATE_MIXED):
        amap = torch.from_numpy(run.read_map(sid))[None, None]  # (1,1,H,W)
        expected = binarize(amap, mixed["value"], cfg.postprocess)[0, 0].numpy()
        assert np.array_equal(written.read_mask(sid) > 0, expected)
        at_t = binarize(amap, t, cfg.postprocess)[0, 0].numpy()  # the category's threshold: another mask
        assert expected.any() and not np.array_equal(expected, at_t)


def test_an_empty_split_is_one_user_error_naming_the_folder(tmp_path: Path) -> None:
    run, _ = _fake_run(tmp_path, shift=False)
    cfg = load_run_config(run.path, [MIXED])
    with pytest.raises(UserError, match=r"run/maps/test_private_mixed is empty: .*split_matched") as err:
        fit_split_thresholds(run, cfg)
    assert "\n" not in str(err.value)
    # train fits the category's threshold before predicting: the split is left out, not an error
    assert set(fit_split_thresholds(run, cfg, predicted=())) == {"validation", "test_public", "test_private"}


def test_carried_over_from_a_threshold_tuned_on_test_it_says_so(tmp_path: Path) -> None:
    run, _ = _fake_run(tmp_path)
    folder = create_evaluation(run.path, ["threshold.method=f1_optimal", MIXED])
    evaluation = yaml.safe_load((folder / "evaluation.yaml").read_text())
    assert evaluation["tuned_on_test"] is True
    why = "test_private_mixed threshold split_matched carried over from the category's, fitted on test_public"
    assert why in evaluation["tuned_on_test_because"]
    mixed = yaml.safe_load((folder / "thresholds.yaml").read_text())["splits"]["test_private_mixed"]
    assert mixed["tuned_on_test"] is True and mixed["source"].endswith(f"from f1_optimal on test_public "
                                                                        f"({TUNED_ON_TEST})")
