"""Cut-paste pseudo-anomalies on the batch's device.

Patches come from `defect_library` (procedural, or a folder of user crops in the winners' layout). Each
chosen tile gets 1..max_patches patches: a defect type is drawn uniformly, then a patch of that type; it is
scaled (relative to the tile, to the object, or, as the winners, by its own pixel size on a `canvas_size`
canvas), rotated by U(0, 360) degrees (affine_grid + grid_sample; nearest for the alpha), optionally
colour-jittered, and blended at a random position. On a grey tile (equal channels) the patch is made grey.
With a foreground (given, or Otsu's threshold on the tile), patches are centred where the foreground is at
least 0.8 and confined to where it exceeds 0.45, with the foreground as blending weight (the winners' rule).
The returned mask is exactly the set of pixels whose value changed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_modules.defect_library import DefectLibrary, load_defect_folder, make_defect_library
from hybridad.errors import UserError

FG_CENTRE = 0.8  # the winners centre a patch on a pixel whose foreground value is at least this
FG_LABEL = 0.45  # ... and label (here: change) only pixels whose foreground value exceeds this
SIZE_REFERENCES = ("tile", "object", "crop")
FOREGROUNDS = ("none", "otsu")


@dataclass
class CutPasteConfig:
    enabled: bool = False
    probability: float = 0.5  # chance that a training tile receives pseudo-anomalies
    max_patches: int = 2  # 1..max_patches patches per chosen tile
    size_reference: str = "tile"  # patch side = scale x "tile" side | "object" sqrt(fg area) | "crop" (below)
    scale_min: float = 0.02  # range of that scale
    scale_max: float = 0.15
    canvas_size: int = 640  # "crop": side = crop px x scale x tile/canvas_size (the winners' 640 canvas)
    type_scales: dict[str, list[float]] = field(default_factory=dict)  # per defect type [min, max] scale
    foreground: str = "none"  # "none" | "otsu" (threshold on the tile, on the device); confines the patches
    colour_jitter: bool = True  # random per-channel gains and an offset (the winners paste crops unchanged)
    opacity_min: float = 0.7  # blending strength
    opacity_max: float = 1.0
    defect_dir: str = ""  # optional folder of user crops: <dir>/<type>/*.png (RGBA / grey+alpha)
    library_size: int = 64  # procedural patches generated per kind (crack, scratch, spot, contamination)
    patch_size: int = 64  # side of the library patches before scaling
    min_contrast: float = 0.15  # push a patch's mean colour at least this far from what it covers (0: off)
    library_seed: int = 0  # seed of the procedural library


def fill_holes(mask: Tensor) -> Tensor:
    """(N,1,H,W) bool -> the mask plus every background region not connected to the image border.

    A flood fill from the border by repeated 3x3 dilation inside the background, on the mask's device.
    """
    background = ~mask
    reach = torch.zeros_like(mask)
    reach[..., 0, :], reach[..., -1, :], reach[..., :, 0], reach[..., :, -1] = True, True, True, True
    reach &= background
    while True:  # the reached set only grows: unchanged after 8 steps means stable
        before = reach
        for _ in range(8):  # between checks, which synchronise the device
            reach = F.max_pool2d(reach.float(), 3, stride=1, padding=1).bool() & background
        if torch.equal(reach, before):
            return ~reach


def otsu_threshold(levels: Tensor) -> Tensor:
    """(N,P) long grey levels in [0,255] -> (N,1) Otsu threshold per row (the first level that maximises the
    between-class variance of `<= t` vs `> t`, as OpenCV's THRESH_OTSU)."""
    n = levels.shape[0]
    hist = torch.zeros(n, 256, device=levels.device, dtype=torch.float64)
    hist.scatter_add_(1, levels, torch.ones_like(levels, dtype=torch.float64))  # (N,256) exact counts
    w0 = hist.cumsum(1)  # pixels at or below each level
    m0 = (hist * torch.arange(256, device=levels.device, dtype=torch.float64)).cumsum(1)
    total, mt = float(levels.shape[1]), m0[:, -1:]
    between = (mt * w0 / total - m0) ** 2 / (w0 * (total - w0)).clamp_min(1.0)  # between-class variance
    between = torch.where((w0 > 0) & (w0 < total), between, torch.full_like(between, -1.0))
    return between.argmax(1, keepdim=True)  # (N,1)


def otsu_foreground(images: Tensor, border: float = 3 / 80) -> Tensor:
    """Object mask of each tile: Otsu's threshold on its grey level, the class covering most of the border
    being background (CPR's foreground assumption), holes filled. An empty result means the whole tile.

    Args:
        images: (N,3,H,W) float [0,1].
        border: width of the border band as a fraction of the shorter side (CPR: 3/80).

    Returns:
        (N,1,H,W) float {0,1}.
    """
    n, _, h, w = images.shape
    levels = (images.mean(1) * 255).round().clamp(0, 255).long().flatten(1)  # (N,H*W) grey levels
    upper = (levels > otsu_threshold(levels)).reshape(n, 1, h, w)  # (N,1,H,W)
    b = max(1, round(min(h, w) * border))
    band = torch.ones(h, w, dtype=torch.bool, device=images.device)
    band[b : h - b, b : w - b] = False
    upper_on_border = (upper & band).flatten(1).sum(1) * 2 > band.sum()  # (N,)
    fg = fill_holes(upper ^ upper_on_border[:, None, None, None])  # highlights inside the object count
    empty = fg.flatten(1).sum(1) == 0  # (N,)
    return (fg | empty[:, None, None, None]).to(images.dtype)


class CutPaste(nn.Module):
    """Paste defect patches into tiles; returns the new tiles and the masks of changed pixels.

    Args:
        config: probabilities, sizes, foreground, blending and library settings.
        library: optional `DefectLibrary`; default: `config.defect_dir` if set, else the procedural library
            rendered from `config.library_seed`.
    """

    def __init__(self, config: CutPasteConfig | None = None, library: DefectLibrary | None = None) -> None:
        super().__init__()
        self.config = cfg = config or CutPasteConfig()
        if cfg.size_reference not in SIZE_REFERENCES or cfg.foreground not in FOREGROUNDS:
            raise UserError(
                f"data.cut_paste: size_reference must be one of {SIZE_REFERENCES} and foreground one of "
                f"{FOREGROUNDS} (got '{cfg.size_reference}', '{cfg.foreground}')"
            )
        if library is None:
            if cfg.defect_dir:
                library = load_defect_folder(cfg.defect_dir, cfg.patch_size)
            else:
                gen = torch.Generator().manual_seed(cfg.library_seed)
                library = make_defect_library(cfg.patch_size, cfg.library_size, gen)
        lo, hi = self._scale_ranges(library)
        kinds = library.kinds.long()
        per_kind = torch.bincount(kinds).float()  # (T,)
        self.register_buffer("patches", library.patches.float(), persistent=False)  # (K,3,s,s)
        self.register_buffer("alphas", (library.alphas > 0.5).float(), persistent=False)  # (K,1,s,s)
        self.register_buffer("sides", library.sides.float(), persistent=False)  # (K,)
        self.register_buffer("scale_lo", lo, persistent=False)  # (K,)
        self.register_buffer("scale_hi", hi, persistent=False)  # (K,)
        # (K,) sampling weights that make every defect type equally likely, whatever its number of crops
        self.register_buffer("pick_weight", 1.0 / per_kind[kinds], persistent=False)

    def _scale_ranges(self, library: DefectLibrary) -> tuple[Tensor, Tensor]:
        """(K,) per-patch scale ranges: `type_scales[type]` where given, else [scale_min, scale_max]."""
        cfg = self.config
        unknown = sorted(set(cfg.type_scales) - set(library.kind_names))
        if unknown:
            raise UserError(
                f"data.cut_paste.type_scales names {unknown}, which are not defect types here "
                f"(types: {list(library.kind_names)})"
            )
        default = [cfg.scale_min, cfg.scale_max]
        ranges = [list(cfg.type_scales.get(name, default)) for name in library.kind_names]
        for name, r in zip(library.kind_names, ranges):
            if len(r) != 2 or not 0 < r[0] <= r[1]:
                label = name or "all"
                raise UserError(f"data.cut_paste: scale range of '{label}' needs [min, max], 0 < min <= max")
        table = torch.tensor(ranges, dtype=torch.float32)  # (T,2)
        kinds = library.kinds.long().cpu()
        return table[kinds, 0], table[kinds, 1]

    def _rand(self, shape: tuple[int, ...], g: torch.Generator | None, device: torch.device) -> Tensor:
        return torch.rand(shape, generator=g, device=device)

    def _centres(
        self, n: int, s: int, fg: Tensor | None, g: torch.Generator | None, dev: torch.device
    ) -> Tensor:
        """(N,2) patch centres (x, y) in normalised [-1,1] coordinates, on a foreground pixel when given."""
        if fg is None:
            return self._rand((n, 2), g, dev) * 2 - 1
        weights = (fg >= FG_CENTRE).flatten(1).float()  # (N,S*S)
        weights[weights.sum(1) == 0] = 1.0  # no confident foreground: anywhere (the paste is clipped anyway)
        flat = torch.multinomial(weights, 1, generator=g).squeeze(1)  # (N,)
        x, y = (flat % s).float(), torch.div(flat, s, rounding_mode="floor").float()
        return torch.stack([(x + 0.5) / s * 2 - 1, (y + 0.5) / s * 2 - 1], dim=1)  # (N,2)

    def _theta(self, centre: Tensor, scale: Tensor, angle: Tensor) -> Tensor:
        """(N,2,3) maps tile coords q to patch coords R(-angle)(q - centre)/scale (both in [-1,1])."""
        cos, sin = angle.cos() / scale, angle.sin() / scale  # (N,)
        cx, cy = centre[:, 0], centre[:, 1]
        row0 = torch.stack([cos, sin, -(cos * cx + sin * cy)], dim=1)  # (N,3)
        row1 = torch.stack([-sin, cos, sin * cx - cos * cy], dim=1)  # (N,3)
        return torch.stack([row0, row1], dim=1)  # (N,2,3)

    def _scale(self, idx: Tensor, object_side: Tensor, g: torch.Generator | None) -> Tensor:
        """(N,) patch side as a fraction of the tile side, for patches `idx` (N,)."""
        cfg = self.config
        lo, hi = self.scale_lo[idx], self.scale_hi[idx]
        u = lo + (hi - lo) * self._rand(idx.shape, g, idx.device)
        if cfg.size_reference == "object":
            return u * object_side
        if cfg.size_reference == "crop":
            return self.sides[idx] * u / cfg.canvas_size
        return u

    def forward(
        self, images: Tensor, generator: torch.Generator | None = None, foreground: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Paste pseudo-defects.

        Args:
            images: (N,3,S,S) float [0,1].
            generator: on `images.device`; the same seed gives the same output.
            foreground: optional (N,1,S,S) in [0,1] (binary or soft); default: `config.foreground`.

        Returns:
            images (N,3,S,S) and masks (N,1,S,S) float {0,1}, 1 exactly where a pixel changed.
        """
        cfg, g, dev = self.config, generator, images.device
        n, _, s, _ = images.shape
        if foreground is None and cfg.foreground == "otsu":
            foreground = otsu_foreground(images)
        fg = None if foreground is None else foreground.to(images.dtype)  # (N,1,S,S)
        confine = None if fg is None else fg * (fg > FG_LABEL)  # blending weight on the object
        object_side = torch.ones(n, device=dev)  # sqrt of the object's area / S
        if fg is not None:
            object_side = ((fg > FG_LABEL).flatten(1).sum(1).float().sqrt() / s).clamp_min(1.0 / s)
        grey = (images.amax(1) - images.amin(1)).flatten(1).amax(1) == 0  # (N,) equal channels
        chosen = self._rand((n,), g, dev) < cfg.probability
        count = torch.randint(1, cfg.max_patches + 1, (n,), generator=g, device=dev)
        out = images  # never modified in place (lerp returns a new tensor)
        for j in range(cfg.max_patches):  # a loop over a handful of patches, batched over tiles
            active = (chosen & (count > j)).to(images.dtype)  # (N,)
            idx = torch.multinomial(self.pick_weight.expand(n, -1), 1, generator=g).squeeze(1)  # (N,)
            patch = self.patches[idx]  # (N,3,s,s)
            if cfg.colour_jitter:
                gain = 0.7 + 0.6 * self._rand((n, 3, 1, 1), g, dev)
                offset = 0.3 * (self._rand((n, 1, 1, 1), g, dev) - 0.5)
                patch = (patch * gain + offset).clamp(0, 1)
            grey_patch = patch.mean(1, keepdim=True).expand_as(patch)  # (N,3,s,s) equal channels
            patch = torch.where(grey[:, None, None, None], grey_patch, patch)
            alpha = self.alphas[idx]  # (N,1,s,s)
            centre = self._centres(n, s, fg, g, dev)
            scale = self._scale(idx, object_side, g)
            angle = 2 * math.pi * self._rand((n,), g, dev)
            opacity = cfg.opacity_min + (cfg.opacity_max - cfg.opacity_min) * self._rand((n,), g, dev)
            theta = self._theta(centre, scale, angle)  # (N,2,3)
            grid = F.affine_grid(theta, [n, 1, s, s], align_corners=False)  # (N,S,S,2)
            a = F.grid_sample(alpha, grid, mode="nearest", align_corners=False)  # (N,1,S,S), zeros outside
            if confine is not None:
                a = a * confine
            if cfg.min_contrast > 0:
                patch = self._push_contrast(patch, alpha, out, a)
            colour = F.grid_sample(patch, grid, mode="bilinear", padding_mode="border", align_corners=False)
            w = a * (opacity * active)[:, None, None, None]  # (N,1,S,S), 0 outside the pasted shape
            out = torch.lerp(out, colour, w)  # out + w * (colour - out): exactly `out` where w == 0
        mask = (out != images).any(dim=1, keepdim=True).to(images.dtype)  # (N,1,S,S)
        return out, mask

    def _push_contrast(self, patch: Tensor, alpha: Tensor, under: Tensor, pasted: Tensor) -> Tensor:
        """Shift each patch's colour so its mean differs by at least `min_contrast` from what it will cover.

        Args:
            patch, alpha: (N,3,s,s) and (N,1,s,s) library patches before warping (same mean as pasted).
            under: (N,3,S,S) current tiles; pasted: (N,1,S,S) warped alpha.
        """
        mc = self.config.min_contrast
        mean_p = (patch * alpha).sum(dim=(1, 2, 3)) / (3 * alpha.sum(dim=(1, 2, 3)).clamp_min(1.0))  # (N,)
        covered = torch.bmm(under.flatten(2), pasted.flatten(2).transpose(1, 2))  # (N,3,1) sums under paste
        mean_u = covered.sum(dim=(1, 2)) / (3 * pasted.sum(dim=(1, 2, 3)).clamp_min(1.0))  # (N,)
        diff = mean_p - mean_u
        sign = torch.where(diff >= 0, 1.0, -1.0)
        sign = torch.where(mean_u + sign * mc > 1.0, -1.0, sign)  # keep room to move inside [0,1]
        sign = torch.where(mean_u + sign * mc < 0.0, 1.0, sign)
        shift = (sign * mc - diff) * (diff.abs() < mc)  # (N,)
        return (patch + shift[:, None, None, None]).clamp(0, 1)
