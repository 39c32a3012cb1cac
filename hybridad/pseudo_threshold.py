"""Thresholds from normal data only (`threshold.method=pseudo_f1`) and the comparison of threshold rules.

`pseudo_f1`: the project's cut-paste pseudo-anomalies (`data_modules.cut_paste.CutPaste`, fixed seed) are
pasted into the validation images (defect-free), the trained model scores them at native resolution through
the same tiling as test images, and the threshold that maximises pooled pixel F1 against the paste masks is
chosen. No test label is used. The paste runs on the whole image padded to a square; `data.cut_paste` scales are
fractions of the image's long side (`threshold.pseudo_scale_of=image`) or, as in training, of a test tile's
side (`tile`).

`score_candidates` re-scores a run's cached test_public maps with each rule's threshold and the run's
post-processing, so reports can show SegF1 at mean + k std, at pseudo_f1 and at the F1-optimal threshold
(tuned on test: an oracle, labelled as such).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from hybridad.errors import UserError
from hybridad.metrics import SegF1, process_local
from hybridad.metrics.functional import f1_max_from_histograms, pixel_histograms
from hybridad.postprocess import PostProcessConfig, binarize
from hybridad.run_dir import RunDir
from hybridad.tile_grid import level_boxes
from hybridad.thresholds import ThresholdConfig, mean_std_threshold
from hybridad.types import Batch, Split

if TYPE_CHECKING:
    from data_modules.cut_paste import CutPaste, CutPasteConfig
    from data_modules.datamodule import MVTecAD2DataModule
    from hybridad.models.anomaly_module import AnomalyModule

RULES = ("mean_std", "pseudo_f1", "f1_optimal")  # the candidates every run compares, in report order


def pseudo_cut_paste(config: CutPasteConfig, tile_side: int, padded_side: int) -> CutPaste:
    """A `CutPaste` whose patches, pasted on a `padded_side` square, have their training size in a tile."""
    from data_modules.cut_paste import CutPaste

    f = tile_side / padded_side
    cfg = dataclasses.replace(config, enabled=True, scale_min=config.scale_min * f,
                              scale_max=config.scale_max * f)
    return CutPaste(cfg)


def paste_native(images: Tensor, cut_paste: CutPaste, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Paste pseudo-anomalies into native images.

    Args:
        images: (B,3,H,W) float [0,1].
        cut_paste: built by `pseudo_cut_paste` for the padded side max(H, W).
        generator: on `images.device`.

    Returns:
        (B,3,H,W) images quantised to 8-bit levels, as real images are, and (B,1,H,W) bool masks of changed
        pixels.
    """
    b, c, h, w = images.shape
    side = max(h, w)
    padded = images.new_zeros((b, c, side, side))  # (B,3,L,L), image top-left
    padded[..., :h, :w] = images
    inside = images.new_zeros((b, 1, side, side))
    inside[..., :h, :w] = 1.0  # patches are centred on and clipped to the image, never the padding
    out, mask = cut_paste.to(images.device)(padded, generator, foreground=inside)
    out = (out[..., :h, :w] * 255.0).round() / 255.0  # (B,3,H,W)
    return out, mask[..., :h, :w] > 0.5


def pseudo_histograms(
    model: AnomalyModule, datamodule: MVTecAD2DataModule, cfg: ThresholdConfig, rank: int = 0, world: int = 1
) -> tuple[Tensor, Tensor]:
    """Score `cfg.pseudo_repeats` pasted copies of every validation image with `model`.

    Each (repeat, image) pair gets its own generator seed, so the pastes do not depend on how images are
    shared out over ranks (`rank` takes images rank, rank + world, ...); sum the histograms over ranks.

    Returns:
        (65536,) float64 counts of pasted (positive) and untouched (negative) pixels per float16 map value.
    """
    from data_modules.dataset import collate_batch

    if cfg.pseudo_scale_of not in ("image", "tile"):
        raise UserError(f"threshold.pseudo_scale_of must be 'image' or 'tile', got {cfg.pseudo_scale_of!r}")
    device = model.device
    ds = datamodule.dataset(Split.VALIDATION)
    pos = torch.zeros(65536, dtype=torch.float64, device=device)
    neg = torch.zeros_like(pos)
    cut_paste = None
    was_training = model.training
    model.eval()
    for index in range(rank, len(ds), world):
        batch = collate_batch([ds[index]])
        images = batch.image.to(device).float() / 255.0  # (1,3,H,W)
        h, w = images.shape[-2:]
        if cut_paste is None:
            y0, x0, y1, x1 = level_boxes(h, w, datamodule.eval_tiler.level)[0]
            side = max(y1 - y0, x1 - x0) if cfg.pseudo_scale_of == "tile" else max(h, w)
            cut_paste = pseudo_cut_paste(datamodule.config.cut_paste, side, max(h, w))
        for repeat in range(cfg.pseudo_repeats):
            seed = (cfg.pseudo_seed * 1_000_003 + repeat) * 1_000_033 + index
            gen = torch.Generator(device=device).manual_seed(seed)
            pasted, mask = paste_native(images, cut_paste, gen)
            tiles, layout = datamodule.eval_tiler(pasted)
            out = model.predict_batch(dataclasses.replace(batch, image=pasted, tiles=tiles, layout=layout))
            p, n = pixel_histograms(out.anomaly_map, mask)
            pos += torch.as_tensor(p, device=device)  # numpy for CPU maps
            neg += torch.as_tensor(n, device=device)
    model.train(was_training)
    return pos, neg


