"""The metric suite: each evaluation metric declared once, for the test callback, `evaluate` and the report.

A `MetricSpec` says what a metric is called (the `metrics.json` key part), how to build its torchmetrics
`Metric`, which fields its `update` reads (in that order), for which breakdown groups it is computed and how
the report shows it. `callbacks.metric_logger.MetricsCallback` (training's test pass), `hybridad.evaluate`
(re-scoring cached maps) and `hybridad.report` loop over `metric_suite()`; none of them names a metric. A
consumer that lacks a field (evaluate has no image score) skips the metrics that read it.

Fields, per image:

| field   | what                                                        |
|---------|-------------------------------------------------------------|
| `map`   | (1,1,H,W) float anomaly map                                 |
| `mask`  | (1,1,H,W) bool ground truth                                 |
| `pred`  | (1,1,H,W) bool predicted mask (exists once a threshold does) |
| `score` | (1,) image score                                            |
| `label` | (1,) long image label (0 good, 1 bad)                       |

Groups (`group_keys`): `all`, `lighting=<tag>`, `defect=<type>` and `good`/`bad`; a spec lists the kinds it
is computed for (`all`, `lighting`, `defect`, `good_bad`). Keys in `metrics.json`: `<prefix>/<name>` for
`all`, `<prefix>/<group>/<name>` for the others.

Adding a metric: its `Metric` class in a new file, and one `MetricSpec` line in `BUILTIN` below (or one
`register_metric` call); see docs/extending_metrics.md.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor
from torchmetrics import Metric

from hybridad.metrics.aupro import AUPRO
from hybridad.metrics.segmentation import ClassF1, ImageAUROC, PixelAUROC, PixelF1Max, SegF1
from hybridad.registry import Registry

FIELDS: tuple[str, ...] = ("map", "mask", "pred", "score", "label")
GROUP_KINDS: tuple[str, ...] = ("all", "lighting", "defect", "good_bad")
REPORT_PLACES: tuple[str, ...] = ("headline", "kpi", "defect", "lighting")  # report tables a metric can be in
EVERY_GROUP: frozenset[str] = frozenset(GROUP_KINDS)


def group_keys(label: int, lighting: str, defect_type: str = "") -> list[str]:
    """Breakdown keys an image belongs to: `"all"`, `"lighting=<lighting>"`, `"good"`/`"bad"` and
    `"defect=<type>"`.

    The good/bad key comes from the label (0 good, 1 bad); it is left out for unlabelled (-1, private)
    images. The lighting key is left out where the layout has no lighting (`""`), the defect key where the
    type says no more than good/bad.
    """
    keys = ["all", f"lighting={lighting}"] if lighting else ["all"]
    if label == 1:
        keys.append("bad")
    elif label == 0:
        keys.append("good")
    if defect_type not in ("", "good", "bad"):
        keys.append(f"defect={defect_type}")
    return keys


def group_kind(key: str) -> str:
    """The kind of a `group_keys` key: `all`, `lighting`, `defect` or `good_bad`."""
    if key == "all":
        return "all"
    if key in ("good", "bad"):
        return "good_bad"
    kind = key.split("=", 1)[0]
    if "=" not in key or kind not in GROUP_KINDS:
        raise ValueError(f"unknown metric group '{key}'")
    return kind


def metric_key(prefix: str, group: str, name: str) -> str:
    """The `metrics.json` key of metric `name` of `group`: `test_public/seg_f1`, `test_public/good/seg_f1`."""
    return f"{prefix}/{name}" if group == "all" else f"{prefix}/{group}/{name}"


def first_value(computed: Tensor) -> float:
    """A metric's value: the tensor's first element (`PixelF1Max` returns `(f1_max, threshold)`)."""
    return float(computed.reshape(-1)[0])


@dataclass(frozen=True)
class MetricSpec:
    """One metric of the suite.

    Args:
        name: the `metrics.json` key part (`aupro_0.05`); no `/`.
        build: `build(**kwargs)` -> a fresh `Metric` (kwargs such as `process_local()`: `Metric.__init__`).
        fields: what `Metric.update` takes, in order (see the module docstring); "pred" means the metric needs
            a threshold.
        groups: the group kinds it is computed for (`all` always included).
        title: the report's column title (default: `name`).
        percent: the report shows `100 * value` with two decimals (fractions); else the value as it is.
        shown_in: report tables that show it: `headline` (the per-split tables), `kpi` (the line per
            category), `defect`, `lighting` (those tables; the metric must be computed for that group kind).
        value: the float of `Metric.compute()` (default: its first element).
    """

    name: str
    build: Callable[..., Metric]
    fields: tuple[str, ...]
    groups: frozenset[str] = frozenset({"all"})
    title: str = ""
    percent: bool = True
    shown_in: frozenset[str] = frozenset({"headline"})
    value: Callable[[Tensor], float] = first_value

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"metric name '{self.name}' must be non-empty and without '/'")
        for what, given, known in (("field", self.fields, FIELDS), ("group kind", self.groups, GROUP_KINDS),
                                   ("report place", self.shown_in, REPORT_PLACES)):
            unknown = sorted(set(given) - set(known))
            if unknown:
                raise ValueError(f"metric '{self.name}': unknown {what}(s) {unknown}; known: {list(known)}")
        if not self.fields:
            raise ValueError(f"metric '{self.name}' reads no field")
        object.__setattr__(self, "groups", frozenset(self.groups) | {"all"})
        object.__setattr__(self, "shown_in", frozenset(self.shown_in))
        uncomputed = sorted(self.shown_in & {"defect", "lighting"} - self.groups)
        if uncomputed:
            raise ValueError(f"metric '{self.name}' is shown in the {uncomputed} table(s) but not computed for "
                             "those groups: add them to `groups`")

    @property
    def needs_threshold(self) -> bool:
        """Reads the predicted mask, which exists only once a threshold does."""
        return "pred" in self.fields

    @property
    def header(self) -> str:
        """The report's column header: the title, with ` %` for percentages."""
        title = self.title or self.name
        return f"{title} %" if self.percent else title


