"""`python -m bench --only thresholds`: label-free threshold rules on real photographs and unseen defects.

For each texture of `data_modules.photos` (crops of six scikit-image photographs; train, validation and test
from disjoint regions) a tiny INP-Former is trained through the project's own `train` path (the `fabric`
slot's routing, tiling and post-processing, kernels scaled to 128 px). A callback scores pasted validation
images for every pseudo-defect rule at the final validation, keeping counts per pseudo family. Then every
rule's threshold binarises the cached test_public maps with the run's post-processing, family by family:
- held-out pseudo families: the rule is calibrated on the other three families only (leave one family out);
- novel families (blur, dent, phase swap, hole, crease, blocks): calibrated on all four pseudo families;
- lighting-shifted test: every test image under test_private_mixed's gain/offset variants, predicted through
  `hybridad predict`; each rule as validated, and carried over by `split_matched` (the shifted maps, no labels).
SegF1 is pooled over the test good images and the family's bad images, averaged over the group's families.
"F1-opt" is the one threshold best for all of the texture's families in the group (tuned on test, an oracle for
scale: one threshold per texture, as the `f1_optimal` rule has one per category); "per-family F1-opt" gives each
family its own best threshold, a stricter bound that no single-threshold system reaches.
Pixel AUROC and AU-PRO(0.05) are the model's, the same for every rule. Means are over all textures and over
the textures where the model detects the group (pixel AUROC >= `DETECTS_AUROC`).

The default rule is chosen on the held-out pseudo rows (leave-one-out over our own families) where the model
detects; the novel rows are the check (docs/thresholds.md). `BENCH_THRESHOLDS_OUT=<dir>` keeps the trees and
runs there; with `BENCH_THRESHOLDS_REUSE=1` the runs already there are re-scored without training (rules are
functions of the stored calibration counts).
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
import numpy as np
import torch

from data_modules.photos import (
    NOVEL_FAMILIES,
    PSEUDO_FAMILIES,
    TEXTURES,
    mixed_lighting,
    read_manifest,
    write_photo_dataset,
)
from hybridad.metrics.functional import au_pro, binary_counts, f1_from_counts, pixel_auroc
from hybridad.postprocess import PostProcessConfig, binarize
from hybridad.pseudo_defect_rules import (
    LEGACY,
    RECIPES,
    PseudoCounts,
    PseudoRecipe,
    candidate_grid,
    capped_faint,
    pseudo_counts,
)
from hybridad.run_dir import RunDir
from hybridad.threshold_rules.split_scores import matched_threshold
from hybridad.thresholds import ScoreStats, ThresholdConfig, mean_std_threshold
from hybridad.types import AnomalyOutput

SLOT = "fabric"
CLOSING = 4  # fabric's 80 px closing at 2448 px, scaled to the 128 px crops
STEPS = int(os.environ.get("BENCH_THRESHOLDS_STEPS", "160"))
REPEATS = 4  # pasted copies of each validation image per rule
LABEL_FREE = ("mean_std", LEGACY.name, *RECIPES, "capped_faint")
REUSE = os.environ.get("BENCH_THRESHOLDS_REUSE", "") == "1"  # re-score the runs already in `out` (no training)
# one thread: the same numbers on every run (with two, brick's pixel AUROC moved from 77 % to 86 % between runs)
THREADS = int(os.environ.get("BENCH_THRESHOLDS_THREADS", "1"))
# training seeds (`seed=`); with several, each texture is trained once per seed and rows say which
SEEDS = tuple(int(s) for s in os.environ.get("BENCH_THRESHOLDS_SEEDS", "1").split(","))
# a texture counts towards the "model detects" means when the model's pixel AUROC on that defect group reaches
# this (fixed before any rule was compared on it): below it every threshold marks noise and ratios are noise
DETECTS_AUROC = 0.6
LIGHTING = "lighting-shifted test (all families)"


class FamilyCalibration(L.Callback):
    """At the final validation: validation statistics and per-family pseudo counts of every recipe."""

    def __init__(self, recipes: list[PseudoRecipe], repeats: int = REPEATS) -> None:
        self.recipes = recipes
        self.cfg = ThresholdConfig(pseudo_repeats=repeats)
        self.stats = ScoreStats()
        self.counts: dict[str, PseudoCounts] = {}
        self.seconds = 0.0
        self.mean = self.std = float("nan")

    def save(self, path: Path) -> None:
        """Keep what the rules need (re-scoring new rules without retraining: `load_calibration`)."""
        torch.save({"mean": self.mean, "std": self.std, "stats": self.stats.state_dict(),
                    "counts": {k: vars(v) for k, v in self.counts.items()}}, path)

    def _final(self, trainer: L.Trainer) -> bool:
        return trainer.state.fn == TrainerFn.VALIDATING and not trainer.sanity_checking

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.stats = ScoreStats()

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._final(trainer) and isinstance(outputs, AnomalyOutput):
            self.stats.update(outputs.anomaly_map.cpu())

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._final(trainer):
            return
        t0 = time.time()
        grid = candidate_grid(self.stats)
        for recipe in self.recipes:
            dm = trainer.datamodule
            self.counts[recipe.name] = pseudo_counts(pl_module, dm, self.cfg, grid, recipe)  # type: ignore[arg-type]
        self.seconds = time.time() - t0
        self.mean, self.std = self.stats.mean, self.stats.std


@dataclass
class TestSet:
    """Cached test_public maps of one run: good images, and bad images per family."""

    good_maps: list[torch.Tensor] = field(default_factory=list)  # (1,1,H,W) each
    bad: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)  # family -> (map, gt)

    def subset(self, family: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,1,H,W) maps and bool GT of the good images plus `family`'s bad images."""
        maps = self.good_maps + [m for m, _ in self.bad[family]]
        gts = [torch.zeros_like(m, dtype=torch.bool) for m in self.good_maps] + [g for _, g in self.bad[family]]
        return torch.cat(maps), torch.cat(gts)


