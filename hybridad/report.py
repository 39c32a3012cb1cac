"""`hybridad report`: `index.html` and `report.md` from run directories (one run per category).

The page, top to bottom: the per-category table laid out like the winners' report (Tables 1 and 2:
AU-PRO(0.05) and SegF1, here on test_public, computed on float16 maps as the server does) beside the published
ISVL numbers on the private splits (where a run is an MVTec AD 2 category; otherwise the headline metrics of
the labelled test set); metrics per defect type (layouts that name types); SegF1 under each threshold rule
(`hybridad.threshold_rules.compared_rules`: label-free, then tuned on test); PRO curves up to FPR 0.05; lighting robustness (per
condition, drop from regular lighting; MVTec AD 2 only); per category, score histograms of good vs bad
pixels and images with the thresholds marked and the best and worst
test_public overlays; then every metric. `report.md` holds the same tables. Plots are PNG files drawn with
matplotlib (Agg backend, imported when a report is written).

Numbers are percentages with two decimals (`0.61234` -> `61.23`); a value a run lacks prints as `–`. A `mean`
row averages the categories that have the value and is marked `*` when some do not.
"""

from __future__ import annotations

import html
import io
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from data_modules.listing import imread
from hybridad.errors import UserError
from hybridad.metrics.suite import MetricSpec, metric_suite
from hybridad.run_dir import RunDir, atomic_write_bytes
from hybridad.threshold_rules import compared_rules
from hybridad.thresholds import OVERRIDABLE_SPLITS
from hybridad.types import CATEGORIES, Sample, Split
from hybridad.visualize import format_threshold, overlay_panel

LIGHTING_ORDER = ("regular", "overexposed", "underexposed")  # then shift_* and others, sorted
# ISVL (VAND 2025 winner) report, Tables 1-2, in %: (SegF1 priv, SegF1 mix, AU-PRO(0.05) priv, AU-PRO mix)
ISVL_REPORTED: dict[str, tuple[float, float, float, float]] = {
    "can": (17.03, 9.21, 46.55, 40.67), "fabric": (84.95, 81.76, 65.94, 69.19),
    "fruit_jelly": (68.10, 67.76, 69.45, 69.34), "rice": (66.34, 66.93, 65.25, 66.78),
    "sheet_metal": (69.69, 69.74, 86.00, 85.19), "vial": (44.01, 42.12, 67.56, 62.49),
    "wallplugs": (11.99, 6.24, 26.63, 22.04), "walnuts": (68.34, 67.65, 80.47, 76.57),
}
MISSING = "–"
FPR_LIMIT = 0.05


@dataclass
class _Run:
    run: RunDir
    category: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    thresholds: dict[str, Any]


@dataclass
class Table:
    """A table both renderers draw: cells are display strings; `signed` columns colour negative numbers."""

    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""
    signed: set[int] = field(default_factory=set)

    def markdown(self, level: str = "##") -> list[str]:
        cells = [[c.replace("|", "\\|") for c in row] for row in [self.header, *self.rows]]
        lines = [f"{level} {self.title}", "", "| " + " | ".join(cells[0]) + " |"]
        lines.append("|" + "---|" * len(self.header))
        lines += ["| " + " | ".join(r) + " |" for r in cells[1:]]
        notes = [n.replace("*", "\\*", 1) if n.startswith("*") else n for n in self._notes()]
        return lines + [x for n in notes for x in ("", n)]

    def _notes(self) -> list[str]:
        partial = any("*" in c for row in self.rows if row and row[0] == "mean" for c in row)
        return [n for n in (PARTIAL_NOTE if partial else "", self.note) if n]

    def html(self, caption: bool = False) -> str:
        cap = f"<caption>{html.escape(self.title)}</caption>" if caption else ""
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.header)
        body = []
        for row in self.rows:
            tds = []
            for j, c in enumerate(row):
                cls = "num" if j > 0 and _is_number(c) else ""
                if "(" in c and "−" in c.split("(", 1)[1]:
                    cls += " drop"
                tds.append(f'<td class="{_attr(cls.strip())}">{html.escape(c)}</td>')
            mean = ' class="mean"' if row and row[0] == "mean" else ""
            body.append(f"<tr{mean}>{''.join(tds)}</tr>")
        note = "".join(f'<p class="note">{html.escape(n)}</p>' for n in self._notes())
        return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{note}"


