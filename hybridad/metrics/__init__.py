"""Evaluation metrics at native resolution: streaming AU-PRO, SegF1, ClassF1, pixel/image AUROC, F1-max."""

from hybridad.metrics.aupro import AUPRO
from hybridad.metrics.segmentation import ClassF1, ImageAUROC, PixelAUROC, PixelF1Max, SegF1, group_keys

__all__ = ["AUPRO", "ClassF1", "ImageAUROC", "PixelAUROC", "PixelF1Max", "SegF1", "group_keys"]
