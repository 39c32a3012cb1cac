"""CPR torch model, foreground, loss and a short Lightning fit (tiny preset, CPU)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from hybridad.errors import UserError
from hybridad.models.cpr.config import CprConfig
from hybridad.models.cpr.foreground import Foreground, lda_direction, seed_regions
from hybridad.models.cpr.loss import (
    hinge_cosine_loss,
    perlin_anomalies,
    remote_negative_weights,
    sample_pairs,
    sample_points,
)
from hybridad.gaussian import mirror_blur2d
from hybridad.image_scores import top_t_sum
from hybridad.models.cpr.torch_model import CprModel, DenseNetTrunk, LocalRetrievalHead


def tiny_cfg(**kw: object) -> CprConfig:
    base = dict(preset="tiny", image_size=64, out_dim=32, k_nearest=2, grb_samples=2000, feb_samples=2000,
                samples_per_image=256, kmeans_iters=10, kmeans_inits=1, n_pairs=32)  # fmt: skip
    base.update(kw)
    return CprConfig(**base)  # type: ignore[arg-type]


def test_densenet201_trunk_shapes_pruning_and_frozen() -> None:
    trunk = DenseNetTrunk("random")
    assert trunk.channels == (256, 512)
    assert sum(p.numel() for p in trunk.parameters()) == 1_297_536  # spec 1.1: kept modules only
    trunk.train()
    assert not trunk.training and not any(m.training for m in trunk.modules())
    f1, f2 = trunk(torch.rand(1, 3, 64, 64))
    assert f1.shape == (1, 256, 16, 16) and f2.shape == (1, 512, 8, 8)
    assert not any(p.requires_grad for p in trunk.parameters())


def test_lrb_head_layout() -> None:
    heads = [LocalRetrievalHead(256, 384), LocalRetrievalHead(512, 384)]
    assert sum(p.numel() for h in heads for p in h.parameters()) == 494_656  # spec 1.3
    h = heads[0]
    assert h.reduce.weight.shape == (192, 256, 1, 1) and h.reduce.bias is not None and h.bn.eps == 1e-5
    shapes = {n: tuple(p.shape) for n, p in h.mixed.named_parameters() if n.endswith("conv.weight")}
    assert shapes == {"b0.conv.weight": (64, 192, 1, 1), "b1a.conv.weight": (48, 192, 1, 1),
                      "b1b.conv.weight": (64, 48, 3, 3), "b2.conv.weight": (64, 192, 1, 1),
                      "b3.conv.weight": (64, 192, 1, 1)}  # fmt: skip
    assert all(m.eps == 1e-3 for m in h.mixed.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert all(m.conv.bias is None for m in (h.mixed.b0, h.mixed.b1a, h.mixed.b1b, h.mixed.b2, h.mixed.b3))
    assert h.proj.weight.shape == (384, 256, 1, 1)
    assert h(torch.randn(2, 256, 5, 5)).shape == (2, 384, 5, 5)


def test_model_forward_shapes_and_gradients_only_on_heads() -> None:
    model = CprModel(tiny_cfg())
    model.train()
    descs, raws = model(torch.rand(2, 3, 64, 64))
    assert [tuple(d.shape) for d in descs] == [(2, 32, 16, 16), (2, 32, 8, 8)]
    assert [tuple(f.shape) for f in raws] == [(2, 32, 16, 16), (2, 32, 8, 8)]
    (descs[0].sum() + descs[1].sum()).backward()
    assert all(p.grad is not None for p in model.heads.parameters())
    assert all(p.grad is None for p in model.trunk.parameters())
    assert not model.trunk.training


def test_blur_matches_direct_2d_mirror_convolution() -> None:
    g = torch.Generator().manual_seed(0)
    m = torch.rand(1, 1, 40, 37, generator=g, dtype=torch.float64)
    x = np.arange(-16, 17)
    k1 = np.exp(-(x**2) / 32.0)
    k2 = np.outer(k1, k1) / k1.sum() ** 2
    want = ndimage.correlate(m[0, 0].numpy(), k2, mode="mirror")  # mirror = edge pixel not repeated
    got = mirror_blur2d(m, 33, 4.0)[0, 0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert top_t_sum(torch.arange(10.0).view(1, 1, 2, 5), 3).item() == 9 + 8 + 7


def test_hinge_loss_and_remote_weights_hand_computed() -> None:
    loss = hinge_cosine_loss(
        torch.tensor([0.5, 0.9, 0.0]), torch.tensor([1.0, 1.0, 0.0]),
        torch.tensor([0.0, -0.5, 0.3]), torch.tensor([2.0, 1.0, 0.0]),
    )  # fmt: skip
    # pos: (1 * 0.3)^3 / 2 ; neg: (2 * 0.2)^3 / 2 (w^3 detail, spec 10.11; -0.5 < m- contributes 0)
    assert math.isclose(loss.item(), 0.3**3 / 2 + 0.4**3 / 2, rel_tol=1e-5)
    w = remote_negative_weights(torch.tensor([[1.0, 3.0, 5.0]]), torch.tensor([[1.0, 1.0, 0.0]]))
    torch.testing.assert_close(w, torch.tensor([[0.5, 1.5, 0.0]]), atol=1e-6, rtol=0)
    zero = hinge_cosine_loss(torch.ones(2), torch.zeros(2), torch.ones(2), torch.zeros(2))
    assert zero.item() == 0.0  # empty sets: denominators max(1, 0)


def test_pair_sampling_respects_mask_distance_and_texture() -> None:
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(2, 1, 32, 32)
    mask[0, :, 8:16, 8:16] = 1
    fg = torch.zeros(2, 1, 32, 32)
    fg[:, :, 4:28, 4:28] = 1
    pairs = sample_pairs(mask, fg, n=40, generator=g)
    pos = pairs.pos_q.long()
    assert torch.equal(pairs.pos_q, pairs.pos_r) and pairs.pos_w.sum() == 80
    assert mask[0, 0, pos[0, :, 1], pos[0, :, 0]].sum() == 0  # positives avoid the anomaly
    assert fg[0, 0, pos[0, :, 1], pos[0, :, 0]].min() == 1  # ... and stay on the foreground
    ok = pairs.rem_v > 0
    assert ((pairs.rem_q - pairs.rem_r).norm(dim=-1)[ok] > 4 * math.sqrt(2)).all() and ok.sum() > 60
    ano = pairs.ano_q.long()
    assert pairs.ano_w[0].sum() == 40 and pairs.ano_w[1].sum() == 0  # sample 1 has no anomaly
    assert mask[0, 0, ano[0, :, 1], ano[0, :, 0]].min() == 1
    assert len(set((ano[0, :, 1] * 32 + ano[0, :, 0]).tolist())) == 40  # without replacement
    assert sample_pairs(mask, None, n=10, remote=False, generator=g).rem_v.sum() == 0


def test_sample_points_official_normalisation() -> None:
    feat = torch.arange(16.0).view(1, 1, 4, 4)
    # p / (S-1) * 2 - 1 with align_corners=False: pixel (0, 0) of a 4x4 image reads the corner at half weight
    got = sample_points(feat, torch.tensor([[[0.0, 0.0], [1.5, 1.5]]]), 4)
    assert got.shape == (1, 2, 1)
    assert math.isclose(got[0, 0, 0].item(), 0.0 * 0.25, abs_tol=1e-6)
    assert math.isclose(got[0, 1, 0].item(), 7.5, abs_tol=1e-5)  # centre of the grid: mean of cells 5, 6, 9, 10


def test_sample_points_equals_grid_sample_values_and_gradients() -> None:
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(2, 5, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)
    xy = torch.rand(2, 50, 2, generator=g, dtype=torch.float64) * 33 - 0.5  # S = 32, a few points off the grid
    xy[0, :4] = torch.tensor([[0.0, 0.0], [31.0, 31.0], [31.0, 0.0], [15.5, 15.5]], dtype=torch.float64)
    got = sample_points(feat, xy, 32)
    want = torch.nn.functional.grid_sample(feat, (xy / 31 * 2 - 1)[:, None], mode="bilinear",
                                           align_corners=False)[:, :, 0].transpose(1, 2)  # fmt: skip
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    weights = torch.randn(got.shape, generator=g, dtype=torch.float64)
    (grad_got,) = torch.autograd.grad((got * weights).sum(), feat)
    (grad_want,) = torch.autograd.grad((want * weights).sum(), feat)
    torch.testing.assert_close(grad_got, grad_want, atol=1e-12, rtol=0)


def test_foreground_lda_on_two_clusters() -> None:
    g = torch.Generator().manual_seed(0)
    n, c, h, w = 4, 6, 20, 20
    feat = 0.3 * torch.randn(n, c, h, w, generator=g)
    obj = torch.zeros(h, w, dtype=torch.bool)
    obj[5:15, 5:15] = True
    feat[:, 0] += torch.where(obj, 2.0, -2.0)  # object vs background along dim 0
    band, centre = seed_regions(h, w, 3 / 20, 1 / 5)
    assert band.sum() == 20 * 20 - 14 * 14 and centre.sum() == 8 * 8
    cells = feat.permute(0, 2, 3, 1)  # (N, H, W, C)
    fgm = Foreground(c)
    fgm.fit(cells.reshape(-1, c), cells[:, band].reshape(-1, c), cells[:, centre].reshape(-1, c),
            generator=torch.Generator().manual_seed(1))  # fmt: skip
    maps = fgm.set_range(fgm.decision(feat))
    assert maps[:, 0, obj].min() > maps[:, 0, ~obj].max()  # perfectly separated
    assert maps[:, 0, obj].mean() > 0.8 and maps[:, 0, ~obj].mean() < 0.2
    assert maps.min() == 0 and maps.max() == 1  # robust min-max saturates the 1 % tails
    torch.testing.assert_close(fgm(feat), maps)  # folded 1x1 conv == scaled decisions
    # LDA direction with isotropic covariance is the mean difference
    a = torch.randn(2000, 2, generator=g)
    b = torch.randn(2000, 2, generator=g) + torch.tensor([3.0, 1.0])
    wv, _ = lda_direction(a, b)
    cos = torch.nn.functional.cosine_similarity(wv.float(), torch.tensor([3.0, 1.0]), dim=0)
    assert cos > 0.99
    assert torch.equal(Foreground(c, enabled=False)(feat), torch.ones(n, 1, h, w))


def test_memory_bank_on_cpu_vs_device_same_maps() -> None:
    torch.manual_seed(0)
    images = torch.rand(6, 3, 64, 64)
    on_dev = CprModel(tiny_cfg())
    on_cpu = CprModel(tiny_cfg(bank_budget_bytes=0))
    on_cpu.load_state_dict(on_dev.state_dict())
    for m in (on_dev, on_cpu):
        m.build_memory_bank(images)
    assert on_dev.bank[0].dtype == torch.float32 and on_cpu.bank[0].device.type == "cpu"
    assert on_dev.bank_fg is not None and on_dev.bank_fg.dtype == torch.float32
    assert torch.equal(on_dev.train_neighbours, on_cpu.train_neighbours)
    assert not (on_dev.train_neighbours == torch.arange(6)[:, None]).any()  # self excluded
    q = torch.rand(2, 3, 64, 64)
    maps = on_dev.tile_maps(q)
    assert maps.shape == (2, 1, 64, 64) and torch.isfinite(maps).all() and maps.min() >= 0
    torch.testing.assert_close(maps, on_cpu.tile_maps(q))
    # a training image scored against its neighbours (self excluded) vs against itself (distance ~0)
    own = on_dev.tile_maps(images[:1], exclude=torch.tensor([-1]))
    assert own.max() < 1e-2
    assert on_dev.image_scores(maps).shape == (2,)
    assert on_dev.bank_bytes_per_image() == (32 * (16 * 16 + 8 * 8)) * 4 + 16 * 16 * 4 + 25 * 13 * 4


def test_store_dtype_float16_halves_descriptors_and_stays_close() -> None:
    torch.manual_seed(0)
    images = torch.rand(6, 3, 64, 64)
    full = CprModel(tiny_cfg())
    half = CprModel(tiny_cfg(store_dtype="float16"))
    half.load_state_dict(full.state_dict())
    for m in (full, half):
        m.build_memory_bank(images)
    assert half.bank[0].dtype == torch.float16
    assert half.bank_fg is not None and half.bank_fg.dtype == torch.float32
    assert full.bank_bytes_per_image() - half.bank_bytes_per_image() == 32 * (16 * 16 + 8 * 8) * 2
    q = torch.rand(2, 3, 64, 64)
    diff = (full.tile_maps(q) - half.tile_maps(q)).abs().max().item()
    assert 0 < diff < 5e-3  # float16 rounding of unit vectors (2^-11 relative) summed over two scales
    with pytest.raises(UserError, match="cpr.store_dtype"):
        CprModel(tiny_cfg(store_dtype="bfloat16"))


def test_local_retrieval_against_given_references_matches_brute_force() -> None:
    from hybridad.models.cpr.retrieval import l2_normalise, local_nn_distance

    torch.manual_seed(0)
    images = torch.rand(5, 3, 64, 64)
    model = CprModel(tiny_cfg(foreground=False)).eval()  # eval: the heads' BN use running statistics
    model.build_memory_bank(images)
    refs = torch.tensor([[1, 3], [4, 0]])
    q = torch.rand(2, 3, 64, 64)
    got = model.local_retrieval(q, refs)
    # brute force: descriptors of query and references straight from the heads, summed over the two scales
    with torch.no_grad():
        fq = model.trunk(model.preprocess(q))
        fr = model.trunk(model.preprocess(images))
        want = torch.zeros(2, 1, 16, 16)
        for s, window in enumerate((3, 1)):
            dq = l2_normalise(model.heads[s](fq[s]))
            dr = l2_normalise(model.heads[s](fr[s]))[refs]  # (2, K, D, h, w)
            d = local_nn_distance(dq, dr, window)
            want += torch.nn.functional.interpolate(d, size=(16, 16), mode="bilinear", align_corners=False)
    want = torch.nn.functional.interpolate(want, size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert model.local_retrieval(images[1:2], torch.tensor([[1]])).abs().max() < 1e-5  # itself: distance 0
    # without foreground and blur, the full map with the same references is the local retrieval result
    torch.testing.assert_close(model.tile_maps(q, references=refs), got)
    nbrs = model.grb.neighbours(model.grb.histograms(fq[0]), model.cfg.k_nearest)
    torch.testing.assert_close(model.tile_maps(q), model.local_retrieval(q, nbrs))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_memory_bank_cuda_matches_cpu() -> None:
    torch.manual_seed(0)
    images = torch.rand(6, 3, 64, 64)
    cpu = CprModel(tiny_cfg())
    gpu = CprModel(tiny_cfg(bank_budget_bytes=0)).cuda()
    gpu.load_state_dict(cpu.state_dict())
    cpu.build_memory_bank(images)
    gpu.build_memory_bank(images)
    q = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(gpu.tile_maps(q.cuda()).cpu(), cpu.tile_maps(q), atol=1e-4, rtol=1e-3)


def test_perlin_anomalies_blend_inside_mask_only() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.rand(4, 3, 64, 64, generator=g)
    out, mask = perlin_anomalies(x, None, g, anomaly_ratio=1.0)
    assert out.shape == x.shape and mask.shape == (4, 1, 64, 64)
    assert set(mask.unique().tolist()) <= {0.0, 1.0} and mask.sum() > 0
    assert torch.equal(out * (1 - mask), x * (1 - mask))
    fg = torch.zeros(4, 1, 64, 64)
    _, none = perlin_anomalies(x, fg, g, anomaly_ratio=1.0)
    assert none.sum() == 0  # masks restricted to the foreground


def test_lightning_fit_few_steps() -> None:
    import lightning as L
    from torch.utils.data import DataLoader

    from hybridad.models.cpr.lightning_model import Cpr
    from hybridad.types import Batch

    torch.manual_seed(0)
    images = torch.rand(8, 3, 64, 64)
    ids = [f"train/good/{i:03d}" for i in range(8)]

    def collate(idx: list[int]) -> Batch:
        mask = torch.zeros(len(idx), 1, 64, 64)
        mask[0, :, 20:30, 20:30] = 1
        x = images[idx].clone()
        x[0, :, 20:30, 20:30] = 1 - x[0, :, 20:30, 20:30]
        return Batch(image=x, label=torch.zeros(len(idx), dtype=torch.long),
                     sample_id=[ids[i] for i in idx], lighting=["regular"] * len(idx), mask=mask,
                     split=["train"] * len(idx))  # fmt: skip

    for synthesis in ("cut_paste", "perlin"):
        module = Cpr(tiny_cfg(synthesis=synthesis))
        module.fit_references((images * 255).round().to(torch.uint8), ids)
        before = [p.detach().clone() for p in module.model.heads.parameters()]
        trunk_before = [p.detach().clone() for p in module.model.trunk.parameters()]
        trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
        trainer.fit(module, DataLoader(list(range(8)), batch_size=4, shuffle=True, collate_fn=collate))
        assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
        assert any(not torch.equal(a, b) for a, b in zip(before, module.model.heads.parameters()))
        assert all(torch.equal(a, b) for a, b in zip(trunk_before, module.model.trunk.parameters()))
        assert not module._bank_stale and module.model.bank[0].shape == (8, 32, 16, 16)  # rebuilt on fit end
        maps = module.tile_maps(torch.rand(2, 3, 64, 64))
        assert maps.shape == (2, 1, 64, 64)
        scores = module.image_score(torch.nn.functional.interpolate(maps, size=(96, 80)))
        assert scores.shape == (2,) and torch.isfinite(scores).all()


# ------------------------------------------------------------------ training makes pseudo-anomalies stand out
SIZE = 48


def _normals(n: int, base: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Aligned normal images: one smooth colour pattern, pixel noise 0.03, brightness x U(0.8, 1.2)."""
    x = base + 0.03 * torch.randn(n, 3, SIZE, SIZE, generator=g)
    return (x * (0.8 + 0.4 * torch.rand(n, 1, 1, 1, generator=g))).clamp(0, 1)


