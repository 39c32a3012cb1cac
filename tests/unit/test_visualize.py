"""Overlay pictures: panel geometry, double contours at the mask edge, colour bar, caption, threshold text."""

from __future__ import annotations

import cv2
import numpy as np

from hybridad.visualize import (
    BAR_LABEL_WIDTH,
    BAR_WIDTH,
    BORDER_COLOUR,
    CAPTION_HEIGHT,
    GT_COLOUR,
    PRED_COLOUR,
    format_threshold,
    overlay_panel,
    panel_scale,
)


def _box_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    image = np.full((20, 30, 3), 100, np.uint8)
    amap = np.zeros((10, 15), np.float32)  # half resolution: resized to the image
    amap[2:4, 3:6] = 1.0
    gt = np.zeros((20, 30), np.uint8)
    gt[5:10, 8:14] = 255  # rows 5..9, columns 8..13
    return image, amap, gt


def test_threshold_text_keeps_six_significant_digits() -> None:
    assert format_threshold(1.0039) == "1.0039"  # was "1" with 3 significant digits
    assert format_threshold(0.28213453) == "0.282135"
    assert format_threshold(0.5) == "0.5" and format_threshold(2.0) == "2"


def test_small_images_are_upscaled_and_large_ones_downscaled() -> None:
    assert panel_scale(20, 30) == 512 / 30  # long side 30 -> 512
    assert panel_scale(2048, 2448) == 1024 / 2448  # long side 2448 -> 1024
    assert panel_scale(600, 800) == 1.0


def test_contours_lie_on_the_mask_edge_in_colour_inside_a_black_border() -> None:
    image, amap, gt = _box_case()
    panel = overlay_panel(image, amap, gt, gt)
    s = 512 / 30
    h, w = round(20 * s), 512
    assert panel.shape == (h, 2 * w + BAR_WIDTH + BAR_LABEL_WIDTH, 3)

    def edge(i: int) -> int:  # native pixel centre -> panel coordinate
        return round((i + 0.5) * s - 0.5)

    top, bottom, left, right = edge(5), edge(9), edge(8), edge(13)
    gt_only = overlay_panel(image, amap, gt, None)
    for drawn, x0, colour in ((panel, 0, GT_COLOUR), (gt_only, w, GT_COLOUR), (panel, w, PRED_COLOUR)):
        hits = (drawn[:, x0:x0 + w] == colour).all(-1)
        ys, xs = np.nonzero(hits)
        # a 3 px line centred on the box outline (native rows 5..9, columns 8..13)
        assert (ys.min(), ys.max(), xs.min(), xs.max()) == (top - 1, bottom + 1, left - 1, right + 1)
        assert not hits[top + 3:bottom - 2, left + 3:right - 2].any()  # the inside is not drawn over
    mid = (top + bottom) // 2
    row = panel[mid, w + left - 3:w + left + 4]  # across the left edge on the heat map: black|white|black
    assert [tuple(p) for p in row[1:6]] == [BORDER_COLOUR, *[PRED_COLOUR] * 3, BORDER_COLOUR]
    assert not (panel[:, :w] == PRED_COLOUR).all(-1).any()  # the prediction is drawn on the heat map only


def test_no_masks_no_contours_and_the_colour_bar_spans_jet_with_the_threshold_marked() -> None:
    image, amap, _ = _box_case()
    panel = overlay_panel(image, amap, None, None, threshold=0.5)
    w = 512
    assert not (panel[:, :2 * w] == GT_COLOUR).all(-1).any()
    bar = panel[:, 2 * w + BAR_WIDTH // 2]  # (h, 3): one column of the bar, top = map maximum
    jet = cv2.applyColorMap(np.array([[255], [0]], np.uint8), cv2.COLORMAP_JET)[:, 0]  # (2,3)
    assert tuple(bar[0]) == tuple(jet[0]) and tuple(bar[-1]) == tuple(jet[1])
    tick = round((1.0 - 0.5) / (1.0 - 0.0) * (panel.shape[0] - 1))  # map range [0, 1]
    assert tuple(bar[tick]) == BORDER_COLOUR
    no_tick = overlay_panel(image, amap, None, None, threshold=3.0)[:, 2 * w + BAR_WIDTH // 2]
    assert not (no_tick == BORDER_COLOUR).all(-1).any()  # a threshold outside the map's range is not marked


def test_caption_adds_a_text_line_above_the_panels() -> None:
    image, amap, gt = _box_case()
    plain = overlay_panel(image, amap, gt, None)
    captioned = overlay_panel(image, amap, gt, None, caption="score 0.5  threshold 1.0039  anomalous")
    assert captioned.shape[0] == plain.shape[0] + CAPTION_HEIGHT
    np.testing.assert_array_equal(captioned[CAPTION_HEIGHT:], plain)
    band = captioned[:CAPTION_HEIGHT]
    assert (band.min(-1) < 100).any() and (band == 255).all(-1).mean() > 0.5  # dark text on white


def test_caption_with_a_non_utf8_file_name_is_drawn_as_ascii() -> None:
    """A file name with surrogate escapes (not valid UTF-8) crashed cv2.putText; it is drawn escaped."""
    image = np.zeros((40, 60, 3), np.uint8)
    amap = np.linspace(0, 1, 40 * 60, dtype=np.float32).reshape(40, 60)
    odd = b"bad\xff".decode("utf-8", "surrogateescape")
    with_odd = overlay_panel(image, amap, None, None, threshold=0.5, caption=f"{odd} score 1")
    escaped = overlay_panel(image, amap, None, None, threshold=0.5, caption="bad\\udcff score 1")
    assert np.array_equal(with_odd, escaped)
