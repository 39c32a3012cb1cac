"""Write native-resolution float16 maps (and binary masks) of every eval step into the run directory.

The TIFF (zlib) and PNG encoding and the file writes run on a small background thread pool (zlib, tifffile and
OpenCV release the GIL), so the training process goes on to the next batch instead of waiting ~0.2 s per 5 MP
map. Memory stays bounded: at most `max_pending` images (float16 map + bool mask) wait in the queue; the next
write blocks until one is done. Every stage's files are complete when its epoch ends (the pool is drained in
`on_*_epoch_end`), before anything reads them back; the first write error is raised there (or at the next write).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.trainer.states import TrainerFn

from hybridad.run_dir import RunDir, to_float16_map
from hybridad.types import AnomalyOutput, Batch, Split


class BackgroundWriter:
    """Runs write jobs on `workers` threads with at most `max_pending` queued or running.

    Args:
        workers: threads encoding and writing.
        max_pending: jobs in flight before `submit` blocks (each holds one image's arrays).
    """

    def __init__(self, workers: int = 2, max_pending: int = 8) -> None:
        self.workers = workers
        self.max_pending = max_pending
        self._pool: ThreadPoolExecutor | None = None
        self._slots = threading.BoundedSemaphore(max_pending)
        self._futures: list[Future] = []

    def submit(self, job: Callable[..., Any], *args: Any) -> None:
        """Queue `job(*args)`; blocks while `max_pending` jobs are in flight; raises an earlier job's error."""
        self._raise_done_errors()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="map-writer")
        self._slots.acquire()
        try:
            future = self._pool.submit(job, *args)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        self._futures.append(future)

    def _raise_done_errors(self) -> None:
        done = [f for f in self._futures if f.done()]
        self._futures = [f for f in self._futures if not f.done()]
        for f in done:
            f.result()  # re-raises the job's exception

    def flush(self) -> None:
        """Wait for every queued job; raise the first error."""
        futures, self._futures = self._futures, []
        errors = [f.exception() for f in futures]
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first

    def close(self) -> None:
        """Drain (errors dropped: the stage has failed already or `flush` reported them) and stop the threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._futures = []


class MapWriterCallback(L.Callback):
    """Caches maps of validation, test_public and the private splits as `<run>/maps/<split>/<rel>.tiff`.

    Binary masks (`<run>/masks/...png`, 0/255) are written where the module produced them (a threshold is set),
    so the PNGs are exactly what SegF1 was computed from. Writes run in the background (module docstring).
    """

    def __init__(self, run_dir: Path, splits: tuple[str, ...] = (
        Split.VALIDATION.value, Split.TEST_PUBLIC.value, Split.TEST_PRIVATE.value, Split.TEST_PRIVATE_MIXED.value,
    ), workers: int = 2, max_pending: int = 8) -> None:
        self.run_dir = RunDir(run_dir)
        self.splits = set(splits)
        self.writer = BackgroundWriter(workers, max_pending)

    def _write_one(self, sample_id: str, map16: np.ndarray, mask: np.ndarray | None) -> None:
        self.run_dir.write_map(sample_id, map16)
        if mask is not None:
            self.run_dir.write_mask(sample_id, mask)

    def _write(self, outputs: Any, batch: Batch) -> None:
        if not isinstance(outputs, AnomalyOutput):
            return
        maps = outputs.anomaly_map.detach().float().cpu()  # (B,1,H,W)
        masks = outputs.pred_mask.detach().cpu() if outputs.pred_mask is not None else None
        for i, (sample_id, split) in enumerate(zip(batch.sample_id, batch.split)):
            if split not in self.splits:
                continue
            map16 = to_float16_map(maps[i, 0])  # (H,W) float16: half the bytes waiting in the queue
            self.writer.submit(self._write_one, sample_id, map16, None if masks is None else masks[i, 0].numpy())

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:  # the stand-alone validate() after fit, not every epoch
            self._write(outputs, batch)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._write(outputs, batch)

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        self._write(outputs, batch)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.writer.flush()

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.writer.flush()

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.writer.flush()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.writer.close()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.writer.flush()
        self.writer.close()
