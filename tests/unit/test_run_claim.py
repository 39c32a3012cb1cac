"""Run claiming (atomic, unique, locked), `latest`, resume targets and the resumable training order."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from data_modules.train_sampler import EpochSampler, ResumableLoader, decode_item_index
from hybridad import run_claim
from hybridad.errors import UserError
from hybridad.run_claim import claim_new_run, lock_run, publish_latest, resolve_resume_target, unlock_run

STAMP = "20260101-000000"


def _claim(out: str) -> str:
    return claim_new_run(out, "can", "").name


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "strftime", lambda fmt: STAMP)
    assert [_claim(str(tmp_path)) for _ in range(3)] == [STAMP, f"{STAMP}-2", f"{STAMP}-3"]
    with multiprocessing.get_context("fork").Pool(6) as pool:  # six processes racing for the same name
        names = pool.map(_claim, [str(tmp_path)] * 6)
    assert len(set(names)) == 6 and not set(names) & {STAMP, f"{STAMP}-2", f"{STAMP}-3"}
    assert sorted(p.name for p in (tmp_path / "can").iterdir()) == sorted([STAMP, f"{STAMP}-2", f"{STAMP}-3", *names])


def test_an_existing_name_is_refused_with_one_line(tmp_path: Path) -> None:
    run = claim_new_run(tmp_path, "can", "exp1")
    (run / "metrics.json").write_text("{}")
    with pytest.raises(UserError, match=r"exists already.*resume=") as err:
        claim_new_run(tmp_path, "can", "exp1")
    assert "\n" not in str(err.value)
    assert (run / "metrics.json").read_text() == "{}"
    with pytest.raises(UserError, match="not a valid run name"):
        claim_new_run(tmp_path, "can", "latest")


def test_a_locked_run_cannot_be_taken_twice(tmp_path: Path) -> None:
    run = claim_new_run(tmp_path, "can", "a")
    fd = lock_run(run)
    with pytest.raises(UserError, match="in use by another running process"):
        lock_run(run)
    unlock_run(fd)
    unlock_run(lock_run(run))  # free again once released (a killed process releases it too)


def test_latest_is_a_relative_link_replaced_atomically(tmp_path: Path) -> None:
    a, b = claim_new_run(tmp_path, "can", "a"), claim_new_run(tmp_path, "can", "b")
    publish_latest(a)
    publish_latest(b)
    latest = tmp_path / "can" / "latest"
    assert latest.is_symlink() and os.readlink(latest) == "b"
    assert sorted(p.name for p in (tmp_path / "can").iterdir()) == ["a", "b", "latest"]  # no temporary link left


def test_resume_latest_is_the_newest_run_by_its_config(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no run of can"):
        resolve_resume_target("latest", tmp_path, "can")
    for name, stamp in (("b", 1_000), ("a", 2_000)):
        run = claim_new_run(tmp_path, "can", name)
        (run / "config.yaml").write_text("{}")
        os.utime(run / "config.yaml", ns=(stamp, stamp))
    assert resolve_resume_target("latest", tmp_path, "can") == (tmp_path / "can" / "a").resolve()
    with pytest.raises(UserError, match="not a hybridad run directory"):
        resolve_resume_target(str(tmp_path / "can"), tmp_path, "can")


def test_resume_latest_is_the_newest_run_that_has_not_completed(tmp_path: Path) -> None:
    """README: `resume=latest` continues the newest running, failed or killed run; completed ones are skipped."""
    from hybridad.run_dir import RunDir

    runs = (("killed", 1_000, "running"), ("failed", 2_000, "failed"), ("done", 3_000, "completed"))
    for name, stamp, state in runs:
        run = claim_new_run(tmp_path, "can", name)
        (run / "config.yaml").write_text("{}")
        RunDir(run).write_state(state)
        os.utime(run / "config.yaml", ns=(stamp, stamp))
    assert resolve_resume_target("latest", tmp_path, "can") == (tmp_path / "can" / "failed").resolve()
    RunDir(tmp_path / "can" / "failed").write_state("completed")
    assert resolve_resume_target("latest", tmp_path, "can") == (tmp_path / "can" / "killed").resolve()
    RunDir(tmp_path / "can" / "killed").write_state("completed")
    with pytest.raises(UserError, match="every run of can .* has completed"):
        resolve_resume_target("latest", tmp_path, "can")


def test_launch_detection_reads_the_launchers_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("HYBRIDAD_CLAIMED_RUN", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_JOB_NAME"):
        monkeypatch.delenv(key, raising=False)
    assert run_claim.detect_launch() == run_claim.Launch(0, 1, external=False, child=False)
    env = {"TORCHELASTIC_RUN_ID": "x", "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "GROUP_RANK": "0",
           "MASTER_ADDR": "localhost", "MASTER_PORT": "1234"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert run_claim.detect_launch() == run_claim.Launch(1, 2, True, False, "localhost", 1234)
    monkeypatch.setenv("HYBRIDAD_CLAIMED_RUN", "/runs/can/x")
    assert run_claim.detect_launch().child


def _epoch_items(sampler: EpochSampler) -> list[int]:
    return list(sampler)


def test_epoch_sampler_shards_every_item_once_and_depends_only_on_seed_and_epoch() -> None:
    ds = TensorDataset(torch.arange(10))
    ranks = [EpochSampler(ds, seed=3, num_replicas=2, rank=r) for r in (0, 1)]
    for epoch in (0, 1):
        for s in ranks:
            s.set_epoch(epoch)
        items = [decode_item_index(i, 10) for s in ranks for i in _epoch_items(s)]
        assert sorted(i for _, i in items) == list(range(10)) and {e for e, _ in items} == {epoch}
    again = EpochSampler(ds, seed=3, num_replicas=2, rank=0)
    again.set_epoch(1)
    assert _epoch_items(again) == _epoch_items(ranks[0])
    again.set_epoch(0)
    assert _epoch_items(again) != _epoch_items(ranks[0])  # another epoch, another order


class _Items(Dataset):
    """Item i is i (the epoch the sampler encodes in the index is dropped, as MVTecAD2Dataset does)."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, index: int) -> int:
        return decode_item_index(index, 12)[1]


