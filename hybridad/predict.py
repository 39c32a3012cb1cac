"""`hybridad predict RUN IMAGES... --out DIR`: a trained category on new images of any size.

The run's model is rebuilt from `config.yaml` and `checkpoints/final.ckpt` (INP-Former's frozen encoder comes
from `inp_former.weights`, or from `inp_former.encoder_seed` for the tiny preset; CPR rebuilds its memory bank
from the training images at `data.root`, as training did). Images go through the run's own eval path: the test
level's grid applied to each image's size, every tile resized to the model input, maps stitched back at native
size, the run's smoothing, image score, threshold and post-processing. Images of one size are batched together
(`--batch-size` images per step, the run's `data.eval_batch_size` by default): memory is bounded by the batch.

Output (`--out`): `maps/<name>.tiff` (float16), `masks/<name>.png` (0/255), `overlays/<name>.png`,
`scores.csv` (`file, image_score, decision, anomalous_area_px`) and `prediction.yaml` (run, threshold and
post-processing used).
`<name>` is the image's path relative to the deepest folder holding every input, without its suffix.
"""

from __future__ import annotations

import csv
import glob
import io
import os
import warnings
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import cv2
import lightning as L
import numpy as np
import torch
import yaml
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from data_modules.datamodule import MVTecAD2DataModule
from data_modules.dataset import collate_batch
from data_modules.listing import png_size, read_image
from hybridad.config import RunConfig, load_run_config
from hybridad.errors import UserError, first_line
from hybridad.run_dir import RunDir, atomic_write_bytes, encode_mask_png, encode_tiff, to_float16_map, write_png
from hybridad.run_loading import EVALUATION_FILE, load_module, read_decision
from hybridad.tile_grid import TileLevel, level_boxes
from hybridad.types import NO_SPLIT, AnomalyOutput, Batch
from hybridad.visualize import format_threshold, overlay_panel

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SCORE_COLUMNS = ("file", "image_score", "decision", "anomalous_area_px")


# ------------------------------------------------------------------------------------------------ inputs


def collect_images(inputs: list[str]) -> list[Path]:
    """Files, folders (their images, not sub-folders) and glob patterns -> sorted unique image paths."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += [p for p in sorted(path.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        elif path.is_file():
            found.append(path)
        else:
            found += [Path(p) for p in sorted(glob.glob(item, recursive=True))
                      if Path(p).is_file() and Path(p).suffix.lower() in IMAGE_SUFFIXES]
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise UserError(f"predict: no images matched {' '.join(inputs)} (give files, folders or globs of "
                        f"{'/'.join(s[1:] for s in IMAGE_SUFFIXES)} images)")
    return unique


def output_names(paths: list[Path]) -> list[str]:
    """Each path relative to the deepest folder holding them all, without suffix (`good/000_regular`)."""
    root = Path(os.path.commonpath([str(p.parent) for p in paths]))
    names = [p.relative_to(root).with_suffix("").as_posix() for p in paths]
    if len(set(names)) < len(names):  # x.png and x.jpg in one folder
        names = [p.relative_to(root).as_posix().replace(".", "_") for p in paths]
    return names


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) from the file header; `UserError` naming the file if it is not a readable image."""
    if path.suffix.lower() == ".png":
        h, w, _ = png_size(path)
        return h, w
    try:
        with Image.open(path) as img:
            w, h = img.size
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read image {path} ({err})") from None
    return h, w


def check_tileable(paths: list[Path], sizes: list[tuple[int, int]], level: TileLevel) -> None:
    """`UserError` naming the first image too small for the run's test grid (fewer pixels than tiles)."""
    for path, (h, w) in zip(paths, sizes):
        try:
            level_boxes(h, w, level)
        except ValueError:
            raise UserError(f"image {path} is {w}x{h}: too small for the run's {level.cols}x{level.rows} test "
                            "grid (at least one pixel per tile)") from None


class NewImages(Dataset):
    """Decoded images as eval items: `image` (3,H,W) uint8 RGB, no mask, label -1, `sample_id` = name, split
    NO_SPLIT."""

    def __init__(self, paths: list[Path], names: list[str]) -> None:
        self.paths, self.names = paths, names

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        img = read_image(self.paths[idx])  # (H,W,3) uint8 RGB; UserError if undecodable
        return {"image": torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1),  # (3,H,W)
                "mask": None, "label": -1, "sample_id": self.names[idx], "split": NO_SPLIT,
                "lighting": "", "tile_box": None}


