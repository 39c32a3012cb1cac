"""`make gpu-check`: the GPU figures of the README's performance table, in one run (< 8 minutes), into one JSON.

Measures (random-init models; weights change nothing in the cost):
- INP-Former ViT-L/14 reg4, 448 px, batch 16 training step, fp32 and bf16-mixed: seconds and peak memory;
- INP-Former ours / official arithmetic (same weights) on the GPU: training step and per-image inference;
- CPR 320 px batch-8 training step;
- AU-PRO on the GPU for 100 maps of 2448x2048 (`AUPRO.update` per map, then `compute`);
- the predict path on one 2448x2048 image (tiling 2x4 at 448 px + INP-Former maps + untile, bf16);
- the decoded-image feed (`bench.bench_data`) at true sizes.

Without a CUDA device it prints one line and exits 0. `--device cpu --tiny` runs the same logic on tiny sizes
(tests only; its figures mean nothing).

    python -m bench.gpu_check --out gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from bench.device_timing import timed

NO_DEVICE = "gpu-check: no CUDA device on this machine; nothing measured (run `make gpu-check` where a GPU is)"


def _section(results: dict, name: str, fn: Callable[[], object]) -> None:
    """Run one measurement; an error is recorded in the JSON (one line) instead of stopping the others."""
    t0 = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as err:  # a measurement that fails (e.g. out of memory) must not lose the others
        results[name] = {"error": f"{type(err).__name__}: {err}".splitlines()[0],
                         "trace": traceback.format_exc().splitlines()[-3:]}  # fmt: skip
    print(f"gpu-check: {name} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)


def _aupro_rows(device: torch.device, n: int, h: int, w: int) -> dict:
    from hybridad.metrics import AUPRO

    gen = torch.Generator(device="cpu").manual_seed(0)
    metric = AUPRO(fpr_limit=0.05).to(device)
    smooth = torch.linspace(0, 1, w)[None, :] * torch.linspace(0, 1, h)[:, None]  # (h,w)
    maps, masks = [], []
    for i in range(min(n, 4)):  # 4 distinct maps on the device, cycled: the metric's cost, not the generator's
        mask = torch.zeros(h, w, dtype=torch.uint8)
        y, x = int(torch.randint(0, max(1, h - h // 8), (1,), generator=gen)), int(torch.randint(0, max(1, w - w // 8), (1,), generator=gen))
        if i % 2 == 0:
            mask[y : y + h // 10 + 1, x : x + w // 10 + 1] = 1
        maps.append((smooth + 0.3 * mask + 0.05 * torch.rand(h, w, generator=gen)).to(torch.float16).to(device))
        masks.append(mask.to(device))

    def run() -> float:
        metric.reset()
        for i in range(n):
            metric.update(maps[i % len(maps)][None], masks[i % len(masks)][None])
        return float(metric.compute())

    run()  # warm-up
    seconds = timed(run, device, 1)[0]
    return {"maps": n, "size": [h, w], "device": str(device), "seconds": round(seconds, 3),
            "maps_per_s": round(n / seconds, 1)}  # fmt: skip


def _predict_row(device: torch.device, tiny: bool) -> dict:
    from bench.bench_inp_former import run as run_inp
    from hybridad.models.inp_former.config import InpFormerConfig

    if tiny:
        cfg = InpFormerConfig(preset="tiny", tiny_depth=2, num_inps=2)
        rows = run_inp(gpu=True, cfg=cfg, input_size=28, batch_size=2, steps=1, device=str(device), bf16=False,
                       image_size=(56, 84), grid=(1, 2))  # fmt: skip
    else:
        rows = run_inp(gpu=True, steps=3, device=str(device), image_size=(2048, 2448), grid=(2, 4))
    return rows[-1]  # inp_former_inference_native_image


def gpu_check(device: str = "cuda", tiny: bool = False) -> dict:
    """Every measurement into one dict (see the module docstring)."""
    from bench import bench_cpr, bench_data
    from bench.bench_inp_former import run as run_inp
    from bench.bench_inp_former import vs_official
    from hybridad.models.inp_former.config import InpFormerConfig

    dev = torch.device(device)
    results: dict = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor()})",
        "torch": torch.__version__, "tiny": tiny, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }  # fmt: skip
    if tiny:
        inp = dict(cfg=InpFormerConfig(preset="tiny", tiny_depth=2, num_inps=2), input_size=28, batch_size=2, steps=1)
    else:
        inp = dict(steps=5)  # run(gpu=True): ViT-L/14 reg4, 448 px, batch 16
    for precision, bf16 in (("fp32", False), ("bf16_mixed", True)):
        _section(results, f"inp_former_train_{precision}",
                 lambda bf16=bf16: run_inp(gpu=True, device=device, bf16=bf16, **inp)[0])  # fmt: skip
    if tiny:
        _section(results, "inp_former_vs_official", lambda: vs_official(
            cfg=inp["cfg"], input_size=28, batch_size=1, steps=1, device=device))
    else:
        _section(results, "inp_former_vs_official", lambda: vs_official(device=device, batch_size=8, steps=5))
    size, batch = (32, 2) if tiny else (320, 8)
    _section(results, "cpr_train_step", lambda: bench_cpr.train_step_row(dev, size=size, batch=batch,
                                                                          refs=4 if tiny else 12))
    n, h, w = (3, 64, 48) if tiny else (100, 2048, 2448)
    _section(results, "aupro_gpu", lambda: _aupro_rows(dev, n, h, w))
    _section(results, "predict_one_image", lambda: _predict_row(dev, tiny))
    if tiny:
        _section(results, "data_feed", lambda: {"skipped": "tiny mode"})
    else:
        _section(results, "data_feed", lambda: bench_data.run(categories=("can", "fabric", "sheet_metal"),
                                                               n_images=8, epochs=2))
    if dev.type == "cuda":
        results["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--device", default="cuda", help="cuda (default); cpu only with --tiny (tests)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: checks the logic, measures nothing")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(NO_DEVICE)
        return 0
    if args.device != "cuda" and not args.tiny:
        parser.error("--device cpu is for --tiny (the logic test); the figures need a GPU")
    t0 = time.time()
    results = gpu_check(args.device, args.tiny)
    results["seconds_total"] = round(time.time() - t0, 1)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    errors = [k for k, v in results.items() if isinstance(v, dict) and "error" in v]
    print(f"gpu-check: wrote {args.out} in {results['seconds_total']} s"
          + (f"; failed: {', '.join(errors)}" if errors else ""))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