def _is_number(cell: str) -> bool:
    return bool(cell) and (cell[0].isdigit() or cell[0] in "−-") and cell != MISSING


# --------------------------------------------------------------------------------------------- loading


def run_status(run: RunDir) -> str:
    """'' for a completed run (or one without state.json), else what the report must say about it."""
    from hybridad.run_claim import run_is_live

    record = run.read_state()
    state = record.get("state")
    if state in (None, "completed"):
        return ""
    if state == "running":
        return ("still running: its numbers are partial" if run_is_live(run.path)
                else "killed while running (state running, no live process): its numbers are partial")
    reason = f": {record['reason']}" if record.get("reason") else ""
    return f"{state}{reason}: its numbers are partial"


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
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def shown_in(place: str) -> list[MetricSpec]:
    """The suite's metrics that the report table `place` shows (`headline`, `kpi`, `defect`, `lighting`)."""
    return [spec for spec in metric_suite() if place in spec.shown_in]


def _pct(value: float | None, percent: bool = True) -> str:
    """A fraction as a percentage with two decimals; `percent=False`: the value to 4 significant digits."""
    if value is None:
        return MISSING
    return f"{100.0 * value:.2f}" if percent else f"{value:.4g}"


def _delta(value: float | None, percent: bool = True) -> str:
    if value is None:
        return ""
    return (f"{100.0 * value:+.2f}" if percent else f"{value:+.4g}").replace("-", "−")


def _mean(values: list[float | None]) -> tuple[float | None, bool]:
    present = [v for v in values if v is not None]
    return (sum(present) / len(present) if present else None), len(present) < len(values)


def _mean_cell(values: list[float | None], percent: bool = True) -> str:
    m, partial = _mean(values)
    return MISSING if m is None else _pct(m, percent) + ("*" if partial else "")


PARTIAL_NOTE = "* mean over the categories that have this metric."


def _threshold_source(r: _Run) -> str:
    """Where the category's threshold came from, then each private split that has its own threshold."""
    th, source = r.thresholds, str(r.thresholds.get("source") or r.metrics.get("threshold_source") or "")
    if th.get("tuned_on_test") or "tuned on test" in source:
        text = "threshold tuned on test"
    elif th.get("method") and source:
        text = f"{th['method']} on {source}"
    else:
        text = source or MISSING
    return "; ".join([text, *_private_split_thresholds(th)])


def _private_split_thresholds(th: dict[str, Any]) -> list[str]:
    """`<split>: <method> @ <value>` for each private split whose threshold differs from the category's."""
    out = []
    for split, entry in (th.get("splits") or {}).items():
        if split in OVERRIDABLE_SPLITS and isinstance(entry, dict) and isinstance(entry.get("value"), (int, float)) \
                and (entry.get("method"), entry["value"]) != (th.get("method"), th.get("value")):
            out.append(f"{split}: {entry.get('method', '?')} @ {entry['value']:.4g}")
    return out


# ---------------------------------------------------------------------------------------------- tables


def main_table(runs: list[_Run], split: str) -> Table:
    """Every headline metric of one split (the detailed table)."""
    specs = shown_in("headline")
    values = [[_value(r.metrics, split, spec.name) for spec in specs] for r in runs]
    rows = [[r.category, *[_pct(x, spec.percent) for x, spec in zip(v, specs)], _threshold_source(r),
             str(r.config.get("branch", MISSING))] for r, v in zip(runs, values)]
    means = [_mean_cell([v[j] for v in values], spec.percent) for j, spec in enumerate(specs)]
    rows.append(["mean", *means, "", ""])
    return Table(split, ["category", *[spec.header for spec in specs], "threshold source", "branch"], rows)


def paper_table(runs: list[_Run]) -> Table:
    """AU-PRO(0.05) and SegF1 per category as in the winners' report Tables 1-2, beside their values."""
    header = ["category", "AU-PRO(0.05) % test_public", "ISVL priv", "ISVL priv_mix",
              "SegF1 % test_public", "ISVL priv", "ISVL priv_mix"]
    cols: list[list[float | None]] = [[], [], [], [], [], []]
    rows = []
    for r in runs:
        ref = ISVL_REPORTED.get(r.category)
        vals = [_value(r.metrics, "test_public", "aupro_0.05"), ref[2] / 100 if ref else None,
                ref[3] / 100 if ref else None, _value(r.metrics, "test_public", "seg_f1"),
                ref[0] / 100 if ref else None, ref[1] / 100 if ref else None]
        for c, v in zip(cols, vals):
            c.append(v)
        rows.append([r.category, *map(_pct, vals)])
    rows.append(["mean", *[_mean_cell(c) for c in cols]])
    note = ("test_public scores of these runs (float16 maps, official AU-PRO and SegF1: what the server "
            "computes for the same maps); ISVL columns are the winners' published private-split scores, "
            "for scale only "
            "(other split, full models).")
    return Table("Per category (layout of the winners' report, Tables 1 and 2)", header, rows, note)


