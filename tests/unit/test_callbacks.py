"""Callbacks fed by hand: each reads only step outputs and gives the pure functions' answers."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import tifffile
import torch
import yaml

from callbacks.map_writer import MapWriterCallback
from callbacks.metric_logger import MetricsCallback
from callbacks.threshold_fit import ThresholdCallback
from hybridad.metrics.functional import au_pro, seg_f1
from hybridad.models.anomaly_module import AnomalyModule
from hybridad.thresholds import ThresholdConfig
from hybridad.types import AnomalyOutput, Batch


def _trainer(**kw: object) -> SimpleNamespace:
    return SimpleNamespace(sanity_checking=False, is_global_zero=True, **kw)


def _batch(ids: list[str], masks: torch.Tensor | None, labels: list[int]) -> Batch:
    n, _, h, w = masks.shape if masks is not None else (len(ids), 1, 8, 8)
    return Batch(image=torch.zeros(n, 3, h, w, dtype=torch.uint8), label=torch.tensor(labels), sample_id=ids,
                 split=[sid.split("/")[0] for sid in ids], lighting=["regular"] * n, mask=masks)


def test_threshold_callback_sets_mean_plus_k_std_of_validation_pixels(tmp_path: Path) -> None:
    module, cb = AnomalyModule(), ThresholdCallback(ThresholdConfig(method="mean_std", k=3.0), tmp_path)
    gen = torch.Generator().manual_seed(0)
    maps = [torch.rand(2, 1, 16, 24, generator=gen) for _ in range(3)]
    cb.on_validation_epoch_start(_trainer(), module)
    for i, m in enumerate(maps):
        cb.on_validation_batch_end(_trainer(), module, AnomalyOutput(m, m.mean((1, 2, 3))), None, i)
    cb.on_validation_epoch_end(_trainer(), module)
    values = torch.cat([m.flatten() for m in maps]).double().numpy()
    expected = values.mean() + 3 * values.std()
    assert float(module.threshold) == pytest.approx(expected, rel=1e-6)
    saved = yaml.safe_load((tmp_path / "thresholds.yaml").read_text())
    assert saved["value"] == pytest.approx(expected, rel=1e-6) and saved["source"] == "validation"
    assert cb.state_dict()["result"]["method"] == "mean_std"


def test_metrics_callback_matches_the_functional_metrics(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    maps = torch.rand(4, 1, 20, 20, generator=gen)
    gt = torch.zeros(4, 1, 20, 20)
    gt[1, 0, 3:8, 4:9] = 1
    gt[3, 0, 10:12, 0:3] = 1
    maps = maps + 0.8 * gt  # defects score higher
    pred = maps > 0.9
    ids = ["test_public/good/000_regular", "test_public/bad/000_regular",
           "test_public/good/001_regular", "test_public/bad/001_regular"]
    cb, module = MetricsCallback(tmp_path), AnomalyModule()
    module.set_threshold(0.9)  # the masks below are `maps > 0.9`
    module.log_dict = lambda *a, **k: None  # no trainer attached
    cb.on_test_epoch_start(_trainer(), module)
    for i in (0, 2):  # two batches of two images
        out = AnomalyOutput(maps[i : i + 2], maps[i : i + 2].flatten(1).amax(1), pred[i : i + 2])
        cb.on_test_batch_end(_trainer(), module, out, _batch(ids[i : i + 2], gt[i : i + 2], [0, 1]), i)
    cb.on_test_epoch_end(_trainer(), module)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test_public/aupro_0.05"] == pytest.approx(au_pro(list(maps[:, 0]), list(gt[:, 0])), abs=1e-9)
    assert metrics["test_public/seg_f1"] == pytest.approx(seg_f1(pred, gt > 0), abs=1e-9)
    assert metrics["test_public/class_f1"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 0))  # every image flagged
    assert metrics["test_public/image_auroc"] == pytest.approx(1.0)
    assert "test_public/lighting=regular/aupro_0.05" in metrics and "test_public/good/seg_f1" in metrics


def test_map_writer_writes_float16_maps_and_binary_masks(tmp_path: Path) -> None:
    amap = torch.rand(1, 1, 5, 7) * 3
    pred = amap > 1.5
    cb = MapWriterCallback(tmp_path)
    batch = _batch(["test_private/004_regular"], None, [-1])
    cb.on_predict_batch_end(_trainer(), AnomalyModule(), AnomalyOutput(amap, amap.mean((1, 2, 3)), pred), batch, 0)
    cb.on_predict_epoch_end(_trainer(), AnomalyModule())  # written in the background: complete at epoch end
    saved = tifffile.imread(tmp_path / "maps" / "test_private" / "004_regular.tiff")
    assert saved.dtype == np.float16 and np.array_equal(saved, amap[0, 0].numpy().astype(np.float16))
    mask = cv2.imread(str(tmp_path / "masks" / "test_private" / "004_regular.png"), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(mask, pred[0, 0].numpy().astype(np.uint8) * 255)


def test_map_writer_encodes_off_the_main_thread_with_bounded_memory(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """TIFF/PNG encoding runs on the writer's threads; at most `max_pending` images wait; errors surface at
    the epoch's end."""
    import threading

    from hybridad.run_dir import RunDir

    gate, started, threads = threading.Event(), [], set()
    real = RunDir.write_map

    def slow_write(self: RunDir, sample_id: str, anomaly_map: object) -> Path:
        threads.add(threading.get_ident())
        started.append(sample_id)
        gate.wait(timeout=60)
        return real(self, sample_id, anomaly_map)

    monkeypatch.setattr(RunDir, "write_map", slow_write)
    cb = MapWriterCallback(tmp_path, workers=1, max_pending=2)
    module = AnomalyModule()
    ids = [f"test_private/{i:03d}_regular" for i in range(5)]

    def feed() -> None:
        for sid in ids:
            amap = torch.rand(1, 1, 4, 6)
            out = AnomalyOutput(amap, amap.mean((1, 2, 3)))
            cb.on_predict_batch_end(_trainer(), module, out, _batch([sid], None, [-1]), 0)

    feeder = threading.Thread(target=feed)
    feeder.start()
    feeder.join(timeout=2.0)
    assert feeder.is_alive() and len(cb.writer._futures) == 2  # blocked: two images in flight, no more
    gate.set()
    feeder.join(timeout=60)
    cb.on_predict_epoch_end(_trainer(), module)
    assert threading.get_ident() not in threads and started == ids
    written = sorted(p.stem for p in (tmp_path / "maps" / "test_private").glob("*.tiff"))
    assert written == [s.split("/")[1] for s in ids]

    def broken(self: RunDir, sample_id: str, anomaly_map: object) -> Path:
        raise OSError(28, "No space left on device", str(tmp_path))

    monkeypatch.setattr(RunDir, "write_map", broken)
    amap = torch.rand(1, 1, 4, 6)
    out = AnomalyOutput(amap, amap.mean((1, 2, 3)))
    cb.on_test_batch_end(_trainer(), module, out, _batch(["test_private/009_regular"], None, [-1]), 0)
    with pytest.raises(OSError, match="No space left"):
        cb.on_test_epoch_end(_trainer(), module)
    cb.teardown(_trainer(), module, "test")
