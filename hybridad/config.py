"""Run configuration: structured dataclass schema <- experiments/*.yaml <- command-line `key=value`.

Merge order: schema defaults, `experiments/base.yaml`, `experiments/<branch>.yaml` (where it exists),
`experiments/categories/<category>.yaml` (where it exists), the user's `config=<file.yaml>`, then the
command line. Unknown keys and wrong types raise `UserError` naming the key.

Any category name is accepted: one without a category file runs on the defaults (branch `inp_former`, or
`branch=cpr`; whole-image tiling; grey or colour as the images are; no post-processing kernels; mean + 3 std
threshold). The eight MVTec AD 2 categories keep the winners' settings from their category files.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data_modules.datamodule import DataConfig
from hybridad.branches import OPTIONS_KEY, Branch, all_branches, get_branch
from hybridad.errors import UserError, check_choice, check_setting
from hybridad.models.cpr.config import CprConfig
from hybridad.models.inp_former.config import InpFormerConfig
from hybridad.postprocess import PostProcessConfig
from hybridad.thresholds import ThresholdConfig

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"
# keys a resumed run may change: where the data lives (if moved), loader processes, logging, progress output
RESUME_MUTABLE = ("data.num_workers", "trainer.enable_progress_bar", "trainer.log_every_n_steps",
                  "logging.wandb", "logging.project", "logging.num_overlays")


@dataclass
class TrainerConfig:
    """Lightning `Trainer` options reachable as `trainer.<key>=...`."""

    accelerator: str = "auto"
    devices: Any = "auto"  # int, list of ids or "auto"
    strategy: str = "auto"  # "ddp" for several GPUs (launched by Lightning, torchrun or SLURM srun)
    num_nodes: int = 1
    precision: str = "32-true"  # "bf16-mixed", "16-mixed", ...
    max_epochs: int = 10
    max_steps: int = -1
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    limit_test_batches: Any = None
    limit_predict_batches: Any = None
    gradient_clip_val: float | None = None
    log_every_n_steps: int = 10
    check_val_every_n_epoch: int = 0  # 0 = no validation while training (as the winners); validate after fit
    num_sanity_val_steps: int = 0
    deterministic: Any = "warn"  # "warn": deterministic algorithms where PyTorch has them | True | False
    enable_progress_bar: bool = True
    fast_dev_run: bool = False
    accumulate_grad_batches: int = 1


@dataclass
class CheckpointConfig:
    """Resumable `<run>/checkpoints/last.ckpt` (written atomically, replaced at each save)."""

    every_n_steps: int = 500  # optimiser steps between saves (0 = only at epoch ends and when fitting ends)


@dataclass
class LoggingConfig:
    wandb: bool = True  # offline unless WANDB_MODE/API key say otherwise
    project: str = "hybridad"
    num_overlays: int = 4  # anomaly-map overlays logged per test run


@dataclass
class RunConfig:
    """Everything one `hybridad train` run needs."""

    branch: str = "inp_former"  # a registered branch (hybridad/branches.py), routed per category
    seed: int = 1
    out_dir: str = "runs"
    name: str = ""  # run directory name below out_dir/<category>/; empty = timestamp
    predict_private: bool = True
    resume: str = ""  # "latest" (newest run of the category) or a run directory: continue that run
    data: DataConfig = field(default_factory=DataConfig)
    inp_former: InpFormerConfig = field(default_factory=InpFormerConfig)
    cpr: CprConfig = field(default_factory=CprConfig)
    # options of a registered branch without its own field above, typed by its config class when it is routed
    # (docs/extending_branches.md); empty for the built-in branches
    branch_options: dict[str, Any] = field(default_factory=dict)
    postprocess: PostProcessConfig = field(default_factory=PostProcessConfig)
    threshold: ThresholdConfig = field(default_factory=ThresholdConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


def _load_yaml(path: Path) -> DictConfig:
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:  # yaml syntax errors
        raise UserError(f"{path}: cannot parse YAML ({err})") from None
    assert isinstance(cfg, DictConfig)
    return cfg


RETIRED_KEYS = ("cpr.steps",)  # keys older runs saved that no longer exist (ignored when a run is read back)


def _load_saved(path: Path) -> DictConfig:
    """A run's saved `config.yaml`, without `RETIRED_KEYS` (so older runs still predict, evaluate, resume)."""
    saved = _load_saved_run_yaml(path)
    for key in RETIRED_KEYS:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(saved, parent, default=None) if parent else saved
        if isinstance(node, DictConfig) and leaf in node:
            node.pop(leaf)
    return saved


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
    user_file, overrides = _user_config(overrides)
    cli = parse_overrides(overrides)
    if OmegaConf.select(cli, "resume", default=None):
        if user_file is not None:
            raise UserError(f"resume keeps the run's config: drop config={user_file}")
        return load_resume_config(cli)

    cfg = OmegaConf.structured(RunConfig)
    cfg = _merge(cfg, _load_yaml(exp / "base.yaml"), "experiments/base.yaml")
    user = _load_yaml(user_file) if user_file else OmegaConf.create({})
    # the category decides the routing, so read it from the command line (or the user's file) before merging
    category = str(OmegaConf.select(cli, "data.category", default=None)
                   or OmegaConf.select(user, "data.category", default=None) or cfg.data.category)
    _check_category_name(category)
    cat_file = exp / "categories" / f"{category}.yaml"
    cat_yaml = _load_yaml(cat_file) if cat_file.is_file() else OmegaConf.create({})
    branch = (OmegaConf.select(cli, "branch", default=None) or user.get("branch")
              or cat_yaml.get("branch", cfg.branch))
    get_branch(str(branch))  # an unknown branch: one line listing the registered ones
    if (exp / f"{branch}.yaml").is_file():  # a branch's experiment file is optional
        cfg = _merge(cfg, _load_yaml(exp / f"{branch}.yaml"), f"experiments/{branch}.yaml")
    cfg = _merge(cfg, cat_yaml, f"experiments/categories/{category}.yaml")
    cfg = _merge(cfg, user, str(user_file))
    cfg = _merge(cfg, cli, "the command line")
    for b in all_branches():  # a tiny preset is random-init: a weight file from the YAMLs is not needed
        section = cfg.get(b.section) if b.section else None
        if (section is not None and section.get("preset") == "tiny" and "weights" in section
                and OmegaConf.select(cli, f"{b.section}.weights") is None):
            section.weights = ""
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise UserError(f"config key '{getattr(err, 'full_key', '?')}': {_reason(err)}") from None
    assert isinstance(obj, RunConfig)
    if get_branch(obj.branch).section is None:  # the run's config.yaml records every option of the branch
        obj.branch_options = dataclasses.asdict(branch_options(obj))
    validate_config(obj)
    return obj


