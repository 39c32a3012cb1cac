"""An own category end to end through the CLI: a `folder` tree and the user's YAML -> train -> evaluate ->
report -> predict -> export; submission refuses in one line. Tiny presets, a few seconds of training."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from own_data_trees import folder_tree

from hybridad.cli import main

TINY = ["inp_former.preset=tiny", "inp_former.tiny_depth=2", "data.tiling.input_size=28", "data.batch_size=4",
        "data.num_workers=0", "logging.wandb=false", "trainer.accelerator=cpu", "trainer.max_epochs=-1",
        "trainer.max_steps=2", "inp_former.warmup_steps=1", "trainer.enable_progress_bar=false", "name=r"]


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        main(args)
    out, err = capsys.readouterr()
    return int(exit_.value.code or 0), out, err


@pytest.fixture(scope="module")
def own_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`hybridad train config=bracket.yaml ...` on a folder tree of 'bracket' (no category YAML)."""
    tmp = tmp_path_factory.mktemp("own")
    root = folder_tree(tmp / "data", "bracket", n_normal=10)
    mine = tmp / "bracket.yaml"
    mine.write_text(f"data:\n  root: {root}\n  category: bracket\n  format: folder\n"
                    f"  layout: {{normal_test: normal_test}}\n  cache_dir: {tmp / 'cache'}\nout_dir: {tmp / 'runs'}\n")
    with pytest.raises(SystemExit) as exit_:
        main(["train", f"config={mine}", *TINY])
    assert exit_.value.code in (0, None)
    return tmp / "runs" / "bracket" / "r"


def test_train_writes_a_run_without_private_splits(own_run: Path) -> None:
    assert json.loads((own_run / "state.json").read_text())["state"] == "completed"
    carved = [ln for ln in (own_run / "validation_images.txt").read_text().splitlines() if not ln.startswith("#")]
    assert len(carved) == 1 and carved[0].endswith(".v2.PNG") and "/normal/" in carved[0]
    assert sorted(p.name for p in (own_run / "maps").iterdir()) == ["test_public", "validation"]
    validation = [p.stem for p in (own_run / "maps" / "validation" / "good").glob("*.tiff")]
    assert [Path(carved[0]).stem] == validation, "the carved image is the validation split"
    rows = list(csv.DictReader((own_run / "scores" / "test_public.csv").open()))
    assert {(r["sample_id"], r["label"], r["defect_type"], r["lighting"]) for r in rows} == {
        ("test_public/good/ok_0", "0", "good", ""), ("test_public/good/ok_1", "0", "good", ""),
        ("test_public/bad/abnormal/top", "1", "abnormal", ""), ("test_public/bad/scratch/s1", "1", "scratch", ""),
        ("test_public/bad/scratch/s2", "1", "scratch", ""),
        ("test_public/bad/scratch/deep/d1", "1", "scratch/deep", ""),
    }
    metrics = json.loads((own_run / "metrics.json").read_text())
    assert 0.0 <= metrics["test_public/defect=scratch/aupro_0.05"] <= 1.0
    assert "test_public/defect=scratch/deep/seg_f1" in metrics
    assert not any("lighting=" in k for k in metrics), "no lighting in this layout"


def test_evaluate_report_predict_export_work_and_submission_refuses(
    own_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _cli(["evaluate", str(own_run), "threshold.k=2"], capsys)
    evaluation = Path(out.strip().splitlines()[-1])
    assert code == 0 and (evaluation / "metrics.json").is_file()
    assert 0.0 <= json.loads((evaluation / "metrics.json").read_text())["test_public/seg_f1"] <= 1.0

    code, _, _ = _cli(["report", str(own_run), "--out", str(tmp_path / "report")], capsys)
    text = (tmp_path / "report" / "report.md").read_text()
    assert code == 0 and "## Per defect type" in text and "| bracket | scratch/deep |" in text
    assert "| bracket | abnormal |" in text
    assert "ISVL" not in text and "Lighting" not in text, "MVTec AD 2-only tables appear only where they apply"
    assert "## Per category: test_public (the labelled test set)" in text
    assert list((tmp_path / "report" / "overlays" / "bracket").glob("*.png"))

    images = own_run.parent.parent.parent / "data" / "bracket" / "abnormal" / "scratch"
    code, _, _ = _cli(["predict", str(own_run), str(images), "--out", str(tmp_path / "pred"), "--device", "cpu"],
                      capsys)
    rows = list(csv.DictReader((tmp_path / "pred" / "scores.csv").open()))
    assert code == 0 and sorted(r["file"] for r in rows) == ["s1", "s2"]

    code, out, _ = _cli(["export", str(own_run), "--out", str(tmp_path / "bracket.pt2")], capsys)
    assert code == 0 and (tmp_path / "bracket.pt2").is_file()

    code, _, err = _cli(["submission", "write", str(own_run), "--out", str(tmp_path / "sub")], capsys)
    assert code == 2 and err.strip().count("\n") == 0
    assert "submission is for MVTec AD 2's eight categories only" in err and not (tmp_path / "sub").exists()
