"""`train(cfg)`: fit, fit the threshold on validation, test on test_public, predict the private splits.

Life cycle of the run directory (see `hybridad.run_claim`): claimed atomically before anything is written,
`state.json` running -> completed, or failed with a one-line reason; `latest` moves only to a completed run;
`resume=` continues a run in its own folder from `checkpoints/last.ckpt`. Under DDP every rank uses the folder
rank 0 chose, whichever launcher started the processes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import warnings
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger, Logger

from callbacks.checkpoint import AtomicCheckpointIO, LastCheckpoint
from callbacks.map_writer import MapWriterCallback
from callbacks.metric_logger import MetricsCallback
from callbacks.overlay_logger import OverlayLoggerCallback
from callbacks.score_writer import ScoreWriterCallback
from callbacks.threshold_fit import ThresholdCallback
from data_modules.datamodule import MVTecAD2DataModule
from hybridad.branches import get_branch
from hybridad.config import RunConfig, check_paths, ignored_settings, to_dict, to_yaml
from hybridad.errors import UserError
from hybridad.models.anomaly_module import AnomalyModule
from hybridad.run_claim import (
    ENV_CLAIMED,
    agree_on_run,
    check_resumable,
    claim_new_run,
    detect_launch,
    lock_run,
    publish_latest,
    unlock_run,
)
from hybridad.run_dir import RunDir
from hybridad.threshold_rules import get_rule
from hybridad.thresholds import has_split_overrides
from hybridad.types import PRIVATE_SPLITS, Split

# Lightning's advertising and messages that are expected for this project's loaders and models
_BENIGN_WARNINGS = (
    r".*does not have many workers.*",
    r".*The number of training batches .* is smaller than the logging interval.*",
    r".*Checkpoint directory .* exists and is not empty.*",
    r".*sync_dist=True.*",
    r".*You're resuming from a checkpoint that ended before the epoch ended.*",
    r".*is not a `DistributedSampler`.*",
    r".*Total length of .* across ranks is zero.*",
    r".*Consider setting `persistent_workers=True`.*",
    r".*the number of .* batches .* is less than.*",
    r".*module\(s\) in eval mode.*",  # the frozen encoder
    r".*`weights_only` was not set.*",
    r".*Experiment logs directory .* exists and is not empty.*",
    r".*The ``compute`` method of metric .* was called before the ``update``.*",  # DDP: other ranks' groups
    r".*isinstance\(treespec, LeafSpec\).*",
)
_NOISE = ("Tip:", "litmodels", "litlogger", "Tensor Cores", "GPU available:", "TPU available:",
          "HPU available:", "LOCAL_RANK:", "`Trainer.fit` stopped", "to estimate number of stepping batches",
          "was not set, defaulting")


def quiet_lightning() -> None:
    """Hide Lightning's tips (litlogger/litmodels adverts, Tensor Core hints) and known-benign warnings."""
    for pattern in _BENIGN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)

    class _NoTips(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            msg = record.getMessage()
            return not any(word in msg for word in _NOISE)

    for name in ("lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for target in [logger, *logger.handlers]:  # handlers see the records of every child logger
            if not any(isinstance(f, _NoTips) for f in target.filters):
                target.addFilter(_NoTips())


def validate_data(cfg: RunConfig) -> str:
    """List and deep-check every split this run reads before any training step (a `UserError` names the file:
    every image decoded, sizes as the layout needs, masks binary and of their image's size;
    `data_modules.checks`). Private splits the layout lacks are skipped: nothing is predicted for them."""
    from data_modules.checks import validate_data as check

    private = PRIVATE_SPLITS if cfg.predict_private else ()
    splits = [Split.TRAIN, Split.VALIDATION, Split.TEST_PUBLIC, *private]
    return check(cfg.data, splits)


VALIDATION_LIST = "validation_images.txt"


def write_validation_list(cfg: RunConfig, run_dir: RunDir) -> None:
    """`<run>/validation_images.txt`: the images carved out of train as validation (never trained on)."""
    from data_modules.formats import list_splits

    carved = list_splits(cfg.data).carved
    if carved:
        d = cfg.data
        head = (f"# validation carved from train (data.validation_fraction={d.validation_fraction}, "
                f"data.validation_seed={d.validation_seed}); never trained on\n")
        run_dir.write_text(VALIDATION_LIST, head + "".join(f"{s.image_path}\n" for s in carved))


def build_model(cfg: RunConfig) -> AnomalyModule:
    """The module of the branch the category is routed to (`hybridad.branches`)."""
    return get_branch(cfg.branch).build(cfg)


def build_loggers(cfg: RunConfig, run: Path) -> list[Logger]:
    loggers: list[Logger] = [CSVLogger(save_dir=run, name="csv", version="")]
    if cfg.logging.wandb and os.environ.get("WANDB_MODE", "offline") != "disabled":
        from lightning.pytorch.loggers import WandbLogger

        os.environ.setdefault("WANDB_MODE", "offline")
        wandb_logger = WandbLogger(project=cfg.logging.project, name=f"{cfg.data.category}/{run.name}",
                                   save_dir=str(run), log_model=False)
        # Lightning always passes `anonymous` to wandb.init, which recent wandb (0.31 here) answers with a warning
        wandb_logger._wandb_init.pop("anonymous", None)
        loggers.append(wandb_logger)
    return loggers


NO_VALIDATION_WHILE_FITTING = 1_000_000  # a validation period in epochs that no run reaches


def build_trainer(cfg: RunConfig, run: Path, extra_callbacks: list[L.Callback] | None = None) -> L.Trainer:
    kwargs = {k: v for k, v in dataclasses.asdict(cfg.trainer).items() if v is not None}
    if kwargs["check_val_every_n_epoch"] == 0:  # no validation while fitting; `validate` after fit still runs
        kwargs["check_val_every_n_epoch"] = NO_VALIDATION_WHILE_FITTING
    callbacks: list[L.Callback] = [
        ThresholdCallback(cfg.threshold, run),
        MetricsCallback(run),
        MapWriterCallback(run),
        ScoreWriterCallback(run),
        OverlayLoggerCallback(run, cfg.logging.num_overlays),
        LastCheckpoint(run / "checkpoints", cfg.checkpoint.every_n_steps),
    ]
    callbacks += list(extra_callbacks or [])  # e.g. the demo's one-line progress bar
    return L.Trainer(default_root_dir=run, logger=build_loggers(cfg, run), callbacks=callbacks,
                     plugins=[AtomicCheckpointIO()], enable_checkpointing=False, enable_model_summary=False,
                     **kwargs)


def _process_group_backend(cfg: RunConfig) -> str:
    import torch

    cuda = torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))))
    return "nccl" if cuda else "gloo"