def _raw(value: Any) -> str:
    """A metrics.json value as stored: numbers with 6 significant digits, anything else as text."""
    if value is None:
        return MISSING
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def all_metrics_table(runs: list[_Run]) -> Table:
    """Every key of every run's metrics.json (sorted), one column per category, values as stored."""
    keys = sorted({k for r in runs for k in r.metrics})
    rows = [[k, *[_raw(r.metrics.get(k)) for r in runs]] for k in keys]
    note = ("Every key of metrics.json, as stored (fractions, not percentages); "
            f"{MISSING} = the run has no such key.")
    return Table("All metrics", ["metrics.json key", *[r.category for r in runs]], rows, note)


def is_mvtec_ad2(r: _Run) -> bool:
    """A run of one of MVTec AD 2's eight categories in its own layout (the winners' columns apply)."""
    data = r.config.get("data") or {}
    return r.category in ISVL_REPORTED and data.get("format", "mvtec_ad2") == "mvtec_ad2"


def summary_table(runs: list[_Run]) -> Table:
    """The winners' table where some run is an MVTec AD 2 category, else the headline metrics of test_public."""
    if any(is_mvtec_ad2(r) for r in runs):
        return paper_table(runs)
    t = main_table(runs, Split.TEST_PUBLIC.value)
    t.title = "Per category: test_public (the labelled test set)"
    return t


def defect_table(runs: list[_Run], split: str = "test_public") -> Table | None:
    """Per defect type (layouts that name types): AU-PRO(0.05), SegF1 and ClassF1 of that type's images."""
    prefix = f"{split}/defect="
    rows = []
    for r in runs:
        types = sorted({k[len(prefix):].rsplit("/", 1)[0] for k in r.metrics if k.startswith(prefix)})
        for t in types:
            rows.append([r.category, t, *[_pct(_value(r.metrics, f"{prefix}{t}", spec.name), spec.percent)
                                          for spec in shown_in("defect")]])
    if not rows:
        return None
    note = (f"Metrics of each defect type's {split} images alone (AU-PRO: normal pixels of those images give "
            "the false positive rate; ClassF1 without good images counts only missed images).")
    headers = [spec.header for spec in shown_in("defect")]
    return Table("Per defect type", ["category", "defect type", *headers], rows, note)


def rules_table(runs: list[_Run]) -> Table | None:
    """SegF1 on test_public under each compared threshold rule (`hybridad.threshold_rules`: label-free first,
    then those tuned on test), from `test_public/threshold=<rule>/seg_f1`."""
    rules = compared_rules()
    found = any(_value(r.metrics, "test_public", f"threshold={rule.name}/seg_f1") is not None
                for r in runs for rule in rules)
    if not found:
        return None
    cols: list[list[float | None]] = [[] for _ in rules]
    rows = []
    for r in runs:
        cells = [r.category]
        for j, rule in enumerate(rules):
            v = _value(r.metrics, "test_public", f"threshold={rule.name}/seg_f1")
            thr = _value(r.metrics, "test_public", f"threshold={rule.name}/value")
            cols[j].append(v)
            cells.append(_pct(v) + (f" @ {format_threshold(thr)}" if thr is not None else ""))
        rows.append(cells)
    rows.append(["mean", *[_mean_cell(c) for c in cols]])
    free = [rule.label for rule in rules if not rule.tuned_on_test]
    tuned = [rule.label for rule in rules if rule.tuned_on_test]
    note = ("SegF1 % on test_public at each rule's threshold (value after @), with the run's "
            "post-processing. "
            f"{_and(free)} {'are' if len(free) > 1 else 'is'} label-free: they use normal data only (the pseudo "
            "rules: cut-paste pseudo-anomalies pasted into validation images, docs/thresholds.md); "
            f"{_and(tuned)} {'are' if len(tuned) > 1 else 'is'} tuned on the test labels: an upper bound, "
            "not a method.")
    return Table("Threshold rules: SegF1 on test_public", ["category", *[rule.label for rule in rules]], rows,
                 note)


