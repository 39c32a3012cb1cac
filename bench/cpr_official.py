"""CPR's scoring written as the official test loop computes it, for `python -m bench.bench_cpr --vs-official`.

Per image (the official loop runs batch 1): at each scale the K references are unfolded into their windows
(`F.unfold`, zero padding, out-of-image cells set to 1e8), the cosine distance to every window cell is one
einsum, the minimum over references and window gives the scale's map; the coarse map is upsampled to the fine
grid and the two are summed, upsampled to the image size, blurred with one 2-D 33 x 33 Gaussian (mirror
padding) and scored as the sum of the 512 largest values (spec/cpr.md sections 1.5 and 10). Descriptors are
L2-normalised already. Only the arithmetic matters here: the bench feeds both arms the same descriptors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hybridad.models.cpr.retrieval import OUTSIDE


def official_scale_map(query: Tensor, refs: Tensor, window: int) -> Tensor:
    """(D, H, W) query and (K, D, H, W) references -> (1, 1, H, W) windowed NN cosine distance."""
    k, d, h, w = refs.shape
    r = window // 2
    cells = F.unfold(refs, window, padding=r).view(k, d, window * window, h * w)  # (K, D, w*w, H*W)
    inside = F.unfold(torch.ones(1, 1, h, w, dtype=refs.dtype), window, padding=r).view(window * window, h * w)
    dist = 1 - torch.einsum("dn,kdcn->kcn", query.reshape(d, h * w), cells)  # (K, w*w, H*W)
    dist = torch.where(inside[None] > 0, dist, torch.full_like(dist, OUTSIDE))
    return dist.amin(dim=(0, 1)).view(1, 1, h, w)


def official_blur(x: Tensor, kernel: int = 33, sigma: float = 4.0) -> Tensor:
    """torchvision's `gaussian_blur(x, (kernel, kernel), sigma)`: the 1-D kernel and its outer product in the
    maps' dtype, one 2-D convolution, 'reflect' padding."""
    r = kernel // 2
    pdf = torch.exp(-0.5 * (torch.linspace(-r, r, kernel, dtype=x.dtype) / sigma).pow(2))
    k1 = pdf / pdf.sum()
    return F.conv2d(F.pad(x, (r, r, r, r), mode="reflect"), torch.mm(k1[:, None], k1[None, :])[None, None])


def official_score(query: list[Tensor], refs: list[Tensor], windows: tuple[int, ...], size: int,
                   top_t: int = 512) -> tuple[Tensor, Tensor]:
    """One image: per-scale (D, h_s, w_s) queries and (K, D, h_s, w_s) references -> ((1,1,size,size) blurred
    map, image score)."""
    fine = query[0].shape[-2:]
    total = torch.zeros(1, 1, *fine)
    for q, r, window in zip(query, refs, windows):
        total = total + F.interpolate(official_scale_map(q, r, window), size=fine, mode="bilinear",
                                      align_corners=False)
    full = F.interpolate(total, size=(size, size), mode="bilinear", align_corners=False)
    blurred = official_blur(full)
    return blurred, blurred.flatten().topk(top_t).values.sum()