def _per_device_batch(cfg: RunConfig, world_size: int) -> int:
    """`data.batch_size`, or `data.global_batch_size / world size` when a global batch is fixed."""
    total = cfg.data.global_batch_size
    if total <= 0:
        return cfg.data.batch_size
    if total % world_size:
        raise UserError(f"data.global_batch_size={total} is not divisible by the {world_size} devices "
                        "of this job")
    return total // world_size


def _keep_csv_log(run: Path) -> None:
    """Lightning's CSV logger empties `csv/metrics.csv` when it starts: keep a resumed run's earlier part."""
    log = run / "csv" / "metrics.csv"
    if log.is_file():
        part = 1
        while (run / "csv" / f"metrics.part{part}.csv").exists():
            part += 1
        os.replace(log, run / "csv" / f"metrics.part{part}.csv")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {text}"[:500]


def train(cfg: RunConfig, callbacks: list[L.Callback] | None = None) -> Path:
    """Run the whole job for one category and return its run directory (`callbacks` join the Trainer's)."""
    quiet_lightning()
    launch = detect_launch()
    if cfg.trainer.num_nodes > 1 and not (launch.external or launch.child):
        raise UserError("trainer.num_nodes > 1 needs an external launcher: start the job with torchrun or "
                        "SLURM srun")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    owner = not launch.child and launch.rank <= 0
    if owner:
        for line in ignored_settings(cfg):
            print(f"warning: {line}", file=sys.stderr, flush=True)
    check_paths(cfg)  # a wrong weight, checkpoint, defect or data path stops the run before any decoding
    model = build_model(cfg)  # weight files are read before the (slow) deep data check
    if owner and not launch.external:
        validate_data(cfg)  # data and weights errors stop the run before any file is written

    lock: list[int] = []

    def choose() -> Path:
        if launch.external:
            validate_data(cfg)  # rank 0 only: its error reaches every rank through the broadcast
        if cfg.resume:
            run = Path(cfg.resume)
            check_resumable(run)
            lock.append(lock_run(run))
            return run
        run = claim_new_run(cfg.out_dir, cfg.data.category, cfg.name)
        lock.append(lock_run(run))
        return run

    run = agree_on_run(choose, launch, _process_group_backend(cfg) if launch.external else "gloo")
    run_dir = RunDir(run)
    set_env = owner and not launch.external
    if set_env:
        os.environ[ENV_CLAIMED] = str(run)  # Lightning's launcher starts the other local ranks with it
    try:
        if owner:
            if not cfg.resume:
                run_dir.write_text("config.yaml", to_yaml(cfg))
                write_validation_list(cfg, run_dir)
            else:
                _keep_csv_log(run)
            run_dir.write_state("running")
        _fit_and_predict(cfg, model, run, owner, callbacks)
        if owner:
            run_dir.write_state("completed")
            publish_latest(run)
    except BaseException as err:
        if owner:
            reason = "interrupted" if isinstance(err, (KeyboardInterrupt, SystemExit)) else _one_line(err)
            try:
                run_dir.write_state("failed", reason)
            except OSError:
                pass  # the disk that failed the run may refuse this too; the original error matters more
        raise
    finally:
        if set_env:
            os.environ.pop(ENV_CLAIMED, None)
        unlock_run(lock[0] if lock else None)
    if owner:
        print(f"run directory: {run}", flush=True)
    return run


