"""Pseudo-defect rules: pastes inside the image and the object, rank-independent counts, the pick on the
post-processed masks, known answers for every rule, candidate SegF1."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch

from data_modules.cut_paste import CutPasteConfig
from data_modules.datamodule import DataConfig, MVTecAD2DataModule
from data_modules.tilers import TilingConfig
from hybridad.errors import UserError
from hybridad.models.anomaly_module import AnomalyModule
from hybridad.postprocess import PostProcessConfig
from hybridad.pseudo_defect_rules import (
    RECIPES,
    PseudoCounts,
    best_candidate,
    candidate_grid,
    pseudo_counts,
    paste_native,
    pseudo_cut_paste,
    pseudo_f1_threshold,
    pseudo_histograms,
)
from hybridad.run_dir import RunDir
from hybridad.threshold_rules import Need, all_rules, fit_threshold
from hybridad.threshold_rules.candidates import score_candidates
from hybridad.thresholds import ScoreStats, ThresholdConfig
from hybridad.types import AnomalyOutput, Batch


def test_pastes_stay_inside_a_non_square_image_and_repeat_with_the_seed() -> None:
    images = torch.full((2, 3, 40, 90), 100 / 255.0)  # (B,3,H,W), padded to 90x90 inside
    config = CutPasteConfig(probability=1.0, max_patches=3, scale_min=0.2, scale_max=0.4, library_size=2)
    cp = pseudo_cut_paste(config, 45, 90)  # tile side 45 on a 90 px square: scales halved
    assert cp.config.enabled
    assert (cp.config.scale_min, cp.config.scale_max) == (pytest.approx(0.1), pytest.approx(0.2))
    out, mask = paste_native(images, cp, torch.Generator().manual_seed(3))
    assert out.shape == images.shape and mask.shape == (2, 1, 40, 90) and mask.dtype == torch.bool
    changed = (out != images).any(dim=1, keepdim=True)
    assert changed.any() and not (changed & ~mask).any()  # every change is labelled
    assert torch.equal(out * 255, (out * 255).round())  # 8-bit levels, as real images
    again, mask2 = paste_native(images, cp, torch.Generator().manual_seed(3))
    assert torch.equal(again, out) and torch.equal(mask2, mask)


def test_pseudo_f1_threshold_known_answer() -> None:
    from hybridad.metrics.functional import float16_keys, key_histogram

    # pasted pixels score 0.5, 0.75, 0.75; untouched 0.25 x3 and 0.75 x1: best F1 at t=0.5 (TP 3, FP 1) = 6/7
    pos = key_histogram(float16_keys(torch.tensor([0.5, 0.75, 0.75])))
    neg = key_histogram(float16_keys(torch.tensor([0.25, 0.25, 0.25, 0.75])))
    thr, f1 = pseudo_f1_threshold(pos, neg)
    assert thr == 0.5 and f1 == pytest.approx(6 / 7)
    assert pseudo_f1_threshold(torch.zeros_like(pos), neg)[0] == float("inf")


def test_fit_threshold_pseudo_f1_needs_the_stored_value() -> None:
    cfg = ThresholdConfig(method="pseudo_f1")
    with pytest.raises(UserError, match="pseudo_f1"):
        fit_threshold(cfg)
    result = fit_threshold(cfg, pseudo=0.25)
    assert (result.value, result.method, result.tuned_on_test) == (0.25, "pseudo_f1", False)


class _DiffModel(AnomalyModule):
    """Scores |pasted - clean| (max over channels): a perfect detector of what was pasted."""

    def __init__(self, clean: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.clean = clean

    def predict_batch(self, batch: Batch) -> AnomalyOutput:
        ref = torch.stack([self.clean[s] for s in batch.sample_id]).float() / 255.0  # (B,3,H,W)
        amap = (batch.image - ref).abs().amax(dim=1, keepdim=True)  # (B,1,H,W)
        return AnomalyOutput(amap, amap.flatten(1).amax(1), None)


def _validation_with(root: Path, model_class: type) -> tuple[MVTecAD2DataModule, Any, Any]:
    """The synthetic `can` validation split (32 px tiles, every image pasted) and a `model_class` that knows
    each validation image's clean pixels."""
    data = DataConfig(root=str(root), category="can", num_workers=0, tiling=TilingConfig(input_size=32),
                      cut_paste=CutPasteConfig(probability=1.0, library_size=2))
    dm = MVTecAD2DataModule(data)
    ds = dm.dataset("validation")
    return dm, ds, model_class({ds[i]["sample_id"]: ds[i]["image"] for i in range(len(ds))})


