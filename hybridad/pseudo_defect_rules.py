"""Thresholds from normal data only: how the pseudo-defect rules paste, score and pick.

A pseudo-defect rule (`RECIPES`) pastes the project's cut-paste pseudo-anomalies (`data_modules.cut_paste`,
fixed seed) into `threshold.pseudo_repeats` copies of every (defect-free) validation image, lets the trained
model score them at native resolution through the test tiling, turns each map into the mask the run would
write (`hybridad.postprocess.binarize` with the run's post-processing) at every threshold of a label-free grid
(`candidate_grid`: quantiles of the validation scores and multiples of their maximum), and keeps the
threshold with the best pooled SegF1 against the paste masks. No test label is used.

Pastes are confined as in training: to the object (`data.cut_paste.foreground`, e.g. Otsu on CPR categories;
the whole image otherwise), with patch sizes as in training (`threshold.pseudo_scale_of=training`: scales are
fractions of a test tile's side for `size_reference: tile|crop`, of the object's side for `object`). Each
(image, repeat) pastes one defect family, cycling over the library's kinds, so counts can be kept per family
(the threshold benchmark leaves one family out, `bench/bench_thresholds.py`).

Rules (both label-free; defaults chosen on the benchmark's calibration families only, docs/thresholds.md):
- `pseudo_f1`: pastes as the training cut-paste draws them (opacity and minimum contrast of `data.cut_paste`).
- `pseudo_faint`: the same families with sizes from 0.5x to 3x the training range and opacity U(0.15, 1)
  without a minimum contrast: down to barely visible, as real defects often are.
- `capped_faint`: the lower of mean + k std and pseudo_faint. Each errs high in its own way (mean + k std
  when the normal scores have a long tail, the pseudo rule when pastes are easier than real defects); real
  defects are subtler than either model of them. Best on the threshold benchmark's calibration families
  (docs/thresholds.md).

The rules themselves (names, needs, report labels) are `hybridad.threshold_rules.pseudo_defects`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from hybridad.errors import UserError
from hybridad.metrics.functional import binary_counts, f1_from_counts, f1_max_from_histograms, pixel_histograms
from hybridad.postprocess import PostProcessConfig, binarize
from hybridad.tile_grid import level_boxes
from hybridad.thresholds import ScoreStats, ThresholdConfig
from hybridad.types import Split

if TYPE_CHECKING:
    from data_modules.cut_paste import CutPaste, CutPasteConfig
    from data_modules.datamodule import MVTecAD2DataModule
    from hybridad.models.anomaly_module import AnomalyModule

SCALE_OF = ("training", "tile", "image")  # "tile" = "training" (older name); "image": the long side (legacy)


@dataclasses.dataclass(frozen=True)
class PseudoRecipe:
    """How one pseudo-defect rule draws its pastes and picks its threshold."""

    name: str
    size_factors: tuple[float, float] = (1.0, 1.0)  # x data.cut_paste.scale_min, x scale_max
    opacity: tuple[float, float] | None = None  # None: data.cut_paste.opacity_min/max
    min_contrast: float | None = None  # None: data.cut_paste.min_contrast
    postprocessed: bool = True  # pick on the mask the run writes; False: pixel F1 on the raw map (legacy)
    scale_of: str | None = None  # None: threshold.pseudo_scale_of
    confine: bool = True  # the training foreground; False: the whole image (legacy)


RECIPES: dict[str, PseudoRecipe] = {
    "pseudo_f1": PseudoRecipe("pseudo_f1"),
    "pseudo_faint": PseudoRecipe("pseudo_faint", size_factors=(0.5, 3.0), opacity=(0.15, 1.0), min_contrast=0.0),
}
# pseudo_f1 as it was before issue 17 (raw map, image-relative sizes, unconfined): the benchmark's "before"
LEGACY = PseudoRecipe("pseudo_f1_legacy", postprocessed=False, scale_of="image", confine=False)


@dataclasses.dataclass
class PseudoCounts:
    """What scoring the pasted validation images gave, per defect family.

    `pos`/`neg`: (65536,) float64 counts of pasted / untouched pixels per float16 map value (raw map).
    `tp`/`fp`/`fn`: (F,K) float64 pixel counts of the post-processed masks at each of the K `candidates`.
    """

    families: tuple[str, ...]
    candidates: Tensor  # (K,)
    pos: Tensor  # (F,65536)
    neg: Tensor  # (F,65536)
    tp: Tensor  # (F,K)
    fp: Tensor
    fn: Tensor

    def pick(self, recipe: PseudoRecipe, families: Sequence[str] | None = None) -> tuple[float, float]:
        """(threshold, pseudo SegF1) over `families` (default: all); (inf, 0) without pastes."""
        rows = [self.families.index(f) for f in (families or self.families)]
        if not recipe.postprocessed:
            f1, thr = f1_max_from_histograms(self.pos[rows].sum(0), self.neg[rows].sum(0))
            return thr, f1
        return best_candidate(self.candidates, self.tp[rows].sum(0), self.fp[rows].sum(0), self.fn[rows].sum(0))


def best_candidate(candidates: Tensor, tp: Tensor, fp: Tensor, fn: Tensor) -> tuple[float, float]:
    """(threshold, F1) of the candidate with the highest pooled F1 (the lowest such threshold on ties);
    (inf, 0) when nothing was pasted."""
    if float(tp[0] + fn[0]) == 0 or candidates.numel() == 0:
        return float("inf"), 0.0
    f1 = torch.tensor([f1_from_counts(float(a), float(b), float(c)) for a, b, c in zip(tp, fp, fn)])
    best = int(torch.argmax(f1))
    return float(candidates[best]), float(f1[best])


def candidate_grid(stats: ScoreStats, size: int = 40) -> Tensor:
    """Label-free thresholds to try: validation-score quantiles 1 - 10^-x (x from 0.7 to 6) and the
    validation maximum times 1.02 .. 4. Sorted, unique, float16-representable (the maps are compared in
    float16). (K,) float32."""
    qs = [100.0 * (1.0 - 10.0 ** (-x)) for x in np.linspace(0.7, 6.0, size // 2)]
    values = [stats.percentile(q, "higher") for q in qs]
    top = max(stats.percentile(100.0, "higher"), 1e-3)
    values += [top * f for f in np.geomspace(1.02, 4.0, size - len(qs))]
    grid = torch.tensor(values, dtype=torch.float32).to(torch.float16).float()
    return torch.unique(grid[torch.isfinite(grid)])


def pseudo_cut_paste(config: CutPasteConfig, tile_side: int, padded_side: int,
                     recipe: PseudoRecipe = RECIPES["pseudo_f1"], library: Any = None) -> CutPaste:
    """A `CutPaste` whose patches, pasted on a `padded_side` square, have their training size in a tile
    (`tile_side` = `padded_side` keeps the configured fractions), drawn as `recipe` says."""
    from data_modules.cut_paste import CutPaste

    f = 1.0 if config.size_reference == "object" else tile_side / padded_side  # object: fractions of the object
    lo, hi = recipe.size_factors
    kinds = set(library.kind_names) if library is not None else set(config.type_scales)
    cfg = dataclasses.replace(config, enabled=True, scale_min=config.scale_min * f * lo,
                              scale_max=config.scale_max * f * hi,
                              type_scales={k: [v[0] * f * lo, v[1] * f * hi]
                                           for k, v in config.type_scales.items() if k in kinds})
    if recipe.opacity is not None:
        cfg = dataclasses.replace(cfg, opacity_min=recipe.opacity[0], opacity_max=recipe.opacity[1])
    if recipe.min_contrast is not None:
        cfg = dataclasses.replace(cfg, min_contrast=recipe.min_contrast)
    return CutPaste(cfg, library)


def paste_native(images: Tensor, cut_paste: CutPaste, generator: torch.Generator,
                 foreground: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Paste pseudo-anomalies into native images.

    Args:
        images: (B,3,H,W) float [0,1].
        cut_paste: built by `pseudo_cut_paste` for the padded side max(H, W).
        generator: on `images.device`.
        foreground: (B,1,H,W) object mask in [0,1] confining the pastes; None = the whole image.

    Returns:
        (B,3,H,W) images quantised to 8-bit levels, as real images are, and (B,1,H,W) bool masks of changed
        pixels.
    """
    b, c, h, w = images.shape
    side = max(h, w)
    padded = images.new_zeros((b, c, side, side))  # (B,3,L,L), image top-left
    padded[..., :h, :w] = images
    inside = images.new_zeros((b, 1, side, side))
    inside[..., :h, :w] = 1.0 if foreground is None else foreground  # never the padding
    out, mask = cut_paste.to(images.device)(padded, generator, foreground=inside)
    out = (out[..., :h, :w] * 255.0).round() / 255.0  # (B,3,H,W)
    return out, (mask[..., :h, :w] > 0.5) & (out != images).any(1, keepdim=True)  # rounding can undo a change


