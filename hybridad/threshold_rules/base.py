"""What a threshold rule is: a name, its needs and parameters, how it is fitted and how the report shows it.

A rule declares its needs (`Need`); the needs decide where it is fitted and how its result is labelled:
- `VALIDATION_STATS`: pixel-score statistics of the defect-free validation maps (`ScoreStats`), collected once
  per validation epoch by `callbacks.threshold_fit.ThresholdCallback` for every rule, and re-read from the
  cached validation maps by `hybridad evaluate`.
- `PSEUDO_DEFECTS`: the trained model scoring validation images with pasted pseudo-defects. Such a rule is
  fitted once at training time (`candidate` with `inputs.model`); its value is stored in `thresholds.yaml`
  (`candidates:`) and `evaluate` reads it back (`stored_value`).
- `SPLIT_MAPS`: the unlabelled maps of the split the threshold is for (a private split's own scores, e.g. under
  changed lighting), with the category's threshold (`RuleInputs.base`) to carry over; fitted where that split's
  maps are cached (`hybridad.evaluate.fit_split_thresholds`), for a private split only.
- `TEST_LABELS`: labelled test_public maps. A rule that needs them is tuned on test: every result it gives
  says so (`ThresholdResult.tuned_on_test`, the "threshold tuned on test" label), with no way to forget it.
A rule that needs nothing (`fixed`) comes from the config.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional, Union

from torch import Tensor

from hybridad.errors import UserError
from hybridad.thresholds import TUNED_ON_TEST, ScoreStats, ThresholdConfig

if TYPE_CHECKING:
    from data_modules.datamodule import MVTecAD2DataModule
    from hybridad.metrics.segmentation import PixelF1Max
    from hybridad.models.anomaly_module import AnomalyModule


class Need(enum.Enum):
    """What a rule is fitted from."""

    VALIDATION_STATS = "validation statistics"
    PSEUDO_DEFECTS = "pseudo-defects (model + validation images)"
    TEST_LABELS = "test labels"
    SPLIT_MAPS = "the split's own maps (unlabelled)"


@dataclass
class ModelInputs:
    """The trained model and its data at training time (rules that need `PSEUDO_DEFECTS`)."""

    model: AnomalyModule
    datamodule: MVTecAD2DataModule
    rank: int = 0
    world: int = 1
    reduce_sum: Callable[[Tensor], Tensor] = lambda t: t  # sums a tensor over ranks (DDP); identity alone


@dataclass
class RuleInputs:
    """What rules are fitted from; a field is None where nothing of that kind is available."""

    stats: Optional[ScoreStats] = None  # VALIDATION_STATS (read it as-is: already summed over ranks)
    labelled: Union[PixelF1Max, tuple[Tensor, Tensor], None] = None  # TEST_LABELS: histograms or (pos, neg)
    model: Optional[ModelInputs] = None  # PSEUDO_DEFECTS, at training time only
    fitted: dict[str, float] = field(default_factory=dict)  # values fitted with the model at training time
    found: dict[str, dict[str, Any]] = field(default_factory=dict)  # candidate records fitted so far
    split_stats: Optional[ScoreStats] = None  # SPLIT_MAPS: pixel scores of the split's own maps
    base: Optional[float] = None  # SPLIT_MAPS: the category's threshold (the rule the split would inherit)


class ThresholdRule:
    """One threshold rule (`threshold.method=<name>`). Subclass, set the class attributes, implement `fit`.

    Class attributes:
        name: the `threshold.method` value.
        label: its column title in the report's "Threshold rules" table.
        needs: what it is fitted from (`Need`); `TEST_LABELS` makes it tuned on test.
        params: the `ThresholdConfig` fields it reads (documentation, sweeps).
        required: params that must be set, with an example value (`{"value": "0.5"}` for `fixed`).
        compared: fitted for every run and scored on test_public next to the others (the report's table).
        style: (matplotlib colour, line style) of its line on the report's histograms.
    """

    name: ClassVar[str]
    label: ClassVar[str]
    needs: ClassVar[frozenset[Need]] = frozenset()
    params: ClassVar[tuple[str, ...]] = ()
    required: ClassVar[dict[str, str]] = {}
    compared: ClassVar[bool] = False
    style: ClassVar[tuple[str, str]] = ("gray", "-")

    @property
    def tuned_on_test(self) -> bool:
        return Need.TEST_LABELS in self.needs

    @property
    def fitted_with_model(self) -> bool:
        """Fitted once at training time (its value is stored in the run's thresholds.yaml)."""
        return Need.PSEUDO_DEFECTS in self.needs

    @property
    def source(self) -> str:
        """Where its value comes from (thresholds.yaml `source`)."""
        if self.tuned_on_test:
            return f"test_public ({TUNED_ON_TEST})"
        if self.fitted_with_model:
            return "validation + pseudo-anomalies"
        if Need.SPLIT_MAPS in self.needs:
            return "validation + the split's own maps"
        return "validation" if Need.VALIDATION_STATS in self.needs else "config"

    def fit(self, cfg: ThresholdConfig, inputs: RuleInputs) -> float:
        """The threshold from what the rule needs (`inputs`); raise `UserError` when a value is unusable."""
        raise NotImplementedError

    def candidate(self, cfg: ThresholdConfig, inputs: RuleInputs) -> dict[str, Any] | None:
        """Its entry in thresholds.yaml `candidates:` at training time (`{"value": ..., ...}`); None: not
        computed for this run."""
        return {"value": self.fit(cfg, inputs)}

    def stored_value(self, thresholds: dict[str, Any], cfg: ThresholdConfig) -> float | None:
        """Its value from a run's thresholds.yaml (`candidates.<name>.value`); None when the run has none."""
        entry = (thresholds.get("candidates") or {}).get(self.name)
        value = entry.get("value") if isinstance(entry, dict) else None
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None

    def fitted_value(self, inputs: RuleInputs) -> float:
        """The value fitted with the model at training time (rules that need `PSEUDO_DEFECTS`)."""
        value = inputs.fitted.get(self.name)
        if value is None or not math.isfinite(value):
            raise UserError(f"threshold.method={self.name} is fitted with the model at training time: train "
                            f"with threshold.pseudo_repeats>0 so the run stores it")
        return float(value)
