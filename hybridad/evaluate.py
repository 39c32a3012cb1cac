"""`hybridad evaluate RUN key=value ...`: re-binarise and re-score a run's cached maps without the model.

Reads the float16 maps a run cached (`<run>/maps/<split>/...`), fits the (overridden) threshold rule of every
split, binarises with the (overridden) post-processing and scores test_public against the ground truth of the
run's dataset. Each call writes a NEW evaluation directory; the run's own files stay as training wrote them:

```
<run>/evaluations/<id>/evaluation.yaml         run, overrides, created, tuned_on_test (and why), W&B sweep id,
                                               the resolved `threshold` and `postprocess` sections
<run>/evaluations/<id>/thresholds.yaml         the category's threshold {value, method, source, tuned_on_test}
                                               + `splits: {<split>: {...}}` (private splits may differ)
<run>/evaluations/<id>/metrics.json            test_public/* metrics, <split>/threshold, threshold_source, ...
<run>/evaluations/<id>/masks/<sample_id>.png   with --write-masks: the masks of all four splits, {0,255}
```
`<id>` is a counter (`0001`, `0002`, ...) claimed by an atomic rename of the finished directory, so an
evaluation is complete or absent, and parallel sweep agents never share one. W&B sweeps call this command
(`experiments/sweeps/threshold.yaml`); `recreate_best` re-creates the best evaluation of a run by a metric,
with masks.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from omegaconf import OmegaConf
from tqdm import tqdm

from data_modules.formats import list_splits
from hybridad.config import RunConfig, load_run_config
from hybridad.errors import UserError
from hybridad.labelled_maps import labelled_test_maps, load_cached_map
from hybridad.metrics import GroupedMetrics, PixelF1Max, group_keys, process_local
from hybridad.postprocess import binarize
from hybridad.run_dir import RunDir
from hybridad.threshold_rules import Need, fit_threshold, get_rule, rule_for_split
from hybridad.threshold_rules.candidates import candidate_thresholds
from hybridad.thresholds import TUNED_ON_TEST, ScoreStats, ThresholdResult
from hybridad.types import PRIVATE_SPLITS, Split

EVALUATIONS_DIR = "evaluations"
EVALUATION_FILE = "evaluation.yaml"
OVERRIDABLE = ("threshold.", "postprocess.")  # what `evaluate` may change: nothing that needs the model
SPLITS = (Split.VALIDATION, Split.TEST_PUBLIC, Split.TEST_PRIVATE, Split.TEST_PRIVATE_MIXED)
SCORED_FIELDS = ("map", "mask", "pred", "label")  # what re-scoring has of each image (metric suite fields)


def _map_stats(run: RunDir, split: Split, why: str) -> ScoreStats:
    """Pixel statistics of every cached map of `split` (process-local: rank 0 reads all ranks' maps)."""
    stats = ScoreStats(**process_local())
    ids = [sid for sid, _ in run.iter_maps(split.value)]
    if not ids:
        raise UserError(f"{run.path}/maps/{split.value} is empty: {why}")
    for sid in tqdm(ids, desc=f"{split.value} maps", leave=False):
        stats.update(load_cached_map(run, sid))
    return stats


def _validation_stats(run: RunDir) -> ScoreStats:
    return _map_stats(run, Split.VALIDATION, "the threshold rule needs the validation maps")


def _check_overrides(overrides: list[str]) -> None:
    for item in overrides:
        key = item.split("=", 1)[0]
        if "=" in item and not key.startswith(OVERRIDABLE):
            raise UserError(f"evaluate: '{key}' cannot change without the model; only threshold.* and "
                            "postprocess.* keys re-score cached maps (retrain for the rest)")


def _load_config(run: RunDir, overrides: list[str]) -> RunConfig:
    _check_overrides(overrides)
    cfg = load_run_config(run.path, overrides)
    cached_sigma = load_run_config(run.path).postprocess.whole_map_blur_sigma
    if cfg.postprocess.whole_map_blur_sigma != cached_sigma:
        raise UserError("postprocess.whole_map_blur_sigma is applied before the maps are cached "
                        f"(this run: {cached_sigma}); change it with `hybridad train`, not `evaluate`")
    return cfg


def fit_split_thresholds(run: RunDir, cfg: RunConfig, predicted: tuple[Split, ...] = PRIVATE_SPLITS
                         ) -> dict[str, ThresholdResult]:
    """The threshold of every split: the category's rule, or a private split's own override.

    Validation maps are read only when a rule needs their statistics; test_public maps with labels only when
    a rule needs them (tuned on test); a rule fitted with the model reads the value the run stored; a private
    split whose rule needs its own maps (`split_matched`) reads that split's cached maps and carries the
    category's threshold (test_public's) over to them. Such a split is left out unless it is in `predicted`
    (train fits the category's threshold before predicting, and predicts only the private splits the layout
    has); an empty one in `predicted` is an error.
    """
    rules = {s.value: rule_for_split(cfg.threshold, s.value) for s in SPLITS}
    rules = {split: r for split, r in rules.items()
             if Split(split) in predicted or Need.SPLIT_MAPS not in get_rule(r.method).needs}
    own = {split: _map_stats(run, Split(split), f"threshold.{split}.method={r.method} reads the split's own "
                             "maps; train with predict_private=true on a layout that has the split")
           for split, r in rules.items() if Need.SPLIT_MAPS in get_rule(r.method).needs}  # first: fail early
    used = [get_rule(r.method) for r in rules.values()]
    now = {need for rule in used if not rule.fitted_with_model for need in rule.needs}  # fitted here
    stats = _validation_stats(run) if Need.VALIDATION_STATS in now else None
    labelled = None
    if Need.TEST_LABELS in now:
        labelled = PixelF1Max(**process_local())
        for item in labelled_test_maps(run, cfg.data, "test_public maps (threshold)"):
            labelled.update(item.anomaly_map, item.mask)
    pseudo: dict[str, float] = {}
    if any(rule.fitted_with_model for rule in used):  # needs the model: the values found at training time
        pseudo = candidate_thresholds(run.read_thresholds(), cfg.threshold)
    fitted = {split: fit_threshold(rule, stats, labelled=labelled, pseudo=pseudo.get(rule.method))
              for split, rule in rules.items() if split not in own}
    for split, split_stats in own.items():  # matched to the split's own maps, from the category's threshold
        fitted[split] = fit_threshold(rules[split], stats, split_stats=split_stats,
                                      base=fitted[Split.TEST_PUBLIC.value])
    return {split: fitted[split] for split in rules}


def _score(run: RunDir, cfg: RunConfig, thresholds: dict[str, ThresholdResult], masks_to: RunDir | None,
           mask_splits: tuple[Split, ...] = (Split.VALIDATION, Split.TEST_PRIVATE, Split.TEST_PRIVATE_MIXED),
           ) -> dict[str, float]:
    """test_public metrics of the metric suite, overall and per group as `MetricsCallback` names them
    (`test_public/<group>/<name>`), but for those reading an image score (cached maps have none); with
    `masks_to`, also the masks of test_public and of every split of `mask_splits` with cached maps written
    there."""
    thr = thresholds[Split.TEST_PUBLIC.value].value
    groups = GroupedMetrics(fields=SCORED_FIELDS, **process_local())
    for item in labelled_test_maps(run, cfg.data, "test_public maps"):
        sample, m, g = item.sample, item.anomaly_map, item.mask
        pred = binarize(m, thr, cfg.postprocess)  # (1,1,H,W) bool
        inputs = {"map": m, "mask": g, "pred": pred, "label": torch.tensor([sample.label])}
        groups.update(group_keys(sample.label, sample.lighting, sample.defect_type), inputs)
        if masks_to is not None:
            masks_to.write_mask(sample.sample_id, pred[0, 0])
    metrics = groups.compute(Split.TEST_PUBLIC.value, sorted(groups.groups))
    metrics.update({f"{split}/threshold": float(r.value) for split, r in thresholds.items()})
    if masks_to is not None:
        on_disk = list_splits(cfg.data).splits
        for split in (s for s in mask_splits if s.value in thresholds):
            maps = list(run.iter_maps(split))
            if not maps and split in on_disk:  # a layout without private splits has nothing to binarise
                print(f"warning: {run.path}/maps/{split.value} is empty; no {split.value} masks written",
                      file=sys.stderr)
            for sid, _ in tqdm(maps, desc=f"{split.value} masks", leave=False):
                masks_to.write_mask(sid, binarize(load_cached_map(run, sid), thresholds[split.value].value,
                                                  cfg.postprocess)[0, 0])
    return metrics


def _tuned_on_test_reasons(thresholds: dict[str, ThresholdResult], selected_by: dict[str, Any] | None
                           ) -> list[str]:
    """Why values of this evaluation were chosen with test_public labels (empty: they were not)."""
    reasons = [f"{split} threshold {r.method} carried over from the category's, fitted on test_public"
               if Need.SPLIT_MAPS in get_rule(r.method).needs
               else f"{split} threshold fitted by {r.method} on test_public"
               for split, r in thresholds.items() if r.tuned_on_test]
    sweep = os.environ.get("WANDB_SWEEP_ID")
    if sweep:
        reasons.append(f"W&B sweep {sweep} searches values by a test_public metric")
    if selected_by:
        reasons.append(f"selected as the best {selected_by['metric']} of {selected_by['among']} evaluations")
    return reasons


def _threshold_record(thresholds: dict[str, ThresholdResult], reasons: list[str]) -> dict[str, Any]:
    """thresholds.yaml: the category's threshold at the top (as train writes it), every split below."""
    base = thresholds[Split.TEST_PUBLIC.value]
    source = base.source
    if reasons and TUNED_ON_TEST not in source:
        source = f"{source} ({TUNED_ON_TEST}: {'; '.join(reasons)})"
    record: dict[str, Any] = {"value": float(base.value), "method": base.method, "source": source,
                              "tuned_on_test": bool(reasons)}
    if reasons:
        record["label"] = TUNED_ON_TEST
    record["splits"] = {split: {"value": float(r.value), "method": r.method, "source": r.source,
                                "tuned_on_test": bool(r.tuned_on_test or reasons)}
                        for split, r in thresholds.items()}
    return record


TEST_PUBLIC_MASKS_ONLY: tuple[Split, ...] = ()  # `evaluate_run(write_masks=...)`: no split beyond test_public


def evaluate_run(run_path: Path, overrides: list[str], write: bool = False,
                 write_masks: bool | tuple[Split, ...] = False, predicted: tuple[Split, ...] = PRIVATE_SPLITS
                 ) -> dict[str, float]:
    """Re-score cached maps; returns `{"test_public/<metric>": value, ...}` and prints a summary.

    With `write=True` (what `hybridad train` uses for `f1_optimal`, and after predicting when a private split
    has its own threshold) the metrics and thresholds replace the run's own `metrics.json` and
    `thresholds.yaml`, and `write_masks` rewrites the run's own masks (True: every split; a tuple of splits:
    test_public and those, e.g. validation before the private splits are predicted); otherwise a new
    evaluation directory is written (`create_evaluation`) and the run's files stay untouched.
    `predicted` (with `write=True`): the private splits with cached maps; one whose rule reads its own maps
    and is not among them is left out (train: none before predicting, the layout's private splits after).
    """
    if not write:
        return json.loads((create_evaluation(run_path, overrides, write_masks) / "metrics.json").read_text())
    run = RunDir(Path(run_path))
    cfg = _load_config(run, overrides)
    thresholds = fit_split_thresholds(run, cfg, predicted)
    if isinstance(write_masks, tuple):
        metrics = _score(run, cfg, thresholds, run, write_masks)
    else:
        metrics = _score(run, cfg, thresholds, run if write_masks else None)
    record = _threshold_record(thresholds, _tuned_on_test_reasons(thresholds, None))
    candidates = run.read_thresholds().get("candidates")
    if candidates:  # the label-free candidates found at training time (mean_std, pseudo_f1) stay on record
        record["candidates"] = candidates
    run.write_metrics({**metrics, "threshold_source": record["source"],
                       "tuned_on_test": record["tuned_on_test"], "overrides": overrides})
    run.write_thresholds(record)
    _print_summary(metrics, record)
    return metrics


def create_evaluation(run_path: Path, overrides: list[str], write_masks: bool = False,
                      selected_by: dict[str, Any] | None = None) -> Path:
    """Evaluate a completed run with `overrides` into a new `<run>/evaluations/<id>/`; returns that folder.

    Args:
        run_path: a completed run directory.
        overrides: `threshold.*` / `postprocess.*` `key=value` items (any number: the folder is a counter).
        write_masks: also binarise every split's cached maps into `<id>/masks/`.
        selected_by: `{metric, value, evaluation, among}` when this re-creates a sweep's best evaluation
            (`best_evaluation`); it marks every value as tuned on test.

    Raises:
        UserError: the run is incomplete, an override is malformed or not re-scorable, a map is missing.
    """
    run = RunDir(Path(run_path))
    run.require_completed("evaluate")
    cfg = _load_config(run, overrides)
    thresholds = fit_split_thresholds(run, cfg)
    reasons = _tuned_on_test_reasons(thresholds, selected_by)
    record = _threshold_record(thresholds, reasons)

    root = run.path / EVALUATIONS_DIR
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        metrics = _score(run, cfg, thresholds, RunDir(tmp) if write_masks else None)
        info = {"threshold_source": record["source"], "tuned_on_test": record["tuned_on_test"]}
        if reasons:
            info["label"] = TUNED_ON_TEST
        resolved = OmegaConf.to_container(OmegaConf.structured(cfg))
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        evaluation = {
            "run": str(run.path.resolve()), "category": cfg.data.category, "overrides": list(overrides),
            "created": stamp, "masks": write_masks,
            "tuned_on_test": bool(reasons), "tuned_on_test_because": reasons,
            "wandb_sweep": os.environ.get("WANDB_SWEEP_ID"), "selected_by": selected_by,
            "threshold": resolved["threshold"], "postprocess": resolved["postprocess"],  # type: ignore[index]
        }
        tmp_dir = RunDir(tmp)
        tmp_dir.write_text(EVALUATION_FILE, yaml.safe_dump(evaluation, sort_keys=False))
        tmp_dir.write_thresholds(record)
        tmp_dir.write_metrics({**metrics, **info})
        _honour_umask(tmp)
        final = _claim(root, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log_to_wandb(metrics, info, cfg, final)
    _print_summary(metrics, record)
    return final


def _honour_umask(folder: Path) -> None:
    """mkdtemp creates 0700; give the evaluation folders the permissions a plain mkdir would."""
    mask = os.umask(0)
    os.umask(mask)
    for path in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        path.chmod(0o777 & ~mask)


def _claim(root: Path, tmp: Path) -> Path:
    """Rename the finished `tmp` to the next free counter below `root` (a concurrent claim takes the next)."""
    for _ in range(1000):
        taken = [int(p.name) for p in root.iterdir() if p.name.isdigit()]
        final = root / f"{max(taken, default=0) + 1:04d}"
        try:
            os.rename(tmp, final)  # fails when another process already renamed its (non-empty) folder there
            return final
        except OSError as err:
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    raise UserError(f"{root}: could not claim a new evaluation id (too many concurrent evaluations)")


def _print_summary(metrics: dict[str, float], record: dict[str, Any]) -> None:
    """One line: the overall metrics and thresholds (`<split>/<name>`); per-group values stay in the files."""
    line = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.count("/") == 1)
    print(f"{line}  [threshold: {record['source']}]", flush=True)


def _log_to_wandb(metrics: dict[str, float], info: dict[str, Any], cfg: RunConfig, folder: Path) -> None:
    """Inside a W&B sweep agent (or with WANDB_RUN_ID set) log the metrics and their label to that run."""
    if not (os.environ.get("WANDB_SWEEP_ID") or os.environ.get("WANDB_RUN_ID")):
        return
    import wandb

    tags = [TUNED_ON_TEST] if info.get("tuned_on_test") else None
    project = None if os.environ.get("WANDB_SWEEP_ID") else cfg.logging.project  # a sweep sets its own
    run = wandb.init(project=project, dir=str(folder), tags=tags)
    run.log(metrics)
    run.summary.update({**info, "evaluation_dir": str(folder)})
    run.finish()
    sys.stdout.flush()


# selecting ------------------------------------------------------------------------------------------------
def list_evaluations(run_path: Path) -> list[Path]:
    """Every finished evaluation directory of a run, oldest first."""
    root = Path(run_path) / EVALUATIONS_DIR
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.name.isdigit() and (p / "metrics.json").is_file()),
                  key=lambda p: int(p.name))


