"""Cut-paste and the defect library: exact masks, determinism, probability, foreground, user crops."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from data_modules.cut_paste import CutPaste, CutPasteConfig, fill_holes, otsu_foreground, otsu_threshold
from data_modules.defect_library import KINDS, DefectLibrary, load_defect_folder, make_defect_library
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
    lib = make_defect_library(32, 5, _gen(0))
    patches, alphas = lib.patches, lib.alphas
    assert lib.kind_names == KINDS and lib.kinds.tolist() == [k for k in range(4) for _ in range(5)]
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
    lib = load_defect_folder(tmp_path, 16)
    patches, alphas = lib.patches, lib.alphas
    assert lib.kind_names == ("", "sub") and lib.kinds.tolist() == [0, 1] and lib.sides.tolist() == [40, 30]
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


# ------------------------------------------------------------------ the winners' pseudo-anomalies


def _square_library(colours: list[tuple], kinds: list[int], names: tuple, side: float = 32) -> DefectLibrary:
    """Fully opaque square patches of one colour each (so a pasted patch's area and colour are known)."""
    k = len(colours)
    patches = torch.tensor(colours, dtype=torch.float32)[:, :, None, None].expand(k, 3, 16, 16).clone()
    alphas = torch.ones(k, 1, 16, 16)
    return DefectLibrary(patches, alphas, torch.full((k,), side), torch.tensor(kinds), names)


def _winners(**kw) -> CutPasteConfig:
    base = dict(enabled=True, probability=1.0, max_patches=1, colour_jitter=False, min_contrast=0.0,
                opacity_min=1.0, opacity_max=1.0, library_size=4, patch_size=32)  # fmt: skip
    base.update(kw)
    return CutPasteConfig(**base)


def _disc_tiles(n: int, s: int, radius: float, inside: float = 0.8, outside: float = 0.2) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(s).float(), torch.arange(s).float(), indexing="ij")
    disc = ((yy - s / 2 + 0.5) ** 2 + (xx - s / 2 + 0.5) ** 2 <= radius**2).float()
    return (outside + (inside - outside) * disc).expand(n, 3, s, s).clone()