class SameSizeBatches(Sampler[list[int]]):
    """Consecutive images of one size, at most `batch_size` per batch (input order kept)."""

    def __init__(self, sizes: list[tuple[int, int]], batch_size: int) -> None:
        self.batches: list[list[int]] = []
        for i, size in enumerate(sizes):
            if self.batches and len(self.batches[-1]) < batch_size and sizes[self.batches[-1][0]] == size:
                self.batches[-1].append(i)
            else:
                self.batches.append([i])

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class NewImagesDataModule(MVTecAD2DataModule):
    """The run's DataModule (tiling, training images for CPR's bank) whose predict loader reads new images."""

    def __init__(self, cfg: RunConfig, paths: list[Path], names: list[str], batch_size: int) -> None:
        super().__init__(cfg.data, seed=cfg.seed)
        self.images = NewImages(paths, names)
        sizes = [image_size(p) for p in paths]
        check_tileable(paths, sizes, cfg.data.tiling.test_level)
        self.batches = SameSizeBatches(sizes, batch_size)

    def predict_dataloader(self) -> DataLoader:  # type: ignore[override]
        return DataLoader(self.images, batch_sampler=self.batches, num_workers=0, collate_fn=collate_batch)


# ------------------------------------------------------------------------------------------------ the run


def trainer_device(device: str) -> dict[str, Any]:
    """`cpu`, `cuda`, `cuda:N` or `auto` -> Lightning `accelerator`/`devices` (one device)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return {"accelerator": "cpu", "devices": 1}
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA device is available here (use --device cpu)")
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        return {"accelerator": "gpu", "devices": [index]}
    raise UserError(f"--device {device}: use cpu, cuda, cuda:N or auto")


# ------------------------------------------------------------------------------------------------ outputs


def overlay_caption(name: str, score: float, threshold: float | None, decision: str, area: int) -> str:
    """The text line on a predict overlay: image score, pixel threshold and the decision (with its area)."""
    thr = "-" if threshold is None else format_threshold(threshold)
    return f"{name}   image score {score:.6g}   pixel threshold {thr}   decision: {decision} ({area} mask px)"


RUN_MARKERS = ("config.yaml", "state.json", "thresholds.yaml", EVALUATION_FILE)  # a run's or evaluation's files


def check_out_dir(out: Path) -> None:
    """`UserError` unless `out` can take predictions: not a file, not a run's or an evaluation's folder."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the predictions")
    marker = next((m for m in RUN_MARKERS if (out / m).exists()), None)
    if marker is not None:
        raise UserError(f"--out {out} holds {marker}: it is a run or evaluation folder whose maps and masks "
                        "predict would overwrite; give a new folder (e.g. --out predictions/)")


