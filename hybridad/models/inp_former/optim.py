"""StableAdamW (as in the INP-Former repository) and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


CHUNK_ELEMENTS = 1 << 22  # parameter elements per multi-tensor update (16 MiB of float32 scratch per list)


def _chunks(params: list[Tensor], limit: int) -> list[list[Tensor]]:
    """Consecutive runs of `params` holding at most `limit` elements each (a larger tensor is a run alone)."""
    out: list[list[Tensor]] = []
    size = limit
    for p in params:
        if size + p.numel() > limit:
            out.append([])
            size = 0
        out[-1].append(p)
        size += p.numel()
    return out


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
        """One step for every parameter with a gradient, as multi-tensor (`torch._foreach_*`) in-place ops.

        Same equations as the official per-parameter loop, on chunks of at most `CHUNK_ELEMENTS` parameter
        elements: two scratch lists per chunk instead of six temporaries per parameter (fewer kernel launches
        on GPU), and scratch small enough to be reused from the heap on CPU (one 68 M-element list would be
        fresh, page-faulted memory every step).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            by_step: dict[int, list[Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("StableAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                by_step.setdefault(state["step"], []).append(p)
            for t, params in by_step.items():
                for chunk in _chunks(params, CHUNK_ELEMENTS):
                    self._update(group, chunk, t)
        return loss

    def _update(self, group: dict, params: list[Tensor], t: int) -> None:
        """The step-`t` update of `params` (all at the same step count, same device and dtype per call)."""
        lr, wd, eps, clip = group["lr"], group["weight_decay"], group["eps"], group["clip_threshold"]
        beta1, beta2 = group["betas"]
        grads = [p.grad for p in params]
        states = [self.state[p] for p in params]
        exp_avg = [s["exp_avg"] for s in states]
        exp_avg_sq = [s["exp_avg_sq"] for s in states]

        torch._foreach_mul_(params, 1.0 - lr * wd)
        torch._foreach_mul_(exp_avg, beta1)
        torch._foreach_add_(exp_avg, grads, alpha=1.0 - beta1)
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1.0 - beta2)
        if group["amsgrad"]:
            second = [s["max_exp_avg_sq"] for s in states]
            torch._foreach_maximum_(second, exp_avg_sq)
        else:
            second = exp_avg_sq
        denom = torch._foreach_sqrt(second)  # sqrt(v_hat) / sqrt(1 - b2^t) + eps
        torch._foreach_div_(denom, math.sqrt(1.0 - beta2**t))
        torch._foreach_add_(denom, eps)
        ratio = torch._foreach_div(grads, denom)
        torch._foreach_mul_(ratio, ratio)
        rms = torch.stack([r.mean() for r in ratio]).sqrt()  # (P,) RMS(grad/denom): no host sync
        del ratio
        step_size = (lr / (1.0 - beta1**t)) / (rms / clip).clamp_min(1.0)  # (P,)
        torch._foreach_div_(denom, list(step_size.unbind()))  # p -= m / (denom / step_size)
        torch._foreach_addcdiv_(params, exp_avg, denom, value=-1.0)


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