def test_pseudo_histograms_perfect_detector_and_rank_split(synthetic_root: Path) -> None:
    dm, ds, model = _validation_with(synthetic_root, _DiffModel)
    cfg = ThresholdConfig(pseudo_repeats=2, pseudo_seed=5)
    pos, neg = pseudo_histograms(model, dm, cfg)
    assert pos.sum() > 0
    thr, f1 = pseudo_f1_threshold(pos, neg)
    assert f1 > 0.99 and 0.0 < thr <= 1.0  # untouched pixels score 0: the pick separates the pastes
    halves = [pseudo_histograms(model, dm, cfg, rank=r, world=2) for r in (0, 1)]
    assert torch.equal(halves[0][0] + halves[1][0], pos) and torch.equal(halves[0][1] + halves[1][1], neg)
    other = pseudo_histograms(model, dm, dataclasses.replace(cfg, pseudo_seed=6))
    assert not torch.equal(other[0], pos)  # the seed decides the pastes


def test_score_candidates_segf1_per_rule(tmp_path: Path) -> None:
    from data_modules.synthetic import write_synthetic_dataset

    root = tmp_path / "data"
    write_synthetic_dataset(root, ["wallplugs"], size=(40, 32), counts="small", seed=0, verbose=False)
    run = RunDir(tmp_path / "run")
    for png in sorted((root / "wallplugs/test_public/bad").glob("*.png")):
        gt = cv2.imread(str(root / f"wallplugs/test_public/ground_truth/bad/{png.stem}_mask.png"), 0)
        run.write_map(f"test_public/bad/{png.stem}", (gt > 0).astype(np.float32) * 0.75 + 0.125)
    for png in sorted((root / "wallplugs/test_public/good").glob("*.png")):
        run.write_map(f"test_public/good/{png.stem}", np.full((32, 40), 0.125, np.float32))
    from data_modules.datamodule import DataConfig

    out = score_candidates(run.path, {"mean_std": 0.5, "pseudo_f1": 2.0}, PostProcessConfig(),
                           DataConfig(root=str(root), category="wallplugs"))
    assert out["test_public/threshold=mean_std/seg_f1"] == 1.0  # separates GT exactly
    assert out["test_public/threshold=pseudo_f1/seg_f1"] == 0.0  # nothing predicted
    assert out["test_public/threshold=f1_optimal/seg_f1"] == 1.0
    assert out["test_public/threshold=f1_optimal/value"] == 0.875  # highest threshold reaching F1 = 1
    assert out["test_public/threshold=pseudo_f1/value"] == 2.0


def test_candidate_thresholds_from_a_stored_thresholds_yaml() -> None:
    from hybridad.threshold_rules.candidates import candidate_thresholds

    stored = {"value": 0.3, "method": "pseudo_f1", "candidates": {
        "mean_std": {"value": 0.9, "k": 3.0, "stats": {"mean": 0.3, "std": 0.2}},
        "pseudo_f1": {"value": 0.3, "pseudo_seg_f1": 0.4}}}
    assert candidate_thresholds(stored, ThresholdConfig(k=3.0)) == {"mean_std": pytest.approx(0.9), "pseudo_f1": 0.3}
    assert candidate_thresholds(stored, ThresholdConfig(k=1.0))["mean_std"] == pytest.approx(0.5)  # the asked k
    # an older run: only the validation statistics -> mean + k std with the asked k; no pseudo candidate
    old = {"value": 0.7, "method": "mean_std", "stats": {"mean": 0.25, "std": 0.125}}
    assert candidate_thresholds(old, ThresholdConfig(k=2.0)) == {"mean_std": 0.5}
    assert candidate_thresholds({"candidates": {"pseudo_f1": {"value": None}}}, ThresholdConfig(k=3.0)) == {}


def test_every_pseudo_method_has_a_recipe_or_is_the_cap() -> None:
    fitted_with_model = tuple(r.name for r in all_rules() if Need.PSEUDO_DEFECTS in r.needs)
    assert (*RECIPES, "capped_faint") == fitted_with_model
    from hybridad.pseudo_defect_rules import capped_faint
    from hybridad.threshold_rules.candidates import candidate_thresholds

    assert capped_faint(0.4, 0.3) == 0.3 and capped_faint(0.2, 0.3) == 0.2 and capped_faint(None, 0.3) == 0.3
    assert capped_faint(0.2, float("inf")) == 0.2 and capped_faint(0.2, None) is None  # not computed
    stored = {"candidates": {"mean_std": {"stats": {"mean": 0.1, "std": 0.1}}, "pseudo_faint": {"value": 0.3}}}
    assert candidate_thresholds(stored, ThresholdConfig(k=3.0))["capped_faint"] == pytest.approx(0.3)
    assert candidate_thresholds(stored, ThresholdConfig(k=1.0))["capped_faint"] == pytest.approx(0.2)  # the asked k


def test_pastes_stay_on_the_object_with_object_relative_sizes() -> None:
    from data_modules.cut_paste import otsu_foreground

    images = torch.full((4, 3, 60, 80), 20 / 255.0)  # dark background ...
    images[..., 20:40, 30:50] = 200 / 255.0  # ... and a bright 20 x 20 object
    fg = otsu_foreground(images)
    assert int(fg[0].sum()) == 400
    config = CutPasteConfig(probability=1.0, max_patches=1, size_reference="object", foreground="otsu",
                            scale_min=0.5, scale_max=0.5, library_size=2, opacity_min=1.0, min_contrast=0.3)
    cp = pseudo_cut_paste(config, 40, 80)  # object reference: the tile side does not rescale
    assert (cp.config.scale_min, cp.config.scale_max) == (0.5, 0.5)
    out, mask = paste_native(images, cp, torch.Generator().manual_seed(0), fg)
    assert mask.any() and not (mask & (fg < 0.5)).any()  # only object pixels change
    assert int(mask.flatten(1).sum(1).max()) <= 100  # a patch of side 0.5 x 20 px: at most 10 x 10