def best_evaluation(run_path: Path, metric: str) -> tuple[Path, float, int]:
    """The run's evaluation with the highest `metric` (earliest on ties): (folder, value, number compared).

    Raises:
        UserError: no evaluation of the run has `metric`.
    """
    scored = []
    for folder in list_evaluations(run_path):
        value = json.loads((folder / "metrics.json").read_text()).get(metric)
        if isinstance(value, (int, float)) and np.isfinite(value):
            scored.append((folder, float(value)))
    if not scored:
        names = ", ".join(f"test_public/{s.name}" for s in GroupedMetrics(SCORED_FIELDS).specs)
        raise UserError(f"no evaluation under {Path(run_path) / EVALUATIONS_DIR} has metric '{metric}'; "
                        f"run a sweep or `hybridad evaluate RUN key=value ...` first (metrics: {names})")
    best = max(scored, key=lambda fv: fv[1])  # max keeps the first of equal values
    return best[0], best[1], len(scored)


def recreate_best(run_path: Path, metric: str) -> Path:
    """Re-evaluate the run's best evaluation by `metric` with masks, labelled as tuned on test; returns it."""
    folder, value, among = best_evaluation(run_path, metric)
    overrides = yaml.safe_load((folder / EVALUATION_FILE).read_text()).get("overrides") or []
    print(f"best {metric} = {value:.4f}: {folder} (of {among}) with {' '.join(overrides) or 'no overrides'}",
          flush=True)
    selected_by = {"metric": metric, "value": value, "evaluation": str(folder.resolve()), "among": among}
    return create_evaluation(run_path, list(overrides), write_masks=True, selected_by=selected_by)

