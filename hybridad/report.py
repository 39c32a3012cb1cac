"""`hybridad report`: markdown tables and PNG overlays from run directories (one run per category).

Numbers are percentages with two decimals (`0.61234` -> `61.23`); a metric a run lacks prints as `–`.
The `mean` row averages the categories that have the metric; it is marked `*` when some do not.
Overlays show, side by side, the input image with the ground-truth contour (green) and the anomaly map as a
JET heat map (min-max scaled per image, display only) blended over the image, with the ground-truth contour
(green) and the predicted-mask contour (red).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from hybridad.errors import UserError
from hybridad.run_dir import RunDir, atomic_write_bytes
from hybridad.types import CATEGORIES, Split

# (metrics.json name, column title)
COLUMNS: tuple[tuple[str, str], ...] = (
    ("aupro_0.05", "AU-PRO(0.05) %"),
    ("seg_f1", "SegF1 %"),
    ("class_f1", "ClassF1 %"),
    ("image_auroc", "image AUROC %"),
    ("pixel_auroc", "pixel AUROC %"),
    ("pixel_f1_max", "pixel F1-max %"),
)
LIGHTING_METRICS: tuple[tuple[str, str], ...] = (("seg_f1", "SegF1 %"), ("aupro_0.05", "AU-PRO(0.05) %"))
LIGHTING_ORDER = ("regular", "overexposed", "underexposed")  # then shift_* and others, sorted
MISSING = "–"
OVERLAY_LONG_SIDE = 768  # overlays are downscaled to this long side


@dataclass
class _Run:
    run: RunDir
    category: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    thresholds: dict[str, Any]


def write_report(run_dirs: list[Path], out: Path | None = None, num_overlays: int = 3) -> str:
    """Write `<out>/report.md` (+ `<out>/overlays/<category>/*.png`) and return the markdown.

    Args:
        run_dirs: run directories, at most one per category.
        out: output folder; default `<first run dir>/report`.
        num_overlays: bad test_public images drawn per category (the first ones in sample-id order).
    """
    if not run_dirs:
        raise UserError("report: give at least one run directory")
    runs = _load_runs(run_dirs)
    out = Path(out) if out is not None else Path(run_dirs[0]) / "report"

    lines = ["# hybridad report", "", "Runs:", ""]
    lines += [f"- {r.category}: `{r.run.path}`" for r in runs]
    splits = [s.value for s in Split
              if any(_value(r.metrics, s.value, m) is not None for r in runs for m, _ in COLUMNS)]
    for split in splits:
        lines += ["", f"## {split}", "", *_main_table(runs, split)]
        for name, title in LIGHTING_METRICS:
            table = _lighting_table(runs, split, name)
            if table:
                lines += ["", f"### {split}: {title} per lighting", "", *table]
    if not splits:
        lines += ["", "No metrics found in metrics.json."]
    if num_overlays > 0:
        legend = ("Left: input + ground truth (green). Right: anomaly map (min-max per image), "
                  "ground truth (green), predicted mask (red).")
        lines += ["", "## Overlays", "", legend, ""]
        for r in runs:
            lines += _overlays(r, out, num_overlays)
    text = "\n".join(lines) + "\n"
    atomic_write_bytes(out / "report.md", text.encode("utf-8"))
    return text


def _load_runs(run_dirs: list[Path]) -> list[_Run]:
    by_category: dict[str, _Run] = {}
    for path in run_dirs:
        run = RunDir(path)
        config = run.read_config()
        category = run.category
        if category in by_category:
            raise UserError(f"runs {by_category[category].run.path} and {run.path} are both '{category}'; "
                            "report one run per category")
        by_category[category] = _Run(run, category, config, run.read_metrics(), run.read_thresholds())
    order = {c: i for i, c in enumerate(CATEGORIES)}
    return sorted(by_category.values(), key=lambda r: order.get(r.category, len(order)))


def _value(metrics: dict[str, Any], split: str, name: str) -> float | None:
    value = metrics.get(f"{split}/{name}")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _pct(value: float | None) -> str:
    return MISSING if value is None else f"{100.0 * value:.2f}"


def _mean_cell(values: list[float | None]) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return MISSING
    return _pct(sum(present) / len(present)) + ("*" if len(present) < len(values) else "")


def _threshold_source(r: _Run) -> str:
    th, source = r.thresholds, str(r.thresholds.get("source") or r.metrics.get("threshold_source") or "")
    if th.get("tuned_on_test") or "tuned on test" in source:
        return "threshold tuned on test"
    if th.get("method") and source:
        return f"{th['method']} on {source}"
    return source or MISSING


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    cells = [[c.replace("|", "\\|") for c in row] for row in [header, *rows]]
    return ["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |"
                                                                              for r in cells[1:]]


def _main_table(runs: list[_Run], split: str) -> list[str]:
    values = [[_value(r.metrics, split, name) for name, _ in COLUMNS] for r in runs]
    rows = [[r.category, *map(_pct, v), _threshold_source(r), str(r.config.get("branch", MISSING))]
            for r, v in zip(runs, values)]
    rows.append(["mean", *[_mean_cell([v[j] for v in values]) for j in range(len(COLUMNS))], "", ""])
    lines = _table(["category", *[title for _, title in COLUMNS], "threshold source", "branch"], rows)
    if any(c.endswith("*") for c in rows[-1]):
        lines += ["", "\\* mean over the categories that have this metric."]
    return lines


def _lighting_table(runs: list[_Run], split: str, name: str) -> list[str]:
    prefix = f"{split}/lighting="
    found = {k[len(prefix):].rsplit("/", 1)[0] for r in runs for k in r.metrics
             if k.startswith(prefix) and k.endswith(f"/{name}")}
    if not found:
        return []
    lightings = [x for x in LIGHTING_ORDER if x in found] + sorted(found - set(LIGHTING_ORDER))
    values = [[_value(r.metrics, f"{split}/lighting={x}", name) for x in lightings] for r in runs]
    rows = [[r.category, *map(_pct, v)] for r, v in zip(runs, values)]
    rows.append(["mean", *[_mean_cell([v[j] for v in values]) for j in range(len(lightings))]])
    return _table(["category", *lightings], rows)


# overlays -------------------------------------------------------------------------------------------
def _overlays(r: _Run, out: Path, count: int) -> list[str]:
    root = (r.config.get("data") or {}).get("root")
    category_dir = Path(root) / r.category if root else None
    if category_dir is None or not category_dir.is_dir():
        where = f"dataset not found at {category_dir}" if category_dir else "no data.root in config.yaml"
        return [f"- {r.category}: overlays skipped ({where})"]
    bad = [sid for sid, _ in r.run.iter_maps(Split.TEST_PUBLIC) if sid.split("/")[1] == "bad"][:count]
    if not bad:
        return [f"- {r.category}: overlays skipped (no test_public/bad maps in the run)"]
    lines = []
    for sid in bad:
        stem = sid.rsplit("/", 1)[1]
        image = cv2.imread(str(category_dir / f"{sid}.png"), cv2.IMREAD_COLOR)  # (H,W,3) BGR, gray -> 3 ch
        if image is None:
            lines.append(f"- {r.category}: overlay of {sid} skipped (image {category_dir / sid}.png missing)")
            continue
        gt_path = category_dir / "test_public/ground_truth/bad" / f"{stem}_mask.png"
        gt = cv2.imread(str(gt_path), cv2.IMREAD_GRAYSCALE)
        pred = _pred_mask(r, sid)
        panel = overlay_panel(image, r.run.read_map(sid), gt, pred)
        rel = Path("overlays") / r.category / f"bad_{stem}.png"
        ok, png = cv2.imencode(".png", panel)
        if ok:
            atomic_write_bytes(out / rel, png.tobytes())
            lines.append(f"![{r.category} {sid}]({rel.as_posix()})")
    return lines


def _pred_mask(r: _Run, sid: str) -> np.ndarray | None:
    if r.run.mask_path(sid).is_file():
        return r.run.read_mask(sid)
    value = r.thresholds.get("value")
    if isinstance(value, (int, float)):
        return r.run.read_map(sid) > float(value)  # display only; the run's own masks take precedence
    return None


def overlay_panel(image: np.ndarray, anomaly_map: np.ndarray, gt: np.ndarray | None, pred: np.ndarray | None
                  ) -> np.ndarray:
    """Two panels side by side, (h, 2w, 3) uint8 BGR, downscaled so the long side is at most 768 px.

    Args:
        image: (H,W,3) uint8 BGR input.
        anomaly_map: (h,w) float scores; resized to (H,W) if needed.
        gt, pred: (H,W) masks (nonzero = anomalous) or None; drawn as contours.
    """
    h, w = image.shape[:2]
    if anomaly_map.shape != (h, w):
        anomaly_map = cv2.resize(anomaly_map.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    lo, hi = float(anomaly_map.min()), float(anomaly_map.max())
    scaled = ((anomaly_map - lo) / (hi - lo) * 255.0) if hi > lo else np.zeros_like(anomaly_map)
    heat = cv2.applyColorMap(scaled.astype(np.uint8), cv2.COLORMAP_JET)  # (H,W,3)
    scale = min(1.0, OVERLAY_LONG_SIDE / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    left = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    right = cv2.addWeighted(left, 0.5, cv2.resize(heat, size, interpolation=cv2.INTER_AREA), 0.5, 0.0)
    for mask, colour, panels in ((gt, (0, 255, 0), (left, right)), (pred, (0, 0, 255), (right,))):
        if mask is None:
            continue
        if mask.shape != (h, w):
            mask = cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
        # contours at native resolution (tiny defects survive), then scaled to the panel
        binary = (mask != 0).astype(np.uint8)
        contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        contours = [np.round(c * scale).astype(np.int32) for c in contours]  # (N,1,2) xy
        for panel in panels:
            cv2.drawContours(panel, contours, -1, colour, 1)
    return np.concatenate([left, right], axis=1)  # (h, 2w, 3)