def _paste_checker(x: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One square of a +-0.06 one-pixel checkerboard per image (side 8-15 px): a faint texture defect."""
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    checker = ((yy + xx) % 2 * 2 - 1).float()  # (S, S) +-1
    mask = torch.zeros(x.shape[0], 1, SIZE, SIZE)
    for i in range(x.shape[0]):
        side = int(torch.randint(SIZE // 6, SIZE // 3, (1,), generator=g))
        y0, x0 = (int(v) for v in torch.randint(0, SIZE - side, (2,), generator=g))
        mask[i, :, y0 : y0 + side, x0 : x0 + side] = 1
    return (x + 0.06 * checker * mask).clamp(0, 1), mask


def test_training_makes_pseudo_anomalous_pixels_score_above_normal_ones(one_thread: None) -> None:
    import lightning as L
    from torch.utils.data import DataLoader
    from torchmetrics.functional.classification import binary_auroc

    from hybridad.models.cpr.lightning_model import Cpr
    from hybridad.types import Batch

    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(1, 3, 8, 8, generator=g)
    base = torch.nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bicubic")
    base = base.clamp(0.2, 0.8)
    train = _normals(12, base, g)
    ids = [f"train/good/{i:03d}" for i in range(12)]
    held_out = _normals(8, base, torch.Generator().manual_seed(5))
    test_x, test_mask = _paste_checker(held_out, torch.Generator().manual_seed(6))
    paste_gen = torch.Generator().manual_seed(1)

    def collate(idx: list[int]) -> Batch:
        x, mask = _paste_checker(train[idx], paste_gen)
        return Batch(image=x, label=torch.ones(len(idx), dtype=torch.long), sample_id=[ids[i] for i in idx],
                     lighting=["regular"] * len(idx), mask=mask, split=["train"] * len(idx))  # fmt: skip

    torch.manual_seed(0)
    module = Cpr(tiny_cfg(image_size=SIZE, foreground=False, n_pairs=64))
    module.fit_references((train * 255).round().to(torch.uint8), ids)

    def pixel_auroc() -> tuple[float, float]:
        module.model.build_memory_bank(module._ref_images)
        maps = module.tile_maps(test_x)
        inside, outside = maps[test_mask > 0].mean(), maps[test_mask == 0].mean()
        return binary_auroc(maps.flatten(), test_mask.flatten().long()).item(), float(inside / outside)

    untrained, untrained_contrast = pixel_auroc()
    trainer = L.Trainer(max_steps=200, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    sampler = torch.utils.data.RandomSampler(range(12), replacement=True, num_samples=800,
                                             generator=torch.Generator().manual_seed(2))  # fmt: skip
    trainer.fit(module, DataLoader(list(range(12)), batch_size=4, sampler=sampler, collate_fn=collate))
    trained, trained_contrast = pixel_auroc()
    # measured (200 steps): pixel AUROC 0.878 untrained -> 0.985 trained; mean inside / outside 1.73 -> 7.28
    assert trained > 0.95 and trained > untrained + 0.05, (untrained, trained)
    assert trained_contrast > 3.0 and trained_contrast > 1.5 * untrained_contrast


def _fitted_tiny_cpr_and_batch(monkeypatch: pytest.MonkeyPatch):
    """A tiny CPR fitted on 6 seeded random 32 px references (logging off) and a batch of the first two."""
    from hybridad.models.cpr.lightning_model import Cpr
    from hybridad.types import Batch

    torch.manual_seed(0)
    images = torch.rand(6, 3, 32, 32)
    ids = [f"train/good/{i:03d}" for i in range(6)]
    module = Cpr(tiny_cfg(image_size=32))
    module.fit_references(images, ids)
    monkeypatch.setattr(module, "log", lambda *a, **k: None)
    batch = Batch(image=images[:2], label=torch.zeros(2, dtype=torch.long), sample_id=ids[:2],
                  lighting=["regular"] * 2, split=["train"] * 2)
    return module, batch


def test_pair_generator_depends_on_the_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    from hybridad.models.cpr.lightning_model import Cpr
    from hybridad.training_seed import micro_batch_seed

    assert len({micro_batch_seed(1, step, rank) for step in range(50) for rank in range(8)}) == 400
    module, batch = _fitted_tiny_cpr_and_batch(monkeypatch)

    def loss_on_rank(rank: int) -> float:
        monkeypatch.setattr(Cpr, "global_rank", property(lambda self: rank))
        torch.manual_seed(0)
        module.model.heads.train()
        return float(module.training_step(batch, 0).detach())

    assert loss_on_rank(0) == loss_on_rank(0)
    assert loss_on_rank(0) != loss_on_rank(1)  # other references, noise and pairs on another rank


def test_every_micro_batch_of_an_accumulation_window_draws_its_own_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    """accumulate_grad_batches > 1: the optimiser step (global_step) stays fixed over the window, the draws
    (reference pick, noise, pairs) must not; the same micro-batch index gives the same draws."""
    from types import SimpleNamespace

    module, batch = _fitted_tiny_cpr_and_batch(monkeypatch)

    def loss_at(micro_batch: int) -> float:
        progress = SimpleNamespace(total=SimpleNamespace(completed=micro_batch))
        module._trainer = SimpleNamespace(global_step=7, global_rank=0, fit_loop=SimpleNamespace(
            epoch_loop=SimpleNamespace(batch_progress=progress)))
        torch.manual_seed(0)
        module.model.heads.train()
        try:
            return float(module.training_step(batch, 0).detach())
        finally:
            module._trainer = None

    assert loss_at(14) == loss_at(14)
    assert loss_at(14) != loss_at(15)


def test_reference_store_holds_every_tile_of_a_2x2_grid_from_whole_clean_images(tmp_path) -> None:
    """With a 2x2 training grid every tile of every training image is stored (not only the top-left one),
    cut from the whole un-augmented image, and a training query finds its own tile's entry."""
    import torch.nn.functional as F
    from test_data_layer import H, W, make_tree  # tests/unit is on sys.path

    from data_modules.augment import AugmentConfig
    from data_modules.datamodule import DataConfig, MVTecAD2DataModule
    from data_modules.listing import list_samples, read_image
    from data_modules.tilers import TilingConfig
    from hybridad.models.cpr.lightning_model import Cpr, reference_key
    from hybridad.tile_grid import TileLevel, level_boxes

    root = make_tree(tmp_path / "data", n_train=3)
    tiling = TilingConfig(input_size=32, train_levels=[TileLevel(2, 2)], test_level=TileLevel(2, 2))
    augment = AugmentConfig(hflip=1.0)  # training crops are flipped: references must not be
    dm = MVTecAD2DataModule(DataConfig(root=str(root), category="can", num_workers=0, tiling=tiling,
                                       augment=augment, cache_dir=str(tmp_path / "cache")))
    module = Cpr(tiny_cfg(image_size=32))
    module.fit_references_from(dm)
    boxes = level_boxes(H, W, TileLevel(2, 2))
    samples = list_samples(root, "can", "train")
    assert module._ref_images is not None and module._ref_images.shape == (3 * 4, 3, 32, 32)
    for i, sample in enumerate(samples):
        image = torch.from_numpy(read_image(sample.image_path)).permute(2, 0, 1)  # (3,H,W) uint8
        for y0, x0, y1, x1 in boxes:
            crop = image[None, :, y0:y1, x0:x1].float()
            expected = F.interpolate(crop, size=(32, 32), mode="bilinear", align_corners=False)
            expected = expected.round().to(torch.uint8)
            index = module._ref_index[reference_key(sample.sample_id, (y0, x0, y1, x1))]
            assert torch.equal(module._ref_images[index], expected[0])
    ids = [samples[1].sample_id] * 2
    tile_boxes = torch.tensor([boxes[3], boxes[2]])
    src, _ = module._reference_for(torch.rand(2, 3, 32, 32), ids, torch.Generator().manual_seed(0), tile_boxes)
    assert src.tolist() == [module._ref_index[reference_key(ids[0], tuple(b))] for b in tile_boxes.tolist()]


def test_checkpoints_load_with_weights_only(tmp_path) -> None:
    """A resume reads last.ckpt with torch.load(weights_only=True): the hyper-parameters are plain values."""
    import lightning as L

    from hybridad.models.cpr.lightning_model import Cpr

    module = Cpr(tiny_cfg(image_size=32))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, max_steps=0)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    ckpt = torch.load(tmp_path / "c.ckpt", map_location="cpu", weights_only=True)
    assert Cpr(**ckpt["hyper_parameters"]).cfg == module.cfg
