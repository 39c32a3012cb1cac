"""INP-Former losses: soft-mining global cosine loss and INP coherence loss (computed in float32)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hybridad.models.inp_former.torch_model import COS_EPS, InpFormerOutput


def _at_least_fp32(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def soft_mining_cosine_loss(encoder: list[Tensor], decoder: list[Tensor], gamma: float = 3.0) -> Tensor:
    """Mean over groups of the per-image global cosine distance, with hard-point gradient mining.

    For each group, the value is mean_b [1 - cos(flatten(e_b), flatten(r_b))]. The gradient reaching the
    decoder map r is multiplied element-wise by w = (d / mean d)^gamma, d = 1 - cos_channel(e, r) of shape
    (B,1,h,w) and the mean over batch and positions; the value itself is unchanged. As in the official code the
    hook sits on the decoder group map; we put it on an alias of it so that other uses of the same tensor keep
    their plain gradient.

    Args:
        encoder: groups of (B,D,h,w) encoder maps (treated as constants).
        decoder: matching decoder maps.
        gamma: mining exponent (3 in the official code; 0 = plain global cosine).
    """
    total = encoder[0].new_zeros((), dtype=torch.float32)
    for e, r in zip(encoder, decoder):
        e = _at_least_fp32(e.detach())
        r = _at_least_fp32(r).view_as(r)  # alias: the hook only affects this path
        if r.requires_grad:
            with torch.no_grad():
                d = 1.0 - F.cosine_similarity(e, r, dim=1, eps=COS_EPS).unsqueeze(1)  # (B,1,h,w)
                weight = (d / d.mean()) ** gamma  # broadcast over channels in the hook
            r.register_hook(lambda g, w=weight: g * w)
        cos = F.cosine_similarity(e.flatten(1), r.flatten(1), dim=1, eps=COS_EPS)  # (B,D,h,w) -> (B,D*h*w) -> (B,)
        total = total + (1.0 - cos).mean()
    return total / len(encoder)


def inp_coherence_loss(fused: Tensor, inps: Tensor) -> Tensor:
    """Mean over batch and tokens of min_m (1 - cos(f_i, p_m)); f = F_Q (B,N,D) constant, p = INPs (B,M,D)."""
    f = _at_least_fp32(fused.detach())
    p = _at_least_fp32(inps)
    f_hat = f / f.norm(dim=-1, keepdim=True).clamp_min(COS_EPS)
    p_hat = p / p.norm(dim=-1, keepdim=True).clamp_min(COS_EPS)
    cos = f_hat @ p_hat.transpose(1, 2)  # (B,N,M)
    return (1.0 - cos).min(dim=-1).values.mean()


class InpFormerLoss(nn.Module):
    """total = soft-mining cosine + coherence_weight * INP coherence.

    Args:
        coherence_weight: weight of the coherence loss (0.2 official).
        gamma: soft-mining exponent (3 official).
    """

    def __init__(self, coherence_weight: float = 0.2, gamma: float = 3.0) -> None:
        super().__init__()
        self.coherence_weight = coherence_weight
        self.gamma = gamma

    def forward(self, out: InpFormerOutput) -> dict[str, Tensor]:
        cosine = soft_mining_cosine_loss(out.encoder, out.decoder, self.gamma)
        coherence = inp_coherence_loss(out.fused, out.inps)
        return {"loss": cosine + self.coherence_weight * coherence, "cosine": cosine, "coherence": coherence}
