"""Extending the metric suite: a toy metric defined here, registered with one call, goes through train,
evaluate and report (docs/extending_metrics.md)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from torch import Tensor
from torchmetrics import Metric

from hybridad.demo import demo_config
from hybridad.evaluate import create_evaluation
from hybridad.metrics import MetricSpec, register_metric, unregister_metric
from hybridad.report import write_report
from hybridad.train import train

FAST = ["trainer.max_epochs=1", "trainer.max_steps=3", "trainer.limit_val_batches=2", "threshold.method=mean_std"]


class MaxScore(Metric):
    """The highest anomaly-map value seen (a toy metric: not a fraction, so the report prints it as it is)."""

    full_state_update = False

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.add_state("highest", torch.tensor(float("-inf"), dtype=torch.float64), dist_reduce_fx="max")

    def update(self, anomaly_maps: Tensor) -> None:
        self.highest = torch.maximum(self.highest, anomaly_maps.detach().amax().to(self.highest))

    def compute(self) -> Tensor:
        return self.highest


@pytest.fixture
def max_score_run(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A tiny `can` run trained, evaluated and reported while `max_score` is registered; unregistered after."""
    register_metric(MetricSpec("max_score", MaxScore, ("map",), title="max score", percent=False))
    try:
        yield train(demo_config("can", synthetic_root, tmp_path_factory.mktemp("runs"), FAST))
    finally:
        unregister_metric("max_score")


def test_a_registered_metric_is_computed_by_train_and_evaluate_and_shown_by_the_report(max_score_run: Path) -> None:
    maps = sorted((max_score_run / "maps" / "test_public").rglob("*.tiff"))
    assert len(maps) > 2
    brute = max(float(tifffile.imread(p).astype(np.float64).max()) for p in maps)  # the cached float16 maps
    evaluation = create_evaluation(max_score_run, [])
    assert json.loads((evaluation / "metrics.json").read_text())["test_public/max_score"] == brute
    # training's test pass saw the float32 maps; float16 rounding is monotone, so their max rounds to `brute`
    trained = json.loads((max_score_run / "metrics.json").read_text())["test_public/max_score"]
    assert float(np.float16(trained)) == brute
    assert "test_public/good/max_score" not in json.loads((evaluation / "metrics.json").read_text())  # all only

    report = write_report([max_score_run], max_score_run / "report", num_overlays=0)
    lines = report.splitlines()
    table = lines.index("## test_public")  # the headline table of test_public
    header = lines[table + 2].split(" | ")
    can_row = next(ln for ln in lines[table:] if ln.startswith("| can |")).split(" | ")
    column = header.index("max score")  # no "%": the value is not a fraction
    assert can_row[column] == f"{trained:.4g}"
