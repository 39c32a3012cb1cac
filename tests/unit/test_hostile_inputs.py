"""Issue 18, items 17-23: hostile or broken inputs end in one line, never in data loss or code execution."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from hybridad.config import load_config
from hybridad.errors import UserError
from hybridad.threshold_rules import fit_threshold
from hybridad.thresholds import ThresholdConfig


def _cli(*args: str) -> subprocess.CompletedProcess:
    """`hybridad ARGS` in this process; stderr captured, the exit code as `returncode`."""
    import contextlib
    import io

    from hybridad.cli import main

    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(list(args))
        except SystemExit as stop:
            code = int(stop.code or 0)
    return subprocess.CompletedProcess(list(args), code, "", err.getvalue())


def _one_line(proc: subprocess.CompletedProcess, needle: str) -> None:
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(err) == 1 and err[0].startswith("hybridad: error: ") and needle in err[0], proc.stderr[-2000:]


# item 20: NaN or missing thresholds ---------------------------------------------------------------------------
@pytest.mark.parametrize(("overrides", "needle"), [
    (["threshold.k=nan"], "threshold.k"),
    (["threshold.k=inf"], "threshold.k"),
    (["threshold.method=fixed", "threshold.value=nan"], "threshold.value"),
    (["threshold.method=fixed"], "needs a value"),
    (["threshold.test_private.method=fixed"], "threshold.test_private.value"),
    (["threshold.test_private_mixed.value=nan"], "threshold.test_private_mixed.value"),
    (["threshold.test_private.k=nan"], "threshold.test_private.k"),
])
def test_nan_or_missing_thresholds_are_refused(overrides: list[str], needle: str) -> None:
    with pytest.raises(UserError, match=needle.replace(".", r"\.")):
        load_config(["data.category=can", *overrides])


def test_fixed_threshold_without_value_is_refused_when_fitted() -> None:
    with pytest.raises(UserError, match="finite threshold.value"):
        fit_threshold(ThresholdConfig(method="fixed"))
    with pytest.raises(UserError, match="finite threshold.value"):
        fit_threshold(ThresholdConfig(method="fixed", value=float("nan")))
    assert fit_threshold(ThresholdConfig(method="fixed", value=0.25)).value == 0.25


# item 19: report HTML injection -------------------------------------------------------------------------------
def test_report_escapes_file_names_in_every_attribute(tmp_path: Path) -> None:
    import re

    import cv2
    import numpy as np

    from data_modules.synthetic import write_synthetic_dataset
    from hybridad.report import write_report
    from hybridad.run_dir import RunDir

    data = tmp_path / "data"
    write_synthetic_dataset(data, ["wallplugs"], size=(40, 32), counts="small", seed=0, verbose=False)
    evil = '000_x" onerror="alert(1)'
    bad_dir, gt_dir = data / "wallplugs/test_public/bad", data / "wallplugs/test_public/ground_truth/bad"
    first = sorted(bad_dir.glob("*.png"))[0]
    (gt_dir / f"{first.stem}_mask.png").rename(gt_dir / f"{evil}_mask.png")
    first.rename(bad_dir / f"{evil}.png")
    run = RunDir(tmp_path / "run")
    run.write_text("config.yaml", f"branch: inp_former\ndata:\n  category: wallplugs\n  root: {data}\n")
    run.write_thresholds({"value": 0.5, "method": "mean_std", "source": "validation"})
    for png in sorted(bad_dir.glob("*.png")):
        gt = cv2.imread(str(gt_dir / f"{png.stem}_mask.png"), 0) > 0
        run.write_map(f"test_public/bad/{png.stem}", gt.astype(np.float32))
    write_report([run.path], tmp_path / "rep", num_overlays=2)
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "onerror=" not in page.replace("onerror=&quot;", "")  # no live attribute
    sources = [html_unescape(s) for s in re.findall(r'<img src="([^"]+)"', page)]
    assert f"overlays/wallplugs/best_{evil}.png" in sources
    assert (tmp_path / "rep" / f"overlays/wallplugs/best_{evil}.png").is_file()


def html_unescape(text: str) -> str:
    import html

    return html.unescape(text)


# item 17: no code execution from files ------------------------------------------------------------------------
class _Payload:
    """Unpickling this runs `Path(marker).touch()`: the attack a weights-only load must refuse."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_checkpoint_loads_weights_only_and_refuses_code(tmp_path: Path) -> None:
    import torch

    from hybridad.run_loading import load_checkpoint_weights

    marker = tmp_path / "pwned"
    ckpt = tmp_path / "final.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": {"x": _Payload(marker)}}, ckpt)
    with pytest.raises(UserError, match="final.ckpt.*weights-only"):
        load_checkpoint_weights(ckpt)
    assert not marker.exists()
    torch.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": {"top_ratio": 0.01}}, ckpt)
    assert torch.equal(load_checkpoint_weights(ckpt)["w"], torch.ones(2))
    ckpt.write_bytes(ckpt.read_bytes()[:100])  # truncated
    with pytest.raises(UserError, match="cannot load .*final.ckpt"):
        load_checkpoint_weights(ckpt)


