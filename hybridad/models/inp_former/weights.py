"""Loading DINOv2 encoder weights (Meta's original .pth or timm .safetensors/.pth) into a timm ViT."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor, nn

from hybridad.errors import UserError

_SIZE_LETTER = {"small": "s", "base": "b", "large": "l", "giant": "g"}
_WRAPPERS = ("model", "state_dict", "teacher", "module")
_PREFIXES = ("module.", "backbone.", "encoder.")


def download_hint(encoder_name: str) -> str:
    """Where Meta publishes the weights that match a timm DINOv2 name."""
    size = next((s for s in _SIZE_LETTER if f"_{s}_" in encoder_name), "large")
    tag = f"vit{_SIZE_LETTER[size]}14"
    reg = "_reg4" if "reg4" in encoder_name else ""
    return f"https://dl.fbaipublicfiles.com/dinov2/dinov2_{tag}/dinov2_{tag}{reg}_pretrain.pth"


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """A flat dict of tensors from a .safetensors or torch file (unwrapping 'model'/'state_dict'/...)."""
    if not path.is_file():
        raise FileNotFoundError(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path), device="cpu")
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in _WRAPPERS:
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError("not a state_dict")
    return {k: v for k, v in sd.items() if isinstance(v, Tensor)}


def to_timm_keys(sd: dict[str, Tensor], no_embed_class: bool) -> dict[str, Tensor]:
    """Meta DINOv2 names (and chunked `blocks.c.i.` layouts) -> timm VisionTransformer names.

    Meta: cls_token, pos_embed (1, 1+G*G, D) with a class slot, register_tokens, mask_token, mlp.w12/w3 (ViT-g).
    timm reg4 (no_embed_class): cls_token with pos[0] folded in, pos_embed (1, G*G, D), reg_token, fc1/fc2.
    """
    for prefix in _PREFIXES:  # official INP-Former checkpoints hold the encoder under `encoder.`
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        k = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k)  # chunked blocks: blocks.<chunk>.<i>.
        k = re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", k)
        k = re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", k)
        if k == "register_tokens":
            k = "reg_token"
        if k in ("mask_token",) or k.startswith("head."):
            continue
        out[k] = v
    pos = out.get("pos_embed")
    if no_embed_class and pos is not None and "cls_token" in out:
        n = pos.shape[1]
        if int(round((n - 1) ** 0.5)) ** 2 == n - 1:  # Meta layout: class slot first
            out["cls_token"] = out["cls_token"] + pos[:, :1]
            out["pos_embed"] = pos[:, 1:]
    return out


def _describe(sd: dict[str, Tensor]) -> str:
    dim = sd["cls_token"].shape[-1] if "cls_token" in sd else "?"
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    regs = sd["reg_token"].shape[1] if "reg_token" in sd else 0
    return f"embed dim {dim}, {len(blocks)} blocks, {regs} registers"


def load_encoder_weights(model_encoder: nn.Module, path: str | Path, encoder_name: str) -> None:
    """Load DINOv2 weights into a timm DINOv2 ViT built by `build_encoder` (in place, exact copy).

    Raises:
        UserError: missing/unreadable file, or weights of another model (naming both models).
    """
    path = Path(path)
    expected = model_encoder.state_dict()
    dim = model_encoder.embed_dim
    depth = len(model_encoder.blocks)
    hint = (
        f"download Meta's weights ({download_hint(encoder_name)}) or timm's "
        f"'{encoder_name}.lvd142m' safetensors and point `inp_former.weights` at the file"
    )
    try:
        raw = read_state_dict(path)
    except FileNotFoundError:
        raise UserError(f"inp_former.weights: file '{path}' not found; {hint}") from None
    except Exception as err:  # unpickling / safetensors errors
        raise UserError(f"inp_former.weights: cannot read '{path}' ({type(err).__name__}: {err}); {hint}") from None
    sd = to_timm_keys(raw, bool(getattr(model_encoder, "no_embed_class", False)))
    wanted = f"{encoder_name} (embed dim {dim}, {depth} blocks)"
    missing = [k for k in expected if k not in sd]
    wrong = [k for k in expected if k in sd and sd[k].shape != expected[k].shape]
    if missing or wrong:
        detail = f"missing {missing[:3]}" if missing else f"shape of {wrong[0]} {tuple(sd[wrong[0]].shape)}"
        raise UserError(
            f"inp_former.weights: '{path}' does not hold {wanted}: it has {_describe(sd)} ({detail}); "
            f"check inp_former.encoder or {hint}"
        )
    model_encoder.load_state_dict({k: sd[k] for k in expected}, strict=True)
