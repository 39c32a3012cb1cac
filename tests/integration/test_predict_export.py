"""Predict on new images, per-split score files and the exported artefact, against a tiny run's outputs."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F

from data_modules.datamodule import MVTecAD2DataModule
from data_modules.listing import list_samples, read_image
from data_modules.tilers import EvalTiler
from hybridad.cli import main
from hybridad.config import load_run_config
from hybridad.demo import demo_config
from hybridad.errors import UserError
from hybridad.export import export_run
from hybridad.export_runtime import ExportedDetector, read_metadata
from hybridad.postprocess import hsv_kmeans_foreground
from hybridad.models.cpr.branch import build_memory_bank
from hybridad.predict import predict
from hybridad.run_dir import RunDir
from hybridad.run_loading import load_module, read_decision
from hybridad.tile_grid import level_boxes
from hybridad.train import train
from hybridad.types import Batch, Sample, Split
from hybridad.visualize import BAR_LABEL_WIDTH, BAR_WIDTH, CAPTION_HEIGHT, panel_scale

ROOT = Path(__file__).resolve().parents[2]
FAST = ["trainer.max_epochs=1", "trainer.max_steps=2", "trainer.limit_val_batches=2",
        "trainer.enable_progress_bar=false"]


def _train(category: str, root: Path, runs: Path, extra: list[str]) -> Path:
    run = train(demo_config(category, root, runs, [*FAST, *extra]))
    if not RunDir(run).read_state():  # runs from before the lifecycle work have no state.json
        RunDir(run).write_state("completed")
    return run


@pytest.fixture(scope="module")
def inp_run(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """can (4x2 test grid), tiny INP-Former with a 2-block random encoder at 56 px."""
    runs = tmp_path_factory.mktemp("runs")
    return _train("can", synthetic_root, runs, ["inp_former.tiny_depth=2", "data.tiling.input_size=56"])


@pytest.fixture(scope="module")
def cpr_run(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """vial (whole image), tiny CPR at 64 px, no private splits."""
    runs = tmp_path_factory.mktemp("runs")
    return _train("vial", synthetic_root, runs, ["data.tiling.input_size=64", "cpr.image_size=64",
                                                "predict_private=false"])


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _test_samples(run: Path) -> list[Sample]:
    cfg = load_run_config(run)
    return list_samples(cfg.data.root, cfg.data.category, Split.TEST_PUBLIC)


def _reference_outputs(run: Path, samples: list[Sample]) -> dict[str, tuple[np.ndarray, float]]:
    """float32 native maps and image scores of the run's own eval path (module + EvalTiler), per sample id."""
    cfg = load_run_config(run)
    module = load_module(RunDir(run), cfg, read_decision(RunDir(run)))
    if cfg.branch == "cpr":
        build_memory_bank(module, MVTecAD2DataModule(cfg.data, seed=cfg.seed))
    tiler = EvalTiler(cfg.data.tiling.test_level, cfg.data.tiling.input_size, cfg.data.tiling.antialias)
    out = {}
    for s in samples:
        image = torch.from_numpy(read_image(s.image_path)).permute(2, 0, 1)[None]  # (1,3,H,W) uint8
        tiles, layout = tiler(image)
        o = module.predict_batch(Batch(image, torch.tensor([s.label]), [s.sample_id], [s.lighting],
                                       tiles=tiles, layout=layout, split=[s.split.value]))
        out[s.sample_id] = (o.anomaly_map[0, 0].numpy(), float(o.image_score[0]))
    return out


def test_score_files_hold_every_image_of_every_split(inp_run: Path) -> None:
    run = RunDir(inp_run)
    rows = _read_csv(inp_run / "scores" / "test_public.csv")
    samples = _test_samples(inp_run)
    assert [r["sample_id"] for r in rows] == sorted(s.sample_id for s in samples)
    by_id = {s.sample_id: s for s in samples}
    for r in rows:
        sample = by_id[r["sample_id"]]
        assert int(r["label"]) == sample.label and r["lighting"] == sample.lighting
        amap = run.read_map(r["sample_id"])  # float16 values of the map the score was computed from
        k = math.ceil(amap.size * 0.01)  # INP-Former's image score: mean of the top 1 % pixels
        assert float(r["image_score"]) == pytest.approx(np.sort(amap.ravel())[-k:].mean(), rel=2e-3)
        assert int(r["anomalous_pixels"]) == int(run.read_mask(r["sample_id"]).sum())
    assert len(_read_csv(inp_run / "scores" / "validation.csv")) == len(list(run.iter_maps(Split.VALIDATION)))
    private = _read_csv(inp_run / "scores" / "test_private.csv")
    assert private and all(r["label"] == "" for r in private)
    assert (inp_run / "scores" / "test_private_mixed.csv").is_file()


