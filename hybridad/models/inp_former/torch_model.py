"""INP-Former (Luo et al., CVPR 2025): frozen DINOv2 encoder, INP extractor, INP-guided decoder.

Input: float tiles in [0,1] of shape (B,3,H,W), H and W multiples of 14. The model normalises them itself.
Output: per group, encoder and decoder feature maps (B,D,H/14,W/14); the anomaly map is 1 - cos between them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hybridad.errors import UserError
from hybridad.models.inp_former.config import InpFormerConfig

PATCH = 14
DINOV2_GRID = 37  # DINOv2 weights store a 37x37 position grid (518 / 14)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
COS_EPS = 1e-8

# Default tapped blocks per encoder size. S/B/L as in the official code; G (40 blocks) is not covered there:
# we scale ViT-L's taps (4..18 of 24) to 40 blocks.
DEFAULT_TAPS: dict[str, list[int]] = {
    "small": [2, 3, 4, 5, 6, 7, 8, 9],
    "base": [2, 3, 4, 5, 6, 7, 8, 9],
    "large": [4, 6, 8, 10, 12, 14, 16, 18],
    "giant": [7, 10, 13, 17, 20, 23, 27, 30],
}
TINY_ENCODER = "vit_small_patch14_reg4_dinov2"


class InpFormerOutput(NamedTuple):
    """What `InpFormerModel.forward` returns (g = group, 2 groups)."""

    encoder: list[Tensor]  # g x (B,D,h,w), no grad
    decoder: list[Tensor]  # g x (B,D,h,w)
    fused: Tensor  # (B,N,D) F_Q, mean of the tapped layers, no grad
    inps: Tensor  # (B,M,D) the per-image INPs
    inp_attention: Tensor  # (B,N,M) softmax-free attention of the patch tokens on the INPs (decoder block 4)


def encoder_size(name: str) -> str:
    """'vit_large_patch14_reg4_dinov2' -> 'large'; raises UserError on a non-DINOv2 name."""
    for size in DEFAULT_TAPS:
        if name.startswith(f"vit_{size}_patch14") and name.endswith("dinov2"):
            return size
    raise UserError(
        f"inp_former.encoder='{name}' is not a DINOv2 ViT/14; use vit_{{small,base,large,giant}}_patch14[_reg4]_dinov2"
    )


def cosine_distance(a: Tensor, b: Tensor, dim: int = 1) -> Tensor:
    """1 - cos(a, b) along `dim` (torch's eps semantics, eps 1e-8)."""
    return 1.0 - F.cosine_similarity(a, b, dim=dim, eps=COS_EPS)


@torch.no_grad()
def trunc_normal_(t: Tensor, std: float, bound: float) -> Tensor:
    """N(0, std) truncated to [-bound, bound] by resampling (same law as nn.init.trunc_normal_, much faster)."""
    t.normal_(0.0, std)
    out = t.abs() > bound
    while bool(out.any()):
        t[out] = torch.randn(int(out.sum()), device=t.device, dtype=t.dtype) * std
        out = t.abs() > bound
    return t


def _trunc_normal_init(module: nn.Module) -> None:
    """Official init of the trainable parts: Linear ~ TN(0, 0.01) cut at +-0.03, bias 0; LayerNorm 1/0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.01, bound=0.03)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (no dropout)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CrossAttention(nn.Module):
    """Multi-head softmax cross-attention: queries from `x` (B,M,D), keys/values from `ctx` (B,N,D).

    `fused`: `F.scaled_dot_product_attention` (flash / memory-efficient kernels on GPU, no (B,H,M,N) score
    tensor kept for backward); False: the official explicit softmax(q k^T * scale) v, bit-exact.
    """

    def __init__(self, dim: int, num_heads: int, fused: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.fused = fused
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, ctx: Tensor) -> Tensor:
        B, M, D = x.shape
        N, H = ctx.shape[1], self.num_heads
        q = self.q(x).reshape(B, M, H, D // H).transpose(1, 2)  # (B,H,M,d)
        k, v = self.kv(ctx).reshape(B, N, 2, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B,H,N,d)
        if self.fused:
            y = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (B,H,M,d)
        else:
            y = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1) @ v  # (B,H,M,N) @ (B,H,N,d)
        return self.proj(y.transpose(1, 2).reshape(B, M, D))  # (B,H,M,d) -> (B,M,H,d) -> (B,M,D)


class InpExtractor(nn.Module):
    """One pre-LN cross-attention block: INP = T' + MLP(LN2 T'), T' = T + Attn(LN1 T, LN1 F_Q) (shared LN1)."""

    def __init__(self, dim: int, num_heads: int, fused: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-8)
        self.attn = CrossAttention(dim, num_heads, fused)
        self.norm2 = nn.LayerNorm(dim, eps=1e-8)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, tokens: Tensor, fused: Tensor) -> Tensor:
        t = tokens + self.attn(self.norm1(tokens), self.norm1(fused))
        return t + self.mlp(self.norm2(t))


