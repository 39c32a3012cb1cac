"""Resumable checkpoints: `last.ckpt` every N optimiser steps, at every epoch end and when fitting ends.

`AtomicCheckpointIO` writes every checkpoint to a temporary name in its folder and renames it, so a full disk
or a kill never leaves a truncated file under the final name (the previous `last.ckpt` survives instead).
`LastCheckpoint` also stores the global random states (torch, CUDA, numpy, python), so a resumed run draws
the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from hybridad.run_dir import atomic_write_with


class AtomicCheckpointIO(TorchCheckpointIO):
    """`torch.save` into a temporary file beside the target, fsync, `os.replace` (see `atomic_write_with`)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        atomic_write_with(Path(path), lambda f: torch.save(checkpoint, f), defer_write_errors=True)


def _random_states() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }


def _set_random_states(states: dict[str, Any]) -> None:
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    if "numpy" in states:
        name, keys, pos, has_gauss, cached = states["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "python" in states:
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))


class LastCheckpoint(L.Callback):
    """Save `<dirpath>/last.ckpt` every `every_n_steps` optimiser steps (0: never mid-epoch), at every
    training epoch end and at the end of fitting; each save replaces the previous one atomically.

    Args:
        dirpath: the run's `checkpoints/` folder.
        every_n_steps: optimiser steps between mid-epoch saves.
    """

    FILENAME = "last.ckpt"

    def __init__(self, dirpath: Path, every_n_steps: int) -> None:
        self.path = Path(dirpath) / self.FILENAME
        self.every_n_steps = every_n_steps
        self._saved_step = -1

    def _save(self, trainer: L.Trainer) -> None:
        if trainer.sanity_checking or trainer.global_step == self._saved_step:
            return
        self._saved_step = trainer.global_step
        trainer.save_checkpoint(self.path, weights_only=False)  # every rank calls it (a barrier); rank 0 writes

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0:
            self._save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"random": _random_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _set_random_states(state_dict.get("random", {}))