def _and(names: list[str]) -> str:
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names) or "none"


def _lightings(runs: list[_Run], split: str) -> list[str]:
    prefix = f"{split}/lighting="
    found = {k[len(prefix):].rsplit("/", 1)[0] for r in runs for k in r.metrics if k.startswith(prefix)}
    return [x for x in LIGHTING_ORDER if x in found] + sorted(found - set(LIGHTING_ORDER))


def lighting_tables(runs: list[_Run], split: str = "test_public") -> list[Table]:
    """Per lighting condition: the metric, and in brackets its change from regular lighting (points)."""
    lightings = _lightings(runs, split)
    tables = []
    for spec in shown_in("lighting"):
        name, title, pc = spec.name, spec.header, spec.percent
        values = [[_value(r.metrics, f"{split}/lighting={x}", name) for x in lightings] for r in runs]
        if not any(v is not None for row in values for v in row):
            continue
        base = lightings.index("regular") if "regular" in lightings else None
        rows = []
        deltas: list[list[float | None]] = []
        for r, row in zip(runs, values):
            ref = row[base] if base is not None else None
            d = [None if v is None or ref is None or j == base else v - ref for j, v in enumerate(row)]
            deltas.append(d)
            rows.append([r.category, *[_pct(v, pc) + (f" ({_delta(dj, pc)})" if dj is not None else "")
                                       for v, dj in zip(row, d)]])
        mean_row = ["mean"]
        for j in range(len(lightings)):
            cell = _mean_cell([row[j] for row in values], pc)
            md, _ = _mean([d[j] for d in deltas])
            mean_row.append(cell + (f" ({_delta(md, pc)})" if md is not None else ""))
        rows.append(mean_row)
        note = (f"{title} on {split} per lighting condition; in brackets the change from regular lighting in "
                "points (the mean row averages the per-category changes).")
        tables.append(Table(f"Lighting robustness: {title}", ["category", *lightings], rows, note))
    return tables


def lighting_table(run_dirs: list[Path], split: str = "test_public") -> str:
    """The lighting robustness tables of some runs as markdown text (what `make demo` prints)."""
    tables = lighting_tables(_load_runs(run_dirs), split)
    if not tables:
        return "No per-lighting metrics in these runs."
    return "\n".join(line for t in tables for line in [*t.markdown("###"), ""])


# --------------------------------------------------------------------------------------------- analysis


def pro_curve(normal: torch.Tensor | np.ndarray, region: torch.Tensor | np.ndarray, n_regions: int,
              fpr_limit: float = FPR_LIMIT) -> tuple[np.ndarray, np.ndarray]:
    """The PRO curve up to `fpr_limit` from float16 histograms (`metrics.functional.ProHistograms.key_order`).

    Args:
        normal: (65536,) normal-pixel counts per float16 key; region: (65536,) summed 1/|region| per key.
        n_regions: number of GT regions.

    Returns:
        (fpr, pro) float64 arrays from (0, 0), one point per distinct score (ties collapsed), ending at
        `fpr_limit` with PRO interpolated linearly; the area under it divided by the limit is the AU-PRO.
    """
    normal, region = torch.as_tensor(normal), torch.as_tensor(region)  # numpy (CPU maps) or tensors
    normal_desc, region_desc = normal.double().flip(0), region.double().flip(0)  # highest score first
    present = (normal_desc > 0) | (region_desc > 0)
    n_ok = float(normal.sum())
    fp_cum = normal_desc.cumsum(0)[present] / max(n_ok, 1.0)
    fpr = np.concatenate([[0.0], fp_cum.clamp(max=1.0).numpy(), [1.0]])
    pro = np.concatenate([[0.0], (region_desc.cumsum(0)[present] / max(n_regions, 1)).clamp(max=1.0).numpy(),
                          [1.0]])
    n_in = int(np.searchsorted(fpr, fpr_limit, side="right"))
    xs, ys = fpr[:n_in], pro[:n_in]
    if n_in < fpr.size and xs[-1] < fpr_limit:
        x0, x1, y0, y1 = xs[-1], fpr[n_in], ys[-1], pro[n_in]
        xs, ys = np.append(xs, fpr_limit), np.append(ys, y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0))
    return xs, ys


