"""From cached maps to a submission: `evaluate` into evaluation directories, the sweep command, `--best`,
`submission write` from an evaluation, per-split thresholds and the "threshold tuned on test" label.

The run is made by hand (config, maps, training masks, state) on the synthetic tree: no model is trained.
Brute-force references use numpy and OpenCV only.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import pytest
import yaml

from data_modules.listing import list_samples
from hybridad.cli import main
from hybridad.config import load_config, load_run_config, to_yaml
from hybridad.errors import UserError
from hybridad.evaluate import create_evaluation, evaluate_run
from hybridad.run_dir import RunDir
from hybridad.submission import check_submission, provenance_path, write_submission
from hybridad.types import Split

ROOT = Path(__file__).resolve().parents[2]
SPLITS = [s.value for s in Split if s != Split.TRAIN]
OVERRIDES = ["threshold.method=mean_std", "threshold.k=1.5", "postprocess.closing_kernel=3",
             "postprocess.min_area=4", "threshold.test_private_mixed.value=0.7"]


def make_run(root: Path, data: Path, state: str = "completed", seed: int = 0) -> Path:
    """A run of `can`: random maps (test_public: ground truth lifted by 0.6), training masks map > 0.9."""
    cfg = load_config([f"data.root={data}", "data.category=can", f"out_dir={root}"])
    run = RunDir(root / "can" / "hand")
    run.write_text("config.yaml", to_yaml(cfg))
    rng = np.random.default_rng(seed)
    for split in SPLITS:
        for s in list_samples(data, "can", split):
            h, w = cv2.imread(str(s.image_path), cv2.IMREAD_UNCHANGED).shape[:2]
            amap = rng.random((h, w), dtype=np.float32) * 0.5
            if s.mask_path is not None:
                amap += 0.6 * (cv2.imread(str(s.mask_path), cv2.IMREAD_UNCHANGED) > 0)
            run.write_map(s.sample_id, amap)
            run.write_mask(s.sample_id, amap > 0.9)
    run.write_thresholds({"value": 0.9, "method": "fixed", "source": "config", "tuned_on_test": False})
    run.write_metrics({"test_public/seg_f1": 0.5, "threshold_source": "config"})
    run.write_state(state, None if state == "completed" else "killed")
    return run.path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, list[str], str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    return int(exit_info.value.code), out.splitlines(), err


def reference_mask(amap: np.ndarray, threshold: float) -> np.ndarray:
    """map >= threshold, 3x3 closing (OpenCV), then 8-connected components under 4 pixels removed."""
    raw = (amap >= np.float32(threshold)).astype(np.uint8)
    closed = cv2.morphologyEx(raw, cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8))
    assert closed.mean() <= 0.95  # the full-mask guard never applies here
    n, labels, stats, _ = cv2.connectedComponentsWithStats(closed, connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= 4
    keep[0] = False
    return keep[labels]


@pytest.fixture(scope="module")
def hand_run(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("runs"), synthetic_root)


@pytest.fixture(scope="module")
def evaluated(hand_run: Path) -> tuple[Path, dict[str, bytes], list[str]]:
    """`python -m hybridad evaluate RUN <OVERRIDES> --write-masks`: (evaluation dir, run before, stdout)."""
    before = snapshot(hand_run)
    out = io.StringIO()  # a module-scoped fixture cannot use capsys
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(hand_run), *OVERRIDES, "--write-masks"])
    assert exit_info.value.code == 0
    lines = out.getvalue().splitlines()
    return Path(lines[-1]), before, lines


def test_evaluate_writes_a_new_directory_with_brute_force_masks_for_every_split(
        hand_run: Path, evaluated: tuple[Path, dict[str, bytes], list[str]]) -> None:
    folder, before, lines = evaluated
    assert folder.parent == hand_run / "evaluations" and folder.name == "0001"  # a counter, printed last
    assert "test_public/seg_f1=" in lines[-2]
    assert snapshot(hand_run) == {**before, **{k: v for k, v in snapshot(hand_run).items()
                                               if k.startswith("evaluations/")}}  # run's own files untouched
    run = RunDir(hand_run)
    val = np.concatenate([run.read_map(sid).ravel() for sid, _ in run.iter_maps("validation")])
    val = val.astype(np.float64)
    base = val.mean() + 1.5 * val.std()  # mean + k std of the validation pixels
    thresholds = yaml.safe_load((folder / "thresholds.yaml").read_text())
    assert thresholds["value"] == pytest.approx(base, rel=1e-9)
    expected = {"validation": base, "test_public": base, "test_private": base, "test_private_mixed": 0.7}
    assert {s: t["value"] for s, t in thresholds["splits"].items()} == pytest.approx(expected, rel=1e-9)
    assert thresholds["splits"]["test_private_mixed"]["method"] == "fixed"
    assert thresholds["tuned_on_test"] is False and "label" not in thresholds

    tp = fp = fn = 0
    evaluation = RunDir(folder)
    for split in SPLITS:
        ids = [sid for sid, _ in run.iter_maps(split)]
        assert [sid for sid, _ in evaluation.iter_masks(split)] == ids, split
        for sid in ids:
            ref = reference_mask(run.read_map(sid), expected[split])
            np.testing.assert_array_equal(evaluation.read_mask(sid), ref, err_msg=sid)
            if split == "test_public":
                sample = next(s for s in list_samples(run.read_config()["data"]["root"], "can", split)
                              if s.sample_id == sid)
                gt = (cv2.imread(str(sample.mask_path), cv2.IMREAD_UNCHANGED) > 0 if sample.mask_path
                      else np.zeros_like(ref))
                tp, fp, fn = (tp + int((ref & gt).sum()), fp + int((ref & ~gt).sum()),
                              fn + int((~ref & gt).sum()))
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["test_public/seg_f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn), rel=1e-6)
    assert metrics["test_private_mixed/threshold"] == pytest.approx(0.7)
    assert metrics["tuned_on_test"] is False
    record = yaml.safe_load((folder / "evaluation.yaml").read_text())
    assert record["overrides"] == OVERRIDES and record["masks"] is True
    assert record["threshold"]["test_private_mixed"]["value"] == 0.7


def test_submission_from_an_evaluation_passes_the_check_and_records_provenance(
        evaluated: tuple[Path, dict[str, bytes], list[str]], synthetic_root: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    folder = evaluated[0]
    code, out, _ = run_cli(["submission", "write", str(folder), "--out", str(tmp_path / "sub")], capsys)
    assert code == 0 and out[-1] == f"wrote {tmp_path / 'sub'}"
    counts = {"can": len(list_samples(synthetic_root, "can", "test_private"))}
    assert check_submission(tmp_path / "sub", counts) == []
    mask = cv2.imread(str(tmp_path / "sub/anomaly_images_thresholded/can/test_private_mixed/000_mixed.png"),
                      cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(mask > 0, RunDir(folder).read_mask("test_private_mixed/000_mixed"))
    provenance = yaml.safe_load(provenance_path(tmp_path / "sub").read_text())
    can = provenance["categories"]["can"]
    assert can["evaluation"] == str(folder.resolve()) and can["overrides"] == OVERRIDES
    assert can["thresholds"]["test_private_mixed"] == pytest.approx(0.7)
    assert provenance["tuned_on_test"] == [] and provenance["label"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub", "sub.provenance.yaml"]

    code, out, _ = run_cli(["submission", "check", str(tmp_path / "sub"), "--categories", "can",
                            "--data-root", str(synthetic_root)], capsys)
    assert code == 0 and "submission OK" in out[-1]
    code, _, err = run_cli(["submission", "check", str(tmp_path / "sub"), "--categories", "can"], capsys)
    assert code == 1 and "test_private/" in err  # the official counts: far more files expected
    code, _, err = run_cli(["submission", "check", str(tmp_path / "sub")], capsys)
    assert code == 1 and "anomaly_images/vial: missing folder" in err  # all 8 categories by default


def test_evaluation_without_masks_and_incomplete_runs_are_refused(
        hand_run: Path, synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    no_masks = create_evaluation(hand_run, ["threshold.k=2"])
    assert not (no_masks / "masks").exists()
    with pytest.raises(UserError, match="--write-masks"):
        write_submission([no_masks], tmp_path / "sub")
    capsys.readouterr()
    incomplete = make_run(tmp_path / "runs", synthetic_root, state="running")
    for argv in (["evaluate", str(incomplete), "threshold.k=2"],
                 ["submission", "write", str(incomplete), "--out", str(tmp_path / "sub")]):
        code, out, err = run_cli(argv, capsys)
        assert code == 2 and out == [] and len(err.strip().splitlines()) == 1, argv
        assert f"run {incomplete} is not complete (state running: killed)" in err
    assert not (incomplete / "evaluations").exists() and not (tmp_path / "sub").exists()


def test_long_override_lists_get_a_short_id(hand_run: Path, capsys: pytest.CaptureFixture) -> None:
    overrides = [f"threshold.k=2.{'0' * 60}1", f"threshold.percentile=99.{'9' * 60}", "threshold.factor=1.0",
                 "threshold.percentile_method=linear", "postprocess.closing_kernel=0",
                 "postprocess.fill_holes=false",
                 "postprocess.min_area=0", "postprocess.erosion_kernel=0", "postprocess.full_mask_guard=0.95",
                 f"threshold.test_private.k=3.{'0' * 60}1", "threshold.test_private_mixed.method=percentile"]
    assert len("_".join(overrides)) > 255  # the old file name built from the overrides
    argv = ["evaluate", str(hand_run), *overrides[:3], "--write-masks", *overrides[3:]]  # a flag in between
    code, out, _ = run_cli(argv, capsys)
    assert code == 0
    folder = Path(out[-1])
    assert folder.parent == hand_run / "evaluations" and folder.name.isdigit() and len(folder.name) == 4
    assert yaml.safe_load((folder / "evaluation.yaml").read_text())["overrides"] == overrides
    assert (folder / "masks/test_private_mixed").is_dir()
    splits = yaml.safe_load((folder / "thresholds.yaml").read_text())["splits"]
    assert splits["test_private_mixed"]["method"] == "percentile"
    assert splits["test_public"]["method"] == "mean_std"


def test_evaluate_refuses_keys_that_need_the_model(hand_run: Path) -> None:
    with pytest.raises(UserError, match="'data.category' cannot change without the model"):
        create_evaluation(hand_run, ["data.category=vial"])
    with pytest.raises(UserError, match="threshold.test_public"):
        create_evaluation(hand_run, ["threshold.test_public.value=0.5"])


class FakeWandb:
    """Records what `evaluate` logs to W&B."""

    def __init__(self) -> None:
        self.calls: dict[str, Any] = {}

    def init(self, **kwargs: Any) -> SimpleNamespace:
        self.calls["init"] = kwargs
        summary: dict[str, Any] = {}
        self.calls["summary"] = summary
        return SimpleNamespace(log=lambda m: self.calls.setdefault("log", m), summary=summary,
                               finish=lambda: None)


def _agent_command(sweep: dict[str, Any]) -> list[str]:
    """The command line `wandb agent` builds for one suggestion (first value / lower bound of each key)."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    def first(spec: dict[str, Any]) -> Any:
        return spec["value"] if "value" in spec else spec["values"][0] if "values" in spec else spec["min"]

    args = {key: {"value": first(spec)} for key, spec in sweep["parameters"].items()}
    sweep_vars = create_sweep_command_args({"args": args})
    # as wandb_agent.py fills them
    sweep_vars.update(interpreter=["python"], program=[sweep["program"]], env=["/usr/bin/env"])
    command = []
    for part in map(str, create_sweep_command(sweep["command"])):
        command += sweep_vars.get(part[2:-1], []) if part.startswith("${") else [part]
    return command


