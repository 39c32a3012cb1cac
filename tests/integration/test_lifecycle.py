"""Run directory life cycle on real tiny runs: kill -9 + resume gives the uninterrupted weights (INP-Former, no
workers); a failed CPR run with 2 loader workers resumed by resume=latest does too (INP-Former with workers: slow);
failed runs are recorded and never take `latest`; completed runs cannot be resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hybridad.config import load_config
from hybridad.errors import UserError
from hybridad.run_dir import RunDir
from hybridad.train import train

ROOT = Path(__file__).resolve().parents[2]
MAX_STEPS = 6  # can: 8 images x 10 tiles / batch 16 = 5 steps per epoch, so the run crosses an epoch end


def _args(data: Path, out: Path) -> list[str]:
    return [
        f"data.root={data}", "data.category=can", f"out_dir={out}", "inp_former.preset=tiny",
        "data.tiling.input_size=28", "data.batch_size=16", "data.num_workers=0", "logging.wandb=false",
        "trainer.accelerator=cpu", "trainer.max_epochs=-1", f"trainer.max_steps={MAX_STEPS}",
        "checkpoint.every_n_steps=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
        "predict_private=false", "trainer.enable_progress_bar=false", "inp_former.warmup_steps=2",
        # generators in play: CPU augmentations and cut-paste (INP-Former drops the pasted tiles from its loss)
        "data.augment.exposure=0.5", "data.augment.hflip=0.5", "data.cut_paste.enabled=true",
        "data.cut_paste.probability=0.3",
    ]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run / "checkpoints" / "final.ckpt", map_location="cpu", weights_only=True)
    assert "optimizer_states" not in ckpt, "final.ckpt holds the weights only"
    return ckpt["state_dict"]


@pytest.fixture(scope="module")
def uninterrupted(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(load_config(_args(synthetic_root, tmp_path_factory.mktemp("ref"))))


def test_kill_9_then_resume_gives_the_uninterrupted_weights(
    synthetic_root: Path, tmp_path: Path, uninterrupted: Path
) -> None:
    out = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, "-m", "hybridad", "train", *_args(synthetic_root, out), "name=r"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = out / "can" / "r" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert last.exists(), err.decode()[-2000:]
    step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert 0 < step < MAX_STEPS, "killed while fitting"
    run = out / "can" / "r"
    assert RunDir(run).read_state()["state"] == "running"
    assert not (out / "can" / "latest").exists(), "latest moves only to a completed run"

    resumed = train(load_config([*_args(synthetic_root, out), "resume=latest"]))
    assert resumed == run.resolve()
    assert RunDir(run).read_state()["state"] == "completed"
    assert (out / "can" / "latest").resolve() == run.resolve()
    assert sorted(p.name for p in (out / "can").iterdir()) == ["latest", "r"], "no second folder"

    want, got = _weights(uninterrupted), _weights(run)
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)

    with pytest.raises(UserError, match="has completed"):
        train(load_config([*_args(synthetic_root, out), f"resume={run}"]))


def test_failed_run_records_its_reason_and_keeps_latest(
    synthetic_root: Path, uninterrupted: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from data_modules.datamodule import MVTecAD2DataModule

    def broken(self: MVTecAD2DataModule) -> None:
        raise RuntimeError("loader exploded\non two lines")

    monkeypatch.setattr(MVTecAD2DataModule, "train_dataloader", broken)
    out = uninterrupted.parent.parent
    with pytest.raises(RuntimeError, match="loader exploded"):
        train(load_config([*_args(synthetic_root, out), "name=broken"]))
    state = json.loads((out / "can" / "broken" / "state.json").read_text())
    assert state["state"] == "failed" and state["reason"] == "RuntimeError: loader exploded on two lines"
    assert (out / "can" / "latest").resolve() == uninterrupted.resolve()
    with pytest.raises(UserError, match="exists already"):
        train(load_config([*_args(synthetic_root, out), "name=broken"]))
    with pytest.raises(UserError, match="resume: trainer.max_steps=3 differs"):
        load_config([*_args(synthetic_root, out), "resume=latest", "trainer.max_steps=3"])


class _FailAfterStep(Exception):
    pass


def _fail_after(step: int):  # noqa: ANN202
    import lightning as L

    class FailAfter(L.Callback):
        """Stops fitting with an error after optimiser step `step` (last.ckpt holds an earlier step)."""

        def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
            if trainer.global_step >= step:
                raise _FailAfterStep(f"stopped after step {step}")

    return FailAfter()


def _cpr_args(data: Path, out: Path) -> list[str]:
    return [
        f"data.root={data}", "data.category=vial", f"out_dir={out}", "cpr.preset=tiny", "cpr.image_size=64",
        "data.tiling.input_size=64", "data.batch_size=2", "data.num_workers=2", "logging.wandb=false",
        "trainer.accelerator=cpu", "trainer.max_epochs=-1", "trainer.max_steps=4", "checkpoint.every_n_steps=2",
        "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "predict_private=false",
        "trainer.enable_progress_bar=false", "data.augment.hflip=0.5",
    ]


@pytest.mark.parametrize("branch", ["cpr", pytest.param("inp_former", marks=pytest.mark.slow)])
def test_failed_then_resumed_with_workers_gives_the_uninterrupted_weights(
    branch: str, synthetic_root: Path, tmp_path: Path
) -> None:
    """CPR (cut-paste, pairs, noise) and INP-Former with 2 loader workers: a run that failed after step 3
    (last.ckpt at step 2), continued with resume=latest, ends with the weights of a run that never stopped."""
    if branch == "cpr":
        args = _cpr_args(synthetic_root, tmp_path / "runs")
    else:
        args = [*_args(synthetic_root, tmp_path / "runs"), "data.num_workers=2", "trainer.max_steps=4"]
        args.remove(f"trainer.max_steps={MAX_STEPS}")
    category = "vial" if branch == "cpr" else "can"
    reference = train(load_config([*args, "name=reference"]))
    with pytest.raises(_FailAfterStep):
        train(load_config([*args, "name=r"]), callbacks=[_fail_after(3)])
    run = tmp_path / "runs" / category / "r"
    assert RunDir(run).read_state()["state"] == "failed"
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)  # our own file
    assert last["global_step"] == 2
    assert train(load_config([*args, "resume=latest"])) == run.resolve()  # the failed run, not the completed one
    want, got = _weights(reference), _weights(run)
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)