def load_test_set(run: Path, data_root: Path) -> TestSet:
    from data_modules.listing import list_samples, read_mask

    families = read_manifest(data_root)
    rd, ts = RunDir(run), TestSet()
    for s in list_samples(data_root, SLOT, "test_public"):
        m = torch.from_numpy(rd.read_map(s.sample_id))[None, None]  # (1,1,H,W)
        if s.mask_path is None:
            ts.good_maps.append(m)
            continue
        gt = torch.from_numpy(np.asarray(read_mask(s.mask_path, s.image_path, tuple(m.shape[-2:])) > 0))
        ts.bad.setdefault(families[s.sample_id], []).append((m, gt[None, None]))
    return ts


def seg_f1(maps: torch.Tensor, gts: torch.Tensor, threshold: float, pp: PostProcessConfig) -> float:
    if not np.isfinite(threshold):
        return 0.0
    return f1_from_counts(*binary_counts(binarize(maps, threshold, pp), gts))


def _oracle_grid(maps: torch.Tensor) -> list[float]:
    """A dense threshold grid of `maps`' own values: 100 quantiles from the median to 1 - 1e-6."""
    qs = torch.tensor(np.concatenate([np.linspace(0.5, 0.99, 50), 1 - np.geomspace(1e-2, 1e-6, 50)]))
    flat = maps.flatten().double()
    sample = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[: 2**22]]
    return torch.unique(torch.quantile(sample, qs).float().to(torch.float16).float()).tolist()


def f1_optimal(maps: torch.Tensor, gts: torch.Tensor, pp: PostProcessConfig) -> tuple[float, float]:
    """(SegF1, threshold) best on a dense grid of the subset's own values: tuned on test (oracle), one
    threshold for this one subset (per family: a bound no single-threshold system reaches)."""
    return max((seg_f1(maps, gts, t, pp), t) for t in _oracle_grid(maps))