BUILTIN: tuple[MetricSpec, ...] = (  # report column order
    MetricSpec("aupro_0.05", partial(AUPRO, fpr_limit=0.05), ("map", "mask"),
               frozenset({"all", "lighting", "defect"}), "AU-PRO(0.05)",
               shown_in=frozenset({"headline", "kpi", "defect", "lighting"})),
    MetricSpec("seg_f1", SegF1, ("pred", "mask"), EVERY_GROUP, "SegF1",
               shown_in=frozenset({"headline", "kpi", "defect", "lighting"})),
    MetricSpec("class_f1", ClassF1, ("pred", "mask"), EVERY_GROUP, "ClassF1",
               shown_in=frozenset({"headline", "kpi", "defect"})),
    MetricSpec("image_auroc", ImageAUROC, ("score", "label"), title="image AUROC",
               shown_in=frozenset({"headline", "kpi"})),
    MetricSpec("pixel_auroc", PixelAUROC, ("map", "mask"), title="pixel AUROC"),
    MetricSpec("pixel_f1_max", PixelF1Max, ("map", "mask"), title="pixel F1-max"),
)
_suite: Registry[MetricSpec] = Registry("metric", lambda spec: spec.name)
_suite.register_all(BUILTIN)


def metric_suite() -> tuple[MetricSpec, ...]:
    """Every registered metric, built-ins first, then in registration order."""
    return _suite.items()


def register_metric(spec: MetricSpec) -> MetricSpec:
    """Add `spec` to the suite (the callback, evaluate and the report then compute and show it); returns it.

    Raises:
        ValueError: a metric of that name is registered already.
    """
    return _suite.register(spec)


def unregister_metric(name: str) -> None:
    """Remove the metric `name` from the suite (no error if it is not there)."""
    _suite.unregister(name)


class GroupedMetrics:
    """One `Metric` per (group key, suite metric), made when a group is first seen; updated per image.

    Args:
        fields: the fields this consumer has; metrics reading any other are left out.
        device: where the metrics' states live (None: the CPU).
        specs: the metrics (default: the suite as registered now).
        **metric_kwargs: for every `Metric.__init__`, e.g. `process_local()`.
    """

    def __init__(self, fields: Collection[str] = FIELDS, device: torch.device | None = None,
                 specs: Sequence[MetricSpec] | None = None, **metric_kwargs: object) -> None:
        chosen = metric_suite() if specs is None else specs
        self.specs = tuple(s for s in chosen if set(s.fields) <= set(fields))
        self._by_name = {s.name: s for s in self.specs}
        self.device = device
        self.metric_kwargs = metric_kwargs
        self.groups: dict[str, dict[str, Metric]] = {}

    def metrics_for(self, key: str) -> dict[str, Metric]:
        """The metrics of group `key` by name (made on first use: the specs computed for its kind)."""
        if key not in self.groups:
            kind = group_kind(key)
            made = {s.name: s.build(**self.metric_kwargs) for s in self.specs if kind in s.groups}
            if self.device is not None:
                made = {n: m.to(self.device) for n, m in made.items()}
            self.groups[key] = made
        return self.groups[key]

    def update(self, keys: Iterable[str], inputs: Mapping[str, Tensor | None]) -> None:
        """Update every metric of the groups `keys` with one image's `inputs` (field -> value); a metric
        whose field is missing or None (no predicted mask before a threshold) is not updated."""
        for key in keys:
            for name, metric in self.metrics_for(key).items():
                args = [inputs.get(f) for f in self._by_name[name].fields]
                if all(a is not None for a in args):
                    metric.update(*args)

    def compute(self, prefix: str, keys: Iterable[str] | None = None, without: Collection[str] = ()
                ) -> dict[str, float]:
        """`{metric_key(prefix, group, name): value}` over `keys` (default: the groups seen), skipping the
        metrics that read a field of `without` (e.g. "pred" when there is no threshold)."""
        results: dict[str, float] = {}
        for key in list(self.groups if keys is None else keys):
            for name, metric in self.metrics_for(key).items():
                spec = self._by_name[name]
                if not set(spec.fields) & set(without):
                    results[metric_key(prefix, key, name)] = spec.value(metric.compute())
        return results
