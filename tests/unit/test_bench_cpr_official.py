"""The CPR bench's official-formula arm computes what our scoring computes (so its speed-up compares like with
like): unfold + einsum windowed NN against `local_nn_distance` (itself tested against brute force), the 2-D blur
against `mirror_blur2d`."""

from __future__ import annotations

import pytest
import torch

from bench.cpr_official import official_blur, official_scale_map
from hybridad.gaussian import mirror_blur2d
from hybridad.models.cpr.retrieval import l2_normalise, local_nn_distance


@pytest.mark.parametrize("window", [1, 3])
def test_official_windowed_nn_matches_ours(window: int) -> None:
    g = torch.Generator().manual_seed(1)
    q = l2_normalise(torch.randn(1, 6, 5, 7, generator=g))  # (1, D, H, W)
    refs = l2_normalise(torch.randn(1, 4, 6, 5, 7, generator=g), dim=2)  # (1, K, D, H, W)
    got = official_scale_map(q[0], refs[0], window)
    torch.testing.assert_close(got, local_nn_distance(q, refs, window), atol=1e-6, rtol=0)
    if window == 3:  # a corner cell never sees the cells outside the image (1e8 there, not 1 - 0)
        assert got[0, 0, 0, 0] < 2


def test_official_blur_matches_ours() -> None:
    x = torch.rand(1, 1, 40, 40, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(official_blur(x), mirror_blur2d(x, 33, 4.0), atol=1e-6, rtol=0)  # float32 kernels
