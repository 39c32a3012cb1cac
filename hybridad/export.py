"""`hybridad export RUN --out FILE.pt2`: one self-contained artefact per category.

Format: `torch.export` (`.pt2`). Both tile networks trace to one graph with no graph break: timm's DINOv2 ViT
(the official position-embedding resampling included) and CPR's DenseNet trunk, heads, global retrieval and
windowed nearest-neighbour search, with the memory bank folded in as constants. The file loads with
`torch.export.load` alone, runs in Python without the model code, and is the input AOTInductor compiles
ahead of time for a C++ deployment (not tried here). ONNX is not installed: it would add a dependency and a
second runtime for the same graph.

What is in the graph and what is not: the graph maps (N,3,S,S) tiles to (N,1,S,S) tile maps (CPR) or to
(N,G,h,w) per-group token maps (INP-Former; the runtime upsamples them to each tile's native size and applies
`inp_former.map_smoothing`). Tiling, untiling, smoothing, image score, threshold and mask post-processing
(OpenCV / scipy morphology, connected components) are the thin runtime `hybridad.export_runtime`, driven by the metadata stored beside the program
in the same file. INP-Former takes any number of tiles per call; CPR's program is traced for one tile per
call (its retrieval chunks queries by a byte budget, which fixes the batch size at trace time), so the runtime
feeds it one tile at a time. The program is specific to the device it was exported on (`--device`, recorded
in the metadata).
"""

from __future__ import annotations

import datetime
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hybridad.branches import get_branch
from hybridad.config import RunConfig, load_run_config
from hybridad.errors import UserError
from hybridad.export_runtime import FORMAT, META_NAME
from hybridad.run_loading import load_module, read_decision
from hybridad.run_dir import RunDir, atomic_write_with

MAX_TILES = 4096  # upper bound of the dynamic tile dimension


class TileNet(nn.Module):
    """The exported function of a torch model with `tile_maps` (CPR): (N,3,S,S) float tiles in [0,1] ->
    (N,1,S,S) float32 tile maps."""

    def __init__(self, tile_maps: nn.Module) -> None:
        super().__init__()
        self.inner = tile_maps

    def forward(self, tiles: Tensor) -> Tensor:
        return self.inner.tile_maps(tiles).float()


def freeze_flags(model: nn.Module) -> nn.Module:
    """Turn 0-d bool buffers (`fitted` flags the eval path branches on) into Python bools on `model`.

    `torch.export` treats buffers as inputs, so `if not bool(self.fitted)` would be data-dependent; frozen,
    the graph keeps the branch the trained model takes. Apply to a copy: the flags can no longer be refitted.
    """
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.dtype == torch.bool and buf.dim() == 0:
                del module._buffers[name]
                setattr(module, name, bool(buf))
    return model


def dynamic_tiles() -> dict[str, Any]:
    """`torch.export` dynamic shapes of a network taking any number of tiles (1..`MAX_TILES`) as `tiles`."""
    return {"tiles": {0: torch.export.Dim("tiles", min=1, max=MAX_TILES)}}


def _training_data(cfg: RunConfig) -> Any:
    """The run's DataModule (CPR's export rebuilds its memory bank from the training images)."""
    from data_modules.datamodule import MVTecAD2DataModule

    return MVTecAD2DataModule(cfg.data, seed=cfg.seed)


def export_run(run_path: Path, out: Path, device: str = "cpu") -> Path:
    """Export a completed run's tile network and eval settings into `out` (a `.pt2`); returns `out`."""
    run = RunDir(run_path)
    run.read_config()
    run.require_completed("export")
    if out.suffix != ".pt2":
        raise UserError(f"export: --out {out} must end in .pt2 (a torch.export archive)")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UserError(f"export: --device {device}: use cpu, cuda or cuda:N")
    if device != "cpu" and not torch.cuda.is_available():
        raise UserError(f"export: --device {device}: no CUDA device is available here")
    cfg = load_run_config(run.path)
    decision = read_decision(run)
    module = load_module(run, cfg, decision).to(device)
    s = cfg.data.tiling.input_size
    network = get_branch(cfg.branch).exportable(module, cfg, lambda: _training_data(cfg))
    with torch.no_grad():
        program = torch.export.export(network.net.eval(), (network.example.to(device),),
                                      dynamic_shapes=network.dynamic_shapes)
    meta = {
        "format": FORMAT,
        "category": cfg.data.category,
        "branch": cfg.branch,
        "input_size": s,
        "test_level": asdict(cfg.data.tiling.test_level),
        "antialias": bool(cfg.data.tiling.antialias),  # downscaling of the tiles, as the run
        "tile_batch": None if network.dynamic_shapes else int(network.example.shape[0]),
        "device": device,
        "threshold": {"value": decision.threshold, "source": decision.source},
        "postprocess": asdict(decision.postprocess),
        "image_score": module.image_score_rule().to_metadata(),
        # null: the program returns tile maps at the input size; else it returns per-group token maps
        "map_smoothing": network.map_smoothing,
        "run": str(run.path.resolve()),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
    }
    # temporary file (0666 minus the umask), fsync, rename; removed on failure (a full disk: one line)
    extra = {META_NAME: json.dumps(meta, indent=2)}
    atomic_write_with(out, lambda f: torch.export.save(program, f, extra_files=extra),
                      defer_write_errors=True)
    return out