def _user_config(overrides: list[str] | None) -> tuple[Path | None, list[str]]:
    """Take `config=<file.yaml>` out of the overrides: (the file, the other items)."""
    user: Path | None = None
    rest = []
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if key != "config" or not sep:
            rest.append(item)
            continue
        if user is not None:
            raise UserError(f"config= given twice ({user} and {value}); merge them into one file")
        user = Path(value).expanduser()
        if not user.is_file():
            raise UserError(f"config={value}: file not found (a YAML file of overrides, e.g. my_line.yaml)")
    return user, rest


def _check_category_name(category: str) -> None:
    """A category names a folder: no path separators, not empty, '.' or '..'."""
    if not category or "/" in category or "\\" in category or category in (".", ".."):
        raise UserError(f"data.category '{category}' is not a folder name (no '/', not empty, '.' or '..')")


def file_keys() -> tuple[str, ...]:
    """Dotted config keys that name a file or folder: every registered branch's, and the defect crops'."""
    keys = [f"{b.config_key}.{key}" for b in all_branches() for key in b.file_keys]
    return (*keys, "data.cut_paste.defect_dir")


def branch_options(cfg: RunConfig) -> Any:
    """The routed branch's options: its own section of `cfg`, or `branch_options` as a `config_class` object
    (unknown keys and wrong types raise a one-line `UserError` naming the key)."""
    branch = get_branch(cfg.branch)
    if branch.section is not None:
        return getattr(cfg, branch.section)
    try:
        schema = OmegaConf.structured(branch.config_class)
        options = OmegaConf.to_object(OmegaConf.merge(schema, cfg.branch_options))
    except OmegaConfBaseException as err:
        raise UserError(f"config key '{OPTIONS_KEY}.{getattr(err, 'full_key', '?')}' (options of branch "
                        f"'{branch.name}'): {_reason(err)}") from None
    return options