@dataclass
class _Analysis:
    """What one pass over a run's cached test_public maps gives the report."""

    fpr: np.ndarray
    pro: np.ndarray
    pixel_pos: np.ndarray  # (65536,) counts per float16 key, GT-anomalous pixels
    pixel_neg: np.ndarray
    image_scores: list[tuple[float, int]]  # (max pixel score, label) per image
    per_image_f1: list[tuple[float, str]]  # (F1 of the predicted mask, sample id) per bad image
    samples: dict[str, Sample] = field(default_factory=dict)  # test_public samples by id (overlay inputs)


def _postprocess_config(config: dict[str, Any]) -> Any:
    from hybridad.postprocess import PostProcessConfig

    try:
        return PostProcessConfig(**(config.get("postprocess") or {}))
    except TypeError:
        return PostProcessConfig()


def _pred_mask(r: _Run, sid: str, amap: np.ndarray) -> np.ndarray | None:
    """The run's written mask; else the run's threshold + post-processing on the cached map; else None."""
    if r.run.mask_path(sid).is_file():
        return r.run.read_mask(sid)
    value = r.thresholds.get("value")
    if not isinstance(value, (int, float)):
        return None
    from hybridad.postprocess import binarize

    mask = binarize(torch.from_numpy(amap)[None, None], float(value), _postprocess_config(r.config))
    return mask[0, 0].numpy()


def _test_data(r: _Run) -> tuple[Any | None, str]:
    """The run's dataset config (`DataConfig`), when its data can be listed; else None and why not."""
    from hybridad.config import load_run_config

    try:
        data = load_run_config(r.run.path).data
    except UserError as err:
        return None, f"dataset not listed: {err}"
    if not Path(data.root).is_dir():
        return None, f"dataset not found at {Path(data.root) / data.category}"
    return data, ""


def _analyse(r: _Run) -> tuple[_Analysis | None, str]:
    from hybridad.labelled_maps import labelled_samples, labelled_test_maps
    from hybridad.metrics.functional import PixelHistograms, ProHistograms, f1_from_counts

    data, why = _test_data(r)
    if data is None:
        return None, why
    try:
        samples = labelled_samples(data, r.run, require_all=False)
    except UserError as err:
        return None, f"dataset not listed: {err}"
    if not samples:
        return None, "no test_public maps in the run"
    pro_hists, pixel_hists = ProHistograms(), PixelHistograms()
    image_scores, per_image = [], []
    for item in labelled_test_maps(r.run, data, samples=samples):
        s = item.sample
        amap, gt_np = item.anomaly_map[0, 0].numpy(), item.mask[0, 0].numpy()  # (H,W) float32, (H,W) bool
        pro_hists.add(amap, gt_np)
        pixel_hists.add(amap, gt_np)
        image_scores.append((float(amap.max()), int(s.label)))
        if s.label == 1:
            pred = _pred_mask(r, s.sample_id, amap)
            if pred is not None:
                tp = int((pred & gt_np).sum())
                f1 = f1_from_counts(tp, int(pred.sum()) - tp, int(gt_np.sum()) - tp)
                per_image.append((f1, s.sample_id))
    normal, region = pro_hists.key_order()  # (65536,) float64 each, key order
    pos, neg = pixel_hists.key_order()
    fpr, pro = pro_curve(normal, region, pro_hists.n_regions)
    return _Analysis(fpr, pro, np.asarray(pos), np.asarray(neg), image_scores, per_image,
                     {s.sample_id: s for s in samples}), ""


