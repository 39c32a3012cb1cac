"""AU-PRO against a brute-force reference written from the MVTec definition, and hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from hybridad.errors import UserError
from hybridad.metrics import AUPRO
from bench.mvtec_reference import au_pro_reference, toy_dataset
from hybridad.metrics.functional import (
    au_pro,
    bit_histogram,
    float16_bits,
    float16_key_values,
    float16_keys,
    key_histogram,
    keys_from_bits,
)


def reference_curve(maps: list[np.ndarray], masks: list[np.ndarray]) -> tuple[list, list] | None:
    """(FPR, PRO) points straight from the definition: one per distinct score, descending."""
    regions, normal_scores = [], []
    for m, g in zip(maps, masks):
        labels, n = ndi.label(g != 0, structure=np.ones((3, 3)))
        regions += [m[labels == i] for i in range(1, n + 1)]
        normal_scores.append(m[g == 0])
    normal = np.concatenate(normal_scores)
    if not regions:
        return None
    thresholds = np.unique(np.concatenate([normal] + regions))[::-1]

    def frac_at_or_above(values: np.ndarray) -> np.ndarray:  # fraction of `values` >= each threshold
        return (values.size - np.searchsorted(np.sort(values), thresholds, side="left")) / values.size

    xs = frac_at_or_above(normal)
    ys = np.mean([frac_at_or_above(r) for r in regions], axis=0)
    return [0.0, *xs.tolist(), 1.0], [0.0, *ys.tolist(), 1.0]


def reference_area(curve: tuple[list[float], list[float]] | None, limit: float) -> float:
    """Trapezoid up to `limit`, y linearly interpolated at the limit, divided by the limit."""
    if curve is None:
        return float("nan")
    xs, ys = curve
    area = 0.0
    for i in range(1, len(xs)):
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        if x1 <= limit:
            area += 0.5 * (y0 + y1) * (x1 - x0)
        else:
            if x0 < limit:
                y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
                area += 0.5 * (y0 + y_lim) * (limit - x0)
            break
    return area / limit


def reference_au_pro(maps: list[np.ndarray], masks: list[np.ndarray], limit: float) -> float:
    return reference_area(reference_curve(maps, masks), limit)


def random_case(seed: int, n_images: int = 5, levels: int | None = None) -> tuple[list, list]:
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    for i in range(n_images):
        h, w = rng.integers(12, 40, size=2)
        g = np.zeros((h, w), np.uint8)
        if i % 3 != 2:  # every third image is good (empty mask)
            for _ in range(rng.integers(1, 4)):
                y, x = rng.integers(0, h), rng.integers(0, w)
                g[y : y + rng.integers(1, 6), x : x + rng.integers(1, 6)] = 255
        m = rng.random((h, w)) + 0.6 * (g > 0)
        if levels is not None:
            m = np.floor(m * levels) / levels  # many ties
        maps.append(m.astype(np.float16).astype(np.float32))
        masks.append(g)
    return maps, masks


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force(seed: int) -> None:
    maps, masks = random_case(seed, levels=16 if seed % 2 else None)
    curve = reference_curve(maps, masks)
    for limit in (0.05, 0.3, 1.0):
        for quantize in ("float16", None):
            got = au_pro(maps, masks, fpr_limit=limit, quantize=quantize)
            assert got == pytest.approx(reference_area(curve, limit), abs=1e-9), (limit, quantize)


def test_float16_form_equals_exact_form_of_float16_cast_maps() -> None:
    rng = np.random.default_rng(7)
    maps = [rng.normal(size=(30, 30)).astype(np.float32) for _ in range(3)]
    masks = [(rng.random((30, 30)) > 0.9).astype(np.uint8) for _ in range(3)]
    cast = [m.astype(np.float16).astype(np.float32) for m in maps]
    assert au_pro(maps, masks) == pytest.approx(au_pro(cast, masks, quantize=None), abs=1e-12)


def test_hand_computed_ties() -> None:
    # 4 normal pixels, one region of 2 pixels. Scores: region {1, 0.5}, normal {0.5, 0, 0, 0}.
    m = np.array([[1.0, 0.5, 0.5, 0.0, 0.0, 0.0]], np.float32)
    g = np.array([[1, 1, 0, 0, 0, 0]], np.uint8)
    # curve: (0,0) -> t=1: (0, 0.5) -> t=0.5 (tie of a region and a normal pixel): (0.25, 1) -> t=0: (1, 1)
    # area up to 0.5: 0.25 * 0.75 + 0.25 * 1 = 0.4375; / 0.5 = 0.875
    for q in ("float16", None):
        assert au_pro([m], [g], fpr_limit=0.5, quantize=q) == pytest.approx(0.875)
        # up to 0.1: y interpolated at 0.1 = 0.5 + 0.5 * 0.1 / 0.25 = 0.7; area = 0.1 * (0.5 + 0.7) / 2 = 0.06
        assert au_pro([m], [g], fpr_limit=0.1, quantize=q) == pytest.approx(0.6)


def test_diagonal_touching_is_one_region_and_border_region() -> None:
    g = np.zeros((6, 6), np.uint8)
    g[0, 0] = g[1, 1] = 1  # diagonal neighbours: ONE 8-connected region of 2 pixels, touching the border
    m = np.zeros((6, 6), np.float32)
    m[0, 0] = 1.0  # half of that region found first
    # One region: PRO at t=1 is 0.5 (two 4-connected regions would give 0.5 too, so add a third pixel apart)
    g[4, 4] = 1  # a one-pixel region, never found before t=0
    # regions: {(0,0),(1,1)} and {(4,4)}; at t=1: recalls 0.5 and 0 -> PRO 0.25, FPR 0
    # at t=0 everything: (1, 1). Area up to 1: 0.5 * (0.25 + 1) * 1 = 0.625
    assert au_pro([m], [g], fpr_limit=1.0) == pytest.approx(0.625)
    assert au_pro([m], [g], fpr_limit=1.0) == pytest.approx(reference_au_pro([m], [g], 1.0))
    # with 4-connectivity there would be 3 regions: PRO(t=1) = 1/3 -> 0.6667; make sure we are not there
    assert au_pro([m], [g], fpr_limit=1.0) != pytest.approx(2 / 3)


def test_one_pixel_regions_and_good_images() -> None:
    good = [np.full((8, 8), 0.1, np.float32) for _ in range(3)]
    bad = np.full((8, 8), 0.1, np.float32)
    gt = np.zeros((8, 8), np.uint8)
    gt[2, 2] = gt[5, 6] = 1
    bad[2, 2] = 0.9  # found; (5,6) ties with all normal pixels
    maps, masks = good + [bad], [np.zeros((8, 8), np.uint8)] * 3 + [gt]
    # t=0.9: FPR 0, PRO 0.5; t=0.1: FPR 1, PRO 1 -> area to 0.05 with y(0.05)=0.5+0.5*0.05 = 0.525
    expected = 0.5 * (0.5 + 0.525) * 0.05 / 0.05
    assert au_pro(maps, masks) == pytest.approx(expected)
    assert au_pro(maps, masks, quantize=None) == pytest.approx(expected)


def test_perfect_and_inverted_maps() -> None:
    rng = np.random.default_rng(1)
    g = np.zeros((32, 32), np.uint8)
    g[3:9, 3:9] = 1
    g[20:22, 25:31] = 1
    perfect = g.astype(np.float32) + 0.1 * rng.random((32, 32)).astype(np.float32)
    assert au_pro([perfect], [g]) == pytest.approx(1.0)
    assert au_pro([-perfect], [g]) == pytest.approx(0.0)
    assert au_pro([-perfect], [g], quantize=None) == pytest.approx(0.0)


def test_random_scores_give_half_the_limit() -> None:
    rng = np.random.default_rng(2)
    maps = [rng.random((200, 200)).astype(np.float32) for _ in range(4)]
    masks = []
    for _ in range(4):
        g = np.zeros((200, 200), np.uint8)
        for y, x in rng.integers(0, 190, size=(5, 2)):
            g[y : y + 10, x : x + 10] = 1
        masks.append(g)
    # PRO(FPR) ~ FPR for random scores: area ~ limit^2 / 2, normalised ~ limit / 2
    assert au_pro(maps, masks) == pytest.approx(0.025, abs=0.006)


def test_no_regions_is_nan_and_bad_args() -> None:
    m = [np.zeros((4, 4), np.float32)]
    assert np.isnan(au_pro(m, [np.zeros((4, 4))]))
    assert np.isnan(AUPRO().compute().item())
    with pytest.raises(UserError):
        AUPRO(fpr_limit=0.0)
    with pytest.raises(UserError):
        au_pro(m, m, quantize="int8")
    with pytest.raises(ValueError, match="NaN"):
        au_pro([np.full((4, 4), np.nan, np.float32)], [np.ones((4, 4))])


def test_float16_keys_order_and_special_values() -> None:
    values = float16_key_values()
    finite = values[~torch.isnan(values)]
    assert bool((finite[1:] >= finite[:-1]).all())
    x = torch.tensor([-0.0, 0.0, -1.0, float("inf"), -float("inf"), 1e6])
    k = float16_keys(x).long()
    assert k[0] + 1 == k[1]  # -0 right below +0 ...
    hist = key_histogram(k)
    assert hist[k[0]] == 0 and hist[k[1]] == 2  # ... and the histogram counts them as one value
    assert k[4] < k[2] < k[0] < k[3] and k[5] == k[3]  # 1e6 overflows float16 to +inf, like the server's TIFF
    assert torch.equal(values[k], x.to(torch.float16).float())
    all_bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)
    assert torch.equal(float16_keys(all_bits).sort().values, torch.arange(65536, dtype=torch.int32))


def test_inputs_layouts_and_tensor_batches() -> None:
    h, w = 20, 25
    rng = np.random.default_rng(0)
    maps_b = rng.random((3, h, w)).astype(np.float16).astype(np.float32)
    masks_b = (rng.random((3, h, w)) > 0.95).astype(np.uint8)
    expected = reference_au_pro(list(maps_b), list(masks_b), 0.05)
    for mp, mk in [
        (torch.from_numpy(maps_b)[:, None], torch.from_numpy(masks_b)[:, None]),  # (B,1,H,W)
        (torch.from_numpy(maps_b), torch.from_numpy(masks_b).bool()),  # (B,H,W)
        ([torch.from_numpy(x)[None] for x in maps_b], list(masks_b)),  # list of (1,H,W) / (H,W)
    ]:
        assert au_pro(mp, mk) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("quantize", ["float16", None])
def test_metric_chunked_updates_equal_functional(quantize: str | None) -> None:
    rng = np.random.default_rng(5)
    maps = torch.from_numpy(rng.random((6, 1, 24, 24)).astype(np.float16).astype(np.float32))
    masks = torch.zeros(6, 1, 24, 24)
    masks[0, 0, 2:6, 2:6] = 1
    masks[3, 0, 10:12, 0:9] = 1
    masks[5, 0, 20:, 20:] = 1
    maps = maps + masks * 0.3
    expected = au_pro(maps, masks, quantize=quantize)
    states = []
    for split in ([6], [1, 2, 3], [1] * 6):
        metric = AUPRO(quantize=quantize)
        start = 0
        for size in split:
            metric.update(maps[start : start + size], masks[start : start + size, 0])
            start += size
        assert metric.compute().item() == pytest.approx(expected, abs=1e-12)
        if quantize == "float16":
            states.append((metric.normal_hist.clone(), metric.region_hist.clone(), int(metric.num_regions)))
    for s in states[1:]:
        assert torch.equal(s[0], states[0][0]) and torch.allclose(s[1], states[0][1], atol=1e-12)
        assert s[2] == states[0][2] == 3


def test_metric_state_dict_and_merge() -> None:
    maps, masks = random_case(11, n_images=4)
    a, b = AUPRO(), AUPRO()
    for m, g in zip(maps[:2], masks[:2]):
        a.update(torch.from_numpy(m)[None], torch.from_numpy(g)[None])
    for m, g in zip(maps[2:], masks[2:]):
        b.update(torch.from_numpy(m)[None], torch.from_numpy(g)[None])
    c = AUPRO()
    c.load_state_dict(a.state_dict())
    c.merge_state(b)
    assert c.compute().item() == pytest.approx(au_pro(maps, masks), abs=1e-12)


def _ddp_worker(rank: int, init_file: str, maps: torch.Tensor, masks: torch.Tensor, out_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    metric = AUPRO()
    metric.update(maps[rank::2], masks[rank::2])  # each rank sees half of the images
    value = metric.compute().item()  # torchmetrics sums the histogram states over ranks
    torch.save(value, f"{out_file}.{rank}")
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_sync_two_ranks(tmp_path) -> None:
    import torch.multiprocessing as mp

    rng = np.random.default_rng(4)
    maps = torch.from_numpy(rng.random((4, 1, 20, 20)).astype(np.float16).astype(np.float32))
    masks = torch.zeros(4, 1, 20, 20)
    masks[0, 0, 2:6, 2:6] = masks[1, 0, 10:12, 3:9] = masks[3, 0, 15:, 15:] = 1
    maps = maps + 0.3 * masks
    out = str(tmp_path / "value")
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), maps, masks, out), nprocs=2, join=True)
    expected = au_pro(maps, masks)
    for rank in range(2):
        assert torch.load(f"{out}.{rank}") == pytest.approx(expected, abs=1e-12)


def _toy16(num_images: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    maps, masks = toy_dataset(num_images=num_images)
    return [m.astype(np.float16) for m in maps], masks  # as the server reads float16 TIFFs


@pytest.mark.parametrize("limit", [0.05, 0.3])
def test_toy_set_matches_mvtec_formula(limit: float) -> None:
    # MVTec's toy set (300x500 uniform maps, one 10x10 square each; 20 of their 200 maps to stay fast) against
    # our rendering of their global-sort code (bench/mvtec_reference.py)
    maps, masks = _toy16(20)
    expected = au_pro_reference(maps, masks, limit)
    assert au_pro(maps, masks, fpr_limit=limit) == pytest.approx(expected, abs=1e-9)
    metric = AUPRO(fpr_limit=limit)  # the streaming metric, tensors in batches of 7
    for i in range(0, 20, 7):
        batch = slice(i, i + 7)
        metric.update(torch.from_numpy(np.stack(maps[batch])), torch.from_numpy(np.stack(masks[batch])))
    assert metric.compute().item() == pytest.approx(expected, abs=1e-9)
    assert expected == pytest.approx(limit / 2, abs=0.3 * limit)  # random scores: about half the limit


@pytest.mark.slow
def test_full_toy_set_matches_mvtec_formula() -> None:
    maps, masks = _toy16(200)  # their 30 M pixel set
    assert au_pro(maps, masks) == pytest.approx(au_pro_reference(maps, masks, 0.05), abs=1e-9)


def test_bit_histograms_permute_into_key_order() -> None:
    # every non-NaN float16 bit pattern once, with a distinct weight: the permuted bit histogram must equal
    # the key histogram built from per-pixel ordering keys
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    values = bits.view(torch.float16)
    values = values[~torch.isnan(values)]
    w = torch.rand(values.numel(), dtype=torch.float64)
    expected = key_histogram(float16_keys(values), w)
    b_np = float16_bits(values.numpy())
    assert b_np.dtype == np.uint16
    assert np.array_equal(keys_from_bits(bit_histogram(b_np, w.numpy())), expected.numpy())
    b_t = (values.view(torch.int16).to(torch.int32) & 0xFFFF).reshape(-1)  # the device path's bit patterns
    assert torch.equal(keys_from_bits(bit_histogram(b_t, w)), expected)
    with pytest.raises(ValueError, match="NaN"):
        keys_from_bits(bit_histogram(float16_bits(np.array([np.nan], np.float32))))


def test_negative_zero_ties_with_positive_zero() -> None:
    # -0 and +0 are one score: one curve point, as for a global sort of the values
    g = np.zeros((4, 6), np.uint8)
    g[0, :3] = 1
    m = np.zeros((4, 6), np.float32)
    m[0, 0] = 1.0
    m_neg = m.copy()
    m_neg[2:, :] = -0.0
    m_neg[0, 1] = -0.0
    for limit in (0.3, 1.0):
        assert au_pro([m_neg], [g], fpr_limit=limit) == pytest.approx(reference_au_pro([m], [g], limit))
        assert au_pro([m_neg], [g], fpr_limit=limit) == pytest.approx(au_pro([m], [g], fpr_limit=limit))


@pytest.mark.parametrize("dtype", [np.float32, np.int32, bool, np.uint8])
def test_mask_dtypes_and_regions_far_apart(dtype: type) -> None:
    # regions in opposite corners (their bounding box spans the image), touching the border; mask dtypes vary
    rng = np.random.default_rng(3)
    masks = [np.zeros((40, 50), np.uint8) for _ in range(3)]
    masks[0][0:3, 0:2] = 255
    masks[0][37:, 45:] = 255
    masks[0][20, 25] = 255
    masks[2][10:12, 30:40] = 1
    maps = [(rng.random((40, 50)) + 0.4 * (g > 0)).astype(np.float16).astype(np.float32) for g in masks]
    expected = reference_au_pro(maps, masks, 0.3)
    typed = [g.astype(dtype) for g in masks]
    assert au_pro(maps, typed, fpr_limit=0.3) == pytest.approx(expected, abs=1e-12)
    metric = AUPRO(fpr_limit=0.3)
    metric.update(np.stack(maps), np.stack(typed))  # numpy batches are accepted too
    assert metric.compute().item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.gpu
def test_device_path_equals_cpu_path() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    maps, masks = random_case(5, n_images=4, levels=16)
    mt, gt = torch.from_numpy(np.stack(maps)).cuda(), torch.from_numpy(np.stack(masks)).cuda()
    metric = AUPRO().cuda()
    metric.update(mt, gt)
    assert metric.compute().item() == pytest.approx(au_pro(maps, masks), abs=1e-12)
    assert au_pro(mt, gt) == pytest.approx(au_pro(maps, masks), abs=1e-12)
