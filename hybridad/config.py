"""Run configuration: structured dataclass schema <- experiments/*.yaml <- command-line `key=value`.

Merge order: schema defaults, `experiments/base.yaml`, `experiments/<branch>.yaml`,
`experiments/categories/<category>.yaml`, then the command line. Unknown keys and wrong types raise
`UserError` naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data_modules.datamodule import DataConfig
from hybridad.errors import UserError
from hybridad.models.cpr.config import CprConfig
from hybridad.models.inp_former.config import InpFormerConfig
from hybridad.postprocess import PostProcessConfig
from hybridad.thresholds import ThresholdConfig
from hybridad.types import CATEGORIES

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"
BRANCHES = ("inp_former", "cpr")


@dataclass
class TrainerConfig:
    """Lightning `Trainer` options reachable as `trainer.<key>=...`."""

    accelerator: str = "auto"
    devices: Any = "auto"  # int, list of ids or "auto"
    strategy: str = "auto"
    precision: str = "32-true"  # "bf16-mixed", "16-mixed", ...
    max_epochs: int = 10
    max_steps: int = -1
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    limit_test_batches: Any = None
    limit_predict_batches: Any = None
    gradient_clip_val: float | None = None
    log_every_n_steps: int = 10
    check_val_every_n_epoch: int = 1
    num_sanity_val_steps: int = 0
    deterministic: Any = "warn"  # "warn": deterministic algorithms where PyTorch has them | True | False
    enable_progress_bar: bool = True
    fast_dev_run: bool = False


@dataclass
class LoggingConfig:
    wandb: bool = True  # offline unless WANDB_MODE/API key say otherwise
    project: str = "hybridad"
    num_overlays: int = 4  # anomaly-map overlays logged per test run


@dataclass
class RunConfig:
    """Everything one `hybridad train` run needs."""

    branch: str = "inp_former"  # "inp_former" | "cpr"; routed per category in experiments/categories/
    seed: int = 1
    out_dir: str = "runs"
    name: str = ""  # run directory name below out_dir/<category>/; empty = timestamp
    predict_private: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    inp_former: InpFormerConfig = field(default_factory=InpFormerConfig)
    cpr: CprConfig = field(default_factory=CprConfig)
    postprocess: PostProcessConfig = field(default_factory=PostProcessConfig)
    threshold: ThresholdConfig = field(default_factory=ThresholdConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def _load_yaml(path: Path) -> DictConfig:
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:  # yaml syntax errors
        raise UserError(f"{path}: cannot parse YAML ({err})") from None
    assert isinstance(cfg, DictConfig)
    return cfg


def _merge(base: DictConfig, other: DictConfig, source: str) -> DictConfig:
    try:
        merged = OmegaConf.merge(base, other)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise UserError(f"config key '{key}' from {source}: {_reason(err)}") from None
    assert isinstance(merged, DictConfig)
    return merged


def _reason(err: OmegaConfBaseException) -> str:
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    return msg


def load_config(overrides: list[str] | None = None, experiments_dir: Path | None = None) -> RunConfig:
    """Build the run config from the schema, the experiment YAMLs and `key=value` overrides."""
    exp = experiments_dir or EXPERIMENTS_DIR
    overrides = list(overrides or [])
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' is not of the form key=value")
    try:
        cli = OmegaConf.from_dotlist(overrides)
    except OmegaConfBaseException as err:
        raise UserError(f"bad override: {_reason(err)}") from None

    cfg = OmegaConf.structured(RunConfig)
    cfg = _merge(cfg, _load_yaml(exp / "base.yaml"), "experiments/base.yaml")
    # the category decides the routing, so read it from the command line before merging YAMLs
    category = OmegaConf.select(cli, "data.category", default=None) or cfg.data.category
    if category not in CATEGORIES:
        raise UserError(f"unknown category '{category}'; valid: {', '.join(CATEGORIES)}")
    cat_yaml = _load_yaml(exp / "categories" / f"{category}.yaml")
    branch = OmegaConf.select(cli, "branch", default=None) or cat_yaml.get("branch", cfg.branch)
    if branch not in BRANCHES:
        raise UserError(f"unknown branch '{branch}'; valid: {', '.join(BRANCHES)}")
    cfg = _merge(cfg, _load_yaml(exp / f"{branch}.yaml"), f"experiments/{branch}.yaml")
    cfg = _merge(cfg, cat_yaml, f"experiments/categories/{category}.yaml")
    cfg = _merge(cfg, cli, "the command line")
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise UserError(f"config key '{getattr(err, 'full_key', '?')}': {_reason(err)}") from None
    assert isinstance(obj, RunConfig)
    return obj


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    out = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    assert isinstance(out, dict)
    return out


def load_run_config(run_dir: Path, overrides: list[str] | None = None) -> RunConfig:
    """The resolved config a run saved (`<run>/config.yaml`), with `key=value` overrides on top."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"{path} not found: is {run_dir} a hybridad run directory (made by `hybridad train`)?")
    cfg = _merge(OmegaConf.structured(RunConfig), _load_yaml(path), str(path))
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"override '{item}' is not of the form key=value")
    try:
        cli = OmegaConf.from_dotlist(list(overrides or []))
    except OmegaConfBaseException as err:
        raise UserError(f"bad override: {_reason(err)}") from None
    cfg = _merge(cfg, cli, "the command line")
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, RunConfig)
    return obj
