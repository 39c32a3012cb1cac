"""The official INP-Former arithmetic for side-by-side benchmarks: explicit softmax attention everywhere and the
per-parameter StableAdamW loop of the INP-Former repository (hybridad's optimizer runs the same equations as
multi-tensor ops). Same weights, same maps (bit-exact model, `inp_former.fused_attn=false`)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hybridad.models.inp_former.optim import StableAdamW


class OfficialStableAdamW(StableAdamW):
    """StableAdamW as the official file writes it: one parameter at a time, fresh temporaries per operation."""

    def _update(self, group: dict, params: list[Tensor], t: int) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for p in params:
            grad, state = p.grad, self.state[p]
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            p.mul_(1.0 - lr * wd)
            exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
            if group["amsgrad"]:
                torch.maximum(state["max_exp_avg_sq"], exp_avg_sq, out=state["max_exp_avg_sq"])
                second = state["max_exp_avg_sq"]
            else:
                second = exp_avg_sq
            denom = second.sqrt() / math.sqrt(1.0 - beta2**t) + eps
            rms = (grad / denom).pow(2).mean().sqrt()
            step_size = (lr / (1.0 - beta1**t)) / (rms / group["clip_threshold"]).clamp_min(1.0)
            p.addcdiv_(exp_avg * -step_size, denom)
