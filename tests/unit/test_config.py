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


def test_a_category_without_yaml_gets_the_defaults() -> None:
    cfg = load_config(["data.category=bracket"])
    assert cfg.branch == "inp_former" and cfg.data.format == "mvtec_ad2"
    tiling = cfg.data.tiling
    assert [(lv.cols, lv.rows) for lv in tiling.train_levels] == [(1, 1)]  # whole image
    assert (tiling.test_level.cols, tiling.test_level.rows) == (1, 1)
    p = cfg.postprocess
    kernels = (p.closing_kernel, p.erosion_kernel, p.min_area, p.fill_holes, p.foreground_splits)
    assert kernels == (0, 0, 0, False, [])
    assert (cfg.threshold.method, cfg.threshold.k) == ("mean_std", 3.0)
    assert cfg.data.augment == load_config(["data.category=bracket", "branch=inp_former"]).data.augment
    cpr = load_config(["data.category=bracket", "branch=cpr"])
    assert cpr.branch == "cpr" and cpr.data.tiling.input_size == 320 and cpr.postprocess.closing_kernel == 0


def test_the_eight_categories_keep_their_yaml_settings_exactly() -> None:
    from omegaconf import OmegaConf

    for category in CATEGORIES:
        cfg = OmegaConf.structured(load_config([f"data.category={category}"]))
        own = OmegaConf.load(EXPERIMENTS_DIR / "categories" / f"{category}.yaml")
        assert OmegaConf.merge(cfg, own) == cfg, f"{category}: a setting of its YAML is not in effect"


def test_user_yaml_merges_after_the_category_file_and_before_the_command_line(tmp_path: Path) -> None:
    mine = tmp_path / "my_line.yaml"
    mine.write_text("data:\n  category: can\n  format: folder\n  layout: {normal: ok, normal_test: ok_test}\n"
                    "postprocess: {closing_kernel: 7}\ntrainer: {max_epochs: 3}\n")
    cfg = load_config([f"config={mine}", "trainer.max_epochs=2"])
    assert cfg.data.category == "can" and cfg.data.format == "folder" and cfg.data.layout.normal == "ok"
    assert cfg.postprocess.closing_kernel == 7  # over categories/can.yaml
    assert [(lv.cols, lv.rows) for lv in cfg.data.tiling.train_levels] == [(2, 1), (4, 2)]  # can.yaml stays
    assert cfg.trainer.max_epochs == 2  # the command line wins
    with pytest.raises(UserError, match="config=nope.yaml: file not found"):
        load_config(["config=nope.yaml"])
    (tmp_path / "bad.yaml").write_text("data: {colour: red}\n")
    with pytest.raises(UserError, match=f"config key 'data.colour' from {tmp_path / 'bad.yaml'}"):
        load_config([f"config={tmp_path / 'bad.yaml'}"])


def test_branch_override_reroutes_a_category() -> None:
    cfg = load_config(["data.category=vial", "branch=inp_former"])
    assert cfg.branch == "inp_former" and cfg.data.tiling.input_size == 448


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("data.bogus=1", "data.bogus"),
        ("trainer.max_epochs=ten", "trainer.max_epochs"),
        ("nonsense", "key=value"),
        ("data.category=a/b", "not a folder name"),
        ("data.format=coco", "'data.format'='coco': use one of 'mvtec_ad2', 'mvtec_ad', 'visa'"),
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


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("threshold.method=otsu", "threshold.method"),
        ("threshold.percentile_method=mid", "threshold.percentile_method"),
        ("trainer.precision=bf17", "trainer.precision"),
        ("trainer.accelerator=tpu9", "trainer.accelerator"),
        ("trainer.strategy=ddp_spawn", "trainer.strategy"),
        ("trainer.strategy=dpp", "trainer.strategy"),
        ("trainer.devices=0", "trainer.devices"),
        ("trainer.max_steps=-2", "trainer.max_steps"),
        ("data.batch_size=0", "data.batch_size"),
        ("data.num_workers=-1", "data.num_workers"),
        ("data.tiling.input_size=100", "multiple of 14"),
        ("data.tiling.test_level={cols: 0, rows: 1}", "data.tiling.test_level"),
        ("postprocess.closing_kernel=-3", "postprocess.closing_kernel"),
        ("postprocess.erosion_kernel=-1", "postprocess.erosion_kernel"),
        ("postprocess.whole_map_blur_sigma=-0.5", "postprocess.whole_map_blur_sigma"),
        ("data.augment.hflip=1.5", "data.augment.hflip"),
        ("inp_former.preset=huge", "inp_former.preset"),
        ("checkpoint.every_n_steps=-1", "checkpoint.every_n_steps"),
        ("postprocess.min_area=[1,", "override 'postprocess.min_area=[1,'"),
        ("data.tiling.test_level={cols: 2", "override 'data.tiling.test_level={cols: 2'"),
        ("name=a/b", "name"),
        ("=3", "key=value"),
    ],
)
def test_bad_values_are_refused_up_front_in_one_line(override: str, needle: str) -> None:
    with pytest.raises(UserError) as err:
        load_config(["data.category=can", override])
    msg = str(err.value)
    assert needle in msg and "\n" not in msg, msg