class InpAttention(nn.Module):
    """ReLU attention of tokens on INPs: ReLU(s_h * q_hat k_hat^T) v with L2-normalised q, k; no softmax."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.learn_scale = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, inps: Tensor) -> tuple[Tensor, Tensor]:
        B, N, D = x.shape
        M, H = inps.shape[1], self.num_heads
        q = self.q(x).reshape(B, N, H, D // H).transpose(1, 2)  # (B,H,N,d)
        kv = self.kv(inps).reshape(B, M, 2, H, D // H).permute(2, 0, 3, 1, 4)  # (2,B,H,M,d)
        q = F.normalize(q, dim=-1, eps=1e-12)
        k = F.normalize(kv[0], dim=-1, eps=1e-12)
        attn = F.relu((q @ k.transpose(-2, -1)) * self.learn_scale)  # (B,H,N,M)
        y = (attn @ kv[1]).transpose(1, 2).reshape(B, N, D)  # (B,H,N,d) -> (B,N,H,d) -> (B,N,D)
        return self.proj(y), attn


class InpDecoderBlock(nn.Module):
    """INP-guided decoder block: y = Attn(LN1 x, LN1 P) (no residual), out = y + MLP(LN2 y)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-8)
        self.attn = InpAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-8)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x: Tensor, inps: Tensor) -> tuple[Tensor, Tensor]:
        y, attn = self.attn(self.norm1(x), self.norm1(inps))
        return y + self.mlp(self.norm2(y)), attn


def interpolate_pos_dinov2(patch_pos: Tensor, grid: tuple[int, int], src: int = DINOV2_GRID) -> Tensor:
    """DINOv2/INP-Former position resampling: (1,src*src,D) -> (1,h*w,D).

    Bicubic with scale ((h + 0.1)/src, (w + 0.1)/src), no antialias, on a float32 copy cast back;
    unchanged when (h, w) == (src, src).
    """
    h, w = grid
    if (h, w) == (src, src):
        return patch_pos
    D = patch_pos.shape[-1]
    pos = patch_pos.float().reshape(1, src, src, D).permute(0, 3, 1, 2)  # (1,D,src,src)
    pos = F.interpolate(pos, scale_factor=((h + 0.1) / src, (w + 0.1) / src), mode="bicubic", antialias=False)
    assert pos.shape[-2:] == (h, w), f"pos-embed resampled to {tuple(pos.shape[-2:])}, expected {(h, w)}"
    return pos.permute(0, 2, 3, 1).reshape(1, h * w, D).to(patch_pos.dtype)  # (1,D,h,w) -> (1,h*w,D)


def build_encoder(
    name: str, depth: int | None = None, fused_attn: bool = True, seed: int | None = 0
) -> nn.Module:
    """A timm DINOv2 ViT at 518 with dynamic input size, random init (seeded), no head."""
    kwargs: dict = dict(pretrained=False, img_size=518, dynamic_img_size=True, num_classes=0)
    if depth is not None:
        kwargs["depth"] = depth
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        enc = timm.create_model(name, **kwargs)
    for blk in enc.blocks:
        blk.attn.fused_attn = fused_attn
    enc.requires_grad_(False)
    return enc.eval()


