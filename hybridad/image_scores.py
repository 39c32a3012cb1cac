"""Image-score rules: (B,1,H,W) native anomaly maps -> (B,) image scores, in one place (pure torch).

A branch's Lightning module names its rule with `ImageScoreRule` (`AnomalyModule.image_score_rule`); the same
name and parameters go into an export's metadata (`hybridad.json`, `image_score`), and the export runtime
applies them with `score_with` (no model code needed). Rules:

- `top_ratio_mean(maps, top_ratio)`: mean of the top `top_ratio` fraction of pixels (INP-Former, the default).
- `blurred_top_t_sum(maps, size, top_t, kernel, sigma, blurred)`: CPR's (DeSTSeg convention): the map resized
  to size x size, blurred with a kernel x kernel mirror-padded Gaussian unless already `blurred`, then the sum
  of its `top_t` largest pixels.

A new rule: a pure function `(maps, **params) -> (B,)` added to `RULES` (a branch package may call
`register_rule`; an exported file then needs that package imported where it runs).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from hybridad.gaussian import mirror_blur2d


def top_ratio_mean(maps: Tensor, top_ratio: float) -> Tensor:
    """(B,1,H,W) -> (B,) mean of the top `top_ratio` fraction of pixels (INP-Former's image score)."""
    flat = maps.flatten(1)  # (B,H*W)
    k = max(1, int(math.ceil(flat.shape[1] * top_ratio)))
    return flat.topk(k, dim=1).values.mean(dim=1)


def top_t_sum(maps: Tensor, t: int) -> Tensor:
    """(B,1,H,W) -> (B,) sum of the `t` largest pixels."""
    flat = maps.flatten(1)  # (B,H*W)
    return flat.topk(min(t, flat.shape[1]), dim=1).values.sum(1)


def blurred_top_t_sum(maps: Tensor, size: int, top_t: int, kernel: int, sigma: float,
                      blurred: bool) -> Tensor:
    """(B,1,H,W) -> (B,) CPR's image score: float32, resized to size x size (bilinear, no antialias), blurred
    (`mirror_blur2d`) unless `blurred`, then the top-`top_t` sum."""
    x = maps.float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    if not blurred:
        x = mirror_blur2d(x, kernel, sigma)
    return top_t_sum(x, top_t)


RULES: dict[str, Callable[..., Tensor]] = {"top_ratio_mean": top_ratio_mean,
                                           "blurred_top_t_sum": blurred_top_t_sum}


def register_rule(name: str, rule: Callable[..., Tensor]) -> None:
    """Add an image-score rule `(maps, **params) -> (B,)` under `name` (an existing name is an error)."""
    if name in RULES and RULES[name] is not rule:
        raise ValueError(f"image score rule {name!r} is already registered")
    RULES[name] = rule


@dataclass(frozen=True)
class ImageScoreRule:
    """A rule of `RULES` by name, with its parameters (stored as the export metadata's `image_score`)."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def __call__(self, maps: Tensor) -> Tensor:
        """(B,1,H,W) native maps -> (B,) image scores."""
        return rule_function(self.name)(maps, **self.params)

    def to_metadata(self) -> dict[str, Any]:
        return {"rule": self.name, **self.params}


def rule_function(name: str) -> Callable[..., Tensor]:
    if name not in RULES:
        raise ValueError(f"unknown image score rule {name!r}; known: {', '.join(RULES)}")
    return RULES[name]


def score_with(maps: Tensor, metadata: dict[str, Any]) -> Tensor:
    """(B,1,H,W) -> (B,) with the rule an export's metadata names (`{"rule": name, **params}`)."""
    params = {k: v for k, v in metadata.items() if k != "rule"}
    return ImageScoreRule(str(metadata["rule"]), params)(maps)