def _fit_and_predict(cfg: RunConfig, model: AnomalyModule, run: Path, owner: bool,
                     callbacks: list[L.Callback] | None = None) -> None:
    datamodule = MVTecAD2DataModule(cfg.data, seed=cfg.seed)
    trainer = build_trainer(cfg, run, callbacks)
    datamodule.config.batch_size = _per_device_batch(cfg, trainer.num_nodes * trainer.num_devices)
    for logger in trainer.loggers:
        logger.log_hyperparams(to_dict(cfg))

    last = run / "checkpoints" / LastCheckpoint.FILENAME
    ckpt_path = str(last) if cfg.resume and last.is_file() else None
    if ckpt_path and owner:
        print(f"resuming {run} from {last}", flush=True)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    trainer.validate(model, datamodule=datamodule, verbose=False)  # final model: validation stats -> threshold
    trainer.test(model, datamodule=datamodule, verbose=False)
    if get_rule(cfg.threshold.method).tuned_on_test:  # fitted from the cached test_public maps
        value = 0.0
        trainer.strategy.barrier("test maps written")
        if trainer.is_global_zero:
            from hybridad.evaluate import TEST_PUBLIC_MASKS_ONLY, evaluate_run

            # process-local metrics (the other ranks wait in the broadcast); the test_public masks now that there
            # is a threshold, as the other rules write them at test (the private splits get theirs when
            # predicted; a private split matched to its own maps is fitted after predicting)
            evaluate_run(run, [], write=True, write_masks=TEST_PUBLIC_MASKS_ONLY, predicted=())
            value = float(RunDir(run).read_thresholds()["value"])
        model.set_threshold(float(trainer.strategy.broadcast(value, src=0)))  # every rank binarises its share
    if cfg.predict_private and not datamodule.predict_splits and owner:
        print(f"{cfg.data.category}: no private splits in this layout, nothing to predict", flush=True)
    if cfg.predict_private and datamodule.predict_splits:
        trainer.predict(model, datamodule=datamodule, return_predictions=False)
        if has_split_overrides(cfg.threshold):  # per-split private thresholds: re-binarise from the cached maps
            trainer.strategy.barrier("private maps written")
            if trainer.is_global_zero:
                from hybridad.evaluate import evaluate_run

                evaluate_run(run, [], write=True, write_masks=True, predicted=datamodule.predict_splits)
    trainer.save_checkpoint(run / "checkpoints" / "final.ckpt", weights_only=True)  # model + threshold only
