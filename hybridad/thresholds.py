"""What threshold rules are built from: the `threshold` config, streaming validation statistics, the formulas.

`ScoreStats` streams the validation pixel scores of one category into sums and a float16-value histogram;
the rules (`hybridad.threshold_rules`, by name) turn it, labelled test histograms or the config into a
`ThresholdResult` that says where the threshold came from. Predictions use `map >= threshold` (see
`hybridad.postprocess.binarize`). The private splits may each override the category's rule
(`threshold.test_private_mixed.value=0.43`, as the winners used a higher level for mixed lighting);
`hybridad.threshold_rules.rule_for_split` resolves the rule a split uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from hybridad.errors import UserError
from hybridad.metrics import process_local
from hybridad.metrics.functional import (
    NUM_KEYS,
    f1_max_from_histograms,
    float16_key_values,
    float16_keys,
    key_histogram,
)
from hybridad.metrics.segmentation import PixelF1Max

PERCENTILE_METHODS = ("linear", "lower", "higher", "nearest")
TUNED_ON_TEST = "threshold tuned on test"  # the label of every value chosen with test_public labels
OVERRIDABLE_SPLITS = ("test_private", "test_private_mixed")


@dataclass
class SplitThresholdConfig:
    """One private split's override of the category's rule; unset (None) fields inherit it.

    Setting `value` without `method` means a fixed threshold for that split.
    """

    method: Optional[str] = None
    k: Optional[float] = None
    percentile: Optional[float] = None
    factor: Optional[float] = None
    value: Optional[float] = None
    percentile_method: Optional[str] = None


@dataclass
class ThresholdConfig:
    method: str = "mean_std"  # a rule of hybridad.threshold_rules (rule_names())
    k: float = 3.0  # mean_std: mean + k * std of validation pixel scores
    percentile: float = 99.0  # percentile: q-th percentile of validation scores ...
    factor: float = 1.0  # ... times factor
    value: Optional[float] = None  # fixed (required by method=fixed)
    percentile_method: str = "linear"  # numpy.percentile method: linear | lower | higher | nearest
    test_private: SplitThresholdConfig = field(default_factory=SplitThresholdConfig)
    test_private_mixed: SplitThresholdConfig = field(default_factory=SplitThresholdConfig)
    # pseudo_f1 / pseudo_faint (hybridad.pseudo_defect_rules): SegF1-optimal on validation images with pasted
    # pseudo-anomalies, through the run's post-processing; computed as candidates under any method unless
    # pseudo_repeats=0
    pseudo_repeats: int = 4  # pasted copies of each validation image (different draws); 0 = off
    pseudo_seed: int = 0  # seed of the pastes (fixed: the same run gives the same threshold)
    # patch sizes: "training" (fractions of a test tile, or of the object for size_reference=object, as the
    # training cut-paste) | "image" (fractions of the image's long side; the default before issue 17);
    # "tile" = "training"
    pseudo_scale_of: str = "training"


@dataclass
class ThresholdResult:
    """A fitted threshold and its provenance (written to thresholds.yaml)."""

    value: float
    method: str
    source: str  # "validation" | "test_public (threshold tuned on test)" | "config" | ... (ThresholdRule.source)
    tuned_on_test: bool


class ScoreStats(Metric):
    """Streaming statistics of pixel scores: count, sum, sum of squares (float64) and a float16 histogram.

    All states are sum-reduced and persistent, so the accumulator merges (`merge_state`, DDP) and checkpoints
    (`state_dict`). Mean/std use the full-precision scores; percentiles are exact for the float16-cast scores.
    The `mean`/`std`/`percentile` accessors read the local states: under DDP read them inside
    `with stats.sync_context():` (as `hybridad.threshold_rules.fit_threshold` does) or use `compute()`.
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        f64 = torch.float64
        self.add_state("count", torch.tensor(0.0, dtype=f64), dist_reduce_fx="sum", persistent=True)
        self.add_state("total", torch.tensor(0.0, dtype=f64), dist_reduce_fx="sum", persistent=True)
        self.add_state("total_sq", torch.tensor(0.0, dtype=f64), dist_reduce_fx="sum", persistent=True)
        self.add_state("hist", torch.zeros(NUM_KEYS, dtype=f64), dist_reduce_fx="sum", persistent=True)

    def update(self, maps: Tensor) -> None:
        """Add every value of `maps` (any shape, e.g. (B,1,H,W)); NaN raises ValueError."""
        hist = key_histogram(float16_keys(maps))  # raises on NaN
        x = maps.detach().reshape(-1).to(torch.float64)  # (N,)
        self.count += x.numel()
        self.total += x.sum()
        self.total_sq += x.square().sum()
        self.hist += hist.to(self.hist.device)

    def compute(self) -> Tensor:
        """(2,) tensor (mean, std)."""
        return torch.tensor([self.mean, self.std], dtype=torch.float64)

    def summed_over_ranks(self) -> ScoreStats:
        """A process-local copy holding the states summed over DDP ranks (a copy alone): read it anywhere,
        with no further sync. Every rank must call it (a collective under DDP)."""
        local = ScoreStats(**process_local()).to(self.count.device)
        with self.sync_context():
            for name in ("count", "total", "total_sq", "hist"):
                setattr(local, name, getattr(self, name).clone())
        return local

    def _require_data(self) -> None:
        if float(self.count) == 0:
            raise UserError("no validation scores were collected: check that the validation split has images")

    @property
    def mean(self) -> float:
        self._require_data()
        return float(self.total / self.count)

    @property
    def std(self) -> float:
        """Population standard deviation (numpy's default, ddof=0)."""
        self._require_data()
        mean = self.total / self.count
        return math.sqrt(max(float(self.total_sq / self.count - mean * mean), 0.0))

    def percentile(self, q: float, method: str = "linear") -> float:
        """q-th percentile (0..100) of the float16-cast scores, as `numpy.percentile(..., method=method)`."""
        self._require_data()
        if not 0.0 <= q <= 100.0:
            raise UserError(f"threshold.percentile must be in [0, 100], got {q}")
        if method not in PERCENTILE_METHODS:
            raise UserError(f"threshold.percentile_method must be in {PERCENTILE_METHODS}, got {method!r}")
        n = int(self.count)
        h = (n - 1) * (q / 100.0)  # virtual index into the sorted values
        lo, hi = math.floor(h), math.ceil(h)
        if method == "lower":
            hi = lo
        elif method == "higher":
            lo = hi
        elif method == "nearest":
            lo = hi = int(np.around(h))
        cum = self.hist.cumsum(0)
        idx = torch.tensor([lo, hi], dtype=torch.float64, device=cum.device)
        keys = torch.searchsorted(cum, idx, right=True)  # first key whose cumulative count exceeds the index
        v_lo, v_hi = float16_key_values(cum.device)[keys].double().tolist()
        if lo == hi:
            return v_lo
        return v_lo + (h - lo) * (v_hi - v_lo)


