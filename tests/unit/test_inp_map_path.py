"""INP-Former's tile map path against a transcription of the official code (INP-Former `utils.py`,
ISVL `isvl.py`): per-group 1 - cos, bilinear upsampling with align_corners=True, `get_gaussian_kernel(5, 4)`."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hybridad.gaussian import inp_gaussian_kernel
from hybridad.inp_map_path import KERNEL_SIGMA, KERNEL_SIZE, tile_maps_from_groups
from hybridad.models.inp_former.config import InpFormerConfig
from hybridad.tile_grid import TileLevel, level_boxes, tile
from hybridad.types import Batch


def official_gaussian_filter(kernel_size: int = 5, sigma: float = 4, channels: int = 1) -> torch.nn.Conv2d:
    """Transcription of INP-Former's `utils.get_gaussian_kernel`."""
    x_coord = torch.arange(kernel_size)
    x_grid = x_coord.repeat(kernel_size).view(kernel_size, kernel_size)
    y_grid = x_grid.t()
    xy_grid = torch.stack([x_grid, y_grid], dim=-1).float()
    mean = (kernel_size - 1) / 2.0
    variance = sigma**2.0
    gaussian_kernel = (1.0 / (2.0 * math.pi * variance)) * torch.exp(
        -torch.sum((xy_grid - mean) ** 2.0, dim=-1) / (2 * variance))
    gaussian_kernel = gaussian_kernel / torch.sum(gaussian_kernel)
    gaussian_kernel = gaussian_kernel.view(1, 1, kernel_size, kernel_size).repeat(channels, 1, 1, 1)
    conv = torch.nn.Conv2d(channels, channels, kernel_size, groups=channels, bias=False, padding=kernel_size // 2)
    conv.weight.data = gaussian_kernel
    conv.weight.requires_grad = False
    return conv


def official_maps(encoder: list[torch.Tensor], decoder: list[torch.Tensor], out_size: tuple[int, int]
                  ) -> torch.Tensor:
    """Transcription of `cal_anomaly_maps` (1 - cos per group, upsampled with align_corners=True, mean)
    followed by the 5x5 sigma-4 filter at `out_size`."""
    a_map_list = []
    for fs, ft in zip(encoder, decoder):
        a_map = 1 - F.cosine_similarity(fs, ft)
        a_map = torch.unsqueeze(a_map, dim=1)
        a_map = F.interpolate(a_map, size=out_size, mode="bilinear", align_corners=True)
        a_map_list.append(a_map)
    anomaly_map = torch.cat(a_map_list, dim=1).mean(dim=1, keepdim=True)
    with torch.no_grad():
        return official_gaussian_filter(5, 4)(anomaly_map)


def test_kernel_is_the_official_5x5_sigma4() -> None:
    assert torch.equal(inp_gaussian_kernel(KERNEL_SIZE, KERNEL_SIGMA), official_gaussian_filter().weight.data)


@pytest.mark.parametrize("smoothing,size", [("isvl", (37, 51)), ("official", (28, 28))])
def test_tile_maps_follow_the_official_formula(smoothing: str, size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    enc = [torch.randn(3, 8, 2, 2) for _ in range(2)]  # (N,D,h,w) per group
    dec = [torch.randn(3, 8, 2, 2) for _ in range(2)]
    groups = torch.stack([1 - F.cosine_similarity(e, d) for e, d in zip(enc, dec)], dim=1)  # (N,G,h,w)
    got = tile_maps_from_groups(groups, smoothing, native_size=(37, 51), input_size=(28, 28))
    torch.testing.assert_close(got, official_maps(enc, dec, size), rtol=0, atol=1e-6)
    none = tile_maps_from_groups(groups, "none", native_size=(37, 51), input_size=(28, 28))
    assert none.shape == (3, 1, 37, 51) and not torch.allclose(none, official_maps(enc, dec, (37, 51)))


def _native_batch(images: torch.Tensor, level: TileLevel, s: int) -> Batch:
    tiles, layout = tile(images, level, out_size=s)
    return Batch(image=images, label=torch.zeros(len(images), dtype=torch.long),
                 sample_id=[f"test_public/good/{i}" for i in range(len(images))], lighting=["regular"] * len(images),
                 tiles=tiles / 255, layout=layout, split=["test_public"] * len(images))


@pytest.mark.parametrize("smoothing", ["isvl", "official"])
def test_native_maps_are_pasted_tiles_of_the_official_formula(smoothing: str, one_thread: None) -> None:
    """Default path = the winners': each 2x2-grid tile's maps go straight to its native size, 5x5 kernel there,
    tiles pasted; `official`: the same kernel at the input size, then resized to the box."""
    from hybridad.models.inp_former.lightning_model import InpFormer

    cfg = InpFormerConfig(preset="tiny", tiny_depth=2, num_inps=3,
                          **({} if smoothing == "isvl" else {"map_smoothing": smoothing}))
    assert InpFormerConfig().map_smoothing == "isvl"
    module = InpFormer(cfg).eval()
    torch.manual_seed(1)
    images = torch.randint(0, 256, (2, 3, 50, 70), dtype=torch.uint8)
    level, s = TileLevel(2, 2), 28
    batch = _native_batch(images, level, s)
    got = module.predict_batch(batch).anomaly_map  # (2,1,50,70)
    with torch.no_grad():
        out = module.model(batch.tiles)
    expected = torch.zeros(2, 1, 50, 70)
    for k, (y0, x0, y1, x1) in enumerate(level_boxes(50, 70, level)):
        idx = torch.arange(2) * 4 + k  # image-major tiles
        enc, dec = [e[idx] for e in out.encoder], [d[idx] for d in out.decoder]
        if smoothing == "isvl":
            m = official_maps(enc, dec, (y1 - y0, x1 - x0))
        else:
            m = F.interpolate(official_maps(enc, dec, (s, s)), size=(y1 - y0, x1 - x0), mode="bilinear",
                              align_corners=False)
        expected[:, :, y0:y1, x0:x1] = m
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_validation_step_runs_the_network_once_and_gives_the_predict_maps(one_thread: None) -> None:
    from hybridad.models.inp_former.lightning_model import InpFormer

    module = InpFormer(InpFormerConfig(preset="tiny", tiny_depth=2, num_inps=3)).eval()
    torch.manual_seed(2)
    batch = _native_batch(torch.randint(0, 256, (1, 3, 40, 40), dtype=torch.uint8), TileLevel(2, 1), 28)
    calls: list[int] = []
    module.model.register_forward_hook(lambda *_: calls.append(1))
    out = module.validation_step(batch, 0)  # also logs val/loss from the same forward
    assert len(calls) == 1
    torch.testing.assert_close(out.anomaly_map, module.predict_batch(batch).anomaly_map, rtol=0, atol=0)