def parse_overrides(overrides: list[str] | None) -> DictConfig:
    """`key=value` items -> one DictConfig; each malformed item is named in a one-line `UserError`.

    For file keys (`*.weights`, `*.checkpoint`, `data.cut_paste.defect_dir`) an empty value, `none` or `null`
    means "no file" (so `inp_former.weights=none` survives `make ARGS=...`, where the shell eats `''`).
    """
    parts = []
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"override '{item}' is not of the form key=value")
        if key in file_keys() and value.strip().lower() in ("", "none", "null", "''", '""'):
            item = f"{key}=''"
        try:
            parts.append(OmegaConf.from_dotlist([item]))
        except (OmegaConfBaseException, yaml.YAMLError) as err:
            why = " ".join(str(err).split("\n")[:2]) if isinstance(err, yaml.YAMLError) else _reason(err)
            raise UserError(f"override '{item}': not valid YAML ({why}); write the value in YAML syntax "
                            "(lists as [1, 2], mappings as {cols: 2, rows: 1}), quoted for the shell") from None
    if not parts:
        return OmegaConf.create({})
    merged = OmegaConf.merge(*parts)
    assert isinstance(merged, DictConfig)
    return merged


def load_resume_config(cli: DictConfig) -> RunConfig:
    """The saved config of the run named by `resume=` (`latest` or a run folder), `cfg.resume` set to it.

    A resumed run keeps its config: another value for any key but `RESUME_MUTABLE` is refused with one line.
    A `data.root` on the command line is used only when the saved one no longer holds the category.
    """
    from hybridad.run_claim import resolve_resume_target

    spec = str(cli.resume)
    schema_default = OmegaConf.structured(RunConfig)
    out_dir = OmegaConf.select(cli, "out_dir", default=None) or schema_default.out_dir
    category = OmegaConf.select(cli, "data.category", default=None)
    if spec == "latest" and not category:
        raise UserError("resume=latest needs data.category (e.g. `make train CAT=can ARGS=resume=latest`)")
    run = resolve_resume_target(spec, out_dir, str(category or ""))
    saved_path = run / "config.yaml"
    saved = _merge(OmegaConf.structured(RunConfig), _load_saved(saved_path), str(saved_path))
    for key, value in _flatten(OmegaConf.to_container(cli)):
        if key in RESUME_MUTABLE or key in ("resume", "out_dir", "name"):  # the last two only locate the run
            continue
        if key == "data.root":
            if not (Path(str(saved.data.root)) / str(saved.data.category)).is_dir():
                saved.data.root = str(value)
            continue
        old = OmegaConf.select(saved, key, default="__missing__")
        changed = _merge(saved.copy(), OmegaConf.create(_nest([(key, value)])), "the command line")
        new = OmegaConf.select(changed, key, default="__missing__")
        if old != new:
            raise UserError(f"resume: {key}={value} differs from the run's {key}={old} "
                            f"({run / 'config.yaml'}); a resumed run keeps its config (start a new run to "
                            "change it)")
    mutable = [(k, v) for k, v in _flatten(OmegaConf.to_container(cli)) if k in RESUME_MUTABLE]
    saved = _merge(saved, OmegaConf.create(_nest(mutable)), "the command line")
    saved.resume = str(run)
    obj = OmegaConf.to_object(saved)
    assert isinstance(obj, RunConfig)
    validate_config(obj)
    return obj


