"""INP-Former torch model and Lightning system on a tiny random-init ViT-S/14."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hybridad.errors import UserError
from hybridad.models.inp_former.config import InpFormerConfig
from hybridad.models.inp_former.loss import InpFormerLoss
from hybridad.models.inp_former.torch_model import InpFormerModel, interpolate_pos_dinov2


def tiny_cfg(**kw) -> InpFormerConfig:
    return InpFormerConfig(preset="tiny", tiny_depth=2, num_inps=3, **kw)


@pytest.fixture(scope="module")
def model() -> InpFormerModel:
    torch.manual_seed(0)
    return InpFormerModel.from_config(tiny_cfg())


@pytest.mark.parametrize("size", [(42, 42), (56, 28)])
def test_shapes_and_finite(model: InpFormerModel, size: tuple[int, int]) -> None:
    x = torch.rand(2, 3, *size)
    out = model(x)
    h, w = size[0] // 14, size[1] // 14
    assert len(out.encoder) == len(out.decoder) == 2
    for t in out.encoder + out.decoder:
        assert t.shape == (2, 384, h, w) and torch.isfinite(t).all()
    assert out.fused.shape == (2, h * w, 384)
    assert out.inps.shape == (2, 3, 384)
    assert out.inp_attention.shape == (2, h * w, 3)
    amap = model.tile_maps(x)
    assert amap.shape == (2, 1, *size) and torch.isfinite(amap).all()


def test_tiny_taps_every_block_and_groups(model: InpFormerModel) -> None:
    assert model.tapped_layers == [0, 1] and len(model.decoder) == 2 and len(model.encoder.blocks) == 2


def test_input_not_multiple_of_14(model: InpFormerModel) -> None:
    with pytest.raises(UserError, match="multiple of 14"):
        model(torch.rand(1, 3, 40, 42))


def test_encoder_frozen_and_trainable_parts_get_grads() -> None:
    m = InpFormerModel.from_config(tiny_cfg()).train()
    assert not m.encoder.training and m.decoder.training
    losses = InpFormerLoss()(m(torch.rand(2, 3, 42, 42)))
    losses["loss"].backward()
    assert all(p.grad is None for p in m.encoder.parameters())
    names = [n for n, _ in m.named_parameters() if not n.startswith("encoder.")]
    assert set(names) == {n for n, p in m.named_parameters() if p.requires_grad}
    for n, p in m.named_parameters():
        if not n.startswith("encoder."):
            assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_default_taps_per_size() -> None:
    # base/large defaults from the official code (no model build needed beyond a 1-block probe)
    from hybridad.models.inp_former.torch_model import DEFAULT_TAPS

    assert DEFAULT_TAPS["base"] == list(range(2, 10))
    assert DEFAULT_TAPS["large"] == list(range(4, 19, 2))


def _bicubic_matrix(n_in: int, n_out: int, scale: float) -> np.ndarray:
    """PyTorch bicubic (a=-0.75, align_corners=False, border clamp) as an (n_out, n_in) matrix, given scale."""
    a = -0.75

    def k(t: float) -> float:
        t = abs(t)
        if t <= 1:
            return (a + 2) * t**3 - (a + 3) * t**2 + 1
        if t < 2:
            return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
        return 0.0

    mat = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) / scale - 0.5
        i0 = math.floor(src)
        frac = src - i0
        for j, off in enumerate(range(-1, 3)):
            mat[i, min(max(i0 + off, 0), n_in - 1)] += k(off - frac)
    return mat


def test_pos_embed_dinov2_matches_formula() -> None:
    torch.manual_seed(0)
    D, src = 4, 37
    pos = torch.randn(1, src * src, D)
    h, w = 8, 5
    out = interpolate_pos_dinov2(pos, (h, w), src)  # (1,h*w,D)
    grid = pos.reshape(src, src, D).double().numpy()  # (y,x,D)
    ry = _bicubic_matrix(src, h, (h + 0.1) / src)
    rx = _bicubic_matrix(src, w, (w + 0.1) / src)
    ref = np.einsum("ay,bx,yxd->abd", ry, rx, grid).reshape(1, h * w, D)
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-5)
    assert interpolate_pos_dinov2(pos, (37, 37), src) is pos  # 518x518: stored grid unchanged


def test_tokens_use_dinov2_pos_embed(model: InpFormerModel) -> None:
    enc = model.encoder
    x = torch.randn(1, 3, 42, 28)
    tokens = model._tokens(x)  # (1, 1+4+3*2, D)
    patches = enc.patch_embed(x).reshape(1, 6, -1) + interpolate_pos_dinov2(enc.pos_embed, (3, 2))
    ref = torch.cat([enc.cls_token, enc.reg_token, patches], dim=1)
    torch.testing.assert_close(tokens, ref, rtol=0, atol=0)
    timm_model = InpFormerModel.from_config(tiny_cfg(pos_embed="timm"))
    assert not torch.allclose(timm_model._tokens(x)[:, 5:], tokens[:, 5:], atol=1e-4)  # antialiased: differs


def _bilinear_align_corners(n_in: int, n_out: int) -> np.ndarray:
    mat = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = i * (n_in - 1) / (n_out - 1)
        i0 = min(int(math.floor(src)), n_in - 2)
        t = src - i0
        mat[i, i0] += 1 - t
        mat[i, i0 + 1] += t
    return mat


def test_anomaly_map_is_mean_one_minus_cos(model: InpFormerModel) -> None:
    x = torch.rand(2, 3, 42, 56)
    out = model(x)
    ry, rx = _bilinear_align_corners(3, 42), _bilinear_align_corners(4, 56)
    ref = 0
    for e, d in zip(out.encoder, out.decoder):
        e, d = e.detach().double().numpy(), d.detach().double().numpy()
        cos = (e * d).sum(1) / (np.linalg.norm(e, axis=1) * np.linalg.norm(d, axis=1))  # (B,h,w)
        ref = ref + np.einsum("ay,bx,nyx->nab", ry, rx, 1 - cos) / 2
    np.testing.assert_allclose(model.tile_maps(x)[:, 0].detach().numpy(), ref, atol=1e-5)


def test_exact_attention_mode_close_to_fused() -> None:
    fused = InpFormerModel.from_config(tiny_cfg())
    exact = InpFormerModel.from_config(tiny_cfg(fused_attn=False))
    exact.load_state_dict(fused.state_dict())
    assert not exact.encoder.blocks[0].attn.fused_attn
    x = torch.rand(1, 3, 42, 42)
    torch.testing.assert_close(exact.encode(x)[-1], fused.encode(x)[-1], atol=1e-4, rtol=1e-4)


def test_init_follows_spec() -> None:
    m = InpFormerModel.from_config(tiny_cfg())
    w = m.decoder[0].attn.q.weight
    assert w.abs().max() <= 0.03 and 0.005 < w.std() < 0.012
    assert (m.decoder[0].attn.q.bias == 0).all() and (m.decoder[0].attn.learn_scale == 1).all()
    assert (m.extractor.norm1.weight == 1).all() and m.extractor.norm1.eps == 1e-8
    assert 0.8 < m.inp_tokens.std() < 1.2


# --- Lightning system ---------------------------------------------------------------------------------------------


def _batch(n: int, size: int = 42, pasted: int = 0):
    from hybridad.types import Batch

    mask = torch.zeros(n, 1, size, size)
    mask[:pasted, :, :5, :5] = 1
    return Batch(
        image=torch.rand(n, 3, size, size),
        label=(mask.flatten(1).amax(1) > 0).long(),
        sample_id=[f"t{i}" for i in range(n)],
        split=["train"] * n,
        lighting=["regular"] * n,
        mask=mask,
    )


def _loader(n_batches: int = 3, bs: int = 2):
    from torch.utils.data import DataLoader

    data = [_batch(bs) for _ in range(n_batches)]
    return DataLoader(data, batch_size=None, collate_fn=lambda b: b)


def _trainer(tmp_path, **kw):
    import lightning as L

    args = dict(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    args.update(kw)
    return L.Trainer(**args)


@pytest.mark.parametrize("precision,steps", [("32-true", 3), ("bf16-mixed", 1)])
def test_lightning_fast_dev_run(tmp_path, precision: str, steps: int) -> None:
    from hybridad.models.inp_former.lightning_model import InpFormer

    module = InpFormer(tiny_cfg(warmup_steps=0))  # the official warm-up runs its first step at lr 0
    before = module.model.decoder[0].attn.q.weight.detach().clone()
    enc_before = module.model.encoder.blocks[0].attn.qkv.weight.detach().clone()
    trainer = _trainer(tmp_path, fast_dev_run=steps, precision=precision)
    trainer.fit(module, _loader())
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert not torch.equal(before, module.model.decoder[0].attn.q.weight)
    assert torch.equal(enc_before, module.model.encoder.blocks[0].attn.qkv.weight)
    opt = trainer.optimizers[0]
    params = {id(p) for g in opt.param_groups for p in g["params"]}
    assert params == {id(p) for p in module.model.trainable_parameters()}


def test_pasted_tiles_are_dropped() -> None:
    from hybridad.models.inp_former.lightning_model import InpFormer

    module = InpFormer(tiny_cfg())
    batch = _batch(3, pasted=1)
    loss = module.training_step(batch, 0)
    ref = module.loss_fn(module.model(batch.image[1:]))["loss"]
    torch.testing.assert_close(loss, ref)

def test_all_pasted_batch_still_runs_backward_with_zero_gradients() -> None:
    """Under DDP every rank must call backward each step: a batch whose tiles all got a paste gives a zero
    loss connected to every trainable parameter (all gradients exactly 0), not None."""
    from hybridad.models.inp_former.lightning_model import InpFormer

    module = InpFormer(tiny_cfg())
    loss = module.training_step(_batch(2, pasted=2), 0)
    assert isinstance(loss, torch.Tensor) and loss.requires_grad and float(loss.detach()) == 0.0
    loss.backward()
    params = list(module.model.trainable_parameters())
    assert params and all(p.grad is not None and not p.grad.any() for p in params)


def test_checkpoint_without_encoder_round_trip(tmp_path) -> None:
    from hybridad.models.inp_former.lightning_model import InpFormer

    module = InpFormer(tiny_cfg(encoder_seed=3))
    trainer = _trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(module, _loader(1))
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert not any(k.startswith("model.encoder.") for k in ckpt["state_dict"])
    assert any(k.startswith("model.decoder.") for k in ckpt["state_dict"])
    loaded = InpFormer.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    x = torch.rand(2, 3, 42, 42)
    module.eval()
    loaded.eval()
    torch.testing.assert_close(loaded.tile_maps(x), module.tile_maps(x), rtol=0, atol=0)
    # checkpoints written before the constructor argument was renamed `cfg` store it as `model`: still loaded
    ckpt["hyper_parameters"]["model"] = ckpt["hyper_parameters"].pop("cfg")
    torch.save(ckpt, tmp_path / "old.ckpt")
    old = InpFormer.load_from_checkpoint(tmp_path / "old.ckpt", map_location="cpu", weights_only=True).eval()
    assert old.cfg == module.cfg
    torch.testing.assert_close(old.tile_maps(x), module.tile_maps(x), rtol=0, atol=0)


def test_missing_weights_is_user_error() -> None:
    from hybridad.models.inp_former.lightning_model import InpFormer

    cfg = InpFormerConfig(encoder="vit_small_patch14_reg4_dinov2")
    with pytest.raises(UserError, match="inp_former.weights"):
        InpFormer(cfg)


@pytest.mark.slow
def test_bench_gpu_path_runs_on_cpu_with_tiny_override() -> None:
    from bench.bench_inp_former import run

    rows = run(gpu=True, cfg=tiny_cfg(), input_size=28, batch_size=2, steps=1, device="cpu", bf16=False,
               image_size=(28, 56), grid=(1, 2))  # fmt: skip
    names = [r["name"] for r in rows]
    assert names == ["inp_former_train_step", "inp_former_inference_tiles", "inp_former_inference_native_image"]
    assert rows[0]["seconds"] > 0 and rows[2]["images_per_s"] > 0 and rows[0]["peak_reserved_gib"] is None


def test_compile_option_same_maps_and_state_dict() -> None:
    compiled = InpFormerModel.from_config(tiny_cfg(compile="aot_eager"))  # "inductor" in real use
    eager = InpFormerModel.from_config(tiny_cfg())
    eager.load_state_dict(compiled.state_dict())  # keys unchanged by compiling
    assert set(eager.state_dict()) == set(compiled.state_dict())
    x = torch.rand(1, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(compiled.tile_maps(x), eager.tile_maps(x), rtol=0, atol=1e-5)
    assert compiled._compiled_call_impl is not None and eager._compiled_call_impl is None


def test_fused_extractor_attention_matches_official_explicit_softmax() -> None:
    fused = InpFormerModel.from_config(tiny_cfg())
    exact = InpFormerModel.from_config(tiny_cfg(fused_attn=False))
    exact.load_state_dict(fused.state_dict())
    assert fused.extractor.attn.fused and not exact.extractor.attn.fused
    x = torch.rand(2, 3, 42, 56)
    with torch.no_grad():
        torch.testing.assert_close(fused.tile_maps(x), exact.tile_maps(x), rtol=0, atol=1e-5)
        out_f, out_e = fused(x), exact(x)
    torch.testing.assert_close(out_f.inps, out_e.inps, rtol=1e-5, atol=1e-5)
