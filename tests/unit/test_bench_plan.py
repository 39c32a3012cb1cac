"""`bench_plan`'s GPU estimate uses the peak of the precision the runs actually train at."""

from __future__ import annotations

import pytest

import bench.bench_plan as plan
from hybridad.config import TrainerConfig


@pytest.fixture
def unit_costs(monkeypatch: pytest.MonkeyPatch) -> None:
    """1 TFLOP per INP-Former training tile and per CPR training image; no model, no benchmark, no TIFFs."""
    inp = {"train_flops_per_tile": 1e12, "infer_flops_per_tile": 1e12, "weights_gb": 1.0,
           "grads_and_optimizer_gb": 1.0, "saved_gb_bfloat16": 5.0, "saved_gb_float32": 10.0}
    monkeypatch.setattr(plan, "inp_former_costs", lambda: inp)
    monkeypatch.setattr(plan, "cpr_costs", lambda: {"train_flops_per_image": 1e12, "infer_flops_per_image": 1e12})
    monkeypatch.setattr(plan, "feed_tiles_per_s", lambda: 1000.0)
    monkeypatch.setattr(plan, "encode_tiff", lambda a: b"x")
    monkeypatch.setattr(plan, "realistic_map", lambda *a, **k: None)


def test_the_estimate_follows_the_default_precision(unit_costs: None) -> None:
    assert TrainerConfig().precision == "32-true"  # the official code has no AMP
    rows = {r["category"]: r for r in plan.plan_rows()}
    assert rows["can"]["precision"] == "32-true"
    assert rows["can"]["GPU tiles/s (est.)"] == round(82.6 * plan.EFFICIENCY)  # fp32 peak, not bf16
    assert rows["vial"]["GPU tiles/s (est.)"] == round(82.6 * plan.EFFICIENCY_CNN)
    assert " 12 of 24 GB" in rows["all 8, one 24 GB GPU"]["eval tiles"]  # fp32 saved tensors: 1 + 1 + 10
    bf16 = {r["category"]: r for r in plan.plan_rows(["trainer.precision=bf16-mixed"])}
    assert bf16["can"]["GPU tiles/s (est.)"] == round(165.2 * plan.EFFICIENCY)
    assert " 7-12 of 24 GB" in bf16["all 8, one 24 GB GPU"]["eval tiles"]
