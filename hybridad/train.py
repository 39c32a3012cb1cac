"""`train(cfg)`: fit, fit the threshold on validation, test on test_public, predict the private splits."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger

from callbacks.map_writer import MapWriterCallback
from callbacks.metric_logger import MetricsCallback
from callbacks.overlay_logger import OverlayLoggerCallback
from callbacks.pseudo_threshold import PseudoThresholdCallback
from callbacks.score_writer import ScoreWriterCallback
from callbacks.threshold_search import ThresholdCallback
from data_modules.datamodule import MVTecAD2DataModule
from data_modules.listing import list_samples
from hybridad.config import RunConfig, to_dict, to_yaml
from hybridad.models.anomaly_module import AnomalyModule
from hybridad.errors import UserError
from hybridad.run_dir import RunDir
from hybridad.types import Split


def build_model(cfg: RunConfig) -> AnomalyModule:
    """The branch the category is routed to."""
    if cfg.branch == "inp_former":
        from hybridad.models.inp_former.lightning_model import InpFormer

        return InpFormer(cfg.inp_former, postprocess=cfg.postprocess)
    from hybridad.models.cpr.lightning_model import Cpr

    if cfg.cpr.image_size != cfg.data.tiling.input_size:
        raise UserError(f"cpr.image_size ({cfg.cpr.image_size}) differs from data.tiling.input_size "
                        f"({cfg.data.tiling.input_size}): set both to the same size")
    return Cpr(cfg.cpr, postprocess=cfg.postprocess)


def make_run_dir(cfg: RunConfig) -> Path:
    name = cfg.name or time.strftime("%Y%m%d-%H%M%S")
    run = Path(cfg.out_dir) / cfg.data.category / name
    run.mkdir(parents=True, exist_ok=True)
    latest = run.parent / "latest"
    if latest.is_symlink() or not latest.exists():
        tmp = run.parent / f".latest-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(run.name)
        os.replace(tmp, latest)
    return run


def build_loggers(cfg: RunConfig, run: Path) -> list[Logger]:
    loggers: list[Logger] = [CSVLogger(save_dir=run, name="csv", version="")]
    if cfg.logging.wandb and os.environ.get("WANDB_MODE", "offline") != "disabled":
        from lightning.pytorch.loggers import WandbLogger

        os.environ.setdefault("WANDB_MODE", "offline")
        loggers.append(WandbLogger(project=cfg.logging.project, name=f"{cfg.data.category}/{run.name}",
                                   save_dir=str(run), log_model=False))
    return loggers


def build_trainer(cfg: RunConfig, run: Path, extra_callbacks: list[L.Callback] | None = None) -> L.Trainer:
    kwargs = {k: v for k, v in dataclasses.asdict(cfg.trainer).items() if v is not None}
    callbacks: list[L.Callback] = [
        ThresholdCallback(cfg.threshold, run),
        PseudoThresholdCallback(cfg.threshold, run),
        MetricsCallback(run),
        MapWriterCallback(run),
        ScoreWriterCallback(run),
        OverlayLoggerCallback(run, cfg.logging.num_overlays),
        ModelCheckpoint(dirpath=run / "checkpoints", save_last=True, save_top_k=0),
    ]
    callbacks += list(extra_callbacks or [])  # e.g. the demo's one-line progress bar
    return L.Trainer(default_root_dir=run, logger=build_loggers(cfg, run), callbacks=callbacks, **kwargs)


def train(cfg: RunConfig, callbacks: list[L.Callback] | None = None) -> Path:
    """Run the whole job for one category and return its run directory (`callbacks` are added to the Trainer's)."""
    L.seed_everything(cfg.seed, workers=True)
    list_samples(cfg.data.root, cfg.data.category, Split.TRAIN)  # data and weights errors stop before any
    model = build_model(cfg)  # file is written
    run = make_run_dir(cfg)
    run_dir = RunDir(run)
    run_dir.write_text("config.yaml", to_yaml(cfg))
    datamodule = MVTecAD2DataModule(cfg.data, seed=cfg.seed)
    trainer = build_trainer(cfg, run, callbacks)
    for logger in trainer.loggers:
        logger.log_hyperparams(to_dict(cfg))

    trainer.fit(model, datamodule=datamodule)
    trainer.validate(model, datamodule=datamodule)  # final model: validation statistics -> threshold
    trainer.test(model, datamodule=datamodule)
    if cfg.threshold.method == "f1_optimal" and trainer.is_global_zero:
        from hybridad.evaluate import evaluate_run

        evaluate_run(run, [], write=True)
        model.set_threshold(float(run_dir.read_thresholds()["value"]))
    if cfg.predict_private:
        trainer.predict(model, datamodule=datamodule, return_predictions=False)
    trainer.save_checkpoint(run / "checkpoints" / "final.ckpt")  # every rank (a barrier); rank 0 writes
    if trainer.is_global_zero:
        print(f"run directory: {run}")
    return run