def test_best_candidate_and_pick_known_answers() -> None:
    cands = torch.tensor([0.1, 0.2, 0.3])
    # F1 at each candidate: 2*8/(16+4+0)=0.8, 2*8/(16+0+0)=1.0, 2*4/(8+0+4)=0.667 -> 0.2
    tp, fp, fn = torch.tensor([8.0, 8, 4]), torch.tensor([4.0, 0, 0]), torch.tensor([0.0, 0, 4])
    assert best_candidate(cands, tp, fp, fn) == (pytest.approx(0.2), 1.0)
    assert best_candidate(cands, torch.zeros(3), fp, torch.zeros(3)) == (float("inf"), 0.0)
    from hybridad.metrics.functional import float16_keys, key_histogram

    # two families; the raw-map pick (legacy) and the post-processed pick see different data on purpose
    pos = torch.stack([key_histogram(float16_keys(torch.tensor([0.5]))), key_histogram(float16_keys(torch.tensor([0.75])))])
    neg = torch.stack([key_histogram(float16_keys(torch.tensor([0.25]))), key_histogram(float16_keys(torch.tensor([0.6])))])
    counts = PseudoCounts(("a", "b"), cands, pos.double(), neg.double(), torch.stack([tp, torch.tensor([0.0, 0, 9])]),
                          torch.stack([fp, torch.zeros(3)]), torch.stack([fn, torch.tensor([9.0, 9, 0])]))
    assert counts.pick(RECIPES["pseudo_f1"], ["a"]) == (pytest.approx(0.2), 1.0)
    assert counts.pick(RECIPES["pseudo_f1"], ["b"]) == (pytest.approx(0.3), 1.0)  # leave "a" out
    legacy = dataclasses.replace(RECIPES["pseudo_f1"], postprocessed=False)
    assert counts.pick(legacy, ["b"]) == (0.75, 1.0)  # raw map: 0.75 separates 0.75 from 0.6


def test_candidate_grid_spans_the_validation_scores() -> None:
    stats = ScoreStats()
    stats.update(torch.linspace(0, 1, 10001))
    grid = candidate_grid(stats)
    assert torch.all(grid[1:] > grid[:-1])  # sorted, unique
    assert 0.7 < float(grid[0]) < 0.85 and float(grid.max()) == pytest.approx(4.0, rel=1e-3)
    assert torch.equal(grid, grid.half().float())  # float16 values: as the maps are compared


class _OffsetDiffModel(_DiffModel):
    """Untouched pixels score 0.1, pasted (changed) pixels 0.6: the best threshold is anything in (0.1, 0.6]."""

    def predict_batch(self, batch: Batch) -> AnomalyOutput:
        out = super().predict_batch(batch)
        amap = torch.where(out.anomaly_map > 0, 0.6, 0.1)
        return AnomalyOutput(amap, amap.flatten(1).amax(1), None)


def test_each_rule_lands_where_it_should(synthetic_root: Path) -> None:
    """Maps built so that the answer is known: validation maps are 0.1 everywhere (mean 0.1, std 0, so mean +
    3 std = 0.1 flags every pixel); pastes score 0.6, so every pseudo rule must land in (0.1, 0.6] with
    pseudo SegF1 1 (scored on the masks the run writes: binarize with the model's post-processing)."""
    dm, ds, model = _validation_with(synthetic_root, _OffsetDiffModel)
    stats = ScoreStats()
    for i in range(len(ds)):
        stats.update(torch.full((1, 1, 8, 8), 0.1))
    mean_std = fit_threshold(ThresholdConfig(), stats).value
    assert mean_std == pytest.approx(0.1)
    grid = candidate_grid(stats)
    cfg = ThresholdConfig(pseudo_repeats=2)
    found = {}
    for name, recipe in RECIPES.items():
        counts = pseudo_counts(model, dm, cfg, grid, recipe)
        assert counts.families == ("crack", "scratch", "spot", "contamination")
        thr, f1 = counts.pick(recipe)
        found[name] = thr
        assert 0.1 < thr <= 0.6 and f1 == 1.0, name
        halves = [pseudo_counts(model, dm, cfg, grid, recipe, rank=r, world=2) for r in (0, 1)]
        assert torch.equal(halves[0].tp + halves[1].tp, counts.tp)  # rank-independent pastes
    from hybridad.pseudo_defect_rules import capped_faint

    assert capped_faint(mean_std, found["pseudo_faint"]) == pytest.approx(0.1)  # the lower of the two
