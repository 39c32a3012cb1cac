"""CPR in the branch registry (`hybridad.branches`): options `cpr.*`, checks, build, export with its bank."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hybridad.branches import Branch, ExportableNetwork, register_branch
from hybridad.errors import UserError, check_choice, check_setting
from hybridad.models.cpr.config import CprConfig

if TYPE_CHECKING:
    from hybridad.config import RunConfig
    from hybridad.models.anomaly_module import AnomalyModule


def build(cfg: RunConfig) -> AnomalyModule:
    """The CPR module; its input must be the tile size (checked here, not at config load: the data layer alone
    may run with any tile size)."""
    from hybridad.models.cpr.lightning_model import Cpr

    if cfg.cpr.image_size != cfg.data.tiling.input_size:
        raise UserError(f"cpr.image_size ({cfg.cpr.image_size}) differs from data.tiling.input_size "
                        f"({cfg.data.tiling.input_size}): set both to the same size")
    return Cpr(cfg.cpr, postprocess=cfg.postprocess)


def convert(src: Path, out: Path) -> None:
    from hybridad.models.cpr.convert import convert_checkpoint

    convert_checkpoint(src, out)


def build_memory_bank(module: AnomalyModule, datamodule: Any) -> None:
    """Rebuild CPR's memory bank from the training images of `datamodule` (the run's DataModule), as
    `Cpr.on_predict_start` does under a Trainer."""
    module.fit_references_from(datamodule)  # type: ignore[attr-defined]
    module.on_predict_start()  # builds the memory bank from those references


def exportable(module: AnomalyModule, cfg: RunConfig, training_data: Callable[[], Any]) -> ExportableNetwork:
    """Tile maps, the memory bank (from `training_data()`, the run's DataModule) folded in as constants;
    one tile per call (the retrieval chunks queries by a byte budget, which fixes the batch size when
    traced)."""
    import copy

    import torch

    from hybridad.export import TileNet, freeze_flags

    build_memory_bank(module, training_data())
    s = cfg.data.tiling.input_size
    net = TileNet(freeze_flags(copy.deepcopy(module.model)))  # type: ignore[attr-defined]
    return ExportableNetwork(net, torch.rand(1, 3, s, s))


def check_options(c: CprConfig) -> None:
    check_choice("cpr.preset", c.preset, ("", "tiny", "random"))
    check_choice("cpr.synthesis", c.synthesis, ("cut_paste", "perlin"))
    check_setting(c.image_size >= 1 and c.k_nearest >= 1 and c.top_t >= 1, "cpr.image_size/k_nearest/top_t",
                  f"{c.image_size}/{c.k_nearest}/{c.top_t}", "must be >= 1")
    check_setting(c.blur_kernel == 0 or (c.blur_kernel > 0 and c.blur_kernel % 2 == 1), "cpr.blur_kernel",
                  c.blur_kernel, "must be an odd size >= 1 (or 0)")
    check_setting(c.lr > 0, "cpr.lr", c.lr, "must be > 0")


def unread_settings(c: CprConfig) -> list[str]:
    if c.preset and c.weights:
        return [f"cpr.weights={c.weights} is ignored: cpr.preset={c.preset} builds a random trunk (set "
                "cpr.preset='' to load the file, or cpr.weights='' to silence this)"]
    return []


BRANCH = register_branch(Branch(
    name="cpr",
    config_class=CprConfig,
    section="cpr",
    build=build,
    exportable=exportable,
    convert=convert,
    demo_overrides=("cpr.preset=tiny", "cpr.weights=''", "data.tiling.input_size=128", "cpr.image_size=128",
                    "data.batch_size=8", "trainer.max_epochs=-1", "trainer.max_steps=90", "cpr.k_nearest=3"),
    file_keys=("weights", "checkpoint"),
    check_options=check_options,
    unread_settings=unread_settings,
))