# ------------------------------------------------------------------------------------------------ plots


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_pro_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> None:
    """All categories' PRO curves up to FPR 0.05 in one figure, AU-PRO in the legend."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for cat, (fpr, pro) in curves.items():
        area = float(np.trapezoid(pro, fpr)) / FPR_LIMIT
        ax.plot(fpr, pro, lw=2, label=f"{cat} ({100 * area:.1f})")
    ax.set(xlim=(0, FPR_LIMIT), ylim=(0, 1), xlabel="false positive rate (normal pixels)",
           ylabel="per-region overlap (PRO)", title="PRO curves on test_public (legend: AU-PRO(0.05) %)")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=9, frameon=False)
    _save(fig, path)




def plot_histograms(a: _Analysis, thresholds: dict[str, float], title: str, path: Path) -> None:
    """Good vs bad pixel scores and image scores (max pixel score), each with the thresholds as lines."""
    from hybridad.metrics.functional import float16_key_values

    plt = _pyplot()
    values = float16_key_values().numpy()
    present = (a.pixel_pos + a.pixel_neg) > 0
    lo, hi = float(values[present].min()), float(values[present].max())
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, 61)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.4))
    classes = ((a.pixel_neg, "good (normal)", "tab:blue"), (a.pixel_pos, "bad (defective)", "tab:red"))
    for hist, label, colour in classes:
        keep = hist > 0
        if keep.any():
            counts, _ = np.histogram(values[keep], bins=edges, weights=hist[keep])
            density = counts / max(counts.sum(), 1.0)
            ax1.stairs(density, edges, fill=True, alpha=0.45, color=colour, label=label)
    ax1.set(yscale="log", xlabel="pixel score", ylabel="fraction of pixels", title="pixels")
    scores = np.array([s for s, _ in a.image_scores])
    labels = np.array([lab for _, lab in a.image_scores])
    img_edges = np.linspace(scores.min(), max(scores.max(), scores.min() + 1e-6), 21)
    for lab, colour in ((0, "tab:blue"), (1, "tab:red")):
        if (labels == lab).any():
            ax2.hist(scores[labels == lab], bins=img_edges, alpha=0.5, color=colour)
    ax2.set(xlabel="image score (max pixel score)", ylabel="images", title="images")
    for ax in (ax1, ax2):
        for rule, thr in thresholds.items():
            known = {r.name: r for r in compared_rules()}.get(rule)
            colour, style = ("black", "-") if rule == "run" else known.style if known else ("gray", "-")
            name = "threshold (run)" if rule == "run" else known.label if known else rule
            ax.axvline(thr, color=colour, ls=style, lw=1.6, label=f"{name}: {format_threshold(thr)}")
        ax.grid(alpha=0.25)
    handles, names = ax1.get_legend_handles_labels()
    fig.legend(handles, names, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=9, frameon=False)
    fig.suptitle(title, x=0.01, ha="left", fontsize=11)
    fig.tight_layout()
    _save(fig, path)


# --------------------------------------------------------------------------------------------- overlays


def _write_overlay(r: _Run, sample: Sample, out: Path, rel: Path) -> str:
    """Draw one overlay to `out/rel`; returns '' or why it was skipped."""
    sid = sample.sample_id
    image = imread(sample.image_path, cv2.IMREAD_COLOR)  # (H,W,3) BGR, gray -> 3 ch
    if image is None:
        return f"image {sample.image_path} missing"
    gt = imread(sample.mask_path, cv2.IMREAD_GRAYSCALE) if sample.mask_path else None
    amap = r.run.read_map(sid)
    value = r.thresholds.get("value")
    threshold = float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
    panel = overlay_panel(image, amap, gt, _pred_mask(r, sid, amap), threshold=threshold)
    ok, png = cv2.imencode(".png", panel)
    if not ok:
        return "PNG encoding failed"
    atomic_write_bytes(out / rel, png.tobytes())
    return ""


def best_and_worst(per_image_f1: list[tuple[float, str]], count: int) -> tuple[list, list]:
    """The `count` bad images with the highest and the lowest mask F1 (ties: sample-id order), disjoint."""
    ranked = sorted(per_image_f1, key=lambda t: (-t[0], t[1]))
    best = ranked[:count]
    worst = [t for t in sorted(per_image_f1, key=lambda t: (t[0], t[1])) if t not in best][:count]
    return best, worst


# ---------------------------------------------------------------------------------------------- writing


CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1280px;
padding:18px 28px;color:#1d2330}
h1{font-size:26px;margin:6px 0 2px}h2{font-size:20px;margin:34px 0 8px;border-bottom:2px solid #e3e6ec;
padding-bottom:4px}h3{font-size:17px;margin:22px 0 6px}
nav a{margin-right:14px;color:#2457c5;text-decoration:none}.sub{color:#5b6475;margin:0 0 8px}
table{border-collapse:collapse;margin:8px 0;font-variant-numeric:tabular-nums}
th,td{padding:5px 11px;border-bottom:1px solid #e3e6ec;text-align:left;white-space:nowrap}
th{background:#f3f5f9;font-weight:600}td.num{text-align:right}tr.mean td{font-weight:600;background:#fafbfd}
td.drop{color:#b42318}.note{color:#5b6475;font-size:13px;max-width:1100px;margin:4px 0 12px}
img{max-width:100%;border:1px solid #e3e6ec;border-radius:4px}
.cat{display:grid;grid-template-columns:repeat(auto-fill,minmax(600px,1fr));gap:10px 16px}.cat figure{margin:0}
caption{text-align:left;font-weight:600;padding:6px 0}
.cat img{width:100%;image-rendering:pixelated}
figcaption{font-size:13px;color:#5b6475;margin-top:2px}.skip{color:#8a5a00}
.kpi{display:inline-block;margin-right:18px;font-size:14px}.kpi b{font-size:17px}
"""