def _tiny_export(path: Path) -> None:
    import json

    import torch

    from hybridad.export_runtime import META_NAME

    program = torch.export.export(torch.nn.Linear(2, 1).eval(), (torch.rand(1, 2),))
    torch.export.save(program, str(path), extra_files={META_NAME: json.dumps({"format": "none"})})


def _rewrite_member(path: Path, suffix: str, change) -> None:
    import zipfile

    with zipfile.ZipFile(path) as src:
        members = [(i, src.read(i)) for i in src.infolist()]
    with zipfile.ZipFile(path, "w") as dst:
        for info, data in members:
            dst.writestr(info, change(data) if info.filename.endswith(suffix) else data)


def test_exported_file_with_pickled_weights_is_refused_before_loading(tmp_path: Path) -> None:
    import io
    import json

    import torch

    from hybridad.export_runtime import ExportedDetector, check_plain_archive

    artefact = tmp_path / "model.pt2"
    _tiny_export(artefact)
    check_plain_archive(artefact)  # a plain export passes
    marker = tmp_path / "pwned"

    def flag(data: bytes) -> bytes:
        config = json.loads(data)
        for payload in config["config"].values():
            payload["use_pickle"] = True
        return json.dumps(config).encode()

    def malicious(data: bytes) -> bytes:
        buf = io.BytesIO()
        torch.save(_Payload(marker), buf)
        return buf.getvalue()

    _rewrite_member(artefact, "model_weights_config.json", flag)
    _rewrite_member(artefact, "weights/weight_0", malicious)
    with pytest.raises(ValueError, match="pickled"):
        ExportedDetector(artefact)
    assert not marker.exists()
    _tiny_export(artefact)  # sample inputs that only a full unpickle reads
    _rewrite_member(artefact, "sample_inputs/model.pt", malicious)
    with pytest.raises(ValueError):
        ExportedDetector(artefact)
    assert not marker.exists()


# item 21: another category's evaluation -----------------------------------------------------------------------
def _fake_run(path: Path, category: str) -> Path:
    from hybridad.run_dir import RunDir

    run = RunDir(path)
    run.write_text("config.yaml", f"branch: inp_former\ndata:\n  category: {category}\n")
    run.write_state("completed")
    run.write_thresholds({"value": 0.5, "method": "mean_std", "source": "validation"})
    return run.path


def _fake_evaluation(run: Path, category: str, value: float) -> Path:
    from hybridad.run_dir import RunDir

    folder = RunDir(run / "evaluations" / "1")
    folder.write_text("evaluation.yaml", f"run: {run}\ncategory: {category}\noverrides: []\n")
    folder.write_thresholds({"value": value, "method": "fixed", "source": "config"})
    return folder.path


def test_predict_refuses_another_runs_or_categorys_evaluation(tmp_path: Path) -> None:
    from hybridad.run_loading import read_decision
    from hybridad.run_dir import RunDir

    can, rice = _fake_run(tmp_path / "can", "can"), _fake_run(tmp_path / "rice", "rice")
    can_eval, rice_eval = _fake_evaluation(can, "can", 0.25), _fake_evaluation(rice, "rice", 0.75)
    assert read_decision(RunDir(can), can_eval).threshold == 0.25
    with pytest.raises(UserError, match="category 'rice' but run .* is 'can'"):
        read_decision(RunDir(can), rice_eval)
    can2 = _fake_run(tmp_path / "can2", "can")
    with pytest.raises(UserError, match="not .*can2"):
        read_decision(RunDir(can2), can_eval)