def test_predict_reproduces_the_runs_test_maps_masks_and_scores(inp_run: Path, tmp_path: Path) -> None:
    data = Path(load_run_config(inp_run).data.root) / "can" / "test_public"
    out = tmp_path / "pred"
    predict(inp_run, [str(data / "good"), str(data / "bad")], out, device="cpu", batch_size=3)
    run = RunDir(inp_run)
    run_scores = {r["sample_id"]: r for r in _read_csv(inp_run / "scores" / "test_public.csv")}
    rows = _read_csv(out / "scores.csv")
    expected = [f"{kind}/{p.stem}" for kind in ("good", "bad") for p in sorted((data / kind).glob("*.png"))]
    assert [r["file"] for r in rows] == expected  # input order
    for r in rows:
        sid = f"test_public/{r['file']}"
        amap = tifffile.imread(out / "maps" / f"{r['file']}.tiff")
        assert amap.dtype == np.float16
        np.testing.assert_allclose(amap.astype(np.float32), run.read_map(sid), rtol=2**-10, atol=1e-6)
        mask = cv2.imread(str(out / "masks" / f"{r['file']}.png"), cv2.IMREAD_UNCHANGED)
        assert set(np.unique(mask)) <= {0, 255} and np.array_equal(mask > 0, run.read_mask(sid))
        assert int(r["anomalous_area_px"]) == int((mask > 0).sum())
        assert r["decision"] == ("anomalous" if (mask > 0).any() else "good")
        assert float(r["image_score"]) == pytest.approx(float(run_scores[sid]["image_score"]), rel=1e-6)
        overlay = cv2.imread(str(out / "overlays" / f"{r['file']}.png"))
        scale = panel_scale(*mask.shape)
        assert overlay.shape[:2] == (CAPTION_HEIGHT + round(mask.shape[0] * scale),
                                     2 * round(mask.shape[1] * scale) + BAR_WIDTH + BAR_LABEL_WIDTH)
        assert (overlay[:CAPTION_HEIGHT].min(-1) < 100).any()  # the caption line: score, threshold, decision


