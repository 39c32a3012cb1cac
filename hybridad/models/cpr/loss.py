"""CPR training: pair sampling, remote-negative weights, the hinge-cosine loss and on-device pseudo-anomalies.

Points are (x, y) pixel coordinates on the S x S input grid, read from descriptor maps by bilinear
`grid_sample` with the official normalisation p / (S - 1) * 2 - 1 and `align_corners=False`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class Pairs:
    """Sampled point pairs of one batch; every tensor has leading dims (B, n). Weight 0 = padding."""

    pos_q: Tensor  # (B, n, 2) xy in the query
    pos_r: Tensor  # (B, n, 2) xy in the reference (same location)
    pos_w: Tensor  # (B, n)
    rem_q: Tensor  # remote negatives: query point far from the reference point
    rem_r: Tensor
    rem_v: Tensor  # (B, n) 0/1 validity (the weights come from raw features, `remote_negative_weights`)
    ano_q: Tensor  # anomaly pairs: same location, inside the pseudo-anomaly mask
    ano_w: Tensor


def _weighted_draw(weight: Tensor, n: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Draw n indices per row without replacement, probability proportional to `weight` (B, M) (Gumbel top-k).

    Returns (indices (B, n), valid (B, n)): rows with fewer than n positive weights get invalid fillers.
    """
    u = torch.rand(weight.shape, generator=generator, device=weight.device).clamp_min(1e-20)
    keys = torch.where(weight > 0, weight.clamp_min(1e-30).log() - (-u.log()).log(), torch.full_like(u, -math.inf))
    top = keys.topk(min(n, weight.shape[1]), dim=1)
    return top.indices, torch.isfinite(top.values)


def _first_valid(valid: Tensor, n: int) -> Tensor:
    """Order (B, M) so that valid entries come first (stable) and keep n: returns gather indices (B, n)."""
    return torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices[:, :n]