def test_resumable_loader_skips_the_batches_already_started() -> None:
    ds = _Items()
    started = {"n": 0}
    loader = ResumableLoader(ds, batch_size=2, sampler=EpochSampler(ds, seed=0), drop_last=True,
                             started_batches=lambda: started["n"])
    loader.sampler.set_epoch(2)
    full = [b.tolist() for b in loader]
    started["n"] = 2
    state = loader.state_dict()
    assert state == {"epoch": 2, "batches": 2}

    fresh = ResumableLoader(ds, batch_size=2, sampler=EpochSampler(ds, seed=0), drop_last=True,
                            started_batches=lambda: 0)
    fresh.load_state_dict(state)
    assert [b.tolist() for b in fresh] == full[2:]  # the rest of epoch 2, in the same order
    assert [b.tolist() for b in fresh] != full[2:]  # the skip applies once; then whole epochs again
    fresh.load_state_dict({"epoch": 2, "batches": len(fresh)})  # saved at the epoch's end: next epoch
    assert fresh.sampler.epoch == 3 and len([b for b in fresh]) == len(fresh)


def _agree_rank(rank: int, port: int, fail: str, results: "multiprocessing.Queue[tuple[int, str]]") -> None:
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=20))

    def choose() -> Path:
        if fail == "oserror":
            raise PermissionError(13, "Permission denied", "/runs/can")
        raise UserError("data.root: no such folder")

    try:
        run_claim.agree_on_run(choose, run_claim.Launch(rank, 2, external=True, child=False), "gloo")
        results.put((rank, "no error"))
    except UserError as err:
        results.put((rank, f"UserError: {err}"))
    except Exception as err:  # e.g. the other rank's broadcast timed out
        results.put((rank, f"{type(err).__name__}"))


@pytest.mark.parametrize("fail", ["oserror", "usererror"])
def test_any_rank0_setup_error_ends_every_rank_with_the_same_line(fail: str) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_agree_rank, args=(r, port, fail, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert got[0] == got[1] and got[0].startswith("UserError: ") and "\n" not in got[0]
    assert ("Permission denied" in got[0]) if fail == "oserror" else got[0].endswith("data.root: no such folder")