class PredictionFiles:
    """Writes maps, masks, overlays and `scores.csv` of new images into one folder (atomic files)."""

    def __init__(self, out: Path, overlays: bool = True, threshold: float | None = None) -> None:
        check_out_dir(out)
        try:
            Path(out).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"--out {out}: cannot create the folder ({err.strerror}); give a writable folder"
                            ) from None
        self.out, self.overlays, self.threshold = Path(out), overlays, threshold
        self.rows: list[tuple[str, float, str, int]] = []

    def add(self, name: str, image: np.ndarray, anomaly_map: np.ndarray, score: float, mask: np.ndarray
            ) -> None:
        """One image: (H,W,3) uint8 RGB, (H,W) float map, image score, (H,W) bool mask."""
        atomic_write_bytes(self.out / "maps" / f"{name}.tiff", encode_tiff(to_float16_map(anomaly_map)))
        atomic_write_bytes(self.out / "masks" / f"{name}.png", encode_mask_png(mask))
        area = int(np.count_nonzero(mask))
        decision = "anomalous" if area > 0 else "good"
        if self.overlays:
            caption = overlay_caption(name, score, self.threshold, decision, area)
            panel = overlay_panel(cv2.cvtColor(image, cv2.COLOR_RGB2BGR), anomaly_map, None, mask,
                                  threshold=self.threshold, caption=caption)
            write_png(self.out / "overlays" / f"{name}.png", panel)
        self.rows.append((name, float(score), decision, area))

    def close(self, provenance: dict[str, Any]) -> Path:
        """Write `scores.csv` (rows in input order) and `prediction.yaml`; returns the csv path."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(SCORE_COLUMNS)
        writer.writerows((name, f"{score:.9g}", decision, area) for name, score, decision, area in self.rows)
        path = self.out / "scores.csv"
        atomic_write_bytes(path, buf.getvalue().encode("utf-8", "surrogateescape"))  # names as on disk
        atomic_write_bytes(self.out / "prediction.yaml", yaml.safe_dump(provenance, sort_keys=False).encode())
        return path


def add_outputs(files: PredictionFiles, images: Tensor, names: list[str], output: AnomalyOutput) -> None:
    """Write a predicted batch: `images` (B,3,H,W) uint8 RGB, `output` with native maps and masks."""
    assert output.pred_mask is not None, "predict needs a threshold"
    rgb = images.permute(0, 2, 3, 1).cpu().numpy()  # (B,3,H,W) -> (B,H,W,3) uint8
    maps = output.anomaly_map.float().cpu().numpy()  # (B,1,H,W)
    masks = output.pred_mask.cpu().numpy()  # (B,1,H,W) bool
    for i, name in enumerate(names):
        files.add(name, rgb[i], maps[i, 0], float(output.image_score[i]), masks[i, 0])


class PredictionWriterCallback(L.Callback):
    """Hands every predicted image to `PredictionFiles`."""

    def __init__(self, files: PredictionFiles) -> None:
        self.files = files

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        assert isinstance(outputs, AnomalyOutput) and isinstance(batch, Batch)
        add_outputs(self.files, batch.image, batch.sample_id, outputs)


# ------------------------------------------------------------------------------------------------ command


def predict(run_path: Path, inputs: list[str], out: Path, device: str = "auto", batch_size: int | None = None,
            evaluation: Path | None = None, overlays: bool = True, precision: str | None = None,
            foreground: bool = False) -> Path:
    """Predict new images with a completed run; returns the path of `scores.csv`.

    Args:
        run_path: the run directory (state completed), or a `.pt2` from `hybridad export`.
        inputs: image files, folders or glob patterns.
        out: output folder (created).
        device: `cpu`, `cuda`, `cuda:N` or `auto`.
        batch_size: images per step (default: the run's `data.eval_batch_size`).
        evaluation: take the threshold and post-processing from this evaluation directory, not the run's.
        overlays: write `overlays/<name>.png`.
        precision: Lightning precision (default: the run's `trainer.precision`).
        foreground: AND every mask with the image's HSV k-means object mask (`postprocess.foreground_dilation`,
            `foreground_seed`; the walnuts rule the run applies to its `foreground_splits`). New images have no
            split, so this is never inferred from their paths.
    """
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: use a positive number of images")
    if Path(run_path).suffix == ".pt2":
        if evaluation is not None:
            raise UserError("predict: --evaluation applies to run directories; an export has its threshold")
        return predict_exported(Path(run_path), inputs, out, device, batch_size or 1, overlays, foreground)
    run = RunDir(run_path)
    run.read_config()  # "not a run directory" before anything else
    run.require_completed("predict")
    check_out_dir(out)
    cfg = load_run_config(run.path)
    paths = collect_images(inputs)
    names = output_names(paths)
    bs = cfg.data.eval_batch_size if batch_size is None else batch_size
    datamodule = NewImagesDataModule(cfg, paths, names, bs)  # reads every header: bad files fail here
    decision = read_decision(run, evaluation)
    module = load_module(run, cfg, decision)
    module.foreground_images = foreground
    files = PredictionFiles(out, overlays, decision.threshold)
    from hybridad.train import quiet_lightning

    quiet_lightning()  # no tips, banners or known-benign warnings between the progress bar and the result
    trainer = L.Trainer(**trainer_device(device), precision=precision or cfg.trainer.precision, logger=False,
                        callbacks=[PredictionWriterCallback(files)], enable_checkpointing=False,
                        enable_model_summary=False, default_root_dir=out)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*custom batch sampler.*")  # ours returns every index
            trainer.predict(module, datamodule=datamodule, return_predictions=False)
    finally:  # a predict stopped by an error (a full disk) leaves Lightning's bar open: later bars would nest
        bar = getattr(trainer.progress_bar_callback, "_predict_progress_bar", None)
        if bar is not None:
            bar.close()
    provenance = {"run": str(run.path.resolve()), "category": cfg.data.category,
                  "branch": cfg.branch, "threshold": decision.threshold, "threshold_from": decision.source,
                  "postprocess": asdict(decision.postprocess), "foreground": foreground, "images": len(paths)}
    path = files.close(provenance)
    print(f"predicted {len(paths)} image(s): {path}")
    return path


def predict_exported(artefact: Path, inputs: list[str], out: Path, device: str = "auto", batch_size: int = 1,
                     overlays: bool = True, foreground: bool = False) -> Path:
    """`predict` with an exported `.pt2` through `hybridad.export_runtime` (no Lightning, no model code)."""
    from hybridad.export_runtime import ExportedDetector

    if not artefact.is_file():
        raise UserError(f"predict: {artefact} not found (write it with `hybridad export RUN --out FILE.pt2`)")
    check_out_dir(out)
    paths = collect_images(inputs)
    names = output_names(paths)
    images = NewImages(paths, names)
    sizes = [image_size(p) for p in paths]
    try:
        detector = ExportedDetector(artefact, None if device == "auto" else device)
    except (ValueError, RuntimeError, KeyError, TypeError) as err:
        raise UserError(f"predict: cannot load {artefact} ({first_line(err)})") from None
    check_tileable(paths, sizes, detector.tiler.level)
    batches = SameSizeBatches(sizes, batch_size)
    files = PredictionFiles(out, overlays, float(detector.meta["threshold"]["value"]))
    for index in tqdm(batches, desc="predict", unit="batch"):
        batch = collate_batch([images[i] for i in index])
        add_outputs(files, batch.image, batch.sample_id, detector(batch.image, foreground=foreground))
    meta = detector.meta
    provenance = {"export": str(artefact.resolve()), "run": meta["run"], "category": meta["category"],
                  "branch": meta["branch"], "threshold": meta["threshold"]["value"],
                  "threshold_from": meta["threshold"]["source"], "postprocess": meta["postprocess"],
                  "foreground": foreground, "images": len(paths)}
    path = files.close(provenance)
    print(f"predicted {len(paths)} image(s): {path}")
    return path