# item 18: no data loss ----------------------------------------------------------------------------------------
def _private_run(root: Path, category: str = "can", count: int = 2, masks: bool = True) -> Path:
    import numpy as np

    from hybridad.run_dir import RunDir

    run = RunDir(root / f"run_{category}")
    run.write_text("config.yaml", f"branch: inp_former\ndata:\n  category: {category}\n")
    run.write_state("completed")
    for split, tag in (("test_private", "regular"), ("test_private_mixed", "mixed")):
        for i in range(count):
            sid = f"{split}/{i:03d}_{tag}"
            run.write_map(sid, np.full((4, 5), float(i), np.float32))
            if masks:
                run.write_mask(sid, np.eye(4, 5, dtype=bool))
    return run.path


def test_submission_overwrite_never_deletes_a_non_submission_folder(tmp_path: Path) -> None:
    from hybridad.submission import write_submission

    run = _private_run(tmp_path / "runs")
    with pytest.raises(UserError, match="holds the source"):  # --out = the runs' parent folder
        write_submission([run], tmp_path / "runs", overwrite=True)
    with pytest.raises(UserError, match="holds the source"):  # --out = the run itself
        write_submission([run], run, overwrite=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(UserError, match="only a submission tree.*thesis.tex"):
        write_submission([run], tmp_path / "mine", overwrite=True)
    assert (run / "config.yaml").is_file() and (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_predict_refuses_an_out_that_is_a_run_or_a_file(tmp_path: Path) -> None:
    from hybridad.predict import predict

    run = _fake_run(tmp_path / "can", "can")
    (tmp_path / "img.png").write_bytes(b"")
    for out, needle in ((run, "holds config.yaml"), (_fake_evaluation(run, "can", 0.5), "holds thresholds.yaml"),
                        (tmp_path / "img.png", "is a file")):
        with pytest.raises(UserError, match=needle):
            predict(run, [str(tmp_path / "img.png")], out)
    proc = _cli("predict", str(run), str(tmp_path / "img.png"), "--out", str(run))
    _one_line(proc, "holds config.yaml")


# item 23: incomplete trees ------------------------------------------------------------------------------------
def test_submission_refuses_missing_maps_or_masks(tmp_path: Path) -> None:
    from hybridad.run_dir import RunDir
    from hybridad.submission import write_submission

    run = _private_run(tmp_path / "runs", count=3)
    RunDir(run).map_path("test_private/001_regular").unlink()  # a gap in the numbering
    RunDir(run).mask_path("test_private/001_regular").unlink()
    with pytest.raises(UserError, match="lacks 1 of 3 test_private maps.*001_regular"):
        write_submission([run], tmp_path / "sub")
    run = _private_run(tmp_path / "runs2", count=2)
    RunDir(run).mask_path("test_private_mixed/001_mixed").unlink()
    with pytest.raises(UserError, match="1 test_private_mixed masks for 2 maps"):
        write_submission([run], tmp_path / "sub")
    # with the dataset here, a missing last map is found too
    data = tmp_path / "data" / "can" / "test_private"
    data.mkdir(parents=True)
    for i in range(3):
        (data / f"{i:03d}_regular.png").write_bytes(b"")
    run = _private_run(tmp_path / "runs3", count=2)
    RunDir(run).write_text("config.yaml",
                           f"branch: inp_former\ndata:\n  category: can\n  root: {tmp_path / 'data'}\n")
    with pytest.raises(UserError, match="lacks 1 of 3 test_private maps.*002_regular"):
        write_submission([run], tmp_path / "sub")
    assert not (tmp_path / "sub").exists()


def test_submission_provenance_lands_before_the_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    import hybridad.submission as submission
    from hybridad.run_dir import RunDir

    run = _private_run(tmp_path / "runs")
    RunDir(run).write_thresholds({"value": 0.5, "method": "f1_optimal", "tuned_on_test": True,
                                  "source": "test_public (threshold tuned on test)"})
    seen = {}
    real_move = submission._move_into_place

    def move_then_die(tmp: Path, out: Path) -> None:  # a kill right after the rename
        real_move(tmp, out)
        seen["record"] = yaml.safe_load(submission.provenance_path(out).read_text())
        raise KeyboardInterrupt

    monkeypatch.setattr(submission, "_move_into_place", move_then_die)
    with pytest.raises(KeyboardInterrupt):
        submission.write_submission([run], tmp_path / "sub")
    assert seen["record"]["label"] == "threshold tuned on test" and seen["record"]["tuned_on_test"] == ["can"]

    def fail(tmp: Path, out: Path) -> None:  # a failed rename leaves no provenance of a tree not written
        raise OSError(28, "No space left on device", str(out))

    monkeypatch.setattr(submission, "_move_into_place", fail)
    with pytest.raises(OSError):
        submission.write_submission([run], tmp_path / "sub2")
    assert not submission.provenance_path(tmp_path / "sub2").exists()


def test_report_says_a_run_is_running_killed_or_failed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from hybridad.report import write_report
    from hybridad.run_claim import lock_run, unlock_run
    from hybridad.run_dir import RunDir

    runs = {}
    for category, state in (("can", "running"), ("rice", "running"), ("vial", "failed"), ("fabric", "completed")):
        run = RunDir(tmp_path / category)
        run.write_text("config.yaml", f"branch: inp_former\ndata:\n  category: {category}\n")
        run.write_state(state, "CUDA out of memory" if state == "failed" else None)
        run.write_metrics({"test_public/seg_f1": 0.5})
        runs[category] = run.path
    fd = lock_run(runs["can"])  # can: a live process; rice: killed (no lock holder)
    try:
        text = write_report(list(runs.values()), tmp_path / "rep", num_overlays=0)
    finally:
        unlock_run(fd)
    err = capsys.readouterr().err
    assert "still running" in text.split(f"`{runs['can']}`", 1)[1].splitlines()[0]
    assert "killed while running" in text.split(f"`{runs['rice']}`", 1)[1].splitlines()[0]
    assert "failed: CUDA out of memory" in text.split(f"`{runs['vial']}`", 1)[1].splitlines()[0]
    assert text.split(f"`{runs['fabric']}`", 1)[1].splitlines()[0] == ""
    assert err.count("warning:") == 3
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "killed while running" in page and "still running" in page


def test_batch_size_zero_and_negative_overlays_are_refused(tmp_path: Path) -> None:
    run = _fake_run(tmp_path / "can", "can")
    (tmp_path / "img.png").write_bytes(b"")
    _one_line(_cli("predict", str(run), str(tmp_path / "img.png"), "--out", str(tmp_path / "o"),
                   "--batch-size", "0"), "--batch-size 0")
    _one_line(_cli("predict", str(tmp_path / "m.pt2"), str(tmp_path / "img.png"), "--out", str(tmp_path / "o"),
                   "--batch-size", "0"), "--batch-size 0")
    _one_line(_cli("report", str(run), "--overlays", "-3"), "--overlays -3")
    assert not (tmp_path / "o").exists() and not (run / "report").exists()


def test_ignored_weight_files_are_named() -> None:
    from hybridad.config import ignored_settings

    cfg = load_config(["data.category=vial", "cpr.preset=tiny", "cpr.weights=/w/densenet.pth"])
    assert [line.split(" is ")[0] for line in ignored_settings(cfg)] == ["cpr.weights=/w/densenet.pth"]
    cfg = load_config(["data.category=can", "cpr.weights=/w/densenet.pth"])
    assert [line.split(" is ")[0] for line in ignored_settings(cfg)] == ["cpr.weights=/w/densenet.pth"]
    assert ignored_settings(load_config(["data.category=vial"])) == []


# item 16: dead code is gone, and older runs still load ---------------------------------------------------------
def test_dead_settings_are_gone_and_older_runs_still_load(tmp_path: Path) -> None:
    import inspect

    import hybridad.postprocess as postprocess
    from hybridad.config import load_run_config
    from hybridad.models.cpr.config import CprConfig
    from hybridad.models.cpr.lightning_model import Cpr

    assert not hasattr(postprocess, "normalize")
    assert "steps" not in vars(CprConfig())
    assert "top_ratio" not in inspect.signature(Cpr).parameters
    with pytest.raises(UserError, match="cpr.steps"):
        load_config(["data.category=vial", "cpr.steps=10"])
    saved = "branch: cpr\ndata:\n  category: vial\ncpr:\n  steps: 2000\n  top_t: 7\n"
    (tmp_path / "config.yaml").write_text(saved)
    assert load_run_config(tmp_path).cpr.top_t == 7  # a run saved before `cpr.steps` was retired
