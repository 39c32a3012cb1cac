"""Official INP-Former checkpoints and DINOv2 weight files -> our model, checked against spec-level references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

from hybridad.errors import UserError
from hybridad.models.inp_former.convert import convert_checkpoint, convert_state_dict
from hybridad.models.inp_former.torch_model import InpFormerModel, build_encoder
from hybridad.models.inp_former.weights import load_encoder_weights

D, HEADS, M, DEPTH, N_DEC = 384, 6, 6, 12, 8  # ViT-S/14 reg4: nothing in the converter may assume ViT-B


def official_state_dict(seed: int = 0, D: int = D, HEADS: int = HEADS, DEPTH: int = DEPTH) -> dict[str, Tensor]:
    """Random tensors with exactly the keys and shapes of an official INP-Former model.pth (spec section 8)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, std: float = 0.02, mean: float = 0.0) -> Tensor:
        return torch.randn(*shape, generator=g) * std + mean

    sd: dict[str, Tensor] = {"prototype_token": r(M, D, std=1.0)}
    sd.update(
        {
            "encoder.cls_token": r(1, 1, D),
            "encoder.pos_embed": r(1, 1 + 37 * 37, D),
            "encoder.register_tokens": r(1, 4, D),
            "encoder.mask_token": r(1, D),
            "encoder.patch_embed.proj.weight": r(D, 3, 14, 14),
            "encoder.patch_embed.proj.bias": r(D),
            "encoder.norm.weight": r(D, mean=1.0),
            "encoder.norm.bias": r(D),
        }
    )
    for i in range(DEPTH):
        b = f"encoder.blocks.{i}."
        for ln in ("norm1", "norm2"):
            sd[b + ln + ".weight"], sd[b + ln + ".bias"] = r(D, std=0.1, mean=1.0), r(D)
        sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"] = r(3 * D, D), r(3 * D)
        sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"] = r(D, D), r(D)
        sd[b + "ls1.gamma"], sd[b + "ls2.gamma"] = r(D, std=0.3), r(D, std=0.3)
        sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"] = r(4 * D, D), r(4 * D)
        sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"] = r(D, 4 * D), r(D)

    def mlp(prefix: str) -> None:
        sd[prefix + "fc1.weight"], sd[prefix + "fc1.bias"] = r(4 * D, D), r(4 * D)
        sd[prefix + "fc2.weight"], sd[prefix + "fc2.bias"] = r(D, 4 * D), r(D)

    def attn_block(prefix: str) -> None:
        for ln in ("norm1", "norm2"):
            sd[prefix + ln + ".weight"], sd[prefix + ln + ".bias"] = r(D, std=0.1, mean=1.0), r(D)
        sd[prefix + "attn.q.weight"], sd[prefix + "attn.q.bias"] = r(D, D), r(D)
        sd[prefix + "attn.kv.weight"], sd[prefix + "attn.kv.bias"] = r(2 * D, D), r(2 * D)
        sd[prefix + "attn.proj.weight"], sd[prefix + "attn.proj.bias"] = r(D, D), r(D)
        mlp(prefix + "mlp.")

    mlp("bottleneck.0.")
    attn_block("aggregation.0.")
    for i in range(N_DEC):
        attn_block(f"decoder.{i}.")
        sd[f"decoder.{i}.attn.learn_scale"] = r(HEADS, 1, 1, std=0.2, mean=1.0)
    return sd


# --- a reference forward written from the spec, on the official key names ---------------------------------------


def _ln(x: Tensor, sd: dict[str, Tensor], p: str, eps: float) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)


def _lin(x: Tensor, sd: dict[str, Tensor], p: str) -> Tensor:
    return x @ sd[p + ".weight"].T + sd[p + ".bias"]


def _mlp(x: Tensor, sd: dict[str, Tensor], p: str) -> Tensor:
    return _lin(F.gelu(_lin(x, sd, p + ".fc1")), sd, p + ".fc2")


