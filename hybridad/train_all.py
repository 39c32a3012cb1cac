"""`hybridad train-all`: every category, one `hybridad train` process per category, one per GPU at a time.

- `--gpus 0,1,2,3`: up to 4 categories run at once, each process sees one GPU (`CUDA_VISIBLE_DEVICES`); a
  freed GPU takes the next category. Without `--gpus`, `--jobs N` CPU processes (default 1: one after another).
- Each category gets its own run directory (`<out_dir>/<category>/<run>`, as `hybridad train`); its output goes
  to `<out_dir>/train_all_logs/<category>.log`.
- A category whose `<out_dir>/<category>/latest` run is completed is skipped, so a re-run finishes only what
  failed or never ran. A failed category does not stop the others; the exit code is 1 when any failed.
- SLURM (`--slurm-array`): one category per array task, `categories[$SLURM_ARRAY_TASK_ID]` (see
  docs/train_all.md); `--summary` prints the table of every category from the run directories.

A summary table (category, state, seconds, run directory, log) ends every call.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hybridad.errors import UserError
from hybridad.run_claim import LATEST
from hybridad.run_dir import RunDir
from hybridad.types import CATEGORIES

LOG_DIR = "train_all_logs"


def train_command() -> list[str]:
    """The per-category command before `data.category=<c>` and the overrides."""
    return [sys.executable, "-m", "hybridad", "train"]


@dataclass
class CategoryResult:
    """How one category ended in this call."""

    category: str
    state: str  # "completed" | "skipped (completed before)" | "failed (exit N)" | "not run"
    seconds: float | None
    run_dir: Path | None
    log: Path | None


def parse_gpus(spec: str) -> list[str]:
    """'0,1,3' -> ['0', '1', '3']; a UserError for anything but distinct non-negative integers."""
    ids = [s.strip() for s in spec.split(",") if s.strip()]
    if not ids or any(not s.isdigit() for s in ids) or len(set(ids)) != len(ids):
        raise UserError(f"--gpus {spec!r}: give distinct GPU indices separated by commas, e.g. --gpus 0,1,2,3")
    return ids


def completed_run(out_dir: Path, category: str) -> Path | None:
    """The category's `latest` run when it is completed, else None."""
    latest = out_dir / category / LATEST
    if latest.is_dir() and RunDir(latest).read_state().get("state") == "completed":
        return latest.resolve()
    return None


def slurm_category(categories: list[str], environ: dict[str, str] | None = None) -> str:
    """The category of this SLURM array task: `categories[SLURM_ARRAY_TASK_ID]`."""
    env = os.environ if environ is None else environ
    task = env.get("SLURM_ARRAY_TASK_ID")
    if task is None:
        raise UserError("--slurm-array: SLURM_ARRAY_TASK_ID is not set; submit with "
                        f"`sbatch --array=0-{len(categories) - 1} ...` (see docs/train_all.md)")
    if not task.isdigit() or int(task) >= len(categories):
        raise UserError(f"--slurm-array: SLURM_ARRAY_TASK_ID={task} is outside 0..{len(categories) - 1} "
                        f"({len(categories)} categories); use --array=0-{len(categories) - 1}")
    return categories[int(task)]


def _out_dir(overrides: list[str]) -> Path:
    from hybridad.config import load_config

    cfg = load_config(overrides)  # config errors stop train-all before any process starts
    return Path(cfg.out_dir)


def _run_dir_from_log(log: Path) -> Path | None:
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith("run directory: "):
            return Path(line.removeprefix("run directory: ").strip())
    return None


def train_all(
    overrides: list[str],
    categories: list[str] | None = None,
    gpus: list[str] | None = None,
    jobs: int = 1,
    command: list[str] | None = None,
) -> list[CategoryResult]:
    """Train every category not yet completed, `len(gpus)` (or `jobs`) at a time; returns one result each.

    `command`: the per-category command before `data.category=<c>` and the overrides (default `train_command()`;
    tests pass a stand-in).
    """
    cats = list(categories or CATEGORIES)
    unknown = sorted(set(cats) - set(CATEGORIES))
    if unknown:
        raise UserError(f"unknown categories {unknown}; valid: {', '.join(CATEGORIES)}")
    if jobs < 1:
        raise UserError(f"--jobs {jobs}: use a positive number of concurrent categories")
    out_dir = _out_dir(overrides)
    base = list(command or train_command())
    slots: list[str | None] = list(gpus) if gpus else [None] * jobs
    results: dict[str, CategoryResult] = {}
    todo = []
    for cat in cats:
        done = completed_run(out_dir, cat)
        if done is not None:
            results[cat] = CategoryResult(cat, "skipped (completed before)", None, done, None)
        else:
            todo.append(cat)
    logs = out_dir / LOG_DIR
    if todo:
        logs.mkdir(parents=True, exist_ok=True)
    running: dict[int, tuple[str, subprocess.Popen, float, Path]] = {}  # slot -> (category, process, start, log)
    free = list(range(len(slots)))
    while todo or running:
        while todo and free:
            slot, cat = free.pop(0), todo.pop(0)
            env = dict(os.environ)
            if slots[slot] is not None:
                env["CUDA_VISIBLE_DEVICES"] = str(slots[slot])
            log = logs / f"{cat}.log"
            where = f"GPU {slots[slot]}" if slots[slot] is not None else f"slot {slot}"
            print(f"train-all: {cat} started on {where} (log {log})", flush=True)
            with log.open("w") as fh:
                proc = subprocess.Popen([*base, f"data.category={cat}", *overrides], stdout=fh,
                                        stderr=subprocess.STDOUT, env=env)
            running[slot] = (cat, proc, time.time(), log)
        time.sleep(0.2)
        for slot, (cat, proc, t0, log) in list(running.items()):
            rc = proc.poll()
            if rc is None:
                continue
            del running[slot]
            free.append(slot)
            state = "completed" if rc == 0 else f"failed (exit {rc})"
            results[cat] = CategoryResult(cat, state, time.time() - t0, _run_dir_from_log(log), log)
            print(f"train-all: {cat} {state} after {time.time() - t0:.0f} s", flush=True)
    return [results[c] for c in cats]


def summary_from_runs(overrides: list[str], categories: list[str] | None = None) -> list[CategoryResult]:
    """Each category's state from its run directories (for SLURM arrays, after the tasks ended)."""
    out_dir = _out_dir(overrides)
    rows = []
    for cat in categories or CATEGORIES:
        done = completed_run(out_dir, cat)
        log = out_dir / LOG_DIR / f"{cat}.log"
        rows.append(CategoryResult(cat, "completed" if done else "not completed", None, done,
                                   log if log.is_file() else None))
    return rows


def summary_table(results: list[CategoryResult]) -> str:
    """Markdown table of `results`."""
    lines = ["| category | state | seconds | run directory | log |", "|---|---|---|---|---|"]
    for r in results:
        secs = "" if r.seconds is None else f"{r.seconds:.0f}"
        lines.append(f"| {r.category} | {r.state} | {secs} | {r.run_dir or ''} | {r.log or ''} |")
    return "\n".join(lines)


def exit_code(results: list[CategoryResult]) -> int:
    """0 when every category is completed (now or before), else 1."""
    return 0 if all(r.state == "completed" or r.state.startswith("skipped") for r in results) else 1
