"""`hybridad train-all`: one process per category and GPU slot, failures isolated, completed ones skipped, SLURM
array tasks, summary. The per-category command is a stand-in process (real `hybridad train` is covered elsewhere)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from hybridad import train_all as ta
from hybridad.cli import main
from hybridad.errors import UserError

# Stand-in for `hybridad train`: records its GPU and time span, fails for $FAIL_CATEGORY, writes a completed run.
FAKE_TRAIN = r"""
import json, os, sys, time
from pathlib import Path
args = dict(a.split("=", 1) for a in sys.argv[1:])
cat, out = args["data.category"], Path(args["out_dir"])
t0 = time.time(); time.sleep(0.6)
(out / "trace").mkdir(parents=True, exist_ok=True)
(out / "trace" / cat).write_text(json.dumps({"gpu": os.environ.get("CUDA_VISIBLE_DEVICES"),
                                             "start": t0, "end": time.time()}))
if cat == os.environ.get("FAIL_CATEGORY"):
    print("boom"); sys.exit(3)
run = out / cat / "r1"; run.mkdir(parents=True)
(run / "state.json").write_text(json.dumps({"state": "completed"}))
(out / cat / "latest").symlink_to("r1")
print(f"run directory: {run}")
"""


def _fake(tmp_path: Path) -> list[str]:
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    return [sys.executable, str(script)]


def test_one_category_per_gpu_failure_isolated_and_rerun_skips(tmp_path, monkeypatch) -> None:
    out = tmp_path / "runs"
    cats = ["can", "fabric", "rice", "vial"]
    monkeypatch.setenv("FAIL_CATEGORY", "rice")
    results = ta.train_all([f"out_dir={out}"], cats, gpus=["0", "1"], command=_fake(tmp_path))
    states = {r.category: r.state for r in results}
    assert states == {"can": "completed", "fabric": "completed", "rice": "failed (exit 3)", "vial": "completed"}
    assert ta.exit_code(results) == 1
    traces = {c: json.loads((out / "trace" / c).read_text()) for c in cats}
    assert {t["gpu"] for t in traces.values()} == {"0", "1"}  # each process saw one GPU
    assert traces["can"]["start"] < traces["fabric"]["end"] and traces["fabric"]["start"] < traces["can"]["end"]
    for t in range(len(cats)):  # never more than 2 at once
        at = traces[cats[t]]["start"] + 0.01
        assert sum(tr["start"] <= at < tr["end"] for tr in traces.values()) <= 2
    by_cat = {r.category: r for r in results}
    assert by_cat["can"].run_dir == out / "can" / "r1" and "boom" in by_cat["rice"].log.read_text()
    assert "| rice | failed (exit 3) |" in ta.summary_table(results)

    monkeypatch.delenv("FAIL_CATEGORY")
    before = {c: (out / "trace" / c).stat().st_mtime_ns for c in cats}
    time.sleep(0.05)
    again = ta.train_all([f"out_dir={out}"], cats, gpus=["0", "1"], command=_fake(tmp_path))
    assert {r.category: r.state for r in again} == {"can": "skipped (completed before)",
                                                   "fabric": "skipped (completed before)",
                                                   "rice": "completed", "vial": "skipped (completed before)"}
    assert ta.exit_code(again) == 0
    assert all((out / "trace" / c).stat().st_mtime_ns == before[c] for c in ("can", "fabric", "vial"))


def test_slurm_array_task_picks_its_category(tmp_path, monkeypatch) -> None:
    cats = ["can", "fabric", "rice"]
    assert ta.slurm_category(cats, {"SLURM_ARRAY_TASK_ID": "2"}) == "rice"
    with pytest.raises(UserError, match="SLURM_ARRAY_TASK_ID is not set"):
        ta.slurm_category(cats, {})
    with pytest.raises(UserError, match="outside 0..2"):
        ta.slurm_category(cats, {"SLURM_ARRAY_TASK_ID": "3"})
    # a simulated array task through the CLI, with the stand-in trainer
    out = tmp_path / "runs"
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setattr(ta, "train_command", lambda: _fake(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        main(["train-all", "--slurm-array", f"out_dir={out}"])
    assert exit_info.value.code == 0
    assert (out / "fabric" / "latest").is_dir() and not (out / "can").exists()
    summary = ta.summary_from_runs([f"out_dir={out}"], ["can", "fabric"])
    assert [(r.category, r.state) for r in summary] == [("can", "not completed"), ("fabric", "completed")]


def test_bad_gpu_list_is_user_error() -> None:
    assert ta.parse_gpus("0, 2,3") == ["0", "2", "3"]
    for bad in ("", "0,0", "a,1", "-1"):
        with pytest.raises(UserError, match="--gpus"):
            ta.parse_gpus(bad)