def texture_optimal(subsets: dict[str, tuple[torch.Tensor, torch.Tensor]], pp: PostProcessConfig,
                    extra: Sequence[float] = ()) -> tuple[float, float]:
    """(mean SegF1 over the families, threshold) of the one threshold best for all of a texture's `subsets`
    together (family -> (maps, gts)): tuned on test, one threshold per texture as the project's `f1_optimal`
    rule and MVTec AD 2's F1-optimal have one per category. The grid is the union of the families' own
    values and `extra` (the rules' thresholds, so no rule can beat it)."""
    maps = torch.cat([m for m, _ in subsets.values()])
    grid = sorted(set(_oracle_grid(maps)) | {float(t) for t in extra if np.isfinite(t)})
    return max((statistics.mean(seg_f1(m, g, t, pp) for m, g in subsets.values()), t) for t in grid)


def load_calibration(path: Path) -> FamilyCalibration:
    data = torch.load(path, weights_only=False)
    cal = FamilyCalibration([])
    cal.mean, cal.std = data["mean"], data["std"]
    if "stats" in data:  # calibrations saved before the lighting section have no histogram
        cal.stats.load_state_dict(data["stats"])
    cal.counts = {k: PseudoCounts(**v) for k, v in data["counts"].items()}
    return cal


def rule_thresholds(cal: FamilyCalibration, held_out: str | None) -> dict[str, float]:
    """Every label-free rule's threshold, its pseudo rules calibrated without `held_out`."""
    out = {"mean_std": mean_std_threshold(cal.mean, cal.std, 3.0)}
    for recipe in [LEGACY, *RECIPES.values()]:
        counts = cal.counts[recipe.name]
        fams = [f for f in counts.families if f != held_out]
        out[recipe.name], _ = counts.pick(recipe, fams)
    out["capped_faint"] = capped_faint(out["mean_std"], out["pseudo_faint"])
    return out


def _train_one(data_root: Path, runs: Path, seed: int) -> tuple[Path, FamilyCalibration]:
    """Train in `runs` (the run lands in `runs/<SLOT>/bench`) with the calibration callback."""
    from hybridad.demo import demo_config, silence_lightning
    from hybridad.train import train

    cal = FamilyCalibration([LEGACY, *RECIPES.values()])
    over = ["predict_private=false", f"postprocess.closing_kernel={CLOSING}", "threshold.pseudo_repeats=0",
            f"trainer.max_steps={STEPS}", "name=bench", f"seed={seed}"]
    cfg = demo_config(SLOT, data_root, runs, over)
    with silence_lightning():
        run = train(cfg, callbacks=[cal])
    return run, cal


def evaluate_texture(run: Path, data_root: Path, cal: FamilyCalibration, pp: PostProcessConfig) -> list[dict]:
    ts = load_test_set(run, data_root)
    per_family: dict[str, dict[str, Any]] = {}
    subsets = {fam: ts.subset(fam) for fam in (*PSEUDO_FAMILIES, *NOVEL_FAMILIES)}
    for fam, (maps, gts) in subsets.items():
        opt, _ = f1_optimal(maps, gts, pp)
        thr = rule_thresholds(cal, fam if fam in PSEUDO_FAMILIES else None)
        per_family[fam] = {"opt": opt, "auroc": pixel_auroc(maps, gts),
                           "aupro": au_pro(maps, gts, 0.05),
                           "rules": {r: (seg_f1(maps, gts, t, pp), t) for r, t in thr.items()}}
    rows = []
    for group, fams in (("held-out pseudo (leave-one-out)", PSEUDO_FAMILIES), ("novel families", NOVEL_FAMILIES)):
        fam_opt = statistics.mean(per_family[f]["opt"] for f in fams)
        used = [t for f in fams for _, t in per_family[f]["rules"].values()]
        opt, opt_thr = texture_optimal({f: subsets[f] for f in fams}, pp, used)
        for rule in LABEL_FREE:
            f1 = statistics.mean(per_family[f]["rules"][rule][0] for f in fams)
            thr = statistics.mean(per_family[f]["rules"][rule][1] for f in fams)
            rows.append({"defects": group, "rule": rule, "SegF1 %": round(100 * f1, 2),
                         "ratio to F1-opt": _ratio(f1, opt), "ratio to per-family F1-opt": _ratio(f1, fam_opt),
                         "threshold": round(thr, 4)})
        rows.append({"defects": group, "rule": "f1_optimal (tuned on test)", "SegF1 %": round(100 * opt, 2),
                     "ratio to F1-opt": 1.0, "ratio to per-family F1-opt": _ratio(opt, fam_opt),
                     "threshold": round(opt_thr, 4)})
        auroc = statistics.mean(per_family[f]["auroc"] for f in fams)
        aupro = statistics.mean(per_family[f]["aupro"] for f in fams)
        for r in rows[-len(LABEL_FREE) - 1:]:
            r.update({"pixel AUROC %": round(100 * auroc, 1), "AU-PRO(0.05) %": round(100 * aupro, 1)})
    return rows