def _flatten(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(tree, dict):
        out: list[tuple[str, Any]] = []
        for k, v in tree.items():
            out += _flatten(v, f"{prefix}{k}.")
        return out
    return [(prefix[:-1], tree)]


def _nest(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Dotted `(key, value)` pairs -> a nested dict."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    out = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    assert isinstance(out, dict)
    return out


def _load_saved_run_yaml(path: Path) -> DictConfig:
    """A run's saved config.yaml; runs saved before `postprocess.gaussian_sigma` was renamed
    `whole_map_blur_sigma` still load (the value moves to the new key)."""
    cfg = _load_yaml(path)
    pp = cfg.get("postprocess")
    if isinstance(pp, DictConfig) and "gaussian_sigma" in pp:
        pp["whole_map_blur_sigma"] = pp.pop("gaussian_sigma")
    return cfg


def load_run_config(run_dir: Path, overrides: list[str] | None = None) -> RunConfig:
    """The resolved config a run saved (`<run>/config.yaml`), with `key=value` overrides on top."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"{path} not found: is {run_dir} a hybridad run directory (made by `hybridad train`)?")
    cfg = _merge(OmegaConf.structured(RunConfig), _load_saved(path), str(path))
    cfg = _merge(cfg, parse_overrides(overrides), "the command line")
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, RunConfig)
    validate_config(obj)
    return obj


PRECISIONS = ("64-true", "64", "32-true", "32", "16-mixed", "16", "bf16-mixed", "bf16", "16-true", "bf16-true",
              "transformer-engine", "transformer-engine-float16")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


def check_paths(cfg: RunConfig) -> None:
    """Every file and folder the run's config names exists: cheap (no decoding, no weight loading), so a wrong
    path stops a run at once with one `UserError` line naming the key, not after the data check.

    Checked: the routed branch's `weights` and `checkpoint`, `data.cut_paste.defect_dir` and `data.root`
    (root, category and split folders in `data.format`'s layout). The weight loaders and the deep data check inspect contents later.
    """
    from data_modules.formats import list_splits

    routed = get_branch(cfg.branch)
    hints = {"weights": "download it (README: Real data and weights) or set the key to the file's path",
             "checkpoint": (f"convert an official file with `hybridad convert {routed.cli_name}` or "
                            if routed.convert else "") + "set the key to none"}
    options = branch_options(cfg)
    for name in routed.file_keys:
        path = str(getattr(options, name) or "")
        if path and not Path(path).is_file():
            hint = hints.get(name, "set the key to the file's path, or to none")
            raise UserError(f"{routed.config_key}.{name}: file '{path}' not found; {hint}")
    defect_dir = cfg.data.cut_paste.defect_dir
    if defect_dir and not Path(defect_dir).is_dir():
        raise UserError(f"data.cut_paste.defect_dir: folder '{defect_dir}' not found; point it at "
                        "<dir>/<category> holding <type>/*.png crops, or set it to none")
    list_splits(cfg.data)  # root, category and split folders in the run's layout (a listing, no decoding)


_check, _check_enum = check_setting, check_choice  # the one-line config errors (hybridad.errors)


def _check_devices(value: Any) -> None:
    ok = value == "auto" or (isinstance(value, int) and (value >= 1 or value == -1))
    if isinstance(value, (list, tuple)):
        ok = len(value) > 0 and all(isinstance(v, int) and v >= 0 for v in value)
    if isinstance(value, str) and value != "auto":
        parts = [p.strip() for p in value.split(",") if p.strip()]
        ok = bool(parts) and all(p.isdigit() or p == "-1" for p in parts)
    _check(ok, "trainer.devices", value, "use a count >= 1, -1 (all), 'auto' or a list of device ids")


def ignored_settings(cfg: RunConfig) -> list[str]:
    """One line per weight file the config sets but the run will not read (train prints them as warnings)."""
    lines = get_branch(cfg.branch).unread_settings(branch_options(cfg))
    for other in all_branches():
        if other.section is None or other.name == cfg.branch:
            continue
        for key in other.file_keys:
            value = getattr(getattr(cfg, other.section), key)
            if value:
                lines.append(f"{other.section}.{key}={value} is ignored: this run's branch is {cfg.branch}")
    return lines


def validate_config(cfg: RunConfig) -> None:
    """Check every value that the schema's types do not (enums, ranges, sizes) and raise one `UserError` line.

    Runs before anything is built or written, so a bad value never surfaces after hours of training.
    """
    from lightning.pytorch.strategies import StrategyRegistry

    from hybridad.threshold_rules import Need, get_rule, rule_for_split, rule_names
    from hybridad.thresholds import OVERRIDABLE_SPLITS, PERCENTILE_METHODS

    from data_modules.formats import READERS

    routed = get_branch(cfg.branch)
    _check_category_name(cfg.data.category)
    _check_enum("data.format", cfg.data.format, tuple(READERS))
    t = cfg.trainer
    _check_enum("trainer.precision", str(t.precision), PRECISIONS)
    _check_enum("trainer.accelerator", t.accelerator, ACCELERATORS)
    strategies = ("auto", *StrategyRegistry.available_strategies())
    _check_enum("trainer.strategy", t.strategy, strategies)
    _check(not any(w in t.strategy for w in ("spawn", "fork", "notebook")), "trainer.strategy", t.strategy,
           "use 'ddp' (processes that start from the command line; spawn/fork strategies are not supported)")
    _check_devices(t.devices)
    _check(t.num_nodes >= 1, "trainer.num_nodes", t.num_nodes, "must be >= 1")
    _check(t.max_epochs >= -1, "trainer.max_epochs", t.max_epochs, "must be >= 1, or -1 for no limit")
    _check(t.max_steps >= -1, "trainer.max_steps", t.max_steps,
           "must be >= 0 (0 = evaluate the untrained model), or -1 for no limit")
    _check(t.log_every_n_steps >= 1, "trainer.log_every_n_steps", t.log_every_n_steps, "must be >= 1")
    _check(t.check_val_every_n_epoch >= 0, "trainer.check_val_every_n_epoch", t.check_val_every_n_epoch,
           "must be >= 0 (0 = no validation while training)")
    _check(t.accumulate_grad_batches >= 1, "trainer.accumulate_grad_batches", t.accumulate_grad_batches,
           "must be >= 1")
    _check(t.num_sanity_val_steps >= -1, "trainer.num_sanity_val_steps", t.num_sanity_val_steps,
           "must be >= -1")
    for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches"):
        v = getattr(t, key)
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        _check(v is None or (number and v >= 0), f"trainer.{key}", v,
               "must be a fraction in [0, 1] or a number of batches >= 0")
    _check(t.gradient_clip_val is None or t.gradient_clip_val >= 0, "trainer.gradient_clip_val",
           t.gradient_clip_val, "must be >= 0")
    _check(cfg.checkpoint.every_n_steps >= 0, "checkpoint.every_n_steps", cfg.checkpoint.every_n_steps,
           "must be >= 0 (0 = only at epoch ends)")

    d = cfg.data
    _check(0.0 < d.validation_fraction < 1.0, "data.validation_fraction", d.validation_fraction,
           "is a share of the training images in (0, 1)")
    _check(d.batch_size >= 1, "data.batch_size", d.batch_size, "must be >= 1")
    _check(d.global_batch_size >= 0, "data.global_batch_size", d.global_batch_size, "must be >= 0 (0 = off)")
    if d.global_batch_size > 0 and isinstance(t.devices, int) and t.devices > 0:
        world = t.devices * t.num_nodes
        _check(d.global_batch_size % world == 0, "data.global_batch_size", d.global_batch_size,
               f"must divide by the {world} devices (trainer.devices x trainer.num_nodes)")
    _check(d.eval_batch_size >= 1, "data.eval_batch_size", d.eval_batch_size, "must be >= 1")
    _check(d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0")
    size = d.tiling.input_size
    _check(size >= 1, "data.tiling.input_size", size, "must be >= 1")
    _check(len(d.tiling.train_levels) >= 1, "data.tiling.train_levels", d.tiling.train_levels,
           "needs at least one level")
    for i, lv in enumerate([*d.tiling.train_levels, d.tiling.test_level]):
        key = f"data.tiling.train_levels[{i}]" if i < len(d.tiling.train_levels) else "data.tiling.test_level"
        _check(lv.cols >= 1 and lv.rows >= 1 and 0 <= lv.overlap < 0.5, key,
               f"{lv.cols}x{lv.rows}/{lv.overlap}", "needs cols >= 1, rows >= 1 and 0 <= overlap < 0.5")
    for key in ("hflip", "vflip", "probability"):
        v = getattr(d.augment, key)
        _check(0.0 <= v <= 1.0, f"data.augment.{key}", v, "is a probability in [0, 1]")
    for key in ("scale", "brightness", "exposure"):
        v = getattr(d.augment, key)
        _check(v >= 0.0, f"data.augment.{key}", v, "must be >= 0")
    cp = d.cut_paste
    _check(0.0 <= cp.probability <= 1.0, "data.cut_paste.probability", cp.probability,
           "is a probability in [0, 1]")
    _check(cp.max_patches >= 1, "data.cut_paste.max_patches", cp.max_patches, "must be >= 1")
    _check(0.0 < cp.scale_min <= cp.scale_max <= 1.0, "data.cut_paste.scale_min/scale_max",
           f"{cp.scale_min}/{cp.scale_max}", "need 0 < scale_min <= scale_max <= 1")
    _check(0.0 <= cp.opacity_min <= cp.opacity_max <= 1.0, "data.cut_paste.opacity_min/opacity_max",
           f"{cp.opacity_min}/{cp.opacity_max}", "need 0 <= opacity_min <= opacity_max <= 1")
    _check(cp.library_size >= 1 and cp.patch_size >= 1, "data.cut_paste.library_size/patch_size",
           f"{cp.library_size}/{cp.patch_size}", "must be >= 1")

    p = cfg.postprocess
    _check(p.whole_map_blur_sigma >= 0, "postprocess.whole_map_blur_sigma", p.whole_map_blur_sigma, "must be >= 0 (0 = off)")
    for key in ("closing_kernel", "erosion_kernel", "min_area"):
        v = getattr(p, key)
        _check(v >= 0, f"postprocess.{key}", v, "must be >= 0 (0 = off)")
    _check(0.0 < p.full_mask_guard <= 1.0, "postprocess.full_mask_guard", p.full_mask_guard,
           "must be in (0, 1]")

    th = cfg.threshold
    _check_enum("threshold.method", th.method, rule_names())
    _check_enum("threshold.percentile_method", th.percentile_method, PERCENTILE_METHODS)
    _check(0.0 < th.percentile <= 100.0, "threshold.percentile", th.percentile, "must be in (0, 100]")
    _check(th.factor > 0, "threshold.factor", th.factor, "must be > 0")
    _check(math.isfinite(th.k), "threshold.k", th.k, "must be a finite number")
    _check(th.value is None or math.isfinite(th.value), "threshold.value", th.value, "must be a finite number")
    own = get_rule(th.method)
    _check(Need.SPLIT_MAPS not in own.needs, "threshold.method", th.method,
           "it reads a private split's own maps and the category's threshold, so it is a private split's "
           f"rule: keep a category rule here and set threshold.test_private_mixed.method={th.method} "
           f"(or threshold.test_private.method)")
    for key, example in own.required.items():
        _check(getattr(th, key) is not None, f"threshold.{key}", getattr(th, key),
               f"threshold.method={th.method} needs a value (threshold.{key}={example})")
    for split in OVERRIDABLE_SPLITS:
        o = getattr(th, split)
        for key in ("k", "percentile", "factor", "value"):
            v = getattr(o, key)
            _check(v is None or math.isfinite(v), f"threshold.{split}.{key}", v, "must be a finite number")
        rule = rule_for_split(th, split)
        split_rule = get_rule(rule.method, f"threshold.{split}.method")
        if Need.SPLIT_MAPS in split_rule.needs:  # carries the category's threshold over: its own keys only
            for key in (f.name for f in dataclasses.fields(o) if f.name != "method"):
                _check(getattr(o, key) is None or key in split_rule.params, f"threshold.{split}.{key}",
                       getattr(o, key), f"has no effect with threshold.{split}.method={rule.method}, which "
                       f"carries the category's threshold over to the split (set threshold.{key} instead)")
        for key, example in split_rule.required.items():
            _check(getattr(rule, key) is not None, f"threshold.{split}.{key}", getattr(o, key),
                   f"threshold.{split}.method={rule.method} needs a value (threshold.{split}.{key}={example})")

    _validate_branches(cfg, routed)
    _check(cfg.logging.num_overlays >= 0, "logging.num_overlays", cfg.logging.num_overlays, "must be >= 0")
    if cfg.resume == "":
        name = cfg.name
        _check("/" not in name and name not in (".", "..", "latest"), "name", name,
               "is a folder name (no '/', not '.', '..' or 'latest')")


def _validate_branches(cfg: RunConfig, routed: Branch) -> None:
    """Every branch's own section (`inp_former.*`, `cpr.*`), the routed branch's `branch_options`, and what
    the routed branch needs of the rest of the config (`Branch.check_run`)."""
    for b in all_branches():
        if b.section is not None:
            b.check_options(getattr(cfg, b.section))
    if routed.section is None:
        routed.check_options(branch_options(cfg))
    else:
        _check(not cfg.branch_options, OPTIONS_KEY, cfg.branch_options,
               f"is read only by branches without their own section; set {routed.section}.<key> instead")
    routed.check_run(cfg)
