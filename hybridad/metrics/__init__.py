"""Evaluation metrics at native resolution: streaming AU-PRO, SegF1, ClassF1, pixel/image AUROC, F1-max; the
suite that declares them (`suite.py`)."""

from typing import Any

from hybridad.metrics.aupro import AUPRO
from hybridad.metrics.segmentation import ClassF1, ImageAUROC, PixelAUROC, PixelF1Max, SegF1
from hybridad.metrics.suite import (
    GroupedMetrics,
    MetricSpec,
    group_keys,
    metric_suite,
    register_metric,
    unregister_metric,
)


def _no_process_group() -> bool:
    return False


def process_local() -> dict[str, Any]:
    """`Metric` keyword arguments for a metric that sees all its data in this process (re-scoring cached maps
    from disk): it never syncs over DDP ranks, so rank 0 can compute it while the other ranks wait."""
    return {"sync_on_compute": False, "distributed_available_fn": _no_process_group}


__all__ = ["AUPRO", "ClassF1", "GroupedMetrics", "ImageAUROC", "MetricSpec", "PixelAUROC", "PixelF1Max", "SegF1",
           "group_keys", "metric_suite", "process_local", "register_metric", "unregister_metric"]
