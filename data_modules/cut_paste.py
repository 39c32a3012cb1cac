"""Cut-paste pseudo-anomalies on the batch's device.

Patches come from `defect_library` (procedural, or a folder of user crops). Each chosen tile gets
1..max_patches patches, each scaled, rotated (affine_grid + grid_sample; nearest for the alpha),
colour-jittered and blended with a random opacity at a random position. The returned mask is exactly the set
of pixels whose value changed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_modules.defect_library import load_defect_folder, make_defect_library


@dataclass
class CutPasteConfig:
    enabled: bool = False
    probability: float = 0.5  # chance that a training tile receives pseudo-anomalies
    max_patches: int = 2  # 1..max_patches patches per chosen tile
    scale_min: float = 0.02  # patch side as a fraction of the tile side
    scale_max: float = 0.15
    opacity_min: float = 0.7  # blending strength
    opacity_max: float = 1.0
    defect_dir: str = ""  # optional folder of user defect crops (RGBA / gray+alpha PNG)
    library_size: int = 64  # procedural patches generated per kind (crack, scratch, spot, contamination)
    patch_size: int = 64  # side of the library patches before scaling
    min_contrast: float = 0.15  # push a patch's mean colour at least this far from what it covers
    library_seed: int = 0  # seed of the procedural library


class CutPaste(nn.Module):
    """Paste defect patches into tiles; returns the new tiles and the masks of changed pixels.

    Args:
        config: probabilities, scale, opacity and library settings.
        library: optional `(patches (K,3,s,s), alphas (K,1,s,s))`; default: `config.defect_dir` if set,
            else the procedural library rendered from `config.library_seed`.
    """

    def __init__(
        self, config: CutPasteConfig | None = None, library: tuple[Tensor, Tensor] | None = None
    ) -> None:
        super().__init__()
        self.config = cfg = config or CutPasteConfig()
        if library is None:
            if cfg.defect_dir:
                library = load_defect_folder(cfg.defect_dir, cfg.patch_size)
            else:
                gen = torch.Generator().manual_seed(cfg.library_seed)
                library = make_defect_library(cfg.patch_size, cfg.library_size, gen)
        self.register_buffer("patches", library[0].float(), persistent=False)  # (K,3,s,s)
        self.register_buffer("alphas", (library[1] > 0.5).float(), persistent=False)  # (K,1,s,s)

    def _rand(self, shape: tuple[int, ...], g: torch.Generator | None, device: torch.device) -> Tensor:
        return torch.rand(shape, generator=g, device=device)

    def _centres(
        self, n: int, s: int, fg: Tensor | None, g: torch.Generator | None, dev: torch.device
    ) -> Tensor:
        """(N,2) patch centres (x, y) in normalised [-1,1] coordinates, on a foreground pixel when given."""
        if fg is None:
            return self._rand((n, 2), g, dev) * 2 - 1
        weights = (fg > 0.5).flatten(1).float()  # (N,S*S)
        weights[weights.sum(1) == 0] = 1.0  # no foreground: anywhere (the paste is clipped to fg anyway)
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

    def forward(
        self, images: Tensor, generator: torch.Generator | None = None, foreground: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Paste pseudo-defects.

        Args:
            images: (N,3,S,S) float [0,1].
            generator: on `images.device`; the same seed gives the same output.
            foreground: optional (N,1,S,S); patches are centred on and clipped to `foreground > 0.5`.

        Returns:
            images (N,3,S,S) and masks (N,1,S,S) float {0,1}, 1 exactly where a pixel changed.
        """
        cfg, g, dev = self.config, generator, images.device
        n, _, s, _ = images.shape
        fg = None if foreground is None else (foreground > 0.5).to(images.dtype)  # (N,1,S,S)
        chosen = self._rand((n,), g, dev) < cfg.probability
        count = torch.randint(1, cfg.max_patches + 1, (n,), generator=g, device=dev)
        out = images  # never modified in place (lerp returns a new tensor)
        for j in range(cfg.max_patches):  # a loop over a handful of patches, batched over tiles
            active = (chosen & (count > j)).to(images.dtype)  # (N,)
            idx = torch.randint(self.patches.shape[0], (n,), generator=g, device=dev)
            gain = 0.7 + 0.6 * self._rand((n, 3, 1, 1), g, dev)
            offset = 0.3 * (self._rand((n, 1, 1, 1), g, dev) - 0.5)
            patch = (self.patches[idx] * gain + offset).clamp(0, 1)  # (N,3,s,s) gathered + jittered
            alpha = self.alphas[idx]  # (N,1,s,s)
            centre = self._centres(n, s, fg, g, dev)
            scale = cfg.scale_min + (cfg.scale_max - cfg.scale_min) * self._rand((n,), g, dev)
            angle = 2 * math.pi * self._rand((n,), g, dev)
            opacity = cfg.opacity_min + (cfg.opacity_max - cfg.opacity_min) * self._rand((n,), g, dev)
            theta = self._theta(centre, scale, angle)  # (N,2,3)
            grid = F.affine_grid(theta, [n, 1, s, s], align_corners=False)  # (N,S,S,2)
            a = F.grid_sample(alpha, grid, mode="nearest", align_corners=False)  # (N,1,S,S), zeros outside
            if fg is not None:
                a = a * fg
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
