"""The demo's thread choice: every core on an idle machine, one thread on a busy one, or what the user forces."""

from __future__ import annotations

import os

import pytest
import torch

from hybridad import demo
from hybridad.demo import busy_cores, demo_threads, pick_threads


def test_pick_threads_by_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HYBRIDAD_DEMO_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(demo, "busy_cores", lambda: None)  # the load-average fallback
    monkeypatch.setattr(os, "getloadavg", lambda: (0.3, 0.2, 0.1))
    assert pick_threads() == 2  # idle
    monkeypatch.setattr(os, "getloadavg", lambda: (2.1, 2.0, 1.0))
    assert pick_threads(own_threads=2) == 2  # the load is our own previous category
    assert pick_threads(own_threads=0) == 1  # other jobs
    monkeypatch.setattr(os, "getloadavg", lambda: (11.0, 11.0, 11.0))
    assert pick_threads(own_threads=1) == 1
    monkeypatch.setenv("HYBRIDAD_DEMO_THREADS", "3")
    assert pick_threads(own_threads=1) == 3


def test_pick_threads_by_cpu_use_now(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HYBRIDAD_DEMO_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (5.0, 5.0, 5.0))  # a job that just ended: ignored
    monkeypatch.setattr(demo, "busy_cores", lambda: 0.2)
    assert pick_threads() == 2
    monkeypatch.setattr(demo, "busy_cores", lambda: 1.4)
    assert pick_threads() == 1


def test_busy_cores_sees_a_spinning_process() -> None:
    import subprocess
    import sys

    if busy_cores(0.05) is None:
        pytest.skip("no /proc/stat on this platform")
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time

        time.sleep(0.3)
        assert busy_cores(0.5) >= 0.7  # one core kept busy (allow for scheduler noise)
    finally:
        spinner.kill()
        spinner.wait()


def test_demo_threads_restores() -> None:
    before = torch.get_num_threads()
    with demo_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_bad_thread_override_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from hybridad.errors import UserError

    monkeypatch.setenv("HYBRIDAD_DEMO_THREADS", "two")
    with pytest.raises(UserError, match="HYBRIDAD_DEMO_THREADS"):
        pick_threads()


def test_adaptive_threads_switch_with_other_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from hybridad.demo import AdaptiveThreads

    monkeypatch.delenv("HYBRIDAD_DEMO_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    before = torch.get_num_threads()
    cb = AdaptiveThreads(threads=2, every=5)
    loads = iter([1.3, 0.1, None])  # a neighbour starts, it ends, /proc unreadable
    monkeypatch.setattr(cb.meter, "others", lambda: next(loads))
    try:
        for step, expect in ((3, 2), (4, 1), (9, 2), (14, 2)):  # checks after steps 5, 10, 15 (0-based 4, 9, 14)
            cb.on_train_batch_end(SimpleNamespace(global_step=step))
            assert cb.threads == expect and torch.get_num_threads() == expect, step
        assert cb.changes == [(4, 1), (9, 2)]
        monkeypatch.setenv("HYBRIDAD_DEMO_THREADS", "2")
        assert cb.choose(1.5) == 2  # a forced count is never overridden
    finally:
        torch.set_num_threads(before)


def test_other_processes_meter_subtracts_own_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from hybridad import demo as demo_mod

    now = demo_mod._cpu_jiffies()
    if now is None:
        pytest.skip("no /proc on this platform")
    t0 = time.process_time()
    while time.process_time() - t0 < 0.3:  # burn our own CPU: /proc/self/stat must see it
        pass
    assert demo_mod._cpu_jiffies()[2] - now[2] >= 15  # >= 0.15 s in 100 Hz jiffies
    samples = iter([(1000, 200, 300), (2000, 300, 800), (2000, 300, 800)])
    monkeypatch.setattr(demo_mod, "_cpu_jiffies", lambda: next(samples))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    meter = demo_mod.OtherProcessesMeter()
    # 1000 jiffies over 2 cores: 100 idle, 500 ours -> others used 400 / 1000 of the machine = 0.8 cores
    assert meter.others() == pytest.approx(0.8)
    assert meter.others() is None  # no time elapsed: no figure


def test_a_neighbour_measured_below_one_core_still_means_one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process spinning on one core measures 0.8-1.0 cores while the demo competes with it (issue 16: at the
    old bar of a whole core the demo went back to 2 threads beside `yes` and took 858 s instead of ~540 s)."""
    monkeypatch.delenv("HYBRIDAD_DEMO_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert [demo.threads_for(c) for c in (0.0, 0.3, 0.49, 0.5, 0.8, 0.97, 1.6)] == [2, 2, 2, 1, 1, 1, 1]
    monkeypatch.setattr(demo, "busy_cores", lambda: 0.85)
    assert pick_threads() == 1


def test_adaptive_threads_recheck_during_eval_after_a_long_enough_window(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from hybridad.demo import AdaptiveThreads

    monkeypatch.delenv("HYBRIDAD_DEMO_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    # (total, idle, own) jiffies; 1 s over 2 cores at 100 Hz = 200 jiffies of machine time
    samples = iter([(0, 0, 0), (100, 50, 10), (250, 60, 100), (300, 200, 110), (500, 300, 150)])
    monkeypatch.setattr(demo, "_cpu_jiffies", lambda: next(samples))
    before = torch.get_num_threads()
    cb = AdaptiveThreads(threads=2)  # reads (0, 0, 0)
    trainer = SimpleNamespace(global_step=7)
    try:
        cb.on_test_batch_end(trainer)  # 100 jiffies: too short a window, nothing judged
        assert cb.threads == 2
        cb.on_validation_batch_end(trainer)  # 250 jiffies since (0,0,0): others (250-60-100)/250*2 = 0.72
        assert cb.threads == 1 and torch.get_num_threads() == 1
        cb.on_predict_batch_end(trainer)  # 50 jiffies since the last figure: too short
        assert cb.threads == 1
        cb.on_predict_batch_end(trainer)  # 250 jiffies: others (250-240-50)/250 < 0 -> 0: idle again
        assert cb.threads == 2 and cb.changes == [(7, 1), (7, 2)]
    finally:
        torch.set_num_threads(before)
