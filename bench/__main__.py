"""`make bench` / `python -m bench [--only SUITE ...] [--gpu]`: every benchmark, as tables.

Numbers are measured, never asserted: run on an idle machine and quote them with the machine they came from.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

from bench.table import markdown_table

SUITES = ("data", "aupro", "inp_former", "cpr", "disk", "plan", "thresholds")  # thresholds: trains, minutes


def _runner(name: str, gpu: bool) -> Callable[[], list[dict]]:
    if name == "data":
        from bench.bench_data import run as run_data

        return run_data
    if name == "aupro":
        from bench.bench_aupro import run as run_aupro

        return run_aupro
    if name == "disk":
        from bench.bench_disk import run as run_disk

        return run_disk
    if name == "thresholds":
        from bench.bench_thresholds import run as run_thresholds

        return run_thresholds
    if name == "plan":
        from bench.bench_plan import run as run_plan

        return run_plan
    if name == "inp_former":
        from bench.bench_inp_former import run as run_inp
        from bench.bench_inp_former import vs_official

        return lambda: run_inp(gpu=gpu) + vs_official(device="cuda" if gpu else "cpu")
    from bench.bench_cpr import run as run_cpr

    return lambda: run_cpr(gpu=gpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=SUITES, default=list(SUITES))
    parser.add_argument("--gpu", action="store_true", help="model benchmarks at the winning setup on CUDA")
    parser.add_argument("--json", default=None, help="also write all rows to this JSON file")
    args = parser.parse_args()
    results: dict[str, list[dict]] = {}
    for name in args.only:
        t0 = time.time()
        print(f"## {name}", flush=True)
        rows = _runner(name, args.gpu)()
        results[name] = rows
        print(markdown_table(rows), f"\n({time.time() - t0:.0f} s)\n", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
