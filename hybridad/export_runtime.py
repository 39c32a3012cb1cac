"""Run a category exported by `hybridad export` (a `.pt2` file) without the training code.

Needs torch, numpy, OpenCV and scipy, plus small pure modules of this repository (`hybridad.tile_grid`,
`hybridad.postprocess`, `hybridad.inp_map_path`, `hybridad.gaussian`, `hybridad.image_scores`,
`data_modules.tilers`); no Lightning, no timm, no model code. The `.pt2` holds:

- the tile network as a `torch.export` program: (N,3,S,S) float tiles in [0,1] -> (N,1,S,S) float32 maps
  (INP-Former: DINOv2 encoder + INP decoder; CPR: DenseNet trunk, heads, retrieval and its memory bank as
  constants). `tile_batch` says how many tiles one call takes (null: any number);
- `hybridad.json` (an extra file of the archive): category, branch, input size, the test level's grid, the
  threshold and mask post-processing, the image-score rule, and where it came from.

`ExportedDetector(path)(images)` repeats the run's eval path: the test level's grid applied to each image's
size, tiles resized to the input, maps stitched back at native size (overlaps averaged), Gaussian smoothing,
image score, threshold and post-processing. A sketch for one file::

    detector = ExportedDetector("can.pt2")
    rgb = cv2.cvtColor(cv2.imread("x.png"), cv2.COLOR_BGR2RGB)                   # (H,W,3) uint8
    out = detector(torch.from_numpy(rgb).permute(2, 0, 1)[None])                 # (1,3,H,W) uint8
    out.anomaly_map[0, 0], out.image_score[0], out.pred_mask[0, 0]               # (H,W), (), (H,W) bool
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from data_modules.tilers import EvalTiler
from hybridad.errors import first_line
from hybridad.image_scores import score_with
from hybridad.inp_map_path import tile_maps_from_groups
from hybridad.postprocess import PostProcessConfig, binarize, hsv_kmeans_foreground, smooth
from hybridad.tile_grid import TileLevel, native_tile_size, untile
from hybridad.types import AnomalyOutput

FORMAT = "hybridad-export/2"  # /2: INP-Former programs return per-group token maps (`map_smoothing`)
META_NAME = "hybridad.json"


def read_metadata(path: Path | str) -> dict[str, Any]:
    """The `hybridad.json` stored in an exported `.pt2` (without loading the program)."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        name = next((n for n in archive.namelist() if n.endswith(f"extra/{META_NAME}")), None)
        if name is None:
            raise ValueError(f"{path} is not a hybridad export (no extra/{META_NAME})")
        return json.loads(archive.read(name))


def check_plain_archive(path: Path | str) -> None:
    """`ValueError` unless every payload of the `.pt2` loads without arbitrary unpickling.

    `torch.export.load` unpickles (`weights_only=False`, or plain `pickle`) any weight or constant flagged
    `use_pickle`, custom objects, legacy `<model>.pt` weight files, and sample inputs that fail a weights-only
    load. `hybridad export` writes none of these, so a file holding one is refused before it is loaded.
    """
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                parts = info.filename.split("/")
                if len(parts) >= 2 and parts[-2] in ("weights", "constants") and parts[-1].endswith(".pt"):
                    raise ValueError(f"{path}: legacy pickled payload {info.filename}")
                if parts[-1].startswith("custom_obj"):
                    raise ValueError(f"{path}: pickled custom object {info.filename}")
                if len(parts) >= 2 and parts[-2] in ("weights", "constants") and parts[-1].endswith(".json"):
                    config = json.loads(archive.read(info))
                    for name, payload in (config.get("config") or {}).items():
                        if payload.get("use_pickle"):
                            raise ValueError(f"{path}: {parts[-2][:-1]} {name!r} is stored pickled "
                                             "(refused: unpickling can run code)")
                if len(parts) >= 2 and parts[-2] == "sample_inputs":
                    torch.load(io.BytesIO(archive.read(info)), map_location="cpu", weights_only=True)
    except (zipfile.BadZipFile, EOFError, OSError, KeyError, AttributeError, pickle.UnpicklingError,
            json.JSONDecodeError, RuntimeError) as err:
        raise ValueError(f"{path} is not a readable .pt2 archive ({first_line(err)})") from None


class ExportedDetector:
    """An exported category: tile network + untiling + threshold + post-processing.

    Args:
        path: the `.pt2` written by `hybridad export`.
        device: where to run; default the device it was exported for (recorded in its metadata).
    """

    def __init__(self, path: Path | str, device: str | None = None) -> None:
        extra = {META_NAME: ""}
        check_plain_archive(path)
        program = torch.export.load(str(path), extra_files=extra)
        if not extra[META_NAME]:
            raise ValueError(f"{path} is not a hybridad export (no {META_NAME})")
        self.meta: dict[str, Any] = json.loads(extra[META_NAME])
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{path}: format {self.meta.get('format')!r}, this runtime reads {FORMAT!r}")
        self.device = torch.device(device or self.meta["device"])
        self.net = program.module().to(self.device)
        self.tiler = EvalTiler(TileLevel(**self.meta["test_level"]), int(self.meta["input_size"]),
                               bool(self.meta.get("antialias", True)))
        self.postprocess = PostProcessConfig(**self.meta["postprocess"])
        self.threshold = float(self.meta["threshold"]["value"])
        self.tile_batch: int | None = self.meta["tile_batch"]

    def image_score(self, maps: Tensor) -> Tensor:
        """(B,1,H,W) smoothed native maps -> (B,) with the run's rule."""
        return score_with(maps, self.meta["image_score"])

    @torch.no_grad()
    def __call__(self, images: Tensor, foreground: bool = False) -> AnomalyOutput:
        """(B,3,H,W) uint8 RGB images of one size -> maps (B,1,H,W), scores (B,), masks (B,1,H,W) bool.

        `foreground`: AND the masks with each image's HSV k-means object mask (the walnuts rule; the stored
        `postprocess.foreground_dilation` / `foreground_seed`)."""
        tiles, layout = self.tiler(images.to(self.device))  # (B*n,3,S,S) float [0,1]
        step = self.tile_batch or tiles.shape[0]
        tile_maps = torch.cat([self.net(chunk) for chunk in tiles.split(step)]).float()  # (B*n,1,S,S) | (B*n,G,h,w)
        smoothing = self.meta.get("map_smoothing")
        if smoothing is not None:  # INP-Former: token maps -> tile maps, as the run's eval path
            tile_maps = tile_maps_from_groups(tile_maps, smoothing, native_tile_size(layout),
                                              (int(tiles.shape[-2]), int(tiles.shape[-1])))
        maps = smooth(untile(tile_maps, layout), self.postprocess)  # (B,1,H,W)
        pp = self.postprocess
        fg = hsv_kmeans_foreground(images, pp.foreground_dilation, pp.foreground_seed) if foreground else None
        return AnomalyOutput(maps, self.image_score(maps), binarize(maps, self.threshold, pp, fg))