def test_sweep_keys_exist_and_the_agent_command_runs_with_the_project_python(
        hand_run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    sweep = yaml.safe_load((ROOT / "experiments/sweeps/threshold.yaml").read_text())
    assert sweep["metric"]["name"].startswith("test_public/") and "threshold tuned on test" in sweep["name"]
    for key, spec in sweep["parameters"].items():
        for value in spec.get("values", [spec.get("value", spec.get("min"))]):
            load_run_config(hand_run, [f"{key}={value}"])  # every key and value exists in the schema
    command = _agent_command(sweep)
    assert command[:4] == [".venv/bin/python", "-m", "hybridad", "evaluate"]  # the Makefile's venv
    assert "VENV    := .venv" in (ROOT / "Makefile").read_text()

    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("HYBRIDAD_RUN_DIR", str(hand_run))
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")
    code, out, _ = run_cli(command[3:], capsys)
    assert code == 0
    folder = Path(out[-1])
    metrics = json.loads((folder / "metrics.json").read_text())
    thresholds = yaml.safe_load((folder / "thresholds.yaml").read_text())
    assert metrics["label"] == thresholds["label"] == "threshold tuned on test"
    assert metrics["tuned_on_test"] is True and "W&B sweep abc123" in metrics["threshold_source"]
    assert fake.calls["init"]["tags"] == ["threshold tuned on test"] and fake.calls["init"]["project"] is None
    assert fake.calls["summary"]["label"] == "threshold tuned on test"
    assert fake.calls["log"]["test_public/seg_f1"] == metrics["test_public/seg_f1"]
    record = yaml.safe_load((folder / "evaluation.yaml").read_text())
    assert record["wandb_sweep"] == "abc123" and record["overrides"] == command[4:]


def test_best_evaluation_becomes_a_submission_labelled_tuned_on_test(
        synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = make_run(tmp_path / "runs", synthetic_root, seed=1)
    scores = {}
    for k in ("1.0", "2.5", "6.0"):
        folder = create_evaluation(run, [f"threshold.k={k}"])
        scores[folder] = json.loads((folder / "metrics.json").read_text())["test_public/seg_f1"]
    best = max(scores, key=scores.get)
    assert len(set(scores.values())) == 3
    code, out, _ = run_cli(["evaluate", str(run), "--best", "test_public/seg_f1"], capsys)
    assert code == 0
    chosen = Path(out[-1])
    assert chosen.name == "0004" and (chosen / "masks/test_private").is_dir()
    record = yaml.safe_load((chosen / "evaluation.yaml").read_text())
    assert record["selected_by"]["evaluation"] == str(best.resolve()) and record["overrides"] == [
        yaml.safe_load((best / "evaluation.yaml").read_text())["overrides"][0]]
    metrics = json.loads((chosen / "metrics.json").read_text())
    assert metrics["test_public/seg_f1"] == scores[best] and metrics["label"] == "threshold tuned on test"
    provenance = yaml.safe_load(write_submission([chosen], tmp_path / "sub").read_text())
    assert provenance["label"] == "threshold tuned on test" and provenance["tuned_on_test"] == ["can"]
    code, _, err = run_cli(["evaluate", str(run), "--best", "test_public/seg_f1", "threshold.k=3"], capsys)
    assert code == 2 and "drop the overrides (threshold.k=3)" in err
    with pytest.raises(UserError, match="no evaluation .* has metric 'test_public/nope'"):
        from hybridad.evaluate import best_evaluation

        best_evaluation(run, "test_public/nope")


def test_train_path_still_updates_the_runs_own_files(synthetic_root: Path, tmp_path: Path) -> None:
    run = make_run(tmp_path / "runs", synthetic_root, state="running")  # train calls it before completion
    before = snapshot(run / "masks")
    metrics = evaluate_run(run, ["threshold.method=f1_optimal"], write=True)
    assert snapshot(run / "masks") == before  # masks only with write_masks
    thresholds = RunDir(run).read_thresholds()
    assert thresholds["tuned_on_test"] is True
    assert thresholds["source"] == "test_public (threshold tuned on test)"
    assert thresholds["value"] == pytest.approx(metrics["test_public/threshold"])
    assert RunDir(run).read_metrics()["test_public/seg_f1"] == metrics["test_public/seg_f1"]
    assert not (run / "evaluations").exists()
    # train, after predicting, when a private split has its own rule: the run's own masks are rewritten
    split_rules = ["threshold.method=fixed", "threshold.value=0.4", "threshold.test_private_mixed.value=0.3"]
    evaluate_run(run, split_rules, write=True, write_masks=True)
    for sid, thr in (("test_private_mixed/000_mixed", 0.3), ("test_private/000_regular", 0.4)):
        expected = RunDir(run).read_map(sid) >= np.float32(thr)
        assert expected.any() and not np.array_equal(expected, RunDir(run).read_map(sid) > 0.9)
        np.testing.assert_array_equal(RunDir(run).read_mask(sid), expected)
