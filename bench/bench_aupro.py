"""AU-PRO time and peak memory: streaming float16 histograms vs the global sort, and one native-size category.

Each variant runs in a fresh subprocess; peak memory is the growth of the process's max RSS (ru_maxrss) over
the figure taken once its input is in memory, so it counts what the metric itself allocates. Torch runs on one
thread by default: on a shared, loaded machine two OpenMP threads spin-wait on each other and the small-map
variant became 30x slower (28 s vs 0.9 s), which measures the neighbours, not the metric.

    python -m bench.bench_aupro
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

SMALL = dict(n=150, h=500, w=400)  # 30 M pixels, the size of MVTec's own toy check
NATIVE = dict(n=156, h=2048, w=2448)  # fabric test_public: 156 maps at native 2448 x 2048


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _make_pair(i: int, h: int, w: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(1,1,h,w) float16-representable scores and (1,1,h,w) mask: every 3rd image good, else 1-4 blobs."""
    mask = torch.zeros(1, 1, h, w)
    if i % 3 != 2:
        for _ in range(int(torch.randint(1, 5, (1,), generator=gen))):
            y, x = (int(v) for v in torch.randint(0, min(h, w) - 40, (2,), generator=gen))
            bh, bw = (int(v) for v in torch.randint(3, 40, (2,), generator=gen))
            mask[..., y : y + bh, x : x + bw] = 1
    scores = torch.rand(1, 1, h, w, generator=gen) + 0.3 * mask
    return scores.half().float(), mask


def _variant(name: str, threads: int = 1) -> dict:
    from hybridad.metrics import AUPRO
    from hybridad.metrics.functional import au_pro

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    if name in ("float16_stream", "global_sort"):
        cfg = SMALL
        pairs = [_make_pair(i, cfg["h"], cfg["w"], gen) for i in range(cfg["n"])]
        maps, masks = [p[0][0, 0] for p in pairs], [p[1][0, 0] for p in pairs]
        base = _max_rss_mib()
        t0 = time.perf_counter()
        value = au_pro(maps, masks, quantize="float16" if name == "float16_stream" else None)
        seconds = time.perf_counter() - t0
    elif name == "native_category":
        cfg = NATIVE
        metric = AUPRO(fpr_limit=0.05)
        m, g = _make_pair(0, cfg["h"], cfg["w"], gen)  # warm allocator at this size, counted in the base
        del m, g
        base = _max_rss_mib()
        seconds = 0.0
        for i in range(cfg["n"]):
            m, g = _make_pair(i, cfg["h"], cfg["w"], gen)  # generated on the fly, never all held
            t0 = time.perf_counter()
            metric.update(m, g)
            seconds += time.perf_counter() - t0
        t0 = time.perf_counter()
        value = float(metric.compute())
        seconds += time.perf_counter() - t0
    else:
        raise ValueError(f"unknown variant {name}")
    pixels = cfg["n"] * cfg["h"] * cfg["w"]
    return dict(
        variant=name,
        images=cfg["n"],
        size=f"{cfg['w']}x{cfg['h']}",
        mpixels=round(pixels / 1e6, 1),
        aupro=round(value, 6),
        seconds=round(seconds, 2),
        peak_mib=round(_max_rss_mib() - base, 1),
        threads=torch.get_num_threads(),
    )


def run(threads: int = 1) -> list[dict]:
    """Run every variant in its own subprocess with `threads` torch threads; returns one row per variant."""
    rows = []
    for name in ("float16_stream", "global_sort", "native_category"):
        cmd = [sys.executable, "-m", "bench.bench_aupro", "--variant", name, "--threads", str(threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", default=None, help="run one variant in this process and print JSON")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per variant")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(_variant(args.variant, args.threads)))
        return
    rows = run(args.threads)
    cols = ["variant", "images", "size", "mpixels", "aupro", "seconds", "peak_mib", "threads"]
    print(" | ".join(f"{c:>15}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r[c]!s:>15}" for c in cols))


if __name__ == "__main__":
    main()
