"""The candidates: the rules every run fits (`compared_rules`) and the SegF1 each reaches on test_public.

At training time `callbacks.threshold_fit.ThresholdCallback` stores the label-free candidates in
`<run>/thresholds.yaml` (`candidates:`); `candidate_thresholds` reads their values back (as `evaluate` needs
them for rules fitted with the model); `score_candidates` re-scores a run's cached test_public maps with each
candidate's threshold and the run's post-processing, next to the rules tuned on test (fitted here from the
same labelled maps: an oracle, labelled as such), so the report can show every rule side by side.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hybridad.labelled_maps import labelled_test_maps
from hybridad.metrics import SegF1, process_local
from hybridad.metrics.functional import pixel_histograms
from hybridad.postprocess import PostProcessConfig, binarize
from hybridad.run_dir import RunDir
from hybridad.threshold_rules import RuleInputs, compared_rules
from hybridad.thresholds import ThresholdConfig

if TYPE_CHECKING:
    from data_modules.datamodule import DataConfig


def candidate_thresholds(thresholds: dict[str, Any], cfg: ThresholdConfig) -> dict[str, float]:
    """The label-free candidates of a run's `thresholds.yaml` (those present), e.g. `{"mean_std": ...,
    "pseudo_f1": ..., "pseudo_faint": ..., "capped_faint": ...}`; mean + k std (and so capped_faint) is
    recomputed with `cfg.k` from the stored validation statistics."""
    out: dict[str, float] = {}
    for rule in compared_rules():
        if not rule.tuned_on_test:
            value = rule.stored_value(thresholds, cfg)
            if value is not None:
                out[rule.name] = value
    return out


def score_candidates(
    run_path: Path, thresholds: dict[str, float], postprocess: PostProcessConfig, data: DataConfig,
    cfg: ThresholdConfig | None = None,
) -> dict[str, float]:
    """SegF1 on test_public (the cached maps of `data`'s test_public images) at each given threshold and at
    the threshold of each compared rule tuned on test (fitted with `cfg` from the same labelled maps).

    Returns flat metrics: `test_public/threshold=<rule>/seg_f1` and `test_public/threshold=<rule>/value`.
    """
    run = RunDir(run_path)
    cfg = cfg or ThresholdConfig()
    seg = {rule: SegF1(**process_local()) for rule in thresholds}
    pos = neg = None
    for item in labelled_test_maps(run, data, require_all=False):
        m, g = item.anomaly_map, item.mask
        p, n = pixel_histograms(m, g)
        pos, neg = (p, n) if pos is None else (pos + p, neg + n)
        for rule, thr in thresholds.items():
            seg[rule].update(binarize(m, thr, postprocess), g)
    values = dict(thresholds)
    tuned = [r for r in compared_rules() if r.tuned_on_test]
    if pos is not None and tuned:
        for rule in tuned:
            values[rule.name] = rule.fit(cfg, RuleInputs(labelled=(pos, neg)))
        fitted = [r.name for r in tuned if np.isfinite(values[r.name])]
        for name in fitted:
            seg[name] = SegF1(**process_local())
        if fitted:
            for item in labelled_test_maps(run, data, require_all=False):
                for name in fitted:
                    seg[name].update(binarize(item.anomaly_map, values[name], postprocess), item.mask)
    out: dict[str, float] = {}
    for rule, metric in seg.items():
        out[f"test_public/threshold={rule}/seg_f1"] = float(metric.compute())
        out[f"test_public/threshold={rule}/value"] = float(values[rule])
    return out