def mean_std_threshold(mean: float, std: float, k: float = 3.0) -> float:
    """mean + k * std (the MVTec AD 2 paper's baseline rule with k = 3)."""
    return mean + k * std


def percentile_threshold(
    values: Union[ScoreStats, Tensor, np.ndarray], q: float, factor: float = 1.0, method: str = "linear"
) -> float:
    """factor x the q-th percentile of float16-cast scores (a `ScoreStats`, or raw values of any shape)."""
    if not isinstance(values, ScoreStats):
        stats = ScoreStats(**process_local())  # local values: no DDP sync
        stats.update(values if isinstance(values, Tensor) else torch.from_numpy(np.asarray(values)))
        values = stats
    return factor * values.percentile(q, method)


def f1_optimal_threshold(labelled: Union[PixelF1Max, tuple[Tensor, Tensor]]) -> tuple[float, float]:
    """Oracle threshold maximising pooled pixel F1 on labelled maps: returns (threshold, f1).

    Args:
        labelled: a `PixelF1Max` fed with labelled (test_public) maps, or its (pos_hist, neg_hist).
    """
    pos, neg = (labelled.pos_hist, labelled.neg_hist) if isinstance(labelled, PixelF1Max) else labelled
    f1, thr = f1_max_from_histograms(pos, neg)
    return thr, f1


def has_split_overrides(cfg: ThresholdConfig) -> bool:
    """Whether a private split sets its own threshold rule (the category's threshold is not the only one)."""
    return any(v is not None for split in OVERRIDABLE_SPLITS for v in vars(getattr(cfg, split)).values())