def test_predict_tiles_an_image_of_another_size_with_the_runs_test_grid(inp_run: Path, tmp_path: Path
                                                                         ) -> None:
    cfg = load_run_config(inp_run)
    src = read_image(Path(cfg.data.root) / "can" / "test_public" / "bad" / "000_regular.png")
    image = cv2.resize(src, (150, 70), interpolation=cv2.INTER_AREA)  # (70,150,3), not the category's size
    cv2.imwrite(str(tmp_path / "odd.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    predict(inp_run, [str(tmp_path / "odd.png")], tmp_path / "pred", device="cpu")
    amap = tifffile.imread(tmp_path / "pred" / "maps" / "odd.tiff").astype(np.float32)
    assert amap.shape == (70, 150)
    # known answer: each box of the 4x2 grid on 70x150 holds its own crop's tile map at the box size (pixels
    # shared by two boxes, where 150 px do not split evenly, hold their mean and are left out)
    module = load_module(RunDir(inp_run), cfg)
    s = cfg.data.tiling.input_size
    boxes = level_boxes(70, 150, cfg.data.tiling.test_level)
    assert len(boxes) == 8 and boxes[-1][2:] == (70, 150)
    cover = np.zeros((70, 150), int)
    for y0, x0, y1, x1 in boxes:
        cover[y0:y1, x0:x1] += 1
    for y0, x0, y1, x1 in (boxes[0], boxes[-1]):
        crop = torch.from_numpy(image[y0:y1, x0:x1]).permute(2, 0, 1)[None].float() / 255  # (1,3,h,w)
        tile = F.interpolate(crop, size=(s, s), mode="bilinear", align_corners=False)
        with torch.no_grad():
            expected = module.tile_maps(tile, (y1 - y0, x1 - x0))[0, 0].numpy()  # straight to the box size
        alone = cover[y0:y1, x0:x1] == 1
        assert alone.mean() > 0.9
        np.testing.assert_allclose(amap[y0:y1, x0:x1][alone], expected[alone], rtol=2**-10, atol=1e-5)


def test_predict_takes_threshold_and_postprocessing_from_an_evaluation(inp_run: Path, tmp_path: Path) -> None:
    image = Path(load_run_config(inp_run).data.root) / "can" / "test_public" / "bad" / "000_regular.png"
    h, w = read_image(image).shape[:2]
    # evaluation directories as `hybridad evaluate` writes them: evaluation.yaml + thresholds.yaml
    own = f"run: {inp_run}\ncategory: can\n"
    low = tmp_path / "eval_low"  # every pixel above the threshold
    RunDir(low).write_text("evaluation.yaml", own + "overrides: [threshold.method=fixed]\n")
    RunDir(low).write_thresholds({"value": -1.0e9, "method": "fixed", "source": "fixed"})
    predict(inp_run, [str(image)], tmp_path / "low", evaluation=low)
    assert _read_csv(tmp_path / "low" / "scores.csv")[0]["anomalous_area_px"] == str(h * w)
    tidy = tmp_path / "eval_tidy"  # the same threshold, then every component removed by min_area
    RunDir(tidy).write_text("evaluation.yaml", own + f"overrides: [postprocess.min_area={h * w + 1}]\n")
    RunDir(tidy).write_thresholds({"value": -1.0e9, "method": "fixed", "source": "fixed"})
    predict(inp_run, [str(image)], tmp_path / "tidy", evaluation=tidy)
    row = _read_csv(tmp_path / "tidy" / "scores.csv")[0]
    assert row["anomalous_area_px"] == "0" and row["decision"] == "good"
    resolved = tmp_path / "eval_resolved"  # the resolved section wins over the override list
    RunDir(resolved).write_text("evaluation.yaml",
                                own + f"overrides: []\npostprocess: {{min_area: {h * w + 1}}}\n")
    RunDir(resolved).write_thresholds({"value": -1.0e9, "method": "fixed", "source": "fixed"})
    predict(inp_run, [str(image)], tmp_path / "resolved", evaluation=resolved)
    assert _read_csv(tmp_path / "resolved" / "scores.csv")[0]["anomalous_area_px"] == "0"
    with pytest.raises(UserError, match="not a finished evaluation"):
        predict(inp_run, [str(image)], tmp_path / "none", evaluation=tmp_path / "eval_missing")


def test_predict_refuses_bad_inputs_with_one_line(inp_run: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UserError, match="no images matched"):
        predict(inp_run, [str(tmp_path / "*.png")], tmp_path / "out")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(UserError, match="broken.png"):
        predict(inp_run, [str(tmp_path / "broken.png")], tmp_path / "out")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((inp_run / "config.yaml").read_text())
    RunDir(unfinished).write_state("failed", "killed")
    with pytest.raises(SystemExit) as stop:
        main(["predict", str(unfinished), str(tmp_path / "broken.png"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1 and "not complete" in err
    with pytest.raises(UserError, match="export: run .* is not complete"):
        export_run(unfinished, tmp_path / "out" / "model.pt2")
    with pytest.raises(UserError, match=r"\.pt2"):
        export_run(inp_run, tmp_path / "out" / "model.onnx")
    assert not (tmp_path / "out").exists()


def _check_export(run: Path, tmp_path: Path) -> float:
    """Export, run the artefact on test_public, compare with the run; returns max |map - run's map|."""
    artefact = export_run(run, tmp_path / "model.pt2")
    meta = read_metadata(artefact)
    assert meta["category"] == RunDir(run).category
    assert meta["threshold"]["value"] == pytest.approx(RunDir(run).read_thresholds()["value"])
    detector = ExportedDetector(artefact)
    samples = _test_samples(run)
    reference = _reference_outputs(run, samples)
    worst = 0.0
    for s in samples:
        image = torch.from_numpy(read_image(s.image_path)).permute(2, 0, 1)[None]
        out = detector(image)
        ref_map, ref_score = reference[s.sample_id]
        worst = max(worst, float(np.abs(out.anomaly_map[0, 0].numpy() - ref_map).max()))
        assert float(out.image_score[0]) == pytest.approx(ref_score, rel=1e-4)
        assert np.array_equal(out.pred_mask[0, 0].numpy(), RunDir(run).read_mask(s.sample_id)), s.sample_id
    assert worst <= 1e-4
    return worst


def test_exported_inp_former_gives_the_runs_maps_and_masks(inp_run: Path, tmp_path: Path) -> None:
    _check_export(inp_run, tmp_path)
    # the object mask is explicit in the runtime too: the thresholded map ANDed with the HSV k-means mask
    detector = ExportedDetector(tmp_path / "model.pt2")
    image = torch.from_numpy(read_image(_test_samples(inp_run)[0].image_path)).permute(2, 0, 1)[None]
    detector.threshold = -1.0  # every pixel above it: the mask is the object mask itself
    pp = detector.postprocess
    assert torch.equal(detector(image, foreground=True).pred_mask,
                       hsv_kmeans_foreground(image, pp.foreground_dilation, pp.foreground_seed))
    assert bool(detector(image).pred_mask.all())
    # `predict` runs the artefact through the runtime alone and writes the run's masks
    data = Path(load_run_config(inp_run).data.root) / "can" / "test_public" / "bad"
    predict(tmp_path / "model.pt2", [str(data / "*.png")], tmp_path / "pred", batch_size=2)
    for r in _read_csv(tmp_path / "pred" / "scores.csv"):
        mask = cv2.imread(str(tmp_path / "pred" / "masks" / f"{r['file']}.png"), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(mask > 0, RunDir(inp_run).read_mask(f"test_public/bad/{r['file']}"))


def test_exported_cpr_gives_the_runs_maps_and_masks(cpr_run: Path, tmp_path: Path) -> None:
    _check_export(cpr_run, tmp_path)
    assert read_metadata(tmp_path / "model.pt2")["tile_batch"] == 1


def test_runtime_imports_no_training_code() -> None:
    heavy = "('lightning', 'timm', 'hybridad.models', 'hybridad.train')"
    code = f"import sys, hybridad.export_runtime; print(sorted(m for m in {heavy} if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_overlay_caption_names_score_threshold_and_decision() -> None:
    from hybridad.predict import overlay_caption

    assert overlay_caption("bad/001", 0.51234567, 1.0039, "anomalous", 12) == (
        "bad/001   image score 0.512346   pixel threshold 1.0039   decision: anomalous (12 mask px)")


def test_train_and_predict_print_no_lightning_tips_banners_or_wandb_warnings(synthetic_root: Path,
                                                                            tmp_path: Path) -> None:
    """The command line as a user runs it: no Lightning tips or device banners, no LeafSpec deprecation, no
    wandb 'anonymous' warning; the lines that matter are still there."""
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           "PYTHONWARNINGS": "default"}
    noise = ("Tip:", "litlogger", "GPU available", "TPU available", "LeafSpec", "anonymous", "Warning",
             "WARNING")
    train_cmd = [sys.executable, "-m", "hybridad", "train", "data.category=can", f"data.root={synthetic_root}",
                 f"out_dir={tmp_path / 'runs'}", "name=quiet", "inp_former.preset=tiny", "inp_former.tiny_depth=2",
                 "data.tiling.input_size=56", "data.batch_size=4", "trainer.max_steps=1", "trainer.max_epochs=1",
                 "trainer.enable_progress_bar=false", "predict_private=false", "logging.wandb=true"]
    proc = subprocess.run(train_cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    output = proc.stdout + proc.stderr
    assert "run directory:" in output and not [n for n in noise if n in output], output[-3000:]
    run = tmp_path / "runs" / "can" / "quiet"
    predict_cmd = [sys.executable, "-m", "hybridad", "predict", str(run),
                   str(synthetic_root / "can" / "test_public" / "bad"), "--out", str(tmp_path / "pred")]
    proc = subprocess.run(predict_cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    output = proc.stdout + proc.stderr
    assert "predicted" in output and not [n for n in noise if n in output], output[-3000:]
