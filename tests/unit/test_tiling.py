"""Tiling: boxes cover the image, tile -> untile round trips, the DataModule's tilers downscale like PIL."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from data_modules.tilers import EvalTiler, TrainTiler, train_tile_boxes
from hybridad.tile_grid import TileLevel, level_boxes, tile, untile

# the real MVTec AD 2 sizes scaled down by 16: sheet_metal, vial, can, fabric/rice/wallplugs/walnuts
SIZES = [  # (H, W)
    (1056 // 16, 4224 // 16), (1900 // 16, 1400 // 16),
    (1024 // 16, 2232 // 16), (2048 // 16, 2448 // 16),
]
GRIDS = [(1, 1), (2, 2), (4, 2), (8, 2), (4, 4)]
OVERLAPS = [0.0, 0.1, 0.25]


@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("overlap", OVERLAPS)
def test_boxes_cover_every_pixel_with_equal_tiles(hw, grid, overlap):
    h, w = hw
    level = TileLevel(*grid, overlap)
    boxes = level_boxes(h, w, level)
    assert len(boxes) == grid[0] * grid[1]
    assert len({(y1 - y0, x1 - x0) for y0, x0, y1, x1 in boxes}) == 1  # all tiles equal
    cover = torch.zeros(h, w)
    for y0, x0, y1, x1 in boxes:
        assert 0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w
        cover[y0:y1, x0:x1] += 1
    assert cover.min() >= 1
    if overlap == 0.0 and h % grid[1] == 0 and w % grid[0] == 0:
        assert cover.max() == 1  # the ISVL grid: no overlap when the grid divides the image


def test_overlap_zero_divisible_is_isvl_grid():
    # ISVL: tile W//C x H//R at (col*tw, row*th), row-major
    boxes = level_boxes(64, 160, TileLevel(4, 2, 0.0))
    expected = [(r * 32, c * 40, (r + 1) * 32, (c + 1) * 40) for r in range(2) for c in range(4)]
    assert boxes == expected


def test_overlap_fraction_is_about_requested():
    (y0, x0, y1, x1), (_, x0b, _, x1b) = level_boxes(100, 400, TileLevel(4, 1, 0.25))[:2]
    tw = x1 - x0
    assert abs((x1 - x0b) / tw - 0.25) < 0.05 and x1b - x0b == tw


@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("overlap", OVERLAPS)
def test_native_round_trip(hw, grid, overlap):
    x = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(0))
    tiles, layout = tile(x, TileLevel(*grid, overlap), None)
    assert tiles.shape[0] == 2 * grid[0] * grid[1] and tiles.dtype == torch.float32
    assert layout.image_size == hw and layout.num_images == 2
    torch.testing.assert_close(untile(tiles, layout), x, atol=1e-5, rtol=0)


def test_tiles_are_image_major_crops():
    x = torch.arange(2 * 1 * 8 * 12, dtype=torch.float32).reshape(2, 1, 8, 12)
    tiles, layout = tile(x, TileLevel(3, 2), None)
    for i in range(tiles.shape[0]):
        y0, x0, y1, x1 = layout.boxes[i % 6]
        assert torch.equal(tiles[i], x[i // 6, :, y0:y1, x0:x1])


def test_uint8_input_gives_float_values_unscaled():
    x = torch.randint(0, 256, (1, 3, 16, 32), dtype=torch.uint8)
    tiles, layout = tile(x, TileLevel(2, 1), None)
    assert tiles.dtype == torch.float32
    assert torch.equal(untile(tiles, layout), x.float())


@pytest.mark.parametrize("overlap", OVERLAPS)
@pytest.mark.parametrize("grid", [(4, 2), (8, 2)])
def test_resized_constant_maps_untile_to_constant(grid, overlap):
    x = torch.zeros(3, 1, 66, 264)
    tiles, layout = tile(x, TileLevel(*grid, overlap), 28)
    assert tiles.shape == (3 * grid[0] * grid[1], 1, 28, 28)
    maps = torch.full((tiles.shape[0], 1, 7, 7), 0.37)  # a model's coarse tile maps
    out = untile(maps, layout)
    assert out.shape == (3, 1, 66, 264)
    torch.testing.assert_close(out, torch.full_like(out, 0.37), atol=1e-6, rtol=0)


def test_untile_averages_overlaps():
    x = torch.zeros(1, 1, 10, 19)
    _, layout = tile(x, TileLevel(2, 1, 0.1), None)  # tiles of 10 columns: [0,10) and [9,19)
    assert layout.boxes == [(0, 0, 10, 10), (0, 9, 10, 19)]
    maps = torch.stack([torch.full((1, 10, 10), 1.0), torch.full((1, 10, 10), 3.0)])  # (2,1,10,10)
    out = untile(maps, layout)[0, 0]
    assert torch.all(out[:, :9] == 1) and torch.all(out[:, 9] == 2) and torch.all(out[:, 10:] == 3)


def test_untile_rejects_wrong_count():
    _, layout = tile(torch.zeros(2, 1, 8, 8), TileLevel(2, 2), None)
    with pytest.raises(ValueError, match="layout expects 2 x 4"):
        untile(torch.zeros(7, 1, 4, 4), layout)


def test_bad_level_raises():
    with pytest.raises(ValueError):
        level_boxes(10, 10, TileLevel(2, 2, 0.6))


def test_train_tiler_matches_resize_of_each_box():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 32, 64), dtype=torch.uint8, generator=g)
    levels = [TileLevel(), TileLevel(2, 2, 0.1)]
    boxes = train_tile_boxes(32, 64, levels)
    assert [(li, ti) for li, ti, _ in boxes] == [(0, 0)] + [(1, t) for t in range(4)]
    pick = torch.tensor([boxes[0][2], boxes[3][2], boxes[4][2]])  # (3,4)
    for antialias in (True, False):
        out = TrainTiler(16, antialias)(images, pick)
        assert out.shape == (3, 3, 16, 16) and out.dtype == torch.float32
        assert 0 <= out.min() and out.max() <= 1
        for i, (y0, x0, y1, x1) in enumerate(pick.tolist()):
            crop = images[i : i + 1, :, y0:y1, x0:x1].float() / 255
            ref = F.interpolate(crop, size=(16, 16), mode="bilinear", antialias=antialias)
            torch.testing.assert_close(out[i : i + 1], ref)


def _textured(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """(1,3,h,w) uint8: smooth shading, a checkerboard of edges and pixel noise (a realistic worst case)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    base = 128 + 60 * torch.sin(xx / 37) * torch.cos(yy / 23) + 40 * ((xx // 97 + yy // 61) % 2)
    img = base[None] + 12 * torch.randn(3, h, w, generator=g)
    return img.clamp(0, 255).to(torch.uint8)[None]


def _pil_resize(img: torch.Tensor, size: int) -> torch.Tensor:
    """(3,h,w) uint8 -> (3,S,S) float grey levels by PIL's bilinear resize (antialiased; torchvision's)."""
    arr = np.ascontiguousarray(img.permute(1, 2, 0).numpy())
    out = np.asarray(Image.fromarray(arr).resize((size, size), Image.BILINEAR))
    return torch.from_numpy(out.astype(np.float32)).permute(2, 0, 1)


# native tile (h, w) -> input side: wallplugs 2448x2048 -> 448 (5.5x, 4.6x), fabric/walnuts full image at a
# quarter of the size (same factors), can's 558x512 test tile and CPR's full vial at 320 (4.4x, 5.9x)
PIL_CASES = [((2048, 2448), 448), ((512, 612), 112), ((512, 558), 448), ((1900, 1400), 320)]


@pytest.mark.parametrize(("hw", "size"), PIL_CASES)
def test_tilers_downscale_like_pil_within_one_grey_level(hw, size):
    images = _textured(*hw)
    ref = _pil_resize(images[0], size)  # (3,S,S) in grey levels
    train = TrainTiler(size)(images, torch.tensor([[0, 0, *hw]]))[0] * 255
    evaluated = EvalTiler(TileLevel(), size)(images)[0][0] * 255
    assert (train - ref).abs().max() <= 1.0 and (evaluated - ref).abs().max() <= 1.0
    plain = TrainTiler(size, antialias=False)(images, torch.tensor([[0, 0, *hw]]))[0] * 255
    assert (plain - ref).abs().max() > 10  # without antialiasing the same tile is far from PIL's


@pytest.mark.parametrize("hw", [(1900, 1400), (1520, 2100)])  # vial, fruit_jelly
def test_cpr_tiles_without_antialias_match_opencv_resize(hw):
    # official CPR input: cv2.resize(img, (320, 320)) with its default bilinear mode, no antialiasing
    images = _textured(*hw)
    arr = np.ascontiguousarray(images[0].permute(1, 2, 0).numpy())
    ref = torch.from_numpy(cv2.resize(arr, (320, 320)).astype(np.float32)).permute(2, 0, 1)
    out = TrainTiler(320, antialias=False)(images, torch.tensor([[0, 0, *hw]]))[0] * 255
    assert (out - ref).abs().max() <= 1.0


def test_eval_tiler_tiles_like_pil_per_tile():
    images = _textured(256, 448, seed=1)
    tiles, layout = EvalTiler(TileLevel(2, 2), 56)(images)  # 224x128 tiles -> 56 (4x, 2.3x)
    for k, (y0, x0, y1, x1) in enumerate(layout.boxes):
        ref = _pil_resize(images[0, :, y0:y1, x0:x1], 56)
        assert (tiles[k] * 255 - ref).abs().max() <= 1.0


def test_upscaling_is_plain_bilinear():
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (2, 3, 20, 24), dtype=torch.uint8, generator=g)
    ref = F.interpolate(images.float() / 255, size=(32, 32), mode="bilinear", antialias=False)
    torch.testing.assert_close(EvalTiler(TileLevel(), 32)(images)[0], ref, atol=0, rtol=0)
    boxes = torch.tensor([[0, 0, 20, 24]] * 2)
    torch.testing.assert_close(TrainTiler(32)(images, boxes), ref, atol=0, rtol=0)


def test_eval_tiler_tiles_and_layout():
    images = torch.randint(0, 256, (2, 3, 32, 64), dtype=torch.uint8)
    tiles, layout = EvalTiler(TileLevel(4, 2), 20)(images)
    assert tiles.shape == (16, 3, 20, 20) and 0 <= tiles.min() and tiles.max() <= 1
    native, layout_native = tile(images, TileLevel(4, 2), None)
    torch.testing.assert_close(untile(native / 255, layout_native), images.float() / 255)
    assert untile(tiles[:, :1], layout).shape == (2, 1, 32, 64)