class InpFormerModel(nn.Module):
    """INP-Former: frozen DINOv2 taps -> fused F_Q -> INPs + bottleneck -> INP-guided decoder -> 2 groups.

    Args:
        encoder: timm DINOv2 name (`vit_{small,base,large,giant}_patch14[_reg4]_dinov2`).
        tapped_layers: 0-based encoder blocks to tap (even count; empty = per-size default).
        num_inps: M, the number of INP tokens.
        pos_embed: "dinov2" (official resampling) or "timm" (timm's antialiased resampling).
        fused_attn: fused (SDPA) encoder and INP-extractor attention; False = explicit softmax, as the official
            code (bit-exact).
        encoder_depth: build the encoder with this many blocks (tiny preset); None = the model's own.
        encoder_seed: seed of the encoder's random init (weights are loaded separately).
    """

    def __init__(
        self,
        encoder: str = "vit_large_patch14_reg4_dinov2",
        tapped_layers: list[int] | None = None,
        num_inps: int = 6,
        pos_embed: str = "dinov2",
        fused_attn: bool = True,
        encoder_depth: int | None = None,
        encoder_seed: int | None = 0,
    ) -> None:
        super().__init__()
        size = encoder_size(encoder)
        if pos_embed not in ("dinov2", "timm"):
            raise UserError(f"inp_former.pos_embed='{pos_embed}': use 'dinov2' or 'timm'")
        self.encoder_name = encoder
        self.encoder = build_encoder(encoder, encoder_depth, fused_attn, encoder_seed)
        depth = len(self.encoder.blocks)
        taps = list(tapped_layers) if tapped_layers else list(DEFAULT_TAPS[size])
        if len(taps) < 2 or len(taps) % 2 or sorted(set(taps)) != taps or taps[0] < 0 or taps[-1] >= depth:
            raise UserError(
                f"inp_former.tapped_layers={taps}: need an even number (>= 2) of increasing block indices "
                f"in [0, {depth - 1}]"
            )
        self.tapped_layers = taps
        self.pos_embed = pos_embed
        D = self.encoder.embed_dim
        H = self.encoder.blocks[0].attn.num_heads

        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.inp_tokens = nn.Parameter(torch.randn(num_inps, D))  # T: (M,D), std 1
        self.extractor = InpExtractor(D, H, fused_attn)
        self.bottleneck = Mlp(D, 4 * D)
        self.decoder = nn.ModuleList(InpDecoderBlock(D, H) for _ in taps)
        for part in (self.extractor, self.bottleneck, self.decoder):
            _trunc_normal_init(part)

    @classmethod
    def from_config(cls, cfg: InpFormerConfig) -> InpFormerModel:
        """Build from `InpFormerConfig`; the tiny preset is a `tiny_depth`-block ViT-S/14 tapping every block.

        `cfg.compile` (a torch.compile backend name) compiles the forward in place (`nn.Module.compile`: the
        state-dict keys, hence checkpoints, are unchanged)."""
        model = cls._build(cfg)
        if cfg.compile:
            model.compile(backend=cfg.compile)
        return model

    @classmethod
    def _build(cls, cfg: InpFormerConfig) -> InpFormerModel:
        if cfg.preset == "tiny":
            return cls(
                encoder=TINY_ENCODER,
                tapped_layers=list(cfg.tapped_layers) or list(range(cfg.tiny_depth)),
                num_inps=cfg.num_inps,
                pos_embed=cfg.pos_embed,
                fused_attn=cfg.fused_attn,
                encoder_depth=cfg.tiny_depth,
                encoder_seed=cfg.encoder_seed,
            )
        if cfg.preset:
            raise UserError(f"inp_former.preset='{cfg.preset}': use '' or 'tiny'")
        return cls(
            encoder=cfg.encoder,
            tapped_layers=list(cfg.tapped_layers),
            num_inps=cfg.num_inps,
            pos_embed=cfg.pos_embed,
            fused_attn=cfg.fused_attn,
            encoder_seed=cfg.encoder_seed,
        )

    def train(self, mode: bool = True) -> InpFormerModel:
        """The frozen encoder stays in eval mode."""
        super().train(mode)
        self.encoder.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Everything except the encoder."""
        return [p for n, p in self.named_parameters() if not n.startswith("encoder.")]

    def _tokens(self, x: Tensor) -> Tensor:
        """Normalised images (B,3,H,W) -> [CLS, registers, patches] tokens (B,P+h*w,D)."""
        enc = self.encoder
        t = enc.patch_embed(x)  # (B,h,w,D): dynamic_img_size gives NHWC
        if self.pos_embed == "timm":
            return enc.norm_pre(enc.patch_drop(enc._pos_embed(t)))
        B, h, w, D = t.shape
        pos = enc.pos_embed  # (1,[1+]37*37,D)
        if enc.no_embed_class:  # reg4 models: the class pos is folded into cls_token
            cls_pos, patch_pos = None, pos
        else:
            cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        src = math.isqrt(patch_pos.shape[1])
        patch_pos = interpolate_pos_dinov2(patch_pos, (h, w), src)  # (1,h*w,D)
        patches = t.reshape(B, h * w, D) + patch_pos.to(t.dtype)  # (B,h*w,D)
        cls = enc.cls_token if cls_pos is None else enc.cls_token + cls_pos  # (1,1,D)
        prefix = [cls.expand(B, -1, -1).to(t.dtype)]
        if enc.reg_token is not None:
            prefix.append(enc.reg_token.expand(B, -1, -1).to(t.dtype))  # (B,R,D)
        return enc.norm_pre(enc.patch_drop(torch.cat(prefix + [patches], dim=1)))

    @torch.no_grad()
    def encode(self, x: Tensor) -> list[Tensor]:
        """Tiles in [0,1] (B,3,H,W) -> patch tokens of each tapped block, each (B,h*w,D); no gradient."""
        H, W = x.shape[-2:]
        if H % PATCH or W % PATCH:
            raise UserError(
                f"INP-Former input {H}x{W} is not a multiple of {PATCH}; set data.tiling.input_size to a "
                f"multiple of 14 (e.g. 448)"
            )
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        tokens = self._tokens(x)
        n_prefix = self.encoder.num_prefix_tokens
        taps: list[Tensor] = []
        for i, blk in enumerate(self.encoder.blocks[: self.tapped_layers[-1] + 1]):  # later blocks never run
            tokens = blk(tokens)
            if i in self.tapped_layers:
                taps.append(tokens[:, n_prefix:])  # drop CLS + registers: (B,h*w,D)
        return taps

    def forward(self, x: Tensor) -> InpFormerOutput:
        """Tiles in [0,1] (B,3,H,W) -> `InpFormerOutput`."""
        B, _, H, W = x.shape
        h, w = H // PATCH, W // PATCH
        taps = self.encode(x)
        fused = torch.stack(taps, dim=1).mean(dim=1)  # (B,L,N,D) -> (B,N,D)
        tokens = self.inp_tokens.unsqueeze(0).expand(B, -1, -1)  # (B,M,D)
        inps = self.extractor(tokens, fused)  # (B,M,D)
        y = self.bottleneck(fused)  # (B,N,D)
        outs: list[Tensor] = []
        attns: list[Tensor] = []
        for blk in self.decoder:
            y, attn = blk(y, inps)
            outs.append(y)
            attns.append(attn)
        outs = outs[::-1]  # deepest decoder block first, mirroring the shallowest encoder taps
        half = len(taps) // 2
        enc_groups = [torch.stack(taps[:half], 1).mean(1), torch.stack(taps[half:], 1).mean(1)]  # 2 x (B,N,D)
        dec_groups = [torch.stack(outs[:half], 1).mean(1), torch.stack(outs[half:], 1).mean(1)]  # 2 x (B,N,D)

        def to_map(t: Tensor) -> Tensor:
            return t.transpose(1, 2).reshape(B, -1, h, w)  # (B,N,D) -> (B,D,N) -> (B,D,h,w)

        vis = attns[min(3, len(attns) - 1)].mean(dim=1)  # 4th decoder block, mean over heads: (B,N,M)
        return InpFormerOutput(
            encoder=[to_map(g) for g in enc_groups],
            decoder=[to_map(g) for g in dec_groups],
            fused=fused,
            inps=inps,
            inp_attention=vis,
        )

    def group_maps(self, out: InpFormerOutput) -> Tensor:
        """Model output -> (B,G,h,w): 1 - cos between encoder and decoder features of each fused group."""
        return torch.stack([cosine_distance(e.float(), d.float()) for e, d in zip(out.encoder, out.decoder)], dim=1)

    def tile_maps(self, x: Tensor) -> Tensor:
        """Tiles in [0,1] (B,3,H,W) -> (B,1,H,W): mean over groups of 1 - cos, bilinear (align_corners=True)."""
        out = self(x)
        maps = [
            F.interpolate(
                cosine_distance(e.float(), d.float()).unsqueeze(1),  # (B,1,h,w)
                size=x.shape[-2:],
                mode="bilinear",
                align_corners=True,
            )
            for e, d in zip(out.encoder, out.decoder)
        ]
        return torch.stack(maps, dim=0).mean(dim=0)  # (G,B,1,H,W) -> (B,1,H,W)


class GroupMapNet(nn.Module):
    """The exported function of INP-Former: (N,3,S,S) tiles -> (N,G,h,w) float32 1 - cos per fused group at
    the token grid; the runtime upsamples and smooths them (`hybridad.inp_map_path`), since the native tile
    size depends on each image's size."""

    def __init__(self, model: InpFormerModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, tiles: Tensor) -> Tensor:
        return self.model.group_maps(self.model(tiles)).float()