def _family_libraries(config: CutPasteConfig) -> list[tuple[str, Any]]:
    """(kind name, one-kind `DefectLibrary`) for each kind of the configured library (procedural or folder)."""
    from data_modules.defect_library import DefectLibrary, load_defect_folder, make_defect_library

    if config.defect_dir:
        lib = load_defect_folder(config.defect_dir, config.patch_size)
    else:
        lib = make_defect_library(config.patch_size, config.library_size,
                                  torch.Generator().manual_seed(config.library_seed))
    out = []
    for k, name in enumerate(lib.kind_names):
        keep = lib.kinds == k
        if bool(keep.any()):
            out.append((name or "all", DefectLibrary(lib.patches[keep], lib.alphas[keep], lib.sides[keep],
                                                     torch.zeros(int(keep.sum()), dtype=torch.long), (name,))))
    return out


def pseudo_counts(
    model: AnomalyModule, datamodule: MVTecAD2DataModule, cfg: ThresholdConfig, candidates: Tensor,
    recipe: PseudoRecipe = RECIPES["pseudo_f1"], rank: int = 0, world: int = 1,
) -> PseudoCounts:
    """Score `cfg.pseudo_repeats` pasted copies of every validation image with `model`.

    Each (repeat, image) pair gets its own generator seed and one defect family (cycling over the kinds), so
    the pastes do not depend on how images are shared out over ranks (`rank` takes images rank, rank + world,
    ...); sum the counts over ranks.
    """
    from data_modules.cut_paste import otsu_foreground
    from data_modules.dataset import collate_batch

    scale_of = recipe.scale_of or cfg.pseudo_scale_of
    if scale_of not in SCALE_OF:
        raise UserError(f"threshold.pseudo_scale_of must be one of {SCALE_OF}, got {scale_of!r}")
    device = model.device
    cp_cfg = datamodule.config.cut_paste
    families = _family_libraries(cp_cfg)
    names = tuple(n for n, _ in families)
    nf, k = len(families), candidates.numel()
    pos = torch.zeros(nf, 65536, dtype=torch.float64)
    neg = torch.zeros_like(pos)
    tp, fp, fn = (torch.zeros(nf, k, dtype=torch.float64) for _ in range(3))
    ds = datamodule.dataset(Split.VALIDATION)
    pp: PostProcessConfig = getattr(model, "postprocess", PostProcessConfig())
    pasters: list[Any] | None = None
    was_training = model.training
    model.eval()
    for index in range(rank, len(ds), world):
        batch = collate_batch([ds[index]])
        images = batch.image.to(device).float() / 255.0  # (1,3,H,W)
        h, w = images.shape[-2:]
        if pasters is None:
            y0, x0, y1, x1 = level_boxes(h, w, datamodule.eval_tiler.level)[0]
            side = max(h, w) if scale_of == "image" else max(y1 - y0, x1 - x0)
            pasters = [pseudo_cut_paste(cp_cfg, side, max(h, w), recipe, lib) for _, lib in families]
        fg = None
        if recipe.confine and cp_cfg.foreground == "otsu":
            fg = otsu_foreground(images)  # (1,1,H,W) the object, as the training pastes see it
        for repeat in range(cfg.pseudo_repeats):
            fam = (index + repeat) % nf
            seed = (cfg.pseudo_seed * 1_000_003 + repeat) * 1_000_033 + index
            gen = torch.Generator(device=device).manual_seed(seed)
            pasted, mask = paste_native(images, pasters[fam], gen, fg)
            tiles, layout = datamodule.eval_tiler(pasted)
            out = model.predict_batch(dataclasses.replace(batch, image=pasted, tiles=tiles, layout=layout))
            amap = out.anomaly_map.detach().float().cpu()  # (1,1,H,W)
            gt = mask.cpu()
            p, n = pixel_histograms(amap, gt)
            pos[fam] += torch.as_tensor(p, dtype=torch.float64)
            neg[fam] += torch.as_tensor(n, dtype=torch.float64)
            for j, t in enumerate(candidates.tolist()):
                a, b, c = binary_counts(binarize(amap, t, pp), gt)
                tp[fam, j] += a
                fp[fam, j] += b
                fn[fam, j] += c
    model.train(was_training)
    return PseudoCounts(names, candidates, pos, neg, tp, fp, fn)


