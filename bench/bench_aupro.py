"""AU-PRO, pixel AUROC and F1-max speed vs the global-sort references, idle and with busy neighbours.

Data: MVTec's toy set as their `generate_toy_dataset` describes it (200 uniform maps of 300x500, one 10x10 GT
square each; our own generator, `bench/mvtec_reference.py`), cast to float16 as the server reads TIFFs.
Baseline: our numpy rendering of MVTec's AU-PRO code (per-pixel change arrays, one global argsort, cumulative
sums), and global-sort pixel AUROC / F1-max. Ours: the streaming float16 histograms of `hybridad.metrics`.

Every figure is a ratio measured side by side in one run: each variant runs in a fresh subprocess with torch's
default thread count (what a user gets), first on the machine as it is ("idle"), then with `--busy` processes
spinning (`python -c "while True: pass"`) beside it. The native-category row streams 156 maps of 2448x2048
(fabric's test_public) through the `AUPRO` metric and reports the peak memory the metric adds (ru_maxrss growth).

    python -m bench.bench_aupro [--busy 2]
"""

from __future__ import annotations

import argparse
import os
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np

TOY = dict(num_images=200, image_width=500, image_height=300, gt_size=10)  # 30 M pixels
NATIVE = dict(n=156, h=2048, w=2448)  # fabric test_public at native size
VARIANTS = ("aupro_mvtec_reference", "aupro", "pixel_auroc_by_sort", "pixel_auroc", "f1_max_by_sort",
            "pixel_f1_max", "aupro_native_category")  # fmt: skip
BASELINE = {"aupro": "aupro_mvtec_reference", "pixel_auroc": "pixel_auroc_by_sort",
            "pixel_f1_max": "f1_max_by_sort"}  # fmt: skip


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _toy16() -> tuple[list[np.ndarray], list[np.ndarray]]:
    from bench.mvtec_reference import toy_dataset

    maps, masks = toy_dataset(**TOY)
    return [m.astype(np.float16) for m in maps], masks


def _timed(fn: Callable[[], float], repeats: int) -> tuple[float, float]:
    """(median seconds, value) over `repeats` calls."""
    times, value = [], float("nan")
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), value


def _native_category() -> tuple[float, float, float]:
    """Stream the native-size category through AUPRO: (seconds in the metric, value, peak MiB added)."""
    import torch

    from hybridad.metrics import AUPRO

    gen = np.random.default_rng(0)
    h, w = NATIVE["h"], NATIVE["w"]
    metric = AUPRO(fpr_limit=0.05)
    smooth = np.linspace(0, 1, w, dtype=np.float32)[None, :] * np.linspace(0, 1, h, dtype=np.float32)[:, None]
    base, seconds = _max_rss_mib(), 0.0
    for i in range(NATIVE["n"]):
        mask = np.zeros((h, w), np.uint8)
        if i % 3 != 2:  # every third image good, else 1-4 blobs
            for _ in range(int(gen.integers(1, 5))):
                y, x = int(gen.integers(0, h - 200)), int(gen.integers(0, w - 200))
                mask[y : y + int(gen.integers(3, 200)), x : x + int(gen.integers(3, 200))] = 1
        m = (smooth + 0.3 * mask + 0.05 * gen.random((h, w), np.float32)).astype(np.float16)
        t0 = time.perf_counter()
        metric.update(torch.from_numpy(m)[None], torch.from_numpy(mask)[None])
        seconds += time.perf_counter() - t0
    t0 = time.perf_counter()
    value = float(metric.compute())
    return seconds + time.perf_counter() - t0, value, _max_rss_mib() - base


def _variant(name: str) -> dict:
    import torch

    from bench import mvtec_reference as ref
    from hybridad.metrics.functional import au_pro, pixel_auroc, pixel_f1_max

    row: dict = {"variant": name, "torch_threads": torch.get_num_threads()}
    if name == "aupro_native_category":
        seconds, value, peak = _native_category()
        row.update(data=f"{NATIVE['n']} x {NATIVE['w']}x{NATIVE['h']}", seconds=round(seconds, 3),
                   value=round(value, 8), peak_mib=round(peak, 1))  # fmt: skip
        return row
    maps, masks = _toy16()
    fns: dict[str, tuple[Callable[[], float], int]] = {
        "aupro_mvtec_reference": (lambda: ref.au_pro_reference(maps, masks, 0.05), 1),
        "aupro": (lambda: au_pro(maps, masks, fpr_limit=0.05), 5),
        "pixel_auroc_by_sort": (lambda: ref.pixel_roc_auc_by_sort(maps, masks), 1),
        "pixel_auroc": (lambda: pixel_auroc(maps, masks), 5),
        "f1_max_by_sort": (lambda: ref.pixel_f1_max_by_sort(maps, masks), 1),
        "pixel_f1_max": (lambda: pixel_f1_max(maps, masks)[0], 5),
    }
    fn, repeats = fns[name]
    seconds, value = _timed(fn, repeats)
    row.update(data="toy 200 x 500x300 float16", seconds=round(seconds, 4), value=round(value, 10))
    return row


def _run_variants(load: str, names: tuple[str, ...]) -> list[dict]:
    rows = []
    for name in names:
        cmd = [sys.executable, "-m", "bench.bench_aupro", "--variant", name]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append({"load": load, **json.loads(out.strip().splitlines()[-1])})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # progress: the busy run takes minutes
    by_name = {r["variant"]: r for r in rows}
    for ours, base in BASELINE.items():
        if ours not in by_name:
            continue
        r, b = by_name[ours], by_name[base]
        r["speedup"] = round(b["seconds"] / r["seconds"], 1)
        r["abs_diff"] = f"{abs(r['value'] - b['value']):.1e}"
    return rows


def run(busy: int = 2, only_aupro: bool = False) -> list[dict]:
    """Every variant idle, then with `busy` spinning processes beside it (the native category only idle); one
    row per variant and load. `only_aupro`: just AU-PRO and its MVTec baseline, with the busy processes."""
    rows = [] if only_aupro else _run_variants("idle", VARIANTS)
    if busy:
        spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
        try:
            names = VARIANTS[:2] if only_aupro else VARIANTS[:-1]
            rows += _run_variants(f"{busy} busy procs, load {os.getloadavg()[0]:.1f}", names)
        finally:
            for p in spinners:  # our own children, ended by handle
                p.kill()
                p.wait()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default=None, help="run one variant in this process and print JSON")
    parser.add_argument("--busy", type=int, default=2, help="spinning processes for the loaded run (0: none)")
    parser.add_argument("--only-aupro", action="store_true", help="AU-PRO and MVTec's code only, busy run only")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(_variant(args.variant)))
        return
    from bench.table import markdown_table

    print(markdown_table(run(args.busy, args.only_aupro)))


if __name__ == "__main__":
    main()