def _ratio(f1: float, opt: float) -> float:
    return round(f1 / opt, 3) if opt > 0 else float("nan")


def _shifted_test_maps(run: Path, data_root: Path, work: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Every test_public image under the test_private_mixed lighting variants (`photos.mixed_lighting`, image
    i gets variant i % 4), predicted by the run through `hybridad predict`: (N,1,H,W) maps and bool GT."""
    import contextlib
    import io

    import cv2
    import tifffile

    from data_modules.listing import list_samples, read_image, read_mask
    from hybridad.predict import predict

    images, gts = work / "images", []
    images.mkdir(parents=True, exist_ok=True)
    samples = list_samples(data_root, SLOT, "test_public")
    for i, s in enumerate(samples):
        shifted = mixed_lighting(read_image(s.image_path), i)  # (H,W,3) uint8, grey in every channel
        cv2.imwrite(str(images / f"{i:03d}.png"), shifted)
        size = shifted.shape[:2]
        gt = np.zeros(size, bool) if s.mask_path is None else np.asarray(read_mask(s.mask_path, s.image_path, size) > 0)
        gts.append(torch.from_numpy(gt)[None, None])
    with contextlib.redirect_stdout(io.StringIO()):
        predict(run, [str(images)], work / "pred", device="cpu", overlays=False)
    maps = [torch.from_numpy(tifffile.imread(work / "pred" / "maps" / f"{i:03d}.tiff").astype(np.float32))
            for i in range(len(samples))]
    return torch.stack(maps)[:, None], torch.cat(gts)  # (N,1,H,W)


def lighting_rows(run: Path, data_root: Path, cal: FamilyCalibration, pp: PostProcessConfig, work: Path
                  ) -> list[dict]:
    """Each label-free rule as validated, and carried over to the shifted split by `split_matched` (which
    reads the shifted maps, no labels), on the lighting-shifted test images; F1-optimal for scale."""
    maps, gts = _shifted_test_maps(run, data_root, work)
    split = ScoreStats()
    split.update(maps)
    thresholds = {rule: (thr, matched_threshold(thr, cal.stats, split))
                  for rule, thr in rule_thresholds(cal, None).items()}
    # one subset (every family pooled): the per-texture and the per-family oracle are the same threshold
    used = [t for pair in thresholds.values() for t in pair]
    opt, opt_thr = texture_optimal({"all": (maps, gts)}, pp, used)
    rows = []
    for rule, (thr, matched) in thresholds.items():
        f1, f1_m = seg_f1(maps, gts, thr, pp), seg_f1(maps, gts, matched, pp)
        rows.append({"defects": LIGHTING, "rule": rule, "SegF1 %": round(100 * f1, 2),
                     "ratio to F1-opt": _ratio(f1, opt), "ratio to per-family F1-opt": _ratio(f1, opt),
                     "threshold": round(thr, 4), "split_matched SegF1 %": round(100 * f1_m, 2),
                     "split_matched ratio": _ratio(f1_m, opt), "split_matched threshold": round(matched, 4)})
    rows.append({"defects": LIGHTING, "rule": "f1_optimal (tuned on test)", "SegF1 %": round(100 * opt, 2),
                 "ratio to F1-opt": 1.0, "ratio to per-family F1-opt": 1.0, "threshold": round(opt_thr, 4)})
    auroc, aupro = pixel_auroc(maps, gts), au_pro(maps, gts, 0.05)
    for r in rows:
        r.update({"pixel AUROC %": round(100 * auroc, 1), "AU-PRO(0.05) %": round(100 * aupro, 1)})
    return rows


def _score_texture(label: str, root: Path, runs: Path, seed: int, lighting: Path) -> list[dict]:
    """Train (or, with REUSE, load) one texture's run and score every rule on it: its rows."""
    t0 = time.time()
    if REUSE:
        run_dir = runs / SLOT / "bench"
        cal = load_calibration(run_dir / "bench_calibration.pt")
    else:
        run_dir, cal = _train_one(root, runs, seed)
        cal.save(run_dir / "bench_calibration.pt")
    t1 = time.time()
    pp = _run_postprocess(run_dir)
    rows = [{"texture": label, **r} for r in evaluate_texture(run_dir, root, cal, pp)]
    if cal.stats.count > 0:
        shutil.rmtree(lighting, ignore_errors=True)
        rows += [{"texture": label, **r} for r in lighting_rows(run_dir, root, cal, pp, lighting)]
    print(f"  {label}: train + calibrate {t1 - t0:.0f} s (calibration {cal.seconds:.0f} s), score "
          f"{time.time() - t1:.0f} s", flush=True)
    return rows


def run(out: Path | None = None, textures: tuple[str, ...] = TEXTURES) -> list[dict]:
    """Train one tiny model per texture and return one row per (texture, defect group, rule), then the means."""
    tmp = None
    out = out or (Path(os.environ["BENCH_THRESHOLDS_OUT"]) if os.environ.get("BENCH_THRESHOLDS_OUT") else None)
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_thresholds_")
        out = Path(tmp.name)
    rows: list[dict] = []
    roots = {t: out / "data" / t for t in textures} if REUSE else write_photo_dataset(out / "data", textures)
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        for tex, root in roots.items():
            for seed in SEEDS:
                label = tex if len(SEEDS) == 1 else f"{tex} (seed {seed})"
                runs = out / "runs" / (tex if len(SEEDS) == 1 else f"{tex}_seed{seed}")
                rows += _score_texture(label, root, runs, seed, out / "lighting" / runs.name)
    finally:
        torch.set_num_threads(threads)
    rows += _means(rows)
    if tmp is not None:
        tmp.cleanup()
    return rows


def _run_postprocess(run_dir: Path) -> PostProcessConfig:
    import yaml

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())["postprocess"]
    return PostProcessConfig(**cfg)


def _means(rows: list[dict]) -> list[dict]:
    """Mean over textures of SegF1 and of the ratio to F1-optimal, per (defect group, rule): over every
    texture, and over the textures where the model detects that group (pixel AUROC >= `DETECTS_AUROC`)."""
    out = []
    keys = list(dict.fromkeys((r["defects"], r["rule"]) for r in rows))
    for label, keep in (("**mean**", lambda r: True),
                        (f"**mean, model detects (AUROC >= {100 * DETECTS_AUROC:.0f} %)**",
                         lambda r: r["pixel AUROC %"] >= 100 * DETECTS_AUROC)):
        for group, rule in keys:
            sel = [r for r in rows if (r["defects"], r["rule"]) == (group, rule) and keep(r)]
            if not sel:
                continue
            row = {"texture": label, "defects": group, "rule": rule, "runs": len(sel),
                   "SegF1 %": round(statistics.mean(r["SegF1 %"] for r in sel), 2)}
            for key in ("ratio to F1-opt", "ratio to per-family F1-opt", "split_matched ratio"):
                if key in sel[0]:
                    row[key] = round(statistics.mean(r[key] for r in sel), 3)
            out.append(row)
    return out
