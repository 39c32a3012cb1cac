"""INP-Former losses, StableAdamW and the warm-up + cosine schedule against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from hybridad.models.inp_former.loss import InpFormerLoss, inp_coherence_loss, soft_mining_cosine_loss
from hybridad.models.inp_former.optim import StableAdamW, warmup_cosine, warmup_cosine_scheduler
from hybridad.models.inp_former.torch_model import InpFormerOutput


def test_soft_mining_value_hand_computed() -> None:
    # one image, 2 channels, 1x2 positions: e = [(1,0), (0,1)], r = [(1,0), (1,1)] per position
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 2)  # (B,C,h,w): channel 0 = (1,0), channel 1 = (0,1)
    r = torch.tensor([[1.0, 1.0], [0.0, 1.0]]).view(1, 2, 1, 2)
    # flattened: e = (1,0,0,1), r = (1,1,0,1): cos = 2 / (sqrt2 * sqrt3)
    expected = 1 - 2 / math.sqrt(6)
    assert soft_mining_cosine_loss([e], [r]).item() == pytest.approx(expected, abs=1e-7)
    # two groups are averaged
    assert soft_mining_cosine_loss([e, e], [r, e]).item() == pytest.approx(expected / 2, abs=1e-7)


def test_soft_mining_gradient_is_reweighted() -> None:
    torch.manual_seed(0)
    B, C, h, w, gamma = 2, 5, 3, 4, 3.0
    enc = [torch.randn(B, C, h, w, dtype=torch.float64) for _ in range(2)]
    dec = [torch.randn(B, C, h, w, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    loss = soft_mining_cosine_loss(enc, dec, gamma)
    loss.backward()
    assert loss.item() == pytest.approx(soft_mining_cosine_loss(enc, [d.detach() for d in dec], 0.0).item())
    for e, r_param in zip(enc, dec):
        r = r_param.detach()
        # explicit gradient of (1/G)(1/B) sum_b [1 - <e_b, r_b> / (|e_b| |r_b|)] w.r.t. r_b
        ef, rf = e.reshape(B, -1), r.reshape(B, -1)
        ne, nr = ef.norm(dim=1, keepdim=True), rf.norm(dim=1, keepdim=True)
        dot = (ef * rf).sum(1, keepdim=True)
        plain = -(ef / (ne * nr) - dot * rf / (ne * nr**3)) / (2 * B)
        # weight from the per-position channel cosine distance
        d = 1 - (e * r).sum(1, keepdim=True) / (e.norm(dim=1, keepdim=True) * r.norm(dim=1, keepdim=True))
        weight = (d / d.mean()) ** gamma  # (B,1,h,w)
        expected = plain.view(B, C, h, w) * weight
        torch.testing.assert_close(r_param.grad, expected, rtol=1e-10, atol=1e-14)


def test_coherence_hand_computed_and_grad_only_to_inps() -> None:
    f = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], requires_grad=True)  # (B=1,N=2,D=2)
    p = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]], requires_grad=True)  # (B=1,M=2,D=2)
    # token 0 matches INP 0 exactly; token 1 is closest to INP 1: 1 - 1/sqrt2
    loss = inp_coherence_loss(f, p)
    assert loss.item() == pytest.approx((1 - 1 / math.sqrt(2)) / 2, abs=1e-7)
    loss.backward()
    assert f.grad is None and p.grad is not None


def test_total_loss_weights() -> None:
    torch.manual_seed(1)
    enc = [torch.randn(2, 4, 2, 2) for _ in range(2)]
    dec = [torch.randn(2, 4, 2, 2) for _ in range(2)]
    fused, inps = torch.randn(2, 4, 4), torch.randn(2, 3, 4)
    out = InpFormerOutput(enc, dec, fused, inps, torch.zeros(2, 4, 3))
    losses = InpFormerLoss(coherence_weight=0.2)(out)
    cos = soft_mining_cosine_loss(enc, dec)
    coh = inp_coherence_loss(fused, inps)
    torch.testing.assert_close(losses["loss"], cos + 0.2 * coh)


# --- StableAdamW ----------------------------------------------------------------------------------------------------


def reference_stable_adamw(params, grads_per_step, lrs, betas, eps, wd, amsgrad, clip):
    """The equations of the official StableAdamW, written out in float64."""
    b1, b2 = betas
    params = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    vmax = [torch.zeros_like(p) for p in params]
    for t, (grads, lr) in enumerate(zip(grads_per_step, lrs), start=1):
        for i, g in enumerate(grads):
            params[i] = params[i] * (1 - lr * wd)
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            vmax[i] = torch.maximum(vmax[i], v[i])
            vhat = vmax[i] if amsgrad else v[i]
            denom = torch.sqrt(vhat) / math.sqrt(1 - b2**t) + eps
            rms = torch.sqrt(torch.mean((g / denom) ** 2)).item()
            lr_eff = lr / (1 - b1**t) / max(1.0, rms / clip)
            params[i] = params[i] - lr_eff * m[i] / denom
    return params


@pytest.mark.parametrize(
    "steps,amsgrad,clip,wd,eps",
    [(1, True, 1.0, 1e-4, 1e-10), (6, True, 1.0, 1e-4, 1e-10), (6, False, 0.5, 1e-2, 1e-8), (4, True, 0.3, 0.1, 1e-8)],
)
def test_stable_adamw_matches_reference(steps: int, amsgrad: bool, clip: float, wd: float, eps: float) -> None:
    gen = torch.Generator().manual_seed(steps)
    shapes = [(3, 4), (5,), (2, 2, 2)]
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) * (t + 1) for s in shapes] for t in range(steps)]
    lrs = [0.0] + [1e-2 * (t + 1) for t in range(steps - 1)]  # first step at lr 0, as the warm-up does
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = StableAdamW(params, lr=1.0, betas=(0.9, 0.999), eps=eps, weight_decay=wd, amsgrad=amsgrad, clip_threshold=clip)
    for grads_t, lr in zip(grads, lrs):
        for p, g in zip(params, grads_t):
            p.grad = g.clone()
        opt.param_groups[0]["lr"] = lr
        opt.step()
    ref = reference_stable_adamw(init, grads, lrs, (0.9, 0.999), eps, wd, amsgrad, clip)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r, rtol=0, atol=1e-12)
    if steps == 1:  # lr 0: parameters unchanged but moments advanced
        assert all(torch.equal(p.detach(), i) for p, i in zip(params, init))
        assert opt.state[params[0]]["step"] == 1 and opt.state[params[0]]["exp_avg"].abs().sum() > 0


def test_stable_adamw_class_defaults() -> None:
    opt = StableAdamW([torch.nn.Parameter(torch.zeros(1))])
    d = opt.defaults
    assert (d["lr"], d["eps"], d["weight_decay"], d["amsgrad"], d["clip_threshold"]) == (1e-3, 1e-8, 1e-2, False, 1.0)


# --- schedule -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "step,expected",
    [
        (0, 0.0),
        (5, 1e-3 * 5 / 9),  # linspace(0, 1e-3, 10)[5]
        (9, 1e-3),
        (10, 1e-3),  # cosine starts at the base lr
        (60, 1e-4 + 0.5 * 9e-4),  # halfway: cos(pi/2) = 0
        (85, 1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 0.75))),
        (110, 1e-4),
        (500, 1e-4),
    ],
)
def test_warmup_cosine_points(step: int, expected: float) -> None:
    assert warmup_cosine(step, total=110, warmup=10, base_lr=1e-3, final_lr=1e-4) == pytest.approx(expected, abs=1e-15)


def test_warmup_cosine_no_warmup_and_scheduler() -> None:
    assert warmup_cosine(0, total=4, warmup=0, base_lr=1.0, final_lr=0.0) == pytest.approx(1.0)
    assert warmup_cosine(2, total=4, warmup=0, base_lr=1.0, final_lr=0.0) == pytest.approx(0.5)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1e-3)
    sched = warmup_cosine_scheduler(opt, total=110, warmup=10, base_lr=1e-3, final_lr=1e-4)
    seen = []
    for _ in range(61):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == 0.0 and seen[9] == pytest.approx(1e-3) and seen[60] == pytest.approx(5.5e-4)


@pytest.mark.parametrize("max_fraction,warmup", [(0.0, 100), (0.1, 18)])
def test_warmup_is_100_iterations_unless_capped_in_the_config(max_fraction: float, warmup: int) -> None:
    from types import SimpleNamespace

    from hybridad.config import load_config, to_yaml
    from hybridad.models.inp_former.config import InpFormerConfig
    from hybridad.models.inp_former.lightning_model import InpFormer

    # wallplugs: 293 images / batch 16 x 10 epochs = 180 steps against the official 100-iteration warm-up
    cfg = InpFormerConfig(preset="tiny", tiny_depth=2, num_inps=2, warmup_max_fraction=max_fraction)
    module = InpFormer(cfg)
    module._trainer = SimpleNamespace(estimated_stepping_batches=180)  # what configure_optimizers reads
    factor = module.configure_optimizers()["lr_scheduler"]["scheduler"].lr_lambdas[0]
    assert factor(warmup - 1) == pytest.approx(1.0)
    assert factor(warmup // 2) == pytest.approx((warmup // 2) / (warmup - 1))
    assert factor(warmup + 40) < 1.0  # cosine decay after the warm-up
    overrides = ["data.category=wallplugs", f"inp_former.warmup_max_fraction={max_fraction}"]
    resolved = to_yaml(load_config(overrides))
    assert "warmup_steps: 100" in resolved and f"warmup_max_fraction: {max_fraction}" in resolved


def test_stable_adamw_chunks_cover_every_parameter_once() -> None:
    from hybridad.models.inp_former.optim import _chunks

    params = [torch.zeros(n) for n in (3, 5, 2, 9, 1, 1)]
    chunks = _chunks(params, 6)
    assert [[p.numel() for p in c] for c in chunks] == [[3], [5], [2], [9], [1, 1]]
    assert [id(p) for c in chunks for p in c] == [id(p) for p in params]
    assert [[p.numel() for p in c] for c in _chunks(params, 100)] == [[3, 5, 2, 9, 1, 1]]


def test_stable_adamw_chunked_matches_reference(monkeypatch) -> None:
    import hybridad.models.inp_former.optim as optim

    monkeypatch.setattr(optim, "CHUNK_ELEMENTS", 7)  # several chunks on the small shapes below
    test_stable_adamw_matches_reference(6, True, 1.0, 1e-4, 1e-10)