def _xy(flat: Tensor, size: int) -> Tensor:
    """Flat pixel indices (B, n) -> (B, n, 2) float xy."""
    return torch.stack([flat % size, flat // size], -1).float()


def sample_pairs(
    mask: Tensor,
    fg_weight: Tensor | None,
    n: int = 300,
    min_dist: float = 4 * 1 * math.sqrt(2),
    remote: bool = True,
    generator: torch.Generator | None = None,
) -> Pairs:
    """Sample positive, remote-negative and anomaly pairs (official recipe, vectorised over the batch).

    Args:
        mask: (B, 1, S, S) pseudo-anomaly mask of the query (> 0 = anomalous).
        fg_weight: (B, 1, S, S) positive draw weight (max of both images' sharpened foreground) or None.
        n: pairs of each kind per sample (2n candidates are drawn for positives / remote negatives).
        min_dist: remote negatives must be farther than this (pixels): outside the 3x3 window at stride 4.
        remote: False for texture-like categories (remote negatives get weight 0).
    """
    b, _, s, _ = mask.shape
    anomalous = mask.flatten(1) > 0  # (B, S*S)
    w = (~anomalous).float()
    if fg_weight is not None:
        w = w * fg_weight.flatten(1).float()
    pos_idx, pos_ok = _weighted_draw(w, 2 * n, generator)  # (B, 2n)
    pos_xy = _xy(pos_idx, s)  # (B, 2n, 2)
    # remote negatives: reference = the drawn positive point, query = a permutation of all pixels
    perm = torch.rand(b, s * s, generator=generator, device=mask.device).topk(pos_idx.shape[1], dim=1).indices
    far_xy = _xy(perm, s)  # (B, 2n, 2)
    far_ok = pos_ok & ((far_xy - pos_xy).norm(dim=-1) > min_dist)
    keep = _first_valid(far_ok, n)  # (B, n)
    rem_q = far_xy.gather(1, keep[..., None].expand(-1, -1, 2))
    rem_r = pos_xy.gather(1, keep[..., None].expand(-1, -1, 2))
    rem_v = far_ok.gather(1, keep).float() * float(remote)
    ano_idx, ano_ok = _weighted_draw(anomalous.float(), n, generator)  # (B, n)
    return Pairs(
        pos_q=pos_xy[:, :n],
        pos_r=pos_xy[:, :n],
        pos_w=pos_ok[:, :n].float(),
        rem_q=rem_q,
        rem_r=rem_r,
        rem_v=rem_v,
        ano_q=_xy(ano_idx, s),
        ano_w=ano_ok.float(),
    )


def sample_points(feat: Tensor, xy: Tensor, size: int) -> Tensor:
    """Bilinear read of (B, C, h, w) maps at (B, n, 2) pixel xy of an S x S image -> (B, n, C).

    Equals `F.grid_sample(feat, xy / (S - 1) * 2 - 1, align_corners=False)` (zero padding), written as four
    gathers so that its backward (a scatter-add) is deterministic on CUDA under deterministic algorithms,
    where grid_sample's backward has no deterministic implementation.
    """
    b, c, h, w = feat.shape
    g = xy.to(feat.dtype) / (size - 1) * 2 - 1  # (B, n, 2) in [-1, 1]
    ix = ((g[..., 0] + 1) * w - 1) / 2  # (B, n) grid_sample's unnormalised x (align_corners=False)
    iy = ((g[..., 1] + 1) * h - 1) / 2
    x0, y0 = ix.floor(), iy.floor()
    flat = feat.flatten(2)  # (B, C, h*w)
    out = feat.new_zeros(b, c, xy.shape[1])
    for dy in (0, 1):
        for dx in (0, 1):
            xx, yy = x0 + dx, y0 + dy
            weight = (1 - (ix - xx).abs()) * (1 - (iy - yy).abs())  # (B, n)
            inside = (xx >= 0) & (xx <= w - 1) & (yy >= 0) & (yy <= h - 1)
            idx = (yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1)).long()  # (B, n)
            corner = flat.gather(2, idx[:, None].expand(-1, c, -1))  # (B, C, n)
            out = out + corner * (weight * inside)[:, None]
    return out.transpose(1, 2)  # (B, n, C)


def remote_negative_weights(dist: Tensor, valid: Tensor) -> Tensor:
    """Spec 10.10: w = d / (sum d + 1e-7) * sum v per sample; dist, valid (B, n) -> (B, n), no gradient."""
    d = (dist * valid).detach()
    return d / (d.sum(1, keepdim=True) + 1e-7) * valid.sum(1, keepdim=True)


def hinge_cosine_loss(
    cos_pos: Tensor, w_pos: Tensor, cos_neg: Tensor, w_neg: Tensor, m_pos: float = 0.8, m_neg: float = -0.2, p: float = 3
) -> Tensor:
    """sum((w * relu(m+ - cos))^p) / max(1, #w>0) + the same for negatives with relu(cos - m-) (spec 10.11)."""
    pos = ((w_pos * F.relu(m_pos - cos_pos)) ** p).sum() / (w_pos > 0).sum().clamp_min(1)
    neg = ((w_neg * F.relu(cos_neg - m_neg)) ** p).sum() / (w_neg > 0).sum().clamp_min(1)
    return pos + neg


def cpr_loss(
    desc_q: list[Tensor],
    desc_r: list[Tensor],
    raw_q: list[Tensor],
    raw_r: list[Tensor],
    pairs: Pairs,
    size: int,
    m_pos: float = 0.8,
    m_neg: float = -0.2,
    p: float = 3,
) -> Tensor:
    """Total loss over the scales: query / reference descriptors and raw trunk features, each (B, C, h, w)."""
    total = desc_q[0].new_zeros(())
    for dq, dr, fq, fr in zip(desc_q, desc_r, raw_q, raw_r):
        cos_pos = F.cosine_similarity(sample_points(dq, pairs.pos_q, size), sample_points(dr, pairs.pos_r, size), dim=-1)
        cos_rem = F.cosine_similarity(sample_points(dq, pairs.rem_q, size), sample_points(dr, pairs.rem_r, size), dim=-1)
        cos_ano = F.cosine_similarity(sample_points(dq, pairs.ano_q, size), sample_points(dr, pairs.ano_q, size), dim=-1)
        with torch.no_grad():
            d = (sample_points(fq, pairs.rem_q, size) - sample_points(fr, pairs.rem_r, size)).square().sum(-1)
        w_rem = remote_negative_weights(d, pairs.rem_v)  # (B, n)
        cos_neg = torch.cat([cos_rem, cos_ano], 1)  # (B, 2n)
        w_neg = torch.cat([w_rem, pairs.ano_w], 1)
        total = total + hinge_cosine_loss(cos_pos, pairs.pos_w, cos_neg, w_neg, m_pos, m_neg, p)
    return total


# ------------------------------------------------------------------ pseudo-anomalies and augmentation
def perlin_noise(size: int, res: tuple[int, int], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """(size, size) 2-D Perlin noise with res = (periods along y, periods along x)."""
    ry, rx = res
    angles = 2 * math.pi * torch.rand(ry + 1, rx + 1, generator=generator, device=device)
    grads = torch.stack([angles.cos(), angles.sin()], -1)  # (ry+1, rx+1, 2)
    ys = torch.arange(size, device=device) * ry / size
    xs = torch.arange(size, device=device) * rx / size
    yi, xi = ys.floor().long(), xs.floor().long()
    fy, fx = (ys - yi)[:, None], (xs - xi)[None, :]  # (S, 1), (1, S)

    def dot(oy: int, ox: int) -> Tensor:
        g = grads[(yi + oy)[:, None], (xi + ox)[None, :]]  # (S, S, 2)
        return g[..., 0] * (fx - ox) + g[..., 1] * (fy - oy)  # gradient . offset, (S, S)

    def fade(t: Tensor) -> Tensor:
        return 6 * t**5 - 15 * t**4 + 10 * t**3

    u, v = fade(fx), fade(fy)
    top = dot(0, 0) * (1 - u) + dot(0, 1) * u
    bottom = dot(1, 0) * (1 - u) + dot(1, 1) * u
    return math.sqrt(2) * (top * (1 - v) + bottom * v)


def perlin_anomalies(
    images: Tensor,
    fg: Tensor | None = None,
    generator: torch.Generator | None = None,
    anomaly_ratio: float = 0.9,
    threshold: float = 0.5,
    grid: int = 16,
) -> tuple[Tensor, Tensor]:
    """Original-CPR-style pseudo-anomalies on the device: Perlin mask blend of a tile-shuffled copy.

    Args:
        images: (B, 3, S, S) float [0, 1], S divisible by `grid` for exact tiles.
        fg: (B, 1, S, S) foreground probability; the mask is kept where fg > 0.5 (None = everywhere).
    Returns:
        (images, masks (B, 1, S, S) in {0, 1}).
    """
    b, c, s, _ = images.shape
    dev = images.device
    masks = torch.zeros(b, 1, s, s, device=dev)
    for i in range(b):  # per sample: its own Perlin scale (few samples per step)
        if float(torch.rand((), generator=generator, device=dev)) >= anomaly_ratio:
            continue
        res = tuple(2 ** int(torch.randint(0, 6, (), generator=generator, device=dev)) for _ in range(2))
        noise = perlin_noise(s, res, generator, dev)
        angle = (float(torch.rand((), generator=generator, device=dev)) - 0.5) * math.pi  # [-90, 90] deg
        rot = torch.tensor([[math.cos(angle), -math.sin(angle), 0.0], [math.sin(angle), math.cos(angle), 0.0]], device=dev)
        grid_r = F.affine_grid(rot[None], [1, 1, s, s], align_corners=False)
        noise = F.grid_sample(noise[None, None], grid_r, mode="bilinear", padding_mode="reflection", align_corners=False)
        masks[i] = (noise[0] > threshold).float()
    if fg is not None:
        masks = masks * (fg > 0.5).float()
    # anomaly source: the image cut into grid x grid tiles, randomly permuted per sample
    t = s // grid
    tiles = images[..., : t * grid, : t * grid].reshape(b, c, grid, t, grid, t).permute(0, 2, 4, 1, 3, 5)
    tiles = tiles.reshape(b, grid * grid, c, t, t)  # (B, g*g, C, t, t)
    order = torch.rand(b, grid * grid, generator=generator, device=dev).argsort(1)  # (B, g*g)
    tiles = tiles.gather(1, order[:, :, None, None, None].expand_as(tiles))
    source = tiles.view(b, grid, grid, c, t, t).permute(0, 3, 1, 4, 2, 5).reshape(b, c, t * grid, t * grid)
    source = F.pad(source, (0, s - t * grid, 0, s - t * grid), mode="replicate")  # (B, C, S, S)
    f = 0.5 + 0.5 * torch.rand(b, 1, 1, 1, generator=generator, device=dev)
    out = images * (1 - masks) + (f * source + (1 - f) * images) * masks
    return out, masks


def salt_pepper(images: Tensor, prob: float = 0.3, generator: torch.Generator | None = None) -> Tensor:
    """With probability `prob` per image, set a random (1 - SNR) fraction of pixels to 0 or 1 (SNR in [0.97, 1])."""
    b, _, h, w = images.shape
    dev = images.device
    apply = torch.rand(b, 1, 1, 1, generator=generator, device=dev) < prob
    snr = 0.97 + 0.03 * torch.rand(b, 1, 1, 1, generator=generator, device=dev)
    u = torch.rand(b, 1, h, w, generator=generator, device=dev)
    salt = apply & (u < (1 - snr) / 2)
    pepper = apply & (u >= (1 - snr) / 2) & (u < 1 - snr)
    return images.masked_fill(salt, 1.0).masked_fill(pepper, 0.0)
