"""CPR retrieval: global (bag-of-words histograms + trimmed KL) and local (windowed nearest neighbour).

All functions are pure tensor code on the input's device; randomness comes from an explicit `torch.Generator`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KL_EPS = 1e-8
OUTSIDE = 1e8  # distance of a window cell that falls outside the image (official value)


def kmeans(x: Tensor, k: int, iters: int = 50, inits: int = 3, generator: torch.Generator | None = None) -> Tensor:
    """Lloyd's K-means with k-means++ seeding; best of `inits` runs by inertia.

    Args:
        x: (M, D) float vectors.
        k: number of centres.
    Returns:
        (k, D) centres. `generator` must live on x's device.
    """
    x = x.float()
    m = x.shape[0]
    best, best_inertia = None, math.inf
    for _ in range(inits):
        # k-means++ seeding: each next centre drawn proportional to the squared distance to the nearest one
        idx = torch.randint(m, (1,), generator=generator, device=x.device)
        centres = x[idx]  # (1, D)
        d2 = torch.cdist(x, centres).square().squeeze(1)  # (M,)
        for _ in range(1, k):
            p = d2 / d2.sum().clamp_min(1e-12)
            nxt = torch.multinomial(p, 1, generator=generator)
            centres = torch.cat([centres, x[nxt]], 0)  # (j+1, D)
            d2 = torch.minimum(d2, (x - centres[-1]).square().sum(1))
        for _ in range(iters):
            assign = torch.cdist(x, centres).argmin(1)  # (M,)
            sums = torch.zeros_like(centres).index_add_(0, assign, x)  # (k, D)
            counts = torch.bincount(assign, minlength=k).to(x.dtype)  # (k,)
            new = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centres)
            shift = (new - centres).abs().max()
            centres = new
            if shift < 1e-6:
                break
        inertia = torch.cdist(x, centres).square().min(1).values.sum().item()
        if inertia < best_inertia:
            best, best_inertia = centres, inertia
    assert best is not None
    return best


class GlobalRetrieval(nn.Module):
    """GRB: codebook of `clusters` visual words on stride-4 features, `grid` x `grid` block histograms.

    The codebook is a buffer (saved in checkpoints); the training images' histograms are kept as a plain
    attribute (their count varies) and are rebuilt with the memory bank.
    """

    def __init__(self, dim: int, clusters: int = 12, grid: int = 5, keep_ratio: float = 0.8) -> None:
        super().__init__()
        self.clusters, self.grid = clusters, grid
        self.keep = int(math.floor(grid * grid * keep_ratio))
        self.register_buffer("centres", torch.zeros(clusters, dim))
        self.register_buffer("fitted", torch.tensor(False))
        self.bank: Tensor | None = None  # (N, grid*grid, clusters+1) training histograms

    def fit(self, samples: Tensor, iters: int = 50, inits: int = 3, generator: torch.Generator | None = None) -> None:
        """Fit the codebook on (M, D) feature vectors."""
        self.centres.copy_(kmeans(samples.to(self.centres.device), self.clusters, iters, inits, generator))
        self.fitted.fill_(True)

    def histograms(self, feat: Tensor) -> Tensor:
        """(B, D, H, W) features -> (B, grid*grid, clusters+1) normalised block histograms (bin 0 = padding)."""
        b, d, h, w = feat.shape
        flat = feat.float().flatten(2).transpose(1, 2)  # (B, H*W, D)
        labels = torch.cdist(flat, self.centres.float()[None].expand(b, -1, -1)).argmin(-1) + 1  # (B, H*W)
        labels = labels.view(b, h, w)
        blk = math.ceil(max(h, w) / self.grid)
        side = blk * self.grid
        # all padding before the first block (top / left), padded cells land in bin 0
        labels = F.pad(labels, (side - w, 0, side - h, 0), value=0)  # (B, side, side)
        labels = labels.view(b, self.grid, blk, self.grid, blk).permute(0, 1, 3, 2, 4)  # (B, g, g, blk, blk)
        labels = labels.reshape(b, self.grid * self.grid, blk * blk)  # (B, g*g, blk*blk)
        onehot = F.one_hot(labels, self.clusters + 1).float()  # (B, g*g, blk*blk, C+1)
        return onehot.sum(2) / (blk * blk)  # (B, g*g, C+1)

    def distances(self, query: Tensor, refs: Tensor) -> Tensor:
        """Trimmed KL: (B, G, C) x (N, G, C) histograms -> (B, N), sum of the `keep` smallest block KLs."""
        q = (query + KL_EPS)[:, None]  # (B, 1, G, C)
        r = (refs.to(query.device) + KL_EPS)[None]  # (1, N, G, C)
        kl = (q * (q / r).log()).sum(-1)  # (B, N, G)
        return kl.sort(-1).values[..., : self.keep].sum(-1)  # (B, N)

    def neighbours(self, query: Tensor, k: int, exclude: Tensor | None = None) -> Tensor:
        """Indices (B, k) of the k nearest training images; `exclude` (B,) long, -1 = none (self-exclusion)."""
        assert self.bank is not None, "GRB bank is empty: build the memory bank first"
        dist = self.distances(query, self.bank)  # (B, N)
        if exclude is not None:
            rows = torch.arange(dist.shape[0], device=dist.device)
            ex = exclude.to(dist.device)
            keep = ex >= 0
            dist[rows[keep], ex[keep]] = math.inf
        k = min(k, dist.shape[1] - (1 if exclude is not None and bool((exclude >= 0).any()) else 0))
        return dist.topk(max(k, 1), dim=1, largest=False).indices  # (B, k)


def l2_normalise(x: Tensor, dim: int = 1) -> Tensor:
    """x / (||x|| + 1e-8) along `dim` (official epsilon)."""
    return x / (x.norm(dim=dim, keepdim=True) + 1e-8)


def local_nn_distance(query: Tensor, refs: Tensor, window: int) -> Tensor:
    """Windowed nearest-neighbour cosine distance.

    Args:
        query: (B, D, H, W) L2-normalised descriptors.
        refs: (B, K, D, H, W) L2-normalised descriptors of each query's K references (any float dtype).
        window: odd window side; a reference cell outside the image counts as distance 1e8.
    Returns:
        (B, 1, H, W) min over the K references and the window of (1 - cos), in the query's dtype (at least
        float32).
    """
    b, k, d, h, w = refs.shape
    r = window // 2
    dtype = torch.promote_types(query.dtype, torch.float32)  # float16 stores are compared in float32
    q = query.to(dtype)
    padded = F.pad(refs.to(dtype).flatten(0, 1), (r, r, r, r))  # (B*K, D, H+2r, W+2r)
    padded = padded.view(b, k, d, h + 2 * r, w + 2 * r)
    valid = F.pad(torch.ones(h, w, device=query.device, dtype=torch.bool), (r, r, r, r))  # (H+2r, W+2r)
    best = torch.full((b, 1, h, w), OUTSIDE, device=query.device, dtype=dtype)
    for dy in range(window):  # loop over window offsets only (at most 9), each step vectorised over positions
        for dx in range(window):
            shifted = padded[..., dy : dy + h, dx : dx + w]  # (B, K, D, H, W)
            dist = 1 - (q[:, None] * shifted).sum(2)  # (B, K, H, W); einsum here lowers to a slow bmm on CPU
            dist = torch.where(valid[dy : dy + h, dx : dx + w], dist, torch.full_like(dist, OUTSIDE))
            best = torch.minimum(best, dist.min(1, keepdim=True).values)
    return best
