"""CPR retrieval: GRB histograms / trimmed KL / self-exclusion and windowed NN scoring vs brute force."""

from __future__ import annotations

import math

import pytest
import torch

from hybridad.models.cpr.retrieval import OUTSIDE, GlobalRetrieval, kmeans, l2_normalise, local_nn_distance


def _brute_histograms(feat: torch.Tensor, centres: torch.Tensor, grid: int) -> torch.Tensor:
    b, d, h, w = feat.shape
    blk = math.ceil(max(h, w) / grid)
    side = blk * grid
    out = torch.zeros(b, grid * grid, centres.shape[0] + 1)
    for i in range(b):
        labels = torch.zeros(side, side, dtype=torch.long)  # padding label 0, all padding top/left
        for y in range(h):
            for x in range(w):
                dist = ((centres - feat[i, :, y, x]) ** 2).sum(1)
                labels[side - h + y, side - w + x] = int(dist.argmin()) + 1
        for by in range(grid):
            for bx in range(grid):
                cell = labels[by * blk : (by + 1) * blk, bx * blk : (bx + 1) * blk]
                for v in cell.flatten().tolist():
                    out[i, by * grid + bx, v] += 1
    return out / (blk * blk)


@pytest.mark.parametrize("size", [10, 12])  # divisible by the grid, and padded (12 -> blocks of 3, 3 rows of padding)
def test_histograms_match_brute_force(size: int) -> None:
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(2, 6, size, size, generator=g)
    grb = GlobalRetrieval(6, clusters=4, grid=5)
    grb.centres.copy_(torch.randn(4, 6, generator=g))
    got = grb.histograms(feat)
    assert got.shape == (2, 25, 5)
    torch.testing.assert_close(got, _brute_histograms(feat, grb.centres, 5))
    if size % 5:
        assert (got[:, 0, 0] > 0).all()  # padded cells land in bin 0 of the first block


def test_trimmed_kl_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(1)
    q = torch.rand(3, 25, 13, generator=g)
    q = q / q.sum(-1, keepdim=True)
    r = torch.rand(4, 25, 13, generator=g)
    r[:, :, 0] = 0  # empty bins must be handled by the epsilon
    r = r / r.sum(-1, keepdim=True)
    grb = GlobalRetrieval(8, clusters=12, grid=5, keep_ratio=0.8)
    got = grb.distances(q, r)
    want = torch.zeros(3, 4)
    for i in range(3):
        for j in range(4):
            blocks = []
            for b in range(25):
                qq, rr = q[i, b] + 1e-8, r[j, b] + 1e-8
                blocks.append(float((qq * torch.log(qq / rr)).sum()))
            want[i, j] = sum(sorted(blocks)[:20])
    torch.testing.assert_close(got, want)


def test_neighbours_exclude_self_and_rank() -> None:
    g = torch.Generator().manual_seed(2)
    bank = torch.rand(6, 25, 13, generator=g)
    bank = bank / bank.sum(-1, keepdim=True)
    grb = GlobalRetrieval(8)
    grb.bank = bank
    nb = grb.neighbours(bank, 3, exclude=torch.arange(6))
    assert nb.shape == (6, 3)
    assert not (nb == torch.arange(6)[:, None]).any()
    dist = grb.distances(bank, bank)
    dist.fill_diagonal_(float("inf"))
    torch.testing.assert_close(nb, dist.argsort(1)[:, :3])
    # without exclusion an image finds itself first (KL(q||q) = 0)
    assert torch.equal(grb.neighbours(bank, 1)[:, 0], torch.arange(6))


def test_kmeans_recovers_separated_clusters() -> None:
    g = torch.Generator().manual_seed(3)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(50, 2, generator=g) for c in centres])
    got = kmeans(x, 3, generator=torch.Generator().manual_seed(0))
    order = torch.cdist(centres, got).argmin(1)
    assert sorted(order.tolist()) == [0, 1, 2]
    torch.testing.assert_close(got[order], centres, atol=0.05, rtol=0)


def _brute_nn(q: torch.Tensor, refs: torch.Tensor, window: int) -> torch.Tensor:
    b, k, d, h, w = refs.shape
    r = window // 2
    out = torch.zeros(b, 1, h, w)
    for i in range(b):
        for y in range(h):
            for x in range(w):
                best = OUTSIDE
                for j in range(k):
                    for dy in range(-r, r + 1):
                        for dx in range(-r, r + 1):
                            yy, xx = y + dy, x + dx
                            if 0 <= yy < h and 0 <= xx < w:
                                best = min(best, 1 - float(q[i, :, y, x] @ refs[i, j, :, yy, xx]))
                out[i, 0, y, x] = best
    return out


@pytest.mark.parametrize("window", [1, 3])
def test_local_nn_distance_matches_brute_force(window: int) -> None:
    g = torch.Generator().manual_seed(4)
    q = l2_normalise(torch.randn(2, 5, 6, 7, generator=g))
    refs = l2_normalise(torch.randn(2, 3, 5, 6, 7, generator=g), dim=2)
    got = local_nn_distance(q, refs, window)
    torch.testing.assert_close(got, _brute_nn(q, refs, window), atol=1e-5, rtol=0)


def test_local_nn_outside_cells_are_invalid() -> None:
    # the only matching descriptor sits one cell to the right; at the right border the window leaves the image
    q = torch.zeros(1, 2, 1, 3)
    q[0, 0] = 1.0  # all query cells = e0
    refs = torch.zeros(1, 1, 2, 1, 3)
    refs[0, 0, 1] = 1.0  # all refs = e1 (orthogonal, distance 1) ...
    refs[0, 0, :, 0, 2] = torch.tensor([1.0, 0.0])  # ... except the last column = e0
    got = local_nn_distance(q, refs, 3)[0, 0, 0]
    torch.testing.assert_close(got, torch.tensor([1.0, 0.0, 0.0]))
    # a 1-cell-wide image with a 3x3 window: the out-of-image cells never win (they are 1e8)
    got = local_nn_distance(q[..., :1], refs[..., :1], 3)
    torch.testing.assert_close(got, torch.ones(1, 1, 1, 1))
