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


def suites() -> tuple[str, ...]:
    """Every suite: data, aupro, one per registered branch with a `bench/bench_<branch>.py` (its
    `suite(gpu)`), disk, plan and thresholds (thresholds trains: minutes)."""
    import importlib.util

    from hybridad.branches import branch_names

    models = tuple(n for n in branch_names() if importlib.util.find_spec(f"bench.bench_{n}") is not None)
    return ("data", "aupro", *models, "disk", "plan", "thresholds")


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
    import importlib

    from hybridad.branches import get_branch

    branch = get_branch(name)  # a model benchmark: `bench/bench_<branch>.py`
    return lambda: importlib.import_module(f"bench.bench_{branch.name}").suite(gpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=suites(), default=list(suites()))
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
