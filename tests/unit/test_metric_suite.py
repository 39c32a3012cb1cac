"""The metric suite: which metric is computed for which group, what a consumer without a field skips, and the
registry (hybridad/metrics/suite.py)."""

from __future__ import annotations

import pytest
import torch

from hybridad.metrics import GroupedMetrics, MetricSpec, SegF1, metric_suite, register_metric, unregister_metric
from hybridad.metrics.functional import au_pro, class_f1, seg_f1
from hybridad.metrics.suite import group_kind


def _images() -> list[dict[str, torch.Tensor]]:
    """Four 12x12 images: two good, two bad with a square defect that scores higher."""
    gen = torch.Generator().manual_seed(3)
    items = []
    for label in (0, 1, 0, 1):
        amap = torch.rand(1, 1, 12, 12, generator=gen)
        mask = torch.zeros(1, 1, 12, 12, dtype=torch.bool)
        if label:
            mask[..., 3:7, 2:6] = True
            amap = amap + 0.7 * mask
        items.append({"map": amap, "mask": mask, "pred": amap > 0.9, "score": amap.amax((1, 2, 3)),
                      "label": torch.tensor([label])})
    return items


def test_groups_get_the_metrics_declared_for_their_kind() -> None:
    groups = GroupedMetrics()
    names = {key: sorted(groups.metrics_for(key)) for key in ("all", "lighting=regular", "defect=scratch", "bad")}
    assert names == {
        "all": sorted(s.name for s in metric_suite()),
        "lighting=regular": ["aupro_0.05", "class_f1", "seg_f1"],
        "defect=scratch": ["aupro_0.05", "class_f1", "seg_f1"],
        "bad": ["class_f1", "seg_f1"],
    }
    assert [group_kind(k) for k in ("all", "good", "lighting=x", "defect=a/b")] == ["all", "good_bad", "lighting",
                                                                                    "defect"]
    with pytest.raises(ValueError, match="unknown metric group"):
        group_kind("colour=red")


def test_grouped_values_equal_the_functional_metrics_and_missing_fields_are_skipped() -> None:
    items = _images()
    groups = GroupedMetrics(fields=("map", "mask", "pred", "label"))  # as evaluate: no image score
    for item in items:
        groups.update(["all", "good" if int(item["label"]) == 0 else "bad"], item)
    got = groups.compute("test_public")
    maps, masks, preds = ([it[f][0, 0] for it in items] for f in ("map", "mask", "pred"))
    assert got["test_public/aupro_0.05"] == pytest.approx(au_pro(maps, masks), abs=1e-12)
    assert got["test_public/seg_f1"] == pytest.approx(seg_f1(preds, masks), abs=1e-12)
    assert got["test_public/bad/class_f1"] == pytest.approx(class_f1(preds[1::2], masks[1::2]), abs=1e-12)
    assert "test_public/image_auroc" not in got  # reads the image score, which this consumer lacks
    assert "test_public/good/aupro_0.05" not in got  # AU-PRO is not computed for good/bad
    no_threshold = groups.compute("test_public", without=("pred",))
    assert "test_public/seg_f1" not in no_threshold and "test_public/aupro_0.05" in no_threshold


def test_a_missing_predicted_mask_leaves_the_thresholded_metrics_untouched() -> None:
    groups = GroupedMetrics()
    item = {**_images()[1], "pred": None}  # before a threshold: no binary mask
    groups.update(["all"], item)
    metrics = groups.metrics_for("all")
    assert int(metrics["seg_f1"].tp) == 0 and int(metrics["seg_f1"].fn) == 0  # not updated
    assert int(metrics["aupro_0.05"].num_regions) == 1 and len(metrics["image_auroc"].scores) == 1  # updated


def test_register_and_unregister() -> None:
    spec = MetricSpec("seg_f1_copy", SegF1, ("pred", "mask"), title="SegF1 again")
    register_metric(spec)
    try:
        assert metric_suite()[-1] is spec and spec.needs_threshold and spec.header == "SegF1 again %"
        with pytest.raises(ValueError, match="registered already"):
            register_metric(MetricSpec("seg_f1_copy", SegF1, ("pred", "mask")))
    finally:
        unregister_metric("seg_f1_copy")
    assert "seg_f1_copy" not in [s.name for s in metric_suite()]
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['image'\]"):
        MetricSpec("bad", SegF1, ("image",))
    with pytest.raises(ValueError, match="without '/'"):
        MetricSpec("a/b", SegF1, ("pred", "mask"))
    with pytest.raises(ValueError, match=r"shown in the \['lighting'\] table"):
        MetricSpec("seg", SegF1, ("pred", "mask"), shown_in=frozenset({"headline", "lighting"}))
