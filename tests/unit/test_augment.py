"""CPU augmentations: the winners' lighting variants and CPR's HLS lightness against hand-computed pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from data_modules.augment import (
    Augment,
    AugmentConfig,
    build_augment,
    draw_rectangles,
    hls_lightness,
    hls_lightness_tensor,
    random_hls_lightness,
    scale_brightness,
    scale_halves,
    scale_rectangles,
)
from hybridad.config import load_config
from hybridad.errors import UserError


class FixedDraws:
    """Stands in for `np.random.Generator`: returns the queued values of `integers` and `uniform` in order."""

    def __init__(self, integers: list = (), uniform: list = (), random: list = ()) -> None:
        self._int, self._uni, self._rand = list(integers), list(uniform), list(random)

    def integers(self, low, high=None, size=None):
        return self._int.pop(0)

    def uniform(self, low=0.0, high=1.0, size=None):
        value = self._uni.pop(0)
        assert low <= value <= high, "a queued draw outside the range the code asks for"
        return value

    def random(self):
        return self._rand.pop(0)


def _flat(value: int, h: int = 6, w: int = 8) -> np.ndarray:
    return np.full((h, w, 3), value, np.uint8)


def test_brightness_hand_computed():
    img = np.array([[[100, 201, 255]]], np.uint8)
    assert scale_brightness(img, 1.2).tolist() == [[[120, 241, 255]]]  # 241.2 truncated, 306 clipped
    assert scale_brightness(img, 0.5).tolist() == [[[50, 100, 127]]]  # 100.5 and 127.5 truncated


@pytest.mark.parametrize("factor", [0.5, 0.73, 1.0, 1.17, 1.2])
def test_brightness_equals_pil_image_enhance(factor):
    # (a) is torchvision's ColorJitter(brightness=(0.5, 1.2)) on a PIL image, i.e. ImageEnhance.Brightness
    img = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    ref = np.asarray(ImageEnhance.Brightness(Image.fromarray(img)).enhance(factor))
    assert np.array_equal(scale_brightness(img, factor), ref)


def test_rectangles_hand_computed():
    out = scale_rectangles(_flat(100), [(1, 2, 2, 3, 1.5), (2, 3, 3, 2, 0.5)])
    expected = np.full((6, 8), 100)
    expected[1:3, 2:5] = 150
    expected[2:5, 3:5] = 50
    expected[2, 3:5] = 75  # the overlap: 100 x 1.5 x 0.5
    assert np.array_equal(out[..., 0], expected) and np.array_equal(out[..., 2], expected)


def test_rectangle_draws_scale_from_448_to_the_crop():
    # sizes 40 (h) x 60 (w) at (y 100, x 200) on the 448 input, factor 0.8; the crop is 896 x 1344 (2x, 3x)
    draws = FixedDraws(integers=[np.array([40, 60]), 100, 200] * 3, uniform=[0.8, 1.4, 0.5])
    rects = draw_rectangles(draws, 896, 1344, 448)
    assert rects == [(200, 600, 80, 180, 0.8), (200, 600, 80, 180, 1.4), (200, 600, 80, 180, 0.5)]


def test_rectangle_draws_stay_in_range():
    rng = np.random.default_rng(3)
    for h, w in [(448, 448), (1024, 1224), (512, 558)]:
        for y0, x0, rh, rw, f in draw_rectangles(rng, h, w, 448):
            assert 30 * h / 448 - 1 <= rh <= 70 * h / 448 + 1 and 30 * w / 448 - 1 <= rw <= 70 * w / 448 + 1
            assert 0 <= y0 and y0 + rh <= h and 0 <= x0 and x0 + rw <= w and 0.5 <= f <= 1.5


def test_halves_hand_computed():
    out = scale_halves(_flat(100, 3, 5))[..., 1]
    assert out.tolist() == [[150, 150, 70, 70, 70]] * 3  # 5 // 2 = 2 columns on the left
    assert scale_halves(_flat(200, 1, 4))[0, :, 0].tolist() == [255, 255, 140, 140]  # 300 clipped


def test_hls_lightness_hand_computed():
    # RGB (200,100,50) is 8-bit HLS (10, 125, 153) (hue 20 deg, L 250/2, S 150/250);
    # L x1.1 = 137.5 -> 137: q = L + S - LS = 0.8149, p = 2L - q = 0.2596 -> R q, G p + (q-p)/3, B p
    img = np.array([[[200, 100, 50], [100, 100, 100], [201, 201, 201]]], np.uint8)
    assert hls_lightness(img, 1.1).tolist() == [[[208, 113, 66], [110, 110, 110], [221, 221, 221]]]
    # L x0.9 = 112.5 -> 112 (< 0.5): q = L(1 + S) = 0.7027, p = 0.1757; greys 90 and 180.9 -> 180
    assert hls_lightness(img, 0.9).tolist() == [[[179, 90, 45], [90, 90, 90], [180, 180, 180]]]


@pytest.mark.parametrize(
    ("draws", "expected"),
    [
        (FixedDraws(integers=[0], uniform=[0.9]), lambda x: scale_brightness(x, 0.9)),
        (
            FixedDraws(integers=[1] + [np.array([30, 70]), 0, 10] * 3, uniform=[1.5, 1.0, 1.0]),
            # 2x crop: 30x70 at (0,10) -> 60x140 at (0,20); the other two rectangles scale by 1.0
            lambda x: scale_rectangles(x, [(0, 20, 60, 140, 1.5)]),
        ),
        (FixedDraws(integers=[2]), scale_halves),
    ],
    ids=["brightness", "rectangles", "halves"],
)
def test_lighting_picks_each_variant(draws, expected):
    img = np.random.default_rng(1).integers(0, 200, (896, 896, 3), dtype=np.uint8)
    aug = Augment(AugmentConfig(lighting=1.0))
    aug.rng = draws
    assert np.array_equal(aug.lighting(img), expected(img))


def test_call_applies_lighting_then_hls_with_their_probabilities():
    img = _flat(100, 4, 4)
    aug = Augment(AugmentConfig(lighting=0.5, hls_lightness=0.3))
    aug.rng = FixedDraws(random=[0.49, 0.29], integers=[2], uniform=[0.05])  # both on; halves; L x1.05
    assert np.array_equal(aug(img), hls_lightness(scale_halves(img), 1.05))
    aug.rng = FixedDraws(random=[0.5, 0.3])  # both off (p is a strict upper bound)
    assert np.array_equal(aug(img), img)


def test_lighting_rate_and_variants_with_a_real_generator():
    img = _flat(100, 8, 8)
    aug = Augment(AugmentConfig(lighting=0.5), seed=0)
    outs = [aug(img) for _ in range(600)]
    unchanged = sum(np.array_equal(o, img) for o in outs)
    halves = sum(o[0, 0, 0] == 150 and o[0, 7, 0] == 70 for o in outs)
    assert 0.43 < unchanged / 600 < 0.57 and 0.12 < halves / 600 < 0.22  # p 0.5, then 1 in 3


def test_build_augment_and_bad_values():
    assert build_augment(AugmentConfig()) is None
    assert build_augment(AugmentConfig(lighting=0.5)) is not None
    assert build_augment(AugmentConfig(hls_lightness=0.3)) is not None
    with pytest.raises(UserError, match="data.augment.lighting"):
        Augment(AugmentConfig(lighting=1.5))
    with pytest.raises(UserError, match="hls_lightness_ratio"):
        Augment(AugmentConfig(hls_lightness=0.3, hls_lightness_ratio=1.0))


def test_hls_lightness_on_the_device_hand_computed_and_near_opencv():
    # (200,100,50) x1.1 in float: L 0.5392, S 0.6 -> q 0.8157 (208), p 0.2627 (67), G p + (q - p) / 3 (114)
    x = torch.tensor([200.0, 100.0, 50.0]).reshape(1, 3, 1, 1) / 255
    out = hls_lightness_tensor(x, torch.tensor([1.1])).flatten() * 255
    torch.testing.assert_close(out, torch.tensor([208.0, 114.0, 67.0]), atol=2e-3, rtol=0)
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    grey = np.repeat(colour[..., :1], 3, axis=2)
    for img, tol in ((colour, 6.0), (grey, 1.0)):
        for f in (0.9, 1.1):
            ref = torch.from_numpy(hls_lightness(img, f)).permute(2, 0, 1).float()
            t = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
            assert (hls_lightness_tensor(t, torch.tensor([f]))[0] * 255 - ref).abs().max() <= tol


def test_random_hls_lightness_probability_and_generator():
    x = torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(random_hls_lightness(x, prob=0.0), x, atol=1e-6, rtol=0)
    a = random_hls_lightness(x, 0.3, 0.1, torch.Generator().manual_seed(1))
    b = random_hls_lightness(x, 0.3, 0.1, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    changed = ((a - x).abs().flatten(1).amax(1) > 1e-5).float().mean()
    assert 0.12 < changed < 0.5


@pytest.mark.parametrize(
    "category", ["can", "fabric", "rice", "sheet_metal", "wallplugs", "walnuts", "fruit_jelly", "vial"]
)
def test_category_configs_use_the_winners_variants(category):
    data = load_config([f"data.category={category}"]).data
    winners_lighting = category in ("can", "fabric", "rice")
    assert data.augment.lighting == (0.5 if winners_lighting else 0.0)
    assert (data.augment.hflip, data.augment.vflip) == ((0.5, 0.5) if winners_lighting else (0.0, 0.0))
    assert data.augment.brightness == 0.0  # the additive jitter is not the winners'
    cpr = category in ("fruit_jelly", "vial")
    assert data.tiling.antialias == (not cpr)  # PIL resize for INP-Former, cv2 (no antialias) for CPR
    if cpr:
        cp = data.cut_paste
        assert cp.enabled and cp.foreground == "otsu" and cp.max_patches == 1 and not cp.colour_jitter