def test_cpr_categories_validate_too() -> None:
    assert load_config(["data.category=vial", "data.tiling.input_size=100", "cpr.image_size=100"])
    with pytest.raises(UserError, match="cpr.synthesis"):
        load_config(["data.category=vial", "cpr.synthesis=poisson"])


@pytest.mark.parametrize("value", ["none", "None", "null", "", "''"])
def test_none_means_no_weight_file(value: str) -> None:
    cfg = load_config(["data.category=can", f"inp_former.weights={value}", f"cpr.checkpoint={value}"])
    assert cfg.inp_former.weights == "" and cfg.cpr.checkpoint == ""


def test_tiny_presets_drop_the_yaml_weight_files_but_keep_explicit_ones() -> None:
    assert load_config(["data.category=can"]).inp_former.weights.endswith(".pth")
    assert load_config(["data.category=can", "inp_former.preset=tiny"]).inp_former.weights == ""
    assert load_config(["data.category=vial", "cpr.preset=tiny"]).cpr.weights == ""
    cfg = load_config(["data.category=can", "inp_former.preset=tiny", "inp_former.weights=w.pth"])
    assert cfg.inp_former.weights == "w.pth"


def test_make_passes_none_through_args(tmp_path: Path) -> None:
    proc = subprocess.run(["make", "-n", "train", "ARGS=inp_former.weights=none resume=latest"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    line = [ln for ln in proc.stdout.splitlines() if "hybridad train" in ln][0]
    assert line.endswith("inp_former.weights=none resume=latest")


def test_resume_keeps_the_saved_config(tmp_path: Path) -> None:
    run = tmp_path / "can" / "r1"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(load_config(["data.category=can", "trainer.max_steps=50",
                                                           f"data.root={tmp_path / 'moved'}"])))
    cfg = load_config(["data.category=can", f"out_dir={tmp_path}", "resume=latest", "data.num_workers=0",
                       "trainer.max_steps=50", "data.root=/elsewhere"])
    assert cfg.resume == str(run.resolve()) and cfg.trainer.max_steps == 50 and cfg.data.num_workers == 0
    assert cfg.data.root == "/elsewhere"  # the saved root does not hold the category: the command line's is used
    with pytest.raises(UserError, match=r"resume: data.batch_size=3 differs from the run's data.batch_size=16"):
        load_config(["data.category=can", f"out_dir={tmp_path}", "resume=latest", "data.batch_size=3"])
    with pytest.raises(UserError, match="needs data.category"):
        load_config([f"out_dir={tmp_path}", "resume=latest"])


def test_global_batch_size_keeps_the_step_fixed_over_device_counts() -> None:
    from hybridad.train import _per_device_batch

    cfg = load_config(["data.category=can", "data.batch_size=8"])
    assert [_per_device_batch(cfg, n) for n in (1, 2, 4)] == [8, 8, 8]  # per device by default
    cfg = load_config(["data.category=can", "data.global_batch_size=16"])
    assert [_per_device_batch(cfg, n) for n in (1, 2, 4)] == [16, 8, 4]
    with pytest.raises(UserError, match="not divisible by the 3 devices"):
        _per_device_batch(cfg, 3)


def test_a_run_saved_before_the_blur_rename_still_loads(tmp_path) -> None:
    from hybridad.config import load_run_config

    (tmp_path / "config.yaml").write_text("postprocess:\n  gaussian_sigma: 2.0\n")
    assert load_run_config(tmp_path).postprocess.whole_map_blur_sigma == 2.0