@pytest.mark.parametrize("seed", range(4))
def test_otsu_threshold_equals_opencv(seed):
    rng = np.random.default_rng(seed)
    s = 48
    grey = _disc_tiles(1, s, 14, 0.7, 0.3)[0, 0].numpy() * 255 + rng.normal(0, 25 + 10 * seed, (s, s))
    levels = np.clip(np.round(grey), 0, 255).astype(np.uint8)  # (S,S)
    t, _ = cv2.threshold(levels, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    assert otsu_threshold(torch.from_numpy(levels).long().reshape(1, -1)).item() == t
    x = torch.from_numpy(levels).float().div(255).expand(1, 3, s, s)
    fg = otsu_foreground(x)[0, 0].bool()
    assert torch.equal(fg, fill_holes(torch.from_numpy(levels > t)[None, None])[0, 0])  # bright object: upper


def test_otsu_takes_the_class_off_the_border_as_object():
    dark_object = _disc_tiles(2, 40, 10, inside=0.1, outside=0.9)
    fg = otsu_foreground(dark_object)
    assert torch.equal(fg, (dark_object[:, :1] < 0.5).float())
    flat = torch.full((1, 3, 16, 16), 0.5)
    assert torch.equal(otsu_foreground(flat), torch.ones(1, 1, 16, 16))  # no object found: the whole tile


def test_otsu_foreground_confines_the_paste():
    x = _disc_tiles(16, 64, 16)
    cp = CutPaste(_winners(foreground="otsu", size_reference="object", scale_min=0.3, scale_max=0.8))
    y, m = cp(x, _gen(0))
    disc = x[:, :1] > 0.5
    assert m.flatten(1).sum(1).min() > 0 and torch.all(m[~disc] == 0)
    assert torch.equal(m, (y != x).any(1, keepdim=True).float())


def test_grey_tiles_get_grey_patches():
    x = torch.rand(8, 1, 48, 48, generator=_gen(0)).expand(8, 3, 48, 48).clone()
    x[4:] = torch.rand(4, 3, 48, 48, generator=_gen(1))  # four colour tiles
    cp = CutPaste(_cfg(colour_jitter=True, max_patches=3))  # random RGB patches and per-channel gains
    y, m = cp(x, _gen(2))
    assert m[:4].sum() > 0 and torch.equal(y[:4, 0], y[:4, 1]) and torch.equal(y[:4, 1], y[:4, 2])
    changed = m[4:, 0] > 0
    assert not torch.equal(y[4:, 0][changed], y[4:, 1][changed])  # colour tiles keep colour patches


@pytest.mark.parametrize("radius", [10, 20])
def test_object_relative_size(radius):
    # a fully opaque square of side 0.5 x sqrt(object area), pasted inside a large disc
    lib = _square_library([(1.0, 1.0, 1.0)], [0], ("",))
    x = _disc_tiles(32, 64, radius, inside=0.5, outside=0.0)
    fg = (x[:, :1] > 0.25).float()
    cp = CutPaste(_winners(size_reference="object", scale_min=0.5, scale_max=0.5), library=lib)
    _, m = cp(x, _gen(3), foreground=fg)
    side = 0.5 * math.sqrt(fg[0].sum().item())
    area = m.flatten(1).sum(1)  # the part of the square inside the disc
    assert area.max() <= side**2 * 1.15 and area.median() >= side**2 * 0.6


def test_crop_size_on_the_winners_canvas():
    # a 320 px crop scaled by 0.5 on a 640 canvas covers a quarter of the tile side: 16 px on a 64 px tile
    lib = _square_library([(1.0, 1.0, 1.0)], [0], ("",), side=320.0)
    cfg = _winners(size_reference="crop", scale_min=0.5, scale_max=0.5, canvas_size=640)
    _, m = CutPaste(cfg, library=lib)(torch.zeros(16, 3, 64, 64), _gen(4))
    area = m.flatten(1).sum(1)  # squares cut by the tile border are smaller
    assert area.max() <= 16**2 * 1.15 and area.max() >= 16**2 * 0.85


def test_types_equally_likely_and_per_type_scales():
    # type "a" has 1 red crop, type "b" 9 green crops: each type is picked half of the time (the winners make
    # the same number of samples per defect folder), and each keeps its own scale range
    lib = _square_library([(1.0, 0.0, 0.0)] + [(0.0, 1.0, 0.0)] * 9, [0] + [1] * 9, ("a", "b"))
    cfg = _winners(type_scales={"a": [0.4, 0.4], "b": [0.1, 0.1]})
    x = torch.zeros(400, 3, 40, 40)
    x[:, 2] = 0.1  # a colour (not grey) tile keeps the patch colours
    y, m = CutPaste(cfg, library=lib)(x, _gen(5))
    red = (y[:, 0] > 0.5).flatten(1).sum(1)
    green = (y[:, 1] > 0.5).flatten(1).sum(1)
    assert 0.4 < (red > 0).float().mean() < 0.6
    assert torch.all((red > 0) ^ (green > 0))
    assert red[red > 0].float().median() > 8 * green[green > 0].float().median()  # (0.4 / 0.1)^2 = 16


def test_soft_foreground_blends_and_mask_stays_exact():
    x = torch.zeros(8, 3, 32, 32)
    fg = torch.linspace(0, 1, 32).expand(8, 1, 32, 32).clone()  # left to right 0 -> 1
    lib = _square_library([(1.0, 1.0, 1.0)], [0], ("",))
    y, m = CutPaste(_winners(scale_min=1.5, scale_max=1.5), library=lib)(x, _gen(6), foreground=fg)
    assert torch.equal(m, (y != x).any(1, keepdim=True).float())
    assert torch.all(m[fg <= 0.45] == 0) and m.sum() > 0
    pasted = m[:, 0] > 0
    torch.testing.assert_close(y[:, 0][pasted], fg[:, 0][pasted])  # white x foreground weight over black


def test_winners_folder_layout_and_type_scales(tmp_path):
    for kind, n in (("contamination", 2), ("tube", 1)):
        (tmp_path / kind).mkdir()
        for i in range(n):
            _write_rgba(tmp_path / kind / f"{i}.png", 30 + 10 * i, 20, gray=True)
    cfg = _winners(defect_dir=str(tmp_path), type_scales={"contamination": [0.1, 0.8], "tube": [0.05, 0.3]})
    cp = CutPaste(cfg)
    assert cp.sides.tolist() == [30.0, 40.0, 30.0]
    assert cp.scale_lo.tolist() == pytest.approx([0.1, 0.1, 0.05]) and cp.scale_hi.tolist() == pytest.approx(
        [0.8, 0.8, 0.3]
    )
    torch.testing.assert_close(cp.pick_weight, torch.tensor([0.5, 0.5, 1.0]))
    with pytest.raises(UserError, match="'tubes'"):
        CutPaste(_winners(defect_dir=str(tmp_path), type_scales={"tubes": [0.1, 0.2]}))
    with pytest.raises(UserError, match="size_reference"):
        CutPaste(_winners(size_reference="image"))


def test_fill_holes_keeps_regions_open_to_the_border():
    mask = torch.zeros(1, 1, 9, 12, dtype=torch.bool)
    mask[0, 0, 1:8, 1:6] = True  # a ring with a hole at (3:5, 2:4) ...
    mask[0, 0, 3:5, 2:4] = False
    mask[0, 0, 2:7, 7:12] = True  # ... and a U open to the right border
    mask[0, 0, 3:6, 8:12] = False
    expected = mask.clone()
    expected[0, 0, 3:5, 2:4] = True  # only the enclosed hole is filled
    assert torch.equal(fill_holes(mask), expected)


def test_otsu_object_includes_enclosed_highlights():
    x = _disc_tiles(1, 48, 16, inside=0.3, outside=0.9)  # dark object on a bright background
    x[:, :, 20:26, 20:26] = 0.95  # a specular highlight inside it
    assert torch.equal(otsu_foreground(x)[0, 0].bool(), (_disc_tiles(1, 48, 16)[0, 0] > 0.5))


def test_cpr_config_pastes_grey_patches_on_the_vial_object_only(synthetic_root):
    from data_modules.dataset import collate_batch
    from data_modules.datamodule import MVTecAD2DataModule
    from hybridad.config import load_config

    over = ["data.category=vial", f"data.root={synthetic_root}", "data.tiling.input_size=96"]
    dm = MVTecAD2DataModule(load_config(over).data, seed=0)
    ds = dm.dataset("train")
    batch = collate_batch([ds[i % len(ds)] for i in range(8)])
    clean = dm.train_tiler(batch.image, batch.tile_box)  # (8,3,96,96) before pasting
    out = dm.train_transform(batch, _gen(0))
    assert torch.equal(out.mask, (out.image != clean).any(1, keepdim=True).float())
    assert out.mask.sum() > 0 and torch.all(out.mask[otsu_foreground(clean) == 0] == 0)
    assert torch.equal(out.image[:, 0], out.image[:, 1]) and torch.equal(out.image[:, 1], out.image[:, 2])
