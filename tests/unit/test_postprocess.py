"""Post-processing against OpenCV / scipy references and hand cases."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from hybridad.postprocess import (
    PostProcessConfig,
    binarize,
    close,
    erode,
    fill_holes,
    hsv_kmeans_foreground,
    remove_small,
    smooth,
)


def random_masks(seed: int, shape: tuple[int, ...] = (3, 1, 40, 52), p: float = 0.08) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.random(shape) < p)


@pytest.mark.parametrize("backend", ["torch", "opencv"])
@pytest.mark.parametrize("k", [3, 4, 10, 15, 80])
def test_closing_and_erosion_equal_opencv(k: int, backend: str) -> None:
    masks = random_masks(k)
    kernel = np.ones((k, k), np.uint8)
    ours_close, ours_erode = close(masks, k, backend), erode(~masks, k, backend)
    for i, m in enumerate(masks[:, 0].numpy().astype(np.uint8)):
        assert np.array_equal(ours_close[i, 0].numpy(), cv2.morphologyEx(m, cv2.MORPH_CLOSE, kernel) > 0)
        assert np.array_equal(ours_erode[i, 0].numpy(), cv2.erode(1 - m, kernel) > 0)


@pytest.mark.parametrize("seed", range(4))
def test_fill_holes_scipy_and_iterative_agree(seed: int) -> None:
    masks = random_masks(seed, p=0.45)  # dense enough to make many holes
    masks[0, 0, 10:20, 10:20] = True
    masks[0, 0, 13:17, 13:17] = False  # one clear hole
    expected = np.stack([ndi.binary_fill_holes(m) for m in masks[:, 0].numpy()])[:, None]
    assert fill_holes(masks, "scipy").numpy().tolist() == expected.tolist()
    assert fill_holes(masks, "iterative").numpy().tolist() == expected.tolist()
    assert bool(fill_holes(masks)[0, 0, 13:17, 13:17].all())


def test_remove_small_hand_case() -> None:
    m = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    m[0, 0, 0, 0] = True  # 1 px
    m[0, 0, 3, 3] = m[0, 0, 4, 4] = True  # diagonal pair: one 8-connected component of 2 px
    m[0, 0, 6:8, 5:8] = True  # 6 px
    out = remove_small(m, 2)
    assert not out[0, 0, 0, 0] and out[0, 0, 3, 3] and out[0, 0, 4, 4] and int(out.sum()) == 8
    assert int(remove_small(m, 3).sum()) == 6


def test_identity_when_everything_off() -> None:
    rng = np.random.default_rng(0)
    maps = torch.from_numpy(rng.random((2, 1, 16, 16)).astype(np.float32))
    cfg = PostProcessConfig(full_mask_guard=0.5)
    assert smooth(maps, cfg) is maps
    out = binarize(maps, 0.5, cfg)
    assert out.dtype == torch.bool and out.shape == maps.shape
    assert torch.equal(out, maps.half().float() >= 0.5)  # compared as cached (float16)
    assert bool(binarize(torch.full((1, 1, 2, 2), 0.5), 0.5, cfg).all())  # inclusive threshold


def test_full_pipeline_on_float_maps_and_guard() -> None:
    maps = torch.zeros(2, 1, 32, 32)
    maps[0, 0, 8:20, 8:20] = 1.0
    maps[0, 0, 12:16, 12:16] = 0.0  # a hole the fill closes
    maps[0, 0, 28, 28] = 1.0  # a speck min_area removes
    maps[1, 0, 0, :] = 1.0  # a ring along the whole border: filling makes image 1 entirely positive
    maps[1, 0, -1, :] = maps[1, 0, :, 0] = maps[1, 0, :, -1] = 1.0
    cfg = PostProcessConfig(fill_holes=True, min_area=4, full_mask_guard=0.95)
    out = binarize(maps, 0.5, cfg)
    assert bool(out[0, 0, 8:20, 8:20].all()) and int(out[0].sum()) == 144
    assert torch.equal(out[1], maps[1] >= 0.5)  # guard kept the raw ring
    no_guard = binarize(maps, 0.5, PostProcessConfig(fill_holes=True, full_mask_guard=1.0))
    assert bool(no_guard[1].all())


def test_erosion_after_closing_in_binarize() -> None:
    maps = torch.zeros(1, 1, 20, 20)
    maps[0, 0, 5:15, 5:15] = 1.0
    out = binarize(maps, 0.5, PostProcessConfig(erosion_kernel=3))
    assert int(out.sum()) == 64 and bool(out[0, 0, 6:14, 6:14].all())


@pytest.mark.parametrize("sigma", [1.0, 2.5])
def test_smooth_matches_scipy_mirror(sigma: float) -> None:
    rng = np.random.default_rng(1)
    x = rng.random((2, 1, 30, 41)).astype(np.float32)
    got = smooth(torch.from_numpy(x), PostProcessConfig(whole_map_blur_sigma=sigma)).numpy()
    for i in range(2):
        ref = ndi.gaussian_filter(x[i, 0].astype(np.float64), sigma, mode="mirror", truncate=4.0)
        np.testing.assert_allclose(got[i, 0], ref, atol=1e-5)
    assert smooth(torch.ones(1, 1, 3, 3), PostProcessConfig(whole_map_blur_sigma=4.0)).shape == (1, 1, 3, 3)


def two_cluster_image(h: int = 60, w: int = 80) -> tuple[torch.Tensor, np.ndarray]:
    """Dark blue background (HSV ~ (120, 200, 40)), bright orange disc (~ (12, 220, 210)), both noisy."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:h, :w]
    disc = (yy - 30) ** 2 + (xx - 45) ** 2 < 15**2
    hsv = np.where(disc[..., None], [12, 220, 210], [120, 200, 40]).astype(np.int16)
    hsv += rng.integers(-4, 5, hsv.shape, dtype=np.int16)  # well inside each cluster
    rgb = cv2.cvtColor(hsv.clip(0, 255).astype(np.uint8), cv2.COLOR_HSV2RGB)
    return torch.from_numpy(rgb).permute(2, 0, 1)[None], disc  # (1,3,H,W) uint8, (H,W) bool


