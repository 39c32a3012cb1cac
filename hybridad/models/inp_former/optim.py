"""StableAdamW (as in the INP-Former repository) and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class StableAdamW(Optimizer):
    """AdamW with decoupled decay applied first, optional AMSGrad and an RMS-clipped step size.

    Per parameter and step t: p *= 1 - lr*wd; m, v Adam moments (v_max = max(v_max, v) with AMSGrad);
    denom = sqrt(v_hat)/sqrt(1 - b2^t) + eps; r = RMS(grad/denom);
    p -= lr / (1 - b1^t) / max(1, r/clip_threshold) * m/denom.
    Defaults are the class defaults of the official file (the training script passes wd 1e-4, eps 1e-10,
    amsgrad True).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        clip_threshold: float = 1.0,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid StableAdamW settings lr={lr} betas={betas} eps={eps} wd={weight_decay}")
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, clip_threshold=clip_threshold
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("StableAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"]
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
                rms = (grad / denom).pow(2).mean().sqrt()  # a tensor: no host sync per parameter
                step_size = (lr / (1.0 - beta1**t)) / (rms / group["clip_threshold"]).clamp_min(1.0)
                p.addcdiv_(exp_avg * -step_size, denom)
        return loss


def warmup_cosine(step: int, total: int, warmup: int, base_lr: float, final_lr: float) -> float:
    """Learning rate at iteration `step` (0-based), as the official `WarmCosineScheduler`.

    Warm-up linspace(0, base_lr, warmup) over the first `warmup` steps, then
    final + (base - final)/2 * (1 + cos(pi * i / (total - warmup))) with i = step - warmup; final_lr from `total` on.
    """
    if step < warmup:
        return base_lr * step / (warmup - 1) if warmup > 1 else 0.0
    if step >= total:
        return final_lr
    i = step - warmup
    return final_lr + 0.5 * (base_lr - final_lr) * (1.0 + math.cos(math.pi * i / (total - warmup)))


def effective_warmup(warmup_steps: int, total_steps: int, max_fraction: float = 0.0) -> int:
    """Warm-up length: `warmup_steps`, capped at floor(max_fraction * total_steps) when `max_fraction` > 0.

    The official schedule has no cap (100 iterations even when a run is as short as wallplugs' ~180).
    """
    if max_fraction > 0:
        return min(warmup_steps, int(max_fraction * total_steps))
    return warmup_steps


def warmup_cosine_scheduler(
    optimizer: Optimizer, total: int, warmup: int, base_lr: float, final_lr: float
) -> LambdaLR:
    """A per-iteration `LambdaLR` following `warmup_cosine` (the optimizer's lr must be `base_lr`)."""

    def factor(step: int) -> float:
        return warmup_cosine(step, total, warmup, base_lr, final_lr) / base_lr

    return LambdaLR(optimizer, factor)