def _heads(x: Tensor) -> Tensor:
    B, n, _ = x.shape
    return x.reshape(B, n, HEADS, D // HEADS).transpose(1, 2)  # (B,n,D) -> (B,H,n,d)


def _merge(x: Tensor) -> Tensor:
    B, _, n, _ = x.shape
    return x.transpose(1, 2).reshape(B, n, D)  # (B,H,n,d) -> (B,n,D)


def reference_forward(sd: dict[str, Tensor], x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Encoder/decoder groups (B,D,h,w) of the official INP-Former, spec sections 1.1-1.6 and 12."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (x - mean) / std
    B, _, H, W = x.shape
    h, w = H // 14, W // 14
    p = F.conv2d(x, sd["encoder.patch_embed.proj.weight"], sd["encoder.patch_embed.proj.bias"], stride=14)
    p = p.flatten(2).transpose(1, 2)  # (B,D,h,w) -> (B,h*w,D)
    pos = sd["encoder.pos_embed"]
    grid = pos[:, 1:].reshape(1, 37, 37, D).permute(0, 3, 1, 2)  # (1,D,37,37)
    grid = F.interpolate(grid, scale_factor=((h + 0.1) / 37, (w + 0.1) / 37), mode="bicubic", antialias=False)
    t = torch.cat([sd["encoder.cls_token"] + pos[:, :1], p + grid.flatten(2).transpose(1, 2)], dim=1)
    t = torch.cat([t[:, :1], sd["encoder.register_tokens"].expand(B, -1, -1), t[:, 1:]], dim=1)
    taps = []
    for i in range(10):  # ViT-S taps 2..9; blocks 10, 11 never run
        b = f"encoder.blocks.{i}"
        qkv = _lin(_ln(t, sd, b + ".norm1", 1e-6), sd, b + ".attn.qkv")
        q, k, v = (_heads(z) for z in qkv.chunk(3, dim=-1))
        a = ((q * (D // HEADS) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        t = t + sd[b + ".ls1.gamma"] * _lin(_merge(a @ v), sd, b + ".attn.proj")
        t = t + sd[b + ".ls2.gamma"] * _mlp(_ln(t, sd, b + ".norm2", 1e-6), sd, b + ".mlp")
        if i >= 2:
            taps.append(t[:, 5:])
    fq = sum(taps) / len(taps)
    # INP extractor (softmax cross-attention, shared LN1)
    tok = sd["prototype_token"].unsqueeze(0).expand(B, -1, -1)
    a0 = "aggregation.0"
    q = _heads(_lin(_ln(tok, sd, a0 + ".norm1", 1e-8), sd, a0 + ".attn.q"))
    kv = _lin(_ln(fq, sd, a0 + ".norm1", 1e-8), sd, a0 + ".attn.kv")
    k, v = _heads(kv[..., :D]), _heads(kv[..., D:])
    a = ((q @ k.transpose(-2, -1)) * (D // HEADS) ** -0.5).softmax(-1)
    tok = tok + _lin(_merge(a @ v), sd, a0 + ".attn.proj")
    inps = tok + _mlp(_ln(tok, sd, a0 + ".norm2", 1e-8), sd, a0 + ".mlp")
    # bottleneck + INP-guided decoder (ReLU on scaled cosine, no residual around attention)
    y = _mlp(fq, sd, "bottleneck.0")
    outs = []
    for i in range(N_DEC):
        d = f"decoder.{i}"
        q = _heads(_lin(_ln(y, sd, d + ".norm1", 1e-8), sd, d + ".attn.q"))
        kv = _lin(_ln(inps, sd, d + ".norm1", 1e-8), sd, d + ".attn.kv")
        k, v = _heads(kv[..., :D]), _heads(kv[..., D:])
        q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        k = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        a = F.relu((q @ k.transpose(-2, -1)) * sd[d + ".attn.learn_scale"])
        y = _lin(_merge(a @ v), sd, d + ".attn.proj")
        y = y + _mlp(_ln(y, sd, d + ".norm2", 1e-8), sd, d + ".mlp")
        outs.append(y)
    outs = outs[::-1]

    def group(ts: list[Tensor]) -> Tensor:
        return (sum(ts) / len(ts)).transpose(1, 2).reshape(B, D, h, w)  # (B,N,D) -> (B,D,h,w)

    return [group(taps[:4]), group(taps[4:])], [group(outs[:4]), group(outs[4:])]


def test_convert_state_dict_matches_reference_forward() -> None:
    official = official_state_dict()
    converted = convert_state_dict(official)
    model = InpFormerModel(encoder="vit_small_patch14_reg4_dinov2", num_inps=M, fused_attn=False)
    model.load_state_dict(converted, strict=True)
    x = torch.rand(1, 3, 42, 56, generator=torch.Generator().manual_seed(1))
    out = model(x)
    with torch.no_grad():
        ref_enc, ref_dec = reference_forward(official, x)
    for ours, ref in zip(out.encoder + out.decoder, ref_enc + ref_dec):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert "encoder.reg_token" in converted and "encoder.mask_token" not in converted
    assert converted["encoder.pos_embed"].shape == (1, 37 * 37, D)


def test_convert_checkpoint_file(tmp_path) -> None:
    src, out = tmp_path / "model.pth", tmp_path / "out" / "inp.pth"
    official = official_state_dict(D=32, HEADS=2, DEPTH=3)  # any width/depth converts
    torch.save(official, src)
    convert_checkpoint(src, out)
    assert out.is_file() and not list(out.parent.glob(".*tmp"))
    loaded = torch.load(out, weights_only=True)
    torch.testing.assert_close(loaded["decoder.3.attn.kv.weight"], official["decoder.3.attn.kv.weight"])
    torch.testing.assert_close(loaded["inp_tokens"], official["prototype_token"])


def test_convert_checkpoint_errors(tmp_path) -> None:
    with pytest.raises(UserError, match="not found"):
        convert_checkpoint(tmp_path / "nope.pth", tmp_path / "o.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(UserError, match="not an official INP-Former"):
        convert_checkpoint(bad, tmp_path / "o.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="garbage.pth"):
        convert_checkpoint(garbage, tmp_path / "o.pth")
    assert not (tmp_path / "o.pth").exists()


# --- DINOv2 weight files -----------------------------------------------------------------------------------------


def timm_to_meta(sd: dict[str, Tensor], chunked: bool = False) -> dict[str, Tensor]:
    """timm reg4 names -> Meta's original layout (spec 9: pos[:,0] = 0, cls unchanged, register_tokens)."""
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if k == "reg_token":
            out["register_tokens"] = v
        elif k == "pos_embed":
            out["pos_embed"] = torch.cat([torch.zeros_like(v[:, :1]), v], dim=1)
        elif chunked and k.startswith("blocks."):
            out["blocks.0." + k[len("blocks.") :]] = v  # block_chunks=1: blocks.0.<i>.
        else:
            out[k] = v
    out["mask_token"] = torch.zeros(1, sd["cls_token"].shape[-1])
    return out


NAME = "vit_small_patch14_reg4_dinov2"


@pytest.fixture(scope="module")
def source_encoder():
    enc = build_encoder(NAME, depth=2, seed=11)
    with torch.no_grad():  # make the class slot and every tensor distinct from a fresh init
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return enc


@pytest.mark.parametrize("fmt", ["safetensors", "timm_pth", "meta", "meta_chunked"])
def test_load_encoder_weights_formats(tmp_path, source_encoder, fmt: str) -> None:
    sd = {k: v.clone().contiguous() for k, v in source_encoder.state_dict().items()}
    if fmt == "safetensors":
        path = tmp_path / "model.safetensors"
        save_file(sd, str(path))
    else:
        path = tmp_path / "w.pth"
        torch.save(sd if fmt == "timm_pth" else timm_to_meta(sd, chunked=fmt == "meta_chunked"), path)
    target = build_encoder(NAME, depth=2, seed=5)
    load_encoder_weights(target, path, NAME)
    for k, v in target.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_meta_class_position_is_folded(tmp_path, source_encoder) -> None:
    sd = source_encoder.state_dict()
    meta = timm_to_meta(sd)
    shift = torch.randn(1, 1, sd["cls_token"].shape[-1])
    meta["pos_embed"][:, :1] = shift
    meta["cls_token"] = sd["cls_token"] - shift
    torch.save(meta, tmp_path / "w.pth")
    target = build_encoder(NAME, depth=2, seed=5)
    load_encoder_weights(target, tmp_path / "w.pth", NAME)
    torch.testing.assert_close(target.cls_token, sd["cls_token"])
    assert torch.equal(target.pos_embed, sd["pos_embed"])


def test_load_encoder_weights_errors(tmp_path, source_encoder) -> None:
    with pytest.raises(UserError, match=r"not found.*dinov2_vits14_reg4_pretrain\.pth.*inp_former\.weights"):
        load_encoder_weights(source_encoder, tmp_path / "missing.pth", NAME)
    torch.save(source_encoder.state_dict(), tmp_path / "small.pth")
    base = build_encoder("vit_base_patch14_reg4_dinov2", depth=1, seed=0)
    with pytest.raises(UserError) as err:
        load_encoder_weights(base, tmp_path / "small.pth", "vit_base_patch14_reg4_dinov2")
    msg = str(err.value)
    assert "small.pth" in msg and "embed dim 768" in msg and "embed dim 384" in msg
    assert "dinov2_vitb14_reg4_pretrain.pth" in msg and "inp_former.weights" in msg
    deeper = build_encoder(NAME, depth=3, seed=0)
    with pytest.raises(UserError, match="3 blocks"):
        load_encoder_weights(deeper, tmp_path / "small.pth", NAME)


def test_lightning_module_loads_weights_and_converted_checkpoint(tmp_path, source_encoder) -> None:
    from hybridad.models.inp_former.config import InpFormerConfig
    from hybridad.models.inp_former.lightning_model import InpFormer

    torch.save(source_encoder.state_dict(), tmp_path / "enc.pth")
    cfg = InpFormerConfig(preset="tiny", tiny_depth=2, num_inps=3, weights=str(tmp_path / "enc.pth"))
    module = InpFormer(cfg)
    assert torch.equal(module.model.encoder.pos_embed, source_encoder.pos_embed)
    # a whole-model file (as `convert` writes) restores the trainable parts too
    torch.save(module.model.state_dict(), tmp_path / "whole.pth")
    again = InpFormer(InpFormerConfig(preset="tiny", tiny_depth=2, num_inps=3, checkpoint=str(tmp_path / "whole.pth")))
    for k, v in module.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[k], v), k
    assert not math.isnan(float(again.tile_maps(torch.rand(1, 3, 28, 28)).mean()))