def pseudo_f1_threshold(pos: Tensor, neg: Tensor) -> tuple[float, float]:
    """(threshold, pseudo F1) maximising pooled pixel F1 on the pasted images; (inf, 0) without pastes."""
    f1, thr = f1_max_from_histograms(pos, neg)
    return thr, f1


# ------------------------------------------------------------------------------ candidates on test_public


def candidate_thresholds(thresholds: dict[str, Any], k: float) -> dict[str, float]:
    """The label-free candidates of a run's `thresholds.yaml`: `{"mean_std": ..., "pseudo_f1": ...}` (those
    present); mean + k std is recomputed with `k` from the stored validation statistics."""
    out: dict[str, float] = {}
    cands = thresholds.get("candidates") or {}
    mean_std = cands.get("mean_std") if isinstance(cands.get("mean_std"), dict) else {}
    stats = mean_std.get("stats") or thresholds.get("stats") or {}
    if "mean" in stats and "std" in stats:
        out["mean_std"] = mean_std_threshold(float(stats["mean"]), float(stats["std"]), k)
    elif mean_std.get("value") is not None:
        out["mean_std"] = float(mean_std["value"])
    pseudo = cands.get("pseudo_f1")
    if isinstance(pseudo, dict) and pseudo.get("value") is not None and np.isfinite(pseudo["value"]):
        out["pseudo_f1"] = float(pseudo["value"])
    return out


def _test_pairs(run: RunDir, root: str, category: str) -> Iterator[tuple[Tensor, Tensor]]:
    """(1,1,H,W) cached map and GT of every test_public image with a cached map (all of them, unless the run
    limited its test batches), one at a time."""
    from data_modules.formats import list_split
    from data_modules.listing import read_mask
    from hybridad.config import load_run_config

    data = load_run_config(run.path).data if (run.path / "config.yaml").is_file() else None
    if data is None or (data.root, data.category) != (root, category):
        from data_modules.datamodule import DataConfig

        data = DataConfig(root=root, category=category)  # an MVTec AD 2 tree
    for s in list_split(data, Split.TEST_PUBLIC):
        if not run.map_path(s.sample_id).is_file():
            continue
        m = torch.from_numpy(run.read_map(s.sample_id))[None, None]  # (1,1,H,W)
        hw = tuple(m.shape[-2:])
        gt = read_mask(s.mask_path, s.image_path, hw) > 0 if s.mask_path else np.zeros(hw, bool)
        yield m, torch.from_numpy(np.asarray(gt))[None, None]


def score_candidates(
    run_path: Path, thresholds: dict[str, float], postprocess: PostProcessConfig, root: str, category: str
) -> dict[str, float]:
    """SegF1 on test_public at each given threshold and at the F1-optimal (tuned on test) one.

    Returns flat metrics: `test_public/threshold=<rule>/seg_f1` and `test_public/threshold=<rule>/value`.
    """
    run = RunDir(run_path)
    seg = {rule: SegF1(**process_local()) for rule in thresholds}
    pos = neg = None
    for m, g in _test_pairs(run, root, category):
        p, n = pixel_histograms(m, g)
        pos, neg = (p, n) if pos is None else (pos + p, neg + n)
        for rule, thr in thresholds.items():
            seg[rule].update(binarize(m, thr, postprocess), g)
    values = dict(thresholds)
    if pos is not None:
        _, values["f1_optimal"] = f1_max_from_histograms(pos, neg)
        if np.isfinite(values["f1_optimal"]):
            seg["f1_optimal"] = SegF1(**process_local())
            for m, g in _test_pairs(run, root, category):
                seg["f1_optimal"].update(binarize(m, values["f1_optimal"], postprocess), g)
    out: dict[str, float] = {}
    for rule, metric in seg.items():
        out[f"test_public/threshold={rule}/seg_f1"] = float(metric.compute())
        out[f"test_public/threshold={rule}/value"] = float(values[rule])
    return out
