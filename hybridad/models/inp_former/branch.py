"""INP-Former in the branch registry (`hybridad.branches`): options `inp_former.*`, checks, build, export."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hybridad.branches import Branch, ExportableNetwork, register_branch
from hybridad.errors import check_choice, check_setting
from hybridad.models.inp_former.config import InpFormerConfig

if TYPE_CHECKING:
    from hybridad.config import RunConfig
    from hybridad.models.anomaly_module import AnomalyModule

PATCH_SIZE = 14  # DINOv2 ViT patch size: the tile input must be a multiple of it


def build(cfg: RunConfig) -> AnomalyModule:
    from hybridad.models.inp_former.lightning_model import InpFormer

    return InpFormer(cfg.inp_former, postprocess=cfg.postprocess)


def convert(src: Path, out: Path) -> None:
    from hybridad.models.inp_former.convert import convert_checkpoint

    convert_checkpoint(src, out)


def exportable(module: AnomalyModule, cfg: RunConfig,
               training_data: Callable[[], Any]) -> ExportableNetwork:
    """Per-group token maps for any number of tiles; the runtime applies `inp_former.map_smoothing`."""
    import torch

    from hybridad.export import dynamic_tiles
    from hybridad.models.inp_former.torch_model import GroupMapNet

    s = cfg.data.tiling.input_size
    net = GroupMapNet(module.model)  # type: ignore[attr-defined]
    return ExportableNetwork(net, torch.rand(2, 3, s, s), dynamic_tiles(),
                             map_smoothing=cfg.inp_former.map_smoothing)


def check_options(m: InpFormerConfig) -> None:
    from hybridad.inp_map_path import MAP_SMOOTHING

    check_choice("inp_former.preset", m.preset, ("", "tiny"))
    check_choice("inp_former.pos_embed", m.pos_embed, ("dinov2", "timm"))
    check_choice("inp_former.map_smoothing", m.map_smoothing, MAP_SMOOTHING)
    check_setting(m.num_inps >= 1, "inp_former.num_inps", m.num_inps, "must be >= 1")
    check_setting(m.lr > 0 and m.final_lr >= 0, "inp_former.lr/final_lr", f"{m.lr}/{m.final_lr}",
                  "need lr > 0, final_lr >= 0")
    check_setting(m.warmup_steps >= 0, "inp_former.warmup_steps", m.warmup_steps, "must be >= 0")


def check_run(cfg: RunConfig) -> None:
    size = cfg.data.tiling.input_size
    check_setting(size % PATCH_SIZE == 0, "data.tiling.input_size", size,
                  f"must be a multiple of {PATCH_SIZE} (the ViT patch size)")


BRANCH = register_branch(Branch(
    name="inp_former",
    config_class=InpFormerConfig,
    section="inp_former",
    build=build,
    exportable=exportable,
    convert=convert,
    demo_overrides=("inp_former.preset=tiny", "inp_former.weights=''", "data.tiling.input_size=112",
                    "data.batch_size=8", "trainer.max_epochs=-1", "trainer.max_steps=160",
                    "inp_former.warmup_steps=20"),
    file_keys=("weights", "checkpoint"),
    check_options=check_options,
    check_run=check_run,
))
