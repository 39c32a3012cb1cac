"""Loading a finished run: its decision (threshold and post-processing) and its module with the final weights.

Used by `hybridad predict` and `hybridad export`; the module is rebuilt from the run's `config.yaml` by its
branch (`hybridad.branches`), then given the weights of `checkpoints/final.ckpt` (hyperparameters stored in
the checkpoint are not read).
"""

from __future__ import annotations

import math
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from hybridad.branches import get_branch
from hybridad.config import RunConfig, load_run_config
from hybridad.errors import UserError, first_line
from hybridad.models.anomaly_module import AnomalyModule
from hybridad.postprocess import PostProcessConfig
from hybridad.run_dir import RunDir

CHECKPOINT = Path("checkpoints") / "final.ckpt"
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"


@dataclass
class Decision:
    """Threshold and mask post-processing applied to new maps, and where they came from."""

    threshold: float
    postprocess: PostProcessConfig
    source: str


EVALUATION_FILE = "evaluation.yaml"  # written by `hybridad evaluate` into <run>/evaluations/<id>/


def _require_own_evaluation(run: RunDir, evaluation: Path, record: dict[str, Any]) -> None:
    """`UserError` unless `evaluation` re-scored `run` (its category, and its run by path or by location)."""
    category = record.get("category")
    if category is not None and str(category) != run.category:
        raise UserError(f"--evaluation {evaluation} is of category '{category}' but run {run.path} is "
                        f"'{run.category}'; give an evaluation of this run ({run.path / 'evaluations'}/<id>)")
    own = {run.path.resolve()}
    recorded = {Path(str(record["run"])).resolve()} if record.get("run") else set()
    if not own & (recorded | {evaluation.resolve().parent.parent}):
        raise UserError(f"--evaluation {evaluation} re-scored run {record.get('run')}, not {run.path}; "
                        f"give an evaluation of this run ({run.path / 'evaluations'}/<id>)")


def _evaluation_postprocess(run: RunDir, evaluation: Path) -> list[str]:
    """`postprocess.*` overrides of an evaluation: its resolved `postprocess` section, else its `overrides`."""
    path = evaluation / EVALUATION_FILE
    if not path.is_file():
        raise UserError(f"{evaluation} is not a finished evaluation (no {EVALUATION_FILE}); "
                        "give a directory written by `hybridad evaluate`")
    record = yaml.safe_load(path.read_text()) or {}
    _require_own_evaluation(run, evaluation, record)
    if isinstance(record.get("postprocess"), dict):
        return [f"postprocess.{k}={v}" for k, v in record["postprocess"].items()]
    return [str(o) for o in record.get("overrides") or [] if str(o).startswith("postprocess.")]


def read_decision(run: RunDir, evaluation: Path | None = None) -> Decision:
    """The run's threshold (`thresholds.yaml`) and post-processing (`config.yaml`), or an evaluation's.

    An evaluation directory (`<run>/evaluations/<id>`) supplies its `thresholds.yaml` top-level `value` (the
    category's threshold; per-split private values are not used for new images) and the post-processing of its
    `evaluation.yaml` (the resolved `postprocess` section, else the `postprocess.*` items of `overrides`).
    """
    cfg = load_run_config(run.path)
    overrides = _evaluation_postprocess(run, evaluation) if evaluation is not None else []
    source = RunDir(evaluation) if evaluation is not None else run
    thr_file = source.path / "thresholds.yaml"
    if not thr_file.is_file():
        hint = ("give a directory written by `hybridad evaluate`" if evaluation
                else "re-run `hybridad evaluate`")
        raise UserError(f"{thr_file} not found ({hint})")
    thresholds = source.read_thresholds()
    value = thresholds.get("value")
    if not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise UserError(f"{thr_file} has no finite threshold 'value'")
    postprocess = load_run_config(run.path, overrides).postprocess if overrides else cfg.postprocess
    what = thresholds.get("source") or thresholds.get("method") or "?"
    return Decision(float(value), postprocess, f"{thr_file} ({what})")


def load_module(run: RunDir, cfg: RunConfig, decision: Decision | None = None) -> AnomalyModule:
    """The run's LightningModule with its final weights, on the CPU, in eval mode, threshold set.

    CPR's memory bank is not in the checkpoint: it is rebuilt at the first eval step from the training images
    (`data.root`), exactly as after training.
    """
    ckpt = run.path / CHECKPOINT
    if not ckpt.is_file() and (run.path / LAST_CHECKPOINT).is_file():
        ckpt = run.path / LAST_CHECKPOINT  # a completed run's last checkpoint is its final one
    if not ckpt.is_file():
        raise UserError(f"{run.path / CHECKPOINT} not found: the run has no final checkpoint "
                        "(finish it with `hybridad train`)")
    state = load_checkpoint_weights(ckpt)
    module = get_branch(cfg.branch).build(cfg)
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"{ckpt}: its weights do not fit the run's model ({first_line(err)}); "
                        "the checkpoint belongs to another run or config") from None
    if decision is not None:
        module.set_threshold(decision.threshold)
        module.postprocess = decision.postprocess
    return module.eval()


def load_checkpoint_weights(ckpt: Path) -> dict[str, Tensor]:
    """The `state_dict` of a Lightning checkpoint, unpickled weights-only (no code in the file runs).

    Only tensors, plain containers and the config dataclass CPR stores as a hyperparameter are allowed.

    Raises:
        UserError: a truncated or corrupt file, or one that needs arbitrary unpickling (naming the file).
    """
    from hybridad.models.cpr.config import CprConfig

    try:
        with torch.serialization.safe_globals([CprConfig]):
            checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
        state = checkpoint["state_dict"]
        if not isinstance(state, dict):
            raise TypeError("state_dict is not a dict")
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, TypeError, ValueError, AttributeError,
            ImportError, OSError, zipfile.BadZipFile) as err:
        raise UserError(f"cannot load {ckpt}: not a complete weights-only checkpoint ({first_line(err)}); "
                        "re-train the run or restore the file") from None
    return state
