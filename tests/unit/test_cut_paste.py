"""Cut-paste and the defect library: exact masks, determinism, probability, foreground, user crops."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from data_modules.cut_paste import CutPaste, CutPasteConfig
from data_modules.defect_library import KINDS, load_defect_folder, make_defect_library
from hybridad.errors import UserError


def _cfg(**kw) -> CutPasteConfig:
    base = dict(enabled=True, probability=1.0, scale_min=0.1, scale_max=0.4, library_size=4, patch_size=32)
    base.update(kw)
    return CutPasteConfig(**base)


def _images(n: int = 6, s: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, s, s, generator=torch.Generator().manual_seed(seed))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_library_shapes_and_binary_nonempty_alphas():
    patches, alphas = make_defect_library(32, 5, _gen(0))
    assert patches.shape == (4 * 5, 3, 32, 32) and alphas.shape == (20, 1, 32, 32)
    assert patches.min() >= 0 and patches.max() <= 1
    assert set(alphas.unique().tolist()) <= {0.0, 1.0}
    area = alphas.flatten(1).mean(1)  # (K,)
    assert torch.all(area > 0) and torch.all(area < 1)
    crack, scratch, spot, blob = area.split(5)  # KINDS order: thin lines cover less than filled shapes
    assert KINDS == ("crack", "scratch", "spot", "contamination")
    assert crack.max() < spot.min() and scratch.max() < blob.min()


def test_library_deterministic():
    a = make_defect_library(16, 3, _gen(1))
    b = make_defect_library(16, 3, _gen(1))
    c = make_defect_library(16, 3, _gen(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("opacity", [(0.7, 1.0), (1.0, 1.0), (0.05, 0.1)])
def test_mask_is_exactly_the_changed_pixels(seed, opacity):
    x = _images(seed=seed)
    cp = CutPaste(_cfg(opacity_min=opacity[0], opacity_max=opacity[1], max_patches=3))
    y, m = cp(x, _gen(seed))
    assert y.shape == x.shape and m.shape == (6, 1, 48, 48)
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    changed = (y != x).any(dim=1, keepdim=True).float()
    assert torch.equal(m, changed)
    assert m.flatten(1).sum(1).min() > 0  # probability 1: every tile got something
    assert y.min() >= 0 and y.max() <= 1


def test_pasted_regions_have_contrast():
    x = torch.full((8, 3, 48, 48), 0.5)
    y, m = CutPaste(_cfg(min_contrast=0.2, opacity_min=1.0))(x, _gen(3))
    diff = (y - x).abs().mean(1, keepdim=True)  # (N,1,S,S)
    per_tile = (diff * m).flatten(1).sum(1) / m.flatten(1).sum(1)
    assert torch.all(per_tile > 0.1)


def test_deterministic_for_a_generator_seed():
    x = _images()
    cp = CutPaste(_cfg(probability=0.5))
    y1, m1 = cp(x, _gen(7))
    y2, m2 = cp(x, _gen(7))
    y3, m3 = cp(x, _gen(8))
    assert torch.equal(y1, y2) and torch.equal(m1, m2)
    assert not torch.equal(m1, m3)


def test_probability_zero_leaves_images_unchanged():
    x = _images()
    y, m = CutPaste(_cfg(probability=0.0))(x, _gen(0))
    assert torch.equal(y, x) and m.sum() == 0


def test_probability_half_picks_some_tiles():
    x = _images(n=64, s=32)
    _, m = CutPaste(_cfg(probability=0.5))(x, _gen(0))
    hit = (m.flatten(1).sum(1) > 0).float().mean().item()
    assert 0.3 < hit < 0.7


def test_foreground_restriction_respected():
    x = _images(n=8)
    fg = torch.zeros(8, 1, 48, 48)
    fg[:, :, 10:30, 20:40] = 1.0
    fg[7] = 0.0  # a tile without foreground gets nothing
    y, m = CutPaste(_cfg(scale_min=0.3, scale_max=0.6))(x, _gen(0), foreground=fg)
    assert m.sum() > 0
    assert torch.all(m[fg < 0.5] == 0)
    assert torch.equal(y[7], x[7])


def test_scale_controls_patch_size():
    x = _images(n=16, s=64)
    _, small = CutPaste(_cfg(scale_min=0.05, scale_max=0.08, max_patches=1))(x, _gen(0))
    _, large = CutPaste(_cfg(scale_min=0.4, scale_max=0.5, max_patches=1))(x, _gen(0))
    assert small.flatten(1).sum(1).max() <= (0.08 * 64 * 1.5) ** 2  # a rotated square of side 0.08*S
    assert large.sum() > 10 * small.sum()


def _write_rgba(path, h, w, gray=False):
    yy, xx = np.mgrid[:h, :w]
    alpha = (((yy - h / 2) / (h / 2)) ** 2 + ((xx - w / 2) / (w / 2)) ** 2 <= 1).astype(np.uint8) * 255
    if gray:
        from PIL import Image

        Image.fromarray(np.dstack([np.full((h, w), 40, np.uint8), alpha]), "LA").save(path)
    else:
        bgr = np.zeros((h, w, 3), np.uint8)
        bgr[..., 2] = 200  # red in RGB
        cv2.imwrite(str(path), np.dstack([bgr, alpha]))


def test_load_defect_folder(tmp_path):
    _write_rgba(tmp_path / "a.png", 20, 40)
    (tmp_path / "sub").mkdir()
    _write_rgba(tmp_path / "sub" / "b.png", 30, 30, gray=True)
    patches, alphas = load_defect_folder(tmp_path, 16)
    assert patches.shape == (2, 3, 16, 16) and alphas.shape == (2, 1, 16, 16)
    assert set(alphas.unique().tolist()) == {0.0, 1.0}
    red = patches[0][:, alphas[0, 0] > 0]  # (3,P)
    assert torch.allclose(red.mean(1), torch.tensor([200 / 255, 0.0, 0.0]), atol=0.02)
    assert alphas[0, 0, :4].sum() == 0  # the 20x40 crop is padded to a square with transparent rows
    torch.testing.assert_close(patches[1][:, 8, 8], torch.full((3,), 40 / 255))
    cp = CutPaste(_cfg(defect_dir=str(tmp_path)))
    assert cp.patches.shape[0] == 2


def test_load_defect_folder_errors(tmp_path):
    with pytest.raises(UserError, match="missing or holds no .png"):
        load_defect_folder(tmp_path / "nope")
    with pytest.raises(UserError, match=str(tmp_path)):
        load_defect_folder(tmp_path)
    cv2.imwrite(str(tmp_path / "rgb.png"), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(UserError, match="rgb.png has no alpha"):
        load_defect_folder(tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_mask_rule():
    x = _images().cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    y, m = CutPaste(_cfg()).cuda()(x, g)
    assert y.device.type == "cuda" and torch.equal(m, (y != x).any(1, keepdim=True).float())
