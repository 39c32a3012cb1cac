"""A branch added from outside the package: one new class and one `register_branch` call, then train,
evaluate, report and export run it (docs/extending_branches.md). The toy branch maps every pixel to one
constant, so its metrics are known by hand."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import Tensor, nn

from hybridad.branches import Branch, ExportableNetwork, register_branch
from hybridad.config import RunConfig
from hybridad.models.anomaly_module import AnomalyModule
from hybridad.types import Batch


@dataclass
class ConstantMapConfig:
    value: float = 0.5  # every pixel's anomaly score


class ConstantMapModel(nn.Module):
    """(N,3,S,S) tiles -> (N,1,S,S) maps of `value` (plain torch: the part `hybridad export` traces)."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.register_buffer("value", torch.tensor(value))

    def tile_maps(self, tiles: Tensor) -> Tensor:
        return torch.zeros_like(tiles[:, :1]) + self.value


class ConstantMap(AnomalyModule):
    def __init__(self, cfg: ConstantMapConfig, postprocess=None) -> None:  # noqa: ANN001
        super().__init__(postprocess=postprocess)
        self.model = ConstantMapModel(cfg.value)
        self.unused = nn.Parameter(torch.zeros(()))  # something for the optimiser

    def tile_maps(self, tiles: Tensor, native_size: tuple[int, int] | None = None) -> Tensor:
        return self.model.tile_maps(tiles)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        return self.unused * 0.0

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([self.unused], lr=0.1)


def _options(cfg: RunConfig) -> ConstantMapConfig:
    from hybridad.config import branch_options

    return branch_options(cfg)


def _check(options: ConstantMapConfig) -> None:
    from hybridad.errors import check_setting

    check_setting(0.0 <= options.value <= 1.0, "branch_options.value", options.value, "must be in [0, 1]")


def _exportable(module: AnomalyModule, cfg: RunConfig, training_data: object) -> ExportableNetwork:
    from hybridad.export import TileNet, dynamic_tiles

    s = cfg.data.tiling.input_size
    return ExportableNetwork(TileNet(module.model), torch.rand(2, 3, s, s), dynamic_tiles())


register_branch(Branch(
    name="constant_map", config_class=ConstantMapConfig, check_options=_check,
    build=lambda cfg: ConstantMap(_options(cfg), postprocess=cfg.postprocess), exportable=_exportable,
    demo_overrides=("data.tiling.input_size=32", "data.batch_size=4", "trainer.max_steps=1"),
))

FAST = ["branch=constant_map", "trainer.max_epochs=1", "trainer.limit_val_batches=2",
        "logging.num_overlays=1", "threshold.method=mean_std", "predict_private=false"]


@pytest.fixture(scope="module")
def constant_run(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hybridad.demo import demo_config
    from hybridad.train import train

    runs = tmp_path_factory.mktemp("runs")
    return train(demo_config("can", synthetic_root, runs, FAST))


def _gt_pixels(root: Path) -> tuple[int, int, int, int]:
    """(anomalous pixels, normal pixels, bad images, good images) of can's test_public."""
    from data_modules.listing import list_samples, read_image, read_mask

    pos = neg = bad = good = 0
    for s in list_samples(root, "can", "test_public"):
        h, w = read_image(s.image_path).shape[:2]
        m = (read_mask(s.mask_path, s.image_path, (h, w)) > 0 if s.mask_path is not None
             else np.zeros((h, w), bool))
        pos, neg = pos + int(m.sum()), neg + int((~m).sum())
        bad, good = bad + int(s.label), good + 1 - int(s.label)
    return pos, neg, bad, good


def test_options_of_a_branch_without_its_own_section_are_typed() -> None:
    from hybridad.config import load_config
    from hybridad.errors import UserError

    cfg = load_config(["data.category=can", "branch=constant_map", "branch_options.value=0.25"])
    assert _options(cfg) == ConstantMapConfig(0.25) and cfg.branch_options == {"value": 0.25}
    assert load_config(["data.category=can", "branch=constant_map"]).branch_options == {"value": 0.5}
    for bad, needle in [("branch_options.bogus=1", "branch_options.bogus"), ("branch_options.value=high",
                        "branch_options.value"), ("branch_options.value=2", "must be in [0, 1]")]:
        with pytest.raises(UserError, match=needle.replace("[", r"\[")) as err:
            load_config(["data.category=can", "branch=constant_map", bad])
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="branch_options.*inp_former"):  # built-ins have their own section
        load_config(["data.category=can", "branch_options.value=0.25"])
    with pytest.raises(UserError, match="unknown branch 'nope'; valid: inp_former, cpr, constant_map"):
        load_config(["data.category=can", "branch=nope"])


def test_a_constant_map_branch_runs_through_train_evaluate_report_and_export(
        constant_run: Path, synthetic_root: Path, tmp_path: Path) -> None:
    from hybridad.evaluate import create_evaluation
    from hybridad.export import export_run
    from hybridad.export_runtime import ExportedDetector
    from hybridad.report import write_report

    pos, neg, bad, good = _gt_pixels(synthetic_root)
    metrics = json.loads((constant_run / "metrics.json").read_text())
    # validation maps are all 0.5: std 0, mean + 3 std = 0.5 (up to float32 summation), at most the constant,
    # so `map >= threshold` marks every pixel of every image
    thresholds = yaml.safe_load((constant_run / "thresholds.yaml").read_text())
    assert thresholds["stats"]["std"] == 0.0 and 0.5 - 1e-6 < thresholds["value"] <= 0.5
    assert metrics["test_public/pixel_auroc"] == 0.5  # every pixel ties
    assert metrics["test_public/image_auroc"] == 0.5
    assert metrics["test_public/seg_f1"] == pytest.approx(2 * pos / (2 * pos + neg), abs=1e-12)
    assert metrics["test_public/class_f1"] == pytest.approx(2 * bad / (2 * bad + good), abs=1e-12)
    # a threshold above the constant: no pixel, no image is anomalous
    folder = create_evaluation(constant_run, ["threshold.method=fixed", "threshold.value=0.75"])
    rescored = json.loads((folder / "metrics.json").read_text())
    assert rescored["test_public/seg_f1"] == 0.0 and rescored["test_public/class_f1"] == 0.0
    # threshold-free: all pixels tie, PRO rises with FPR on a straight line: AU-PRO(5 % FPR) = 0.05 / 2 / 0.05
    for scored in (metrics, rescored):
        assert scored["test_public/aupro_0.05"] == pytest.approx(0.025, abs=1e-12)
    report = write_report([constant_run], tmp_path / "report")
    seg_f1_percent, aupro_percent = f"{100 * 2 * pos / (2 * pos + neg):.2f}", "2.50"
    assert "constant_map" in report and f"| can | {aupro_percent} |" in report
    assert f"| {seg_f1_percent} |" in report
    # the export holds the tile network and the default image score rule; the runtime gives 0.5 everywhere
    export_run(constant_run, tmp_path / "constant.pt2")
    detector = ExportedDetector(tmp_path / "constant.pt2")
    assert detector.meta["image_score"] == {"rule": "top_ratio_mean", "top_ratio": 0.01}
    out = detector(torch.zeros(1, 3, 40, 60, dtype=torch.uint8))
    torch.testing.assert_close(out.anomaly_map, torch.full((1, 1, 40, 60), 0.5), rtol=0, atol=1e-6)
    assert out.image_score.tolist() == pytest.approx([0.5], abs=1e-6)
    assert bool(out.pred_mask.all()) and np.isclose(detector.threshold, 0.5)
