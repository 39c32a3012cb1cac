"""`hybridad evaluate RUN_DIR key=value ...`: re-score a run's cached float16 maps without the model.

Reads `<run>/maps/validation` (threshold statistics) and `<run>/maps/test_public` plus the ground truth from the
dataset root in the run's config, applies the (overridden) post-processing and threshold rule, and computes the
same metrics as the test callbacks. W&B sweeps call this command (experiments/sweeps/threshold.yaml).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from data_modules.listing import list_samples, read_mask
from hybridad.config import RunConfig, load_run_config
from hybridad.errors import UserError
from hybridad.metrics import AUPRO, ClassF1, PixelF1Max, SegF1
from hybridad.postprocess import binarize
from hybridad.run_dir import RunDir
from hybridad.thresholds import ScoreStats, fit_threshold
from hybridad.types import Sample, Split


def _read_mask(sample: Sample, shape: tuple[int, int]) -> np.ndarray:
    """Ground truth (H,W) bool; all-normal for good images."""
    if sample.mask_path is None:
        return np.zeros(shape, dtype=bool)
    return read_mask(sample.mask_path, sample.image_path, shape) > 0


def _load_map(run: RunDir, sample_id: str) -> torch.Tensor:
    path = run.map_path(sample_id)
    if not path.is_file():
        raise UserError(f"{path} missing: the run has no cached map for {sample_id} (re-run `hybridad train`)")
    return torch.from_numpy(run.read_map(sample_id))[None, None]  # (1,1,H,W), already smoothed by the run


def _validation_stats(run: RunDir) -> ScoreStats:
    stats = ScoreStats()
    ids = [sid for sid, _ in run.iter_maps(Split.VALIDATION.value)]
    if not ids:
        raise UserError(f"{run.path}/maps/validation is empty: the threshold rule needs the validation maps")
    for sid in tqdm(ids, desc="validation maps", leave=False):
        stats.update(_load_map(run, sid))
    return stats


def evaluate_run(run_path: Path, overrides: list[str], write: bool = False) -> dict[str, float]:
    """Re-score cached maps; returns `{"test_public/<metric>": value, ...}` and prints a summary.

    With `write=True` the metrics replace `<run>/metrics.json` and the threshold `<run>/thresholds.yaml`;
    otherwise they go to `<run>/evaluations/<overrides>.json` so sweeps never overwrite the run's own result.
    """
    run = RunDir(Path(run_path))
    cfg = load_run_config(run.path, overrides)
    cached_sigma = load_run_config(run.path).postprocess.gaussian_sigma
    if cfg.postprocess.gaussian_sigma != cached_sigma:
        raise UserError(f"postprocess.gaussian_sigma is applied before the maps are cached (this run: {cached_sigma}); "
                        "change it with `hybridad train`, not `evaluate`")
    samples = list_samples(cfg.data.root, cfg.data.category, Split.TEST_PUBLIC)

    def pairs(desc: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(1,1,H,W) map and GT, one image at a time: a category never sits in memory at once."""
        for s in tqdm(samples, desc=desc, leave=False):
            m = _load_map(run, s.sample_id)
            yield m, torch.from_numpy(_read_mask(s, tuple(m.shape[-2:])))[None, None]

    labelled = None
    if cfg.threshold.method == "f1_optimal":
        labelled = PixelF1Max()
        for m, g in pairs("test_public maps (threshold)"):
            labelled.update(m, g)
        stats = None
    else:
        stats = _validation_stats(run) if cfg.threshold.method != "fixed" else ScoreStats()
    result = fit_threshold(cfg.threshold, stats, labelled=labelled)

    aupro, seg_f1, class_f1 = AUPRO(fpr_limit=0.05), SegF1(), ClassF1()
    for m, g in pairs("test_public maps"):
        pred = binarize(m, result.value, cfg.postprocess)
        aupro.update(m, g)
        seg_f1.update(pred, g)
        class_f1.update(pred, g)
    metrics = {
        "test_public/aupro_0.05": float(aupro.compute()),
        "test_public/seg_f1": float(seg_f1.compute()),
        "test_public/class_f1": float(class_f1.compute()),
        "test_public/threshold": float(result.value),
    }
    info: dict[str, Any] = {"threshold_source": result.source, "overrides": overrides}
    if write:
        run.write_metrics({**metrics, **info})
        run.write_thresholds({"value": float(result.value), "method": result.method, "source": result.source,
                              "tuned_on_test": bool(result.tuned_on_test)})
    else:
        name = "_".join(o.replace("/", "-") for o in overrides) or "default"
        run.write_text(f"evaluations/{name}.json", json.dumps({**metrics, **info}, indent=2))
    _log_to_wandb(metrics, cfg)
    print(" ".join(f"{k}={v:.4f}" for k, v in metrics.items()) + f"  [threshold: {result.source}]")
    return metrics


def _log_to_wandb(metrics: dict[str, float], cfg: RunConfig) -> None:
    """Inside a W&B sweep agent (or with WANDB_RUN_ID set) log the metrics to the sweep's run."""
    if not (os.environ.get("WANDB_SWEEP_ID") or os.environ.get("WANDB_RUN_ID")):
        return
    import wandb

    run = wandb.init(project=cfg.logging.project)
    run.log(metrics)
    run.finish()
