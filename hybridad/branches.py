"""The branch registry: every model branch declares itself here once (as timm's `register_model`).

A branch is a `Branch` registered by its own package (`hybridad/models/<name>/branch.py`, one
`register_branch(Branch(...))` call). Config loading, `train`, `export`, the export runtime's metadata,
`hybridad convert` and the demo read the registry; nothing else compares branch names. The built-in
branches are the modules in `BUILTIN_BRANCH_MODULES`, imported on the first look-up (importing a branch
module only fills the registry: its model code is imported when `build` runs). A third-party branch
registers itself from its own module, imported before the config is loaded (docs/extending_branches.md).

Options: a built-in branch has its own `RunConfig` field (`section`, e.g. `inp_former:`); a branch without
one takes its options from `branch_options:` (typed by its `config_class`; unknown keys and wrong types are
errors, as everywhere; `hybridad.config.branch_options` returns them as a `config_class` object).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hybridad.errors import UserError
from hybridad.registry import Registry

if TYPE_CHECKING:
    from torch import Tensor, nn

    from hybridad.config import RunConfig
    from hybridad.models.anomaly_module import AnomalyModule

BUILTIN_BRANCH_MODULES = ("hybridad.models.inp_former.branch", "hybridad.models.cpr.branch")
OPTIONS_KEY = "branch_options"  # the RunConfig field of the options of branches without their own section


@dataclass(frozen=True)
class ExportableNetwork:
    """What `hybridad export` traces for a run: `net(example)` under `torch.export`.

    Attributes:
        net: (N,3,S,S) float tiles in [0,1] -> (N,1,S,S) float32 tile maps, or (N,G,h,w) per-group token maps
            when `map_smoothing` is set (the runtime turns those into tile maps with `hybridad.inp_map_path`).
        example: an example input, (n,3,S,S).
        dynamic_shapes: `torch.export` dynamic shapes of the tile dimension, or None: the program then takes
            exactly `example.shape[0]` tiles per call (recorded as the metadata's `tile_batch`).
        map_smoothing: `inp_map_path.MAP_SMOOTHING` value the runtime applies to group maps; None = tile maps.
    """

    net: nn.Module
    example: Tensor
    dynamic_shapes: dict[str, Any] | None = None
    map_smoothing: str | None = None


@dataclass(frozen=True)
class Branch:
    """One model branch.

    Attributes:
        name: the value of the run config's `branch` key.
        config_class: dataclass of its options.
        build: run config -> the branch's `AnomalyModule` (its image-score rule is the module's
            `image_score_rule()`, stored in export metadata and applied by the runtime).
        exportable: (module with its final weights, run config, the run's DataModule factory) -> the network
            `hybridad export` traces, after any preparation it needs (CPR: the memory bank built from the
            training images; the factory builds the DataModule on its first call, so models need not import
            `data_modules`).
        section: its `RunConfig` field (built-ins: `inp_former`, `cpr`); None = its options live under
            `branch_options`.
        convert: (official checkpoint, output file) -> None, for `hybridad convert <name with '-'>`.
        demo_overrides: `key=value` items the demo adds when a category is routed here (its tiny preset).
        file_keys: option keys naming files (`weights`, `checkpoint`): "none" clears them on the command line,
            `check_paths` checks them, and another branch's run warns that they are ignored.
        check_options: raises a one-line `UserError` for a bad option value (its section is checked on every
            run; options under `branch_options` when it is routed).
        check_run: raises a one-line `UserError` for settings outside its options that it cannot run with
            (e.g. the input size), when it is routed.
        unread_settings: options -> one line per setting its own run will not read (train prints them).
    """

    name: str
    config_class: type
    build: Callable[[RunConfig], AnomalyModule]
    exportable: Callable[[AnomalyModule, RunConfig, Callable[[], Any]], ExportableNetwork]
    section: str | None = None
    convert: Callable[[Path, Path], None] | None = None
    demo_overrides: tuple[str, ...] = ()
    file_keys: tuple[str, ...] = ()
    check_options: Callable[[Any], None] = field(default=lambda options: None)
    check_run: Callable[[RunConfig], None] = field(default=lambda cfg: None)
    unread_settings: Callable[[Any], list[str]] = field(default=lambda options: [])

    @property
    def config_key(self) -> str:
        """The dotted key its options live under: its section, or `branch_options`."""
        return self.section or OPTIONS_KEY

    @property
    def cli_name(self) -> str:
        """Its name on the command line (`hybridad convert inp-former`)."""
        return self.name.replace("_", "-")


def _import_builtins() -> None:
    for module in BUILTIN_BRANCH_MODULES:
        importlib.import_module(module)


_REGISTRY: Registry[Branch] = Registry("branch", lambda b: b.name, _import_builtins)


def register_branch(branch: Branch) -> Branch:
    """Add `branch` to the registry (another branch of the same name is an error); returns it."""
    return _REGISTRY.register(branch)


def unregister_branch(name: str) -> None:
    """Remove a registered branch (tests that add a toy branch clean up with it)."""
    _REGISTRY.unregister(name)


def branch_names() -> tuple[str, ...]:
    """Registered branch names, built-ins first."""
    return _REGISTRY.names()


def all_branches() -> tuple[Branch, ...]:
    return _REGISTRY.items()


def get_branch(name: str) -> Branch:
    """The registered branch `name`; a one-line `UserError` listing the valid names otherwise."""
    branch = _REGISTRY.find(name)
    if branch is None:
        raise UserError(f"unknown branch '{name}'; valid: {', '.join(_REGISTRY.names())}")
    return branch
