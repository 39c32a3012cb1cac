"""Overlay pictures of anomaly maps and masks (OpenCV only: no matplotlib, no Lightning).

`overlay_panel` draws one image as `[input | heat map | colour bar]` under an optional caption line: the input
with the ground-truth contour, the anomaly map as a JET heat map (min-max scaled per image) blended over the
input with the ground-truth and predicted contours, and a colour bar labelled with the map's real minimum and
maximum (and the threshold, when given). Contours are drawn as a coloured line inside a black border, so they
stay visible on every JET colour. Used by `hybridad report`, `hybridad predict` and the overlay callback.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

OVERLAY_LONG_SIDE = 1024  # each panel is downscaled to at most this long side ...
OVERLAY_MIN_LONG_SIDE = 512  # ... and small images are upscaled (nearest) to at least this one
GT_COLOUR = (255, 0, 255)  # BGR magenta: no JET colour is magenta
PRED_COLOUR = (255, 255, 255)  # BGR white
BORDER_COLOUR = (0, 0, 0)
BAR_WIDTH = 18  # colour bar strip, px
BAR_LABEL_WIDTH = 86  # room for the bar's labels, px
CAPTION_HEIGHT = 30  # text line above the panels, px (only when a caption is given)
TEXT_COLOUR = (20, 20, 20)
BACKGROUND = (255, 255, 255)


def format_threshold(value: float) -> str:
    """A threshold with enough digits to tell close values apart: 6 significant digits (`1.0039`, `0.282135`)."""
    return f"{value:.6g}" if math.isfinite(value) else str(value)


def panel_scale(height: int, width: int) -> float:
    """Factor from native size to panel size: long side at most 1024 px, at least 512 px."""
    long_side = max(height, width)
    return min(OVERLAY_LONG_SIDE / long_side, max(1.0, OVERLAY_MIN_LONG_SIDE / long_side))


def line_thickness(panel_long_side: int) -> int:
    """Thickness of a contour's coloured core (its black border adds 1 px on each side)."""
    return max(2, round(panel_long_side / 300))


def draw_contours(panel: np.ndarray, mask: np.ndarray, scale: float, colour: tuple[int, int, int],
                  thickness: int) -> None:
    """Draw the outer contours of `mask` ((H,W) at native size, nonzero = inside) onto `panel` in place.

    Contours are found at native resolution (tiny defects survive), scaled to the panel, then drawn twice: a
    black line `thickness + 2` wide, then the colour `thickness` wide on top of it.
    """
    binary = (mask != 0).astype(np.uint8)
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    # pixel centres: native (x, y) -> panel ((x + 0.5) * scale - 0.5, ...)
    scaled = [np.round((c.astype(np.float64) + 0.5) * scale - 0.5).astype(np.int32) for c in contours]  # (N,1,2)
    cv2.drawContours(panel, scaled, -1, BORDER_COLOUR, thickness + 2, lineType=cv2.LINE_8)
    cv2.drawContours(panel, scaled, -1, colour, thickness, lineType=cv2.LINE_8)


def colour_bar(height: int, low: float, high: float, threshold: float | None = None) -> np.ndarray:
    """(height, BAR_WIDTH + BAR_LABEL_WIDTH, 3) uint8 BGR: the JET scale, high at the top, labelled with the
    map's minimum and maximum and, when inside that range, a black tick at the threshold."""
    strip = np.full((height, BAR_WIDTH + BAR_LABEL_WIDTH, 3), BACKGROUND, np.uint8)
    levels = np.linspace(255, 0, height).round().astype(np.uint8)  # top row = 255
    jet = cv2.applyColorMap(levels[:, None], cv2.COLORMAP_JET)  # (height,1,3)
    strip[:, :BAR_WIDTH] = jet
    font, size = cv2.FONT_HERSHEY_SIMPLEX, 0.42
    x = BAR_WIDTH + 4
    cv2.putText(strip, f"{high:.4g}", (x, 12), font, size, TEXT_COLOUR, 1, cv2.LINE_AA)
    cv2.putText(strip, f"{low:.4g}", (x, height - 4), font, size, TEXT_COLOUR, 1, cv2.LINE_AA)
    if threshold is not None and high > low and low <= threshold <= high:
        y = round((high - threshold) / (high - low) * (height - 1))
        cv2.line(strip, (0, y), (BAR_WIDTH + 2, y), BORDER_COLOUR, 2)
        cv2.putText(strip, f"thr {format_threshold(threshold)}", (x, min(max(y + 4, 26), height - 18)), font,
                    size, TEXT_COLOUR, 1, cv2.LINE_AA)
    return strip


def overlay_panel(image: np.ndarray, anomaly_map: np.ndarray, gt: np.ndarray | None, pred: np.ndarray | None,
                  threshold: float | None = None, caption: str = "") -> np.ndarray:
    """`[input | heat map | colour bar]`, (CAPTION_HEIGHT if caption else 0) + h rows, 2w + bar columns, BGR.

    Each panel is the image scaled by `panel_scale` (h x w). Left: the input with the ground-truth contour
    (magenta). Right: the JET heat map (min-max scaled per image, display only) blended 50/50 over the input,
    with the ground-truth (magenta) and predicted (white) contours, each inside a black border. The colour bar
    gives the map's real minimum and maximum and marks `threshold`. `caption` is written above the panels.

    Args:
        image: (H,W,3) uint8 BGR input.
        anomaly_map: (h,w) float scores; resized to (H,W) if needed.
        gt, pred: (H,W) masks (nonzero = anomalous) or None.
        threshold: the score threshold, marked on the colour bar.
        caption: one text line (e.g. score, threshold and decision); empty = no caption band.
    """
    h, w = image.shape[:2]
    if anomaly_map.shape != (h, w):
        anomaly_map = cv2.resize(anomaly_map.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    lo, hi = float(anomaly_map.min()), float(anomaly_map.max())
    scaled = ((anomaly_map - lo) / (hi - lo) * 255.0) if hi > lo else np.zeros_like(anomaly_map)
    heat = cv2.applyColorMap(scaled.astype(np.uint8), cv2.COLORMAP_JET)  # (H,W,3)
    scale = panel_scale(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_NEAREST
    left = cv2.resize(image, size, interpolation=interpolation)
    right = cv2.addWeighted(left, 0.5, cv2.resize(heat, size, interpolation=interpolation), 0.5, 0.0)
    thickness = line_thickness(max(size))
    for mask, colour, panels in ((gt, GT_COLOUR, (left, right)), (pred, PRED_COLOUR, (right,))):
        if mask is None:
            continue
        if mask.shape != (h, w):
            mask = cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
        for panel in panels:
            draw_contours(panel, mask, scale, colour, thickness)
    bar = colour_bar(size[1], lo, hi, threshold)
    out = np.concatenate([left, right, bar], axis=1)  # (h, 2w + bar, 3)
    if not caption:
        return out
    band = np.full((CAPTION_HEIGHT, out.shape[1], 3), BACKGROUND, np.uint8)
    # Hershey fonts draw ASCII only, and OpenCV crashes on a str that is not valid UTF-8 (a file name with
    # surrogate escapes): draw an ASCII rendering of the caption
    caption = caption.encode("ascii", "backslashreplace").decode("ascii")
    cv2.putText(band, caption, (6, CAPTION_HEIGHT - 9), cv2.FONT_HERSHEY_SIMPLEX, 0.55, TEXT_COLOUR, 1,
                cv2.LINE_AA)
    return np.concatenate([band, out], axis=0)
