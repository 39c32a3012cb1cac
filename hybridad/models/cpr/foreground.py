"""CPR foreground estimation (FEB): 2-means pseudo-labels + LDA, folded into a clamped 1x1 conv."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hybridad.gaussian import gaussian_kernel1d
from hybridad.models.cpr.retrieval import kmeans


def seed_regions(h: int, w: int, border: float = 3 / 80, center: float = 1 / 5) -> tuple[Tensor, Tensor]:
    """Boolean (H, W) masks of the background seeds (border band) and foreground seeds (central square)."""
    bh, bw = max(1, int(h * border)), max(1, int(w * border))
    band = torch.ones(h, w, dtype=torch.bool)
    band[bh : h - bh, bw : w - bw] = False
    centre = torch.zeros(h, w, dtype=torch.bool)
    cy0, cy1 = int(h / 2 - h * center), int(h / 2 + h * center)
    cx0, cx1 = int(w / 2 - w * center), int(w / 2 + w * center)
    centre[cy0:cy1, cx0:cx1] = True
    return band, centre


def lda_direction(bg: Tensor, fg: Tensor) -> tuple[Tensor, Tensor]:
    """Two-class LDA with equal priors: returns (w (D,), b ()) with decision x @ w + b, positive = foreground."""
    bg, fg = bg.double(), fg.double()
    mu0, mu1 = bg.mean(0), fg.mean(0)
    centred = torch.cat([bg - mu0, fg - mu1])  # (n0+n1, D)
    cov = centred.T @ centred / max(1, centred.shape[0] - 2)  # (D, D) pooled within-class covariance
    w = torch.linalg.pinv(cov, hermitian=True) @ (mu1 - mu0)  # (D,)
    b = -0.5 * (mu0 + mu1) @ w
    return w, b


def robust_range(values: Tensor) -> tuple[Tensor, Tensor]:
    """(min, max) of decision values ignoring the 1 % tails (official: k-th smallest / k-th largest)."""
    v = values.flatten().float()
    k = max(1, int(0.01 * v.numel()))
    return v.kthvalue(k).values, v.topk(k).values[-1]


class Foreground(nn.Module):
    """Per-category linear foreground classifier on stride-4 trunk features.

    `forward` returns probabilities in [0, 1]; when disabled (texture-like categories) or not fitted it
    returns ones, so multiplying an anomaly map by it is a no-op.
    """

    def __init__(self, dim: int, enabled: bool = True) -> None:
        super().__init__()
        self.enabled = enabled
        self.register_buffer("weight", torch.zeros(dim))
        self.register_buffer("bias", torch.ones(()))
        self.register_buffer("fitted", torch.tensor(False))

    def fit(
        self,
        kmeans_samples: Tensor,
        bg_candidates: Tensor,
        fg_candidates: Tensor,
        max_per_class: int = 15_000,
        iters: int = 50,
        inits: int = 3,
        generator: torch.Generator | None = None,
    ) -> None:
        """Fit the LDA direction; call `set_range` afterwards with all training decision values.

        Args:
            kmeans_samples: (M, D) random feature vectors for the 2-means.
            bg_candidates: (Nb, D) features of border-band cells.
            fg_candidates: (Nc, D) features of central-square cells.
            generator: on the same device as the features.
        """
        dev = kmeans_samples.device
        centres = kmeans(kmeans_samples.float(), 2, iters, inits, generator)  # (2, D)
        lab_b = torch.cdist(bg_candidates.float(), centres).argmin(1)  # (Nb,)
        lab_c = torch.cdist(fg_candidates.float(), centres).argmin(1)  # (Nc,)
        bg_cluster = torch.bincount(lab_b, minlength=2).argmax()
        bg = bg_candidates[lab_b == bg_cluster]
        fg = fg_candidates[lab_c != bg_cluster]
        n = min(max_per_class, bg.shape[0], fg.shape[0])
        if n < 2:  # no separable object: treat everything as foreground
            self.weight.zero_()
            self.bias.fill_(1.0)
            self.fitted.fill_(True)
            return
        bg = bg[torch.randperm(bg.shape[0], generator=generator, device=dev)[:n]]
        fg = fg[torch.randperm(fg.shape[0], generator=generator, device=dev)[:n]]
        w, b = lda_direction(bg.float(), fg.float())
        self.weight.copy_(w.float())
        self.bias.copy_(b.float())

    def decision(self, feat: Tensor) -> Tensor:
        """(B, D, H, W) -> (B, 1, H, W) raw affine decision value."""
        dtype = torch.promote_types(feat.dtype, torch.float32)  # float64 when the features are
        decision = torch.einsum("bdhw,d->bhw", feat.to(dtype), self.weight.to(dtype))  # (B, H, W)
        return decision[:, None] + self.bias.to(dtype)

    def set_range(self, decisions: Tensor) -> Tensor:
        """Fold the robust min-max of all training decision values into weight and bias.

        Returns the decisions mapped through the folded classifier, i.e. the training foreground maps.
        """
        lo, hi = robust_range(decisions)
        scale = (hi - lo).clamp_min(1e-12)
        self.weight.div_(scale)
        self.bias.sub_(lo).div_(scale)
        self.fitted.fill_(True)
        return ((decisions.float() - lo) / scale).clamp(0, 1)

    def forward(self, feat: Tensor) -> Tensor:
        """(B, D, H, W) stride-4 features -> (B, 1, H, W) foreground probability."""
        if not self.enabled or not bool(self.fitted):
            dtype = torch.promote_types(feat.dtype, torch.float32)
            return feat.new_ones(feat.shape[0], 1, *feat.shape[2:], dtype=dtype)
        return self.decision(feat).clamp(0, 1)


def positive_sampling_weight(fg: Tensor, size: int) -> Tensor:
    """Foreground map (B, 1, h, w) -> (B, 1, size, size) positive-pair draw weight (official training recipe).

    Gaussian smoothing with sigma = h / 25 cells (scipy-like truncate 4, reflect border), logistic sharpening
    1 / (1 + exp(5 - 10 x)), bilinear resize.
    """
    sigma = fg.shape[-2] / 25
    radius = min(int(4 * sigma + 0.5), fg.shape[-1] - 1, fg.shape[-2] - 1)
    k = gaussian_kernel1d(sigma, radius, fg.device).float()
    x = F.pad(fg.float(), (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1))  # horizontal pass
    x = F.conv2d(x, k.view(1, 1, -1, 1))  # vertical pass
    x = torch.sigmoid(10 * x - 5)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)