def _attr(value: str) -> str:
    """`value` safe inside a double-quoted HTML attribute (quotes, <, > and & escaped)."""
    return html.escape(value, quote=True)


def _kpis(r: _Run) -> str:
    parts = []
    for spec in shown_in("kpi"):
        value = _pct(_value(r.metrics, "test_public", spec.name), spec.percent)
        parts.append(f'<span class="kpi">{html.escape(spec.title or spec.name)} <b>{value}</b></span>')
    parts.append(f'<span class="kpi">threshold <b>{html.escape(_threshold_source(r))}</b></span>')
    return "".join(parts)


def write_report(run_dirs: list[Path], out: Path | None = None, num_overlays: int = 2) -> str:
    """Write `<out>/index.html`, `<out>/report.md` and their PNGs; return the markdown.

    Args:
        run_dirs: run directories, at most one per category.
        out: output folder; default `<first run dir>/report`.
        num_overlays: best and worst test_public bad images drawn per category (by mask F1); 0 = none.
    """
    if not run_dirs:
        raise UserError("report: give at least one run directory")
    if num_overlays < 0:
        raise UserError(f"report: --overlays {num_overlays}: give a count >= 0 (0 = none)")
    runs = _load_runs(run_dirs)
    out = Path(out) if out is not None else Path(run_dirs[0]) / "report"

    status = {r.category: run_status(r.run) for r in runs}
    for r in runs:
        if status[r.category]:
            print(f"warning: {r.run.path}: {status[r.category]}", file=sys.stderr, flush=True)
    md = ["# hybridad report", "", "Runs:", ""] + [
        f"- {r.category}: `{r.run.path}`" + (f" (**{status[r.category]}**)" if status[r.category] else "")
        for r in runs]
    body: list[str] = []
    nav: list[tuple[str, str]] = []

    def section(anchor: str, title: str, content: str) -> None:
        nav.append((anchor, title))
        body.append(f'<h2 id="{_attr(anchor)}">{html.escape(title)}</h2>{content}')

    paper = summary_table(runs)
    md += ["", *paper.markdown()]
    section("summary", "Summary", paper.html())
    defects = defect_table(runs)
    if defects is not None:
        md += ["", *defects.markdown()]
        section("defects", "Per defect type", defects.html())
    rules = rules_table(runs)
    if rules is not None:
        md += ["", *rules.markdown()]
        section("thresholds", "Threshold rules", rules.html())

    analyses: dict[str, _Analysis] = {}
    skipped: dict[str, str] = {}
    for r in runs:
        a, why = _analyse(r)
        if a is None:
            skipped[r.category] = why
        else:
            analyses[r.category] = a
    if analyses:
        plot_pro_curves({c: (a.fpr, a.pro) for c, a in analyses.items()}, out / "pro_curves.png")
        section("pro", "PRO curves", '<img src="pro_curves.png" alt="PRO curves">'
                '<p class="note">Per-region overlap against the false positive rate over all normal pixels '
                "of "
                "test_public, up to 0.05 (the AU-PRO(0.05) integration range).</p>")
        md += ["", "## PRO curves", "", "![PRO curves](pro_curves.png)"]

    light = lighting_tables(runs)
    if light:
        md += [line for t in light for line in ["", *t.markdown()]]
        section("lighting", "Lighting robustness", "".join(t.html(caption=True) for t in light))

    cat_html, cat_md = [], ["", "## Per category"]
    for r in runs:
        parts = [f'<h3 id="cat-{r.category}">{r.category}</h3><div>{_kpis(r)}</div>']
        cat_md += ["", f"### {r.category}"]
        a = analyses.get(r.category)
        if a is None:
            why = html.escape(skipped[r.category])
            parts.append(f'<p class="skip">plots and overlays skipped: {why}</p>')
            cat_md += ["", f"- {r.category}: plots and overlays skipped ({skipped[r.category]})"]
            cat_html.append("".join(parts))
            continue
        lines = _rule_lines(r)
        rel = Path("histograms") / f"{r.category}.png"
        plot_histograms(a, lines, f"{r.category}: test_public scores", out / rel)
        parts.append(f'<img src="{_attr(rel.as_posix())}" alt="{_attr(r.category)} score histograms">')
        cat_md += ["", f"![{r.category} histograms]({rel.as_posix()})"]
        if num_overlays > 0 and a.per_image_f1:
            best, worst = best_and_worst(a.per_image_f1, num_overlays)
            figs = []
            for kind, items in (("best", best), ("worst", worst)):
                for f1, sid in items:
                    name = sid.split("/", 2)[2].replace("/", "__")  # test_public/bad/<t>/<stem> -> <t>__<stem>
                    rel = Path("overlays") / r.category / f"{kind}_{name}.png"
                    why = _write_overlay(r, a.samples[sid], out, rel)
                    caption = f"{kind}: {sid} (mask F1 {100 * f1:.1f} %)"
                    if why:
                        figs.append(f'<p class="skip">{html.escape(caption)} skipped: {html.escape(why)}</p>')
                        cat_md.append(f"- {r.category}: overlay of {sid} skipped ({why})")
                        continue
                    figs.append(f'<figure><img src="{_attr(rel.as_posix())}" alt="{_attr(caption)}">'
                                f"<figcaption>{html.escape(caption)}</figcaption></figure>")
                    cat_md.append(f"![{r.category} {kind} {sid}]({rel.as_posix()})")
            parts.append(f'<div class="cat">{"".join(figs)}</div>')
        cat_html.append("".join(parts))
    legend = ('<p class="note">Histograms: pixel scores of normal (blue) and defective (red) test_public '
              "pixels, "
              "and image scores (max pixel score: an image is flagged when it reaches the threshold, before "
              "post-processing), with each rule's threshold. Overlays: the bad images whose predicted mask "
              "fits "
              "the ground truth best and worst; left, input with ground truth (magenta); right, anomaly map "
              "(JET, min-max per image; the colour bar gives the real scores and marks the run's threshold) "
              "with ground truth (magenta) and predicted mask (white), each outlined in black.</p>")
    section("categories", "Per category", legend + "".join(cat_html))
    md += cat_md

    for s in Split:
        if s == Split.TEST_PUBLIC and not any(is_mvtec_ad2(r) for r in runs):
            continue  # the summary is this table already
        if any(_value(r.metrics, s.value, m.name) is not None for r in runs for m in shown_in("headline")):
            t = main_table(runs, s.value)
            md += ["", *t.markdown()]
            section(f"all-{s.value}", f"Headline metrics: {s.value}", t.html())
    every = all_metrics_table(runs)
    md += ["", *every.markdown()]
    section("all-metrics", "All metrics", every.html())

    text = "\n".join(md) + "\n"
    atomic_write_bytes(out / "report.md", text.encode("utf-8"))
    links = "".join(f'<a href="#{_attr(a)}">{html.escape(t)}</a>' for a, t in nav)
    runs_line = ", ".join(f"{html.escape(r.category)}: <code>{html.escape(str(r.run.path))}</code>"
                          + (f' <b class="skip">({html.escape(status[r.category])})</b>' if status[r.category]
                             else "")
                          for r in runs)
    page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>hybridad report</title>'
            f"<style>{CSS}</style></head><body><h1>hybridad report</h1><p class=\"sub\">{len(runs)} run(s): "
            f"{runs_line}</p><nav>{links}</nav>{''.join(body)}</body></html>\n")
    atomic_write_bytes(out / "index.html", page.encode("utf-8"))
    return text


def _rule_lines(r: _Run) -> dict[str, float]:
    """Thresholds to mark on the histograms: the run's own and each rule's (when the run stored them)."""
    lines: dict[str, float] = {}
    value = r.thresholds.get("value")
    if isinstance(value, (int, float)) and math.isfinite(value):
        lines["run"] = float(value)
    for rule in compared_rules():
        v = _value(r.metrics, "test_public", f"threshold={rule.name}/value")
        if v is not None:
            lines[rule.name] = v
    return lines