def test_hsv_kmeans_foreground_finds_the_bright_cluster_and_dilates_it() -> None:
    image, disc = two_cluster_image()
    got = hsv_kmeans_foreground(image, dilation=0)
    assert got.shape == (1, 1, 60, 80) and got.dtype == torch.bool
    assert np.array_equal(got[0, 0].numpy(), disc)  # the brighter (higher V) cluster is the object
    dilated = hsv_kmeans_foreground(image, dilation=15)[0, 0].numpy()
    # a 15x15 square dilation: within Chebyshev distance 7 of a disc pixel
    want = np.array([[disc[max(0, y - 7) : y + 8, max(0, x - 7) : x + 8].any() for x in range(80)]
                     for y in range(60)])
    assert np.array_equal(dilated, want) and dilated.sum() > disc.sum()
    one_colour = torch.full((1, 3, 8, 8), 90, dtype=torch.uint8)
    assert hsv_kmeans_foreground(one_colour).all()  # nothing to separate: all object


def test_binarize_ands_the_foreground_before_closing() -> None:
    maps = torch.zeros(1, 1, 20, 20)
    maps[..., 2:18, 2:18] = 1.0
    fg = torch.zeros(1, 1, 20, 20, dtype=torch.bool)
    fg[..., :, :10] = True
    out = binarize(maps, 0.5, PostProcessConfig(closing_kernel=3), fg)
    assert out[..., 2:18, 2:10].all() and out.sum() == 16 * 8  # the defect outside the object is gone


def test_anomaly_module_applies_the_foreground_to_the_configured_split_only() -> None:
    from hybridad.errors import UserError
    from hybridad.models.anomaly_module import AnomalyModule
    from hybridad.types import Batch

    image, disc = two_cluster_image()
    module = AnomalyModule(PostProcessConfig(foreground_splits=["test_private_mixed"], foreground_dilation=0))
    batch = Batch(image=image.repeat(2, 1, 1, 1), label=torch.full((2,), -1), lighting=["regular", "mixed"],
                  sample_id=["test_private/000_regular", "test_private_mixed/000_mixed"],
                  split=["test_private", "test_private_mixed"])
    fg = module.foreground(batch)
    assert fg is not None and fg[0].all() and np.array_equal(fg[1, 0].numpy(), disc)
    batch.sample_id = ["test_private/000_regular", "test_public/good/000_regular"]
    batch.split = ["test_private", "test_public"]
    assert module.foreground(batch) is None
    with pytest.raises(UserError, match="foreground_splits"):
        AnomalyModule(PostProcessConfig(foreground_splits=["test_privat_mixed"]))


def test_binarize_compares_the_float16_map_as_cached() -> None:
    thr = 0.7392578125  # a float16 value, as thresholds fitted on the float16 histograms are
    maps = torch.tensor([0.73925, 0.7390, thr, 0.9]).view(1, 1, 1, 4)  # 0.73925 rounds up to thr in float16
    got = binarize(maps, thr, PostProcessConfig())
    assert got.flatten().tolist() == [True, False, True, True]
    assert torch.equal(got, maps.half().float() >= thr)  # the cached map decides


def test_object_mask_is_chosen_explicitly_for_new_images_not_by_their_path() -> None:
    """Run eval: the splits in `foreground_splits`; predict: `foreground_images` True / False for every image,
    whatever the sample id says."""
    from hybridad.models.anomaly_module import AnomalyModule
    from hybridad.types import NO_SPLIT, Batch

    module = AnomalyModule(PostProcessConfig(foreground_splits=["test_private_mixed"], foreground_dilation=1))
    image = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    image[..., 2:6, 2:6] = 200  # a bright object on a dark background
    expected = hsv_kmeans_foreground(image, 1)
    assert 0 < int(expected.sum()) < 64

    def fg(sample_id: str, split: str) -> torch.Tensor | None:
        return module.foreground(Batch(image=image, label=torch.zeros(1, dtype=torch.long), sample_id=[sample_id],
                                       split=[split], lighting=["mixed"]))

    mixed = ("test_private_mixed/000_mixed", "test_private_mixed")
    assert torch.equal(fg(*mixed), expected) and fg("test_private/000_regular", "test_private") is None
    module.foreground_images = False  # predict without --foreground: a path that looks like the split is no reason
    assert fg("test_private_mixed/000_mixed", NO_SPLIT) is None and fg(*mixed) is None
    module.foreground_images = True  # predict --foreground: every image
    assert torch.equal(fg("some_folder/photo", NO_SPLIT), expected)