def pseudo_histograms(
    model: AnomalyModule, datamodule: MVTecAD2DataModule, cfg: ThresholdConfig, rank: int = 0, world: int = 1,
    recipe: PseudoRecipe = RECIPES["pseudo_f1"],
) -> tuple[Tensor, Tensor]:
    """(65536,) raw-map counts of pasted (positive) and untouched (negative) pixels, families pooled."""
    counts = pseudo_counts(model, datamodule, cfg, torch.zeros(0), recipe, rank, world)
    return counts.pos.sum(0), counts.neg.sum(0)


def pseudo_f1_threshold(pos: Tensor, neg: Tensor) -> tuple[float, float]:
    """(threshold, pseudo F1) maximising pooled pixel F1 on the raw pasted maps; (inf, 0) without pastes."""
    f1, thr = f1_max_from_histograms(pos, neg)
    return thr, f1


def capped_faint(mean_std: float | None, pseudo_faint: float | None) -> float | None:
    """min(mean + k std, pseudo_faint); None when pseudo_faint was not computed (threshold.pseudo_repeats=0).
    A pseudo_faint of inf (nothing pasted) leaves mean + k std."""
    if pseudo_faint is None:
        return None
    values = [v for v in (mean_std, pseudo_faint) if v is not None and np.isfinite(v)]
    return min(values) if values else None
