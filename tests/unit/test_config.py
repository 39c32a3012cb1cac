"""Config: merge order, routing, strictness, and every experiments/ file building."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from hybridad.config import EXPERIMENTS_DIR, RunConfig, load_config, load_run_config, to_yaml
from hybridad.errors import UserError
from hybridad.types import CATEGORIES

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("category", CATEGORIES)
def test_every_category_builds_with_its_routed_branch(category: str) -> None:
    cfg = load_config([f"data.category={category}"])
    assert isinstance(cfg, RunConfig)
    assert cfg.data.category == category
    assert cfg.branch == ("cpr" if category in ("fruit_jelly", "vial") else "inp_former")


def test_merge_order_schema_base_branch_category_cli() -> None:
    cfg = load_config(["data.category=fabric"])
    assert cfg.threshold.k == 3.0  # base.yaml
    assert cfg.data.tiling.input_size == 448  # inp_former.yaml
    assert cfg.postprocess.closing_kernel == 80  # categories/fabric.yaml
    assert [(lv.cols, lv.rows) for lv in cfg.data.tiling.train_levels] == [(1, 1), (2, 2)]
    cfg = load_config(["data.category=fabric", "postprocess.closing_kernel=5", "trainer.max_epochs=2"])
    assert cfg.postprocess.closing_kernel == 5 and cfg.trainer.max_epochs == 2  # command line wins
    cfg = load_config(["data.category=vial"])
    assert cfg.data.tiling.input_size == 320 and cfg.trainer.max_steps == 1300  # cpr.yaml, then vial.yaml


def test_branch_override_reroutes_a_category() -> None:
    cfg = load_config(["data.category=vial", "branch=inp_former"])
    assert cfg.branch == "inp_former" and cfg.data.tiling.input_size == 448


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("data.bogus=1", "data.bogus"),
        ("trainer.max_epochs=ten", "trainer.max_epochs"),
        ("nonsense", "key=value"),
        ("data.category=bolts", "valid:"),
        ("branch=patchcore", "unknown branch"),
    ],
)
def test_bad_overrides_raise_one_line_naming_the_key(override: str, needle: str) -> None:
    with pytest.raises(UserError) as err:
        load_config([override])
    msg = str(err.value)
    assert needle in msg and "\n" not in msg


def test_cli_reports_config_error_without_traceback() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "hybridad", "train", "data.category=can", "data.bogus=1"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.bogus" in lines[0]


def test_resolved_config_round_trips_through_the_run_dir(tmp_path: Path) -> None:
    cfg = load_config(["data.category=rice", "threshold.k=2.5"])
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    again = load_run_config(tmp_path, ["postprocess.min_area=7"])
    assert again.threshold.k == 2.5 and again.data.tiling.test_level.cols == 4
    assert again.postprocess.min_area == 7


def test_experiment_yamls_hold_only_known_keys() -> None:
    schema = OmegaConf.structured(RunConfig)
    for path in sorted(EXPERIMENTS_DIR.rglob("*.yaml")):
        if "sweeps" in path.parts:
            continue
        OmegaConf.merge(schema, OmegaConf.load(path))  # raises on an unknown key or a wrong type


def test_every_swept_key_exists_in_the_schema() -> None:
    sweep = yaml.safe_load((EXPERIMENTS_DIR / "sweeps" / "threshold.yaml").read_text())
    schema = OmegaConf.structured(RunConfig)
    for key in sweep["parameters"]:
        assert OmegaConf.select(schema, key, default="__missing__") != "__missing__", key
    assert sweep["command"][-1] == "${args_no_hyphens}"
