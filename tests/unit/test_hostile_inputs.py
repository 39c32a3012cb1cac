"""Issue 18, items 17-23: hostile or broken inputs end in one line, never in data loss or code execution."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hybridad.config import load_config
from hybridad.errors import UserError
from hybridad.thresholds import ThresholdConfig, fit_threshold

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m hybridad ARGS` in a fresh process (a segfault or abort shows as a negative/134 code)."""
    return subprocess.run([sys.executable, "-m", "hybridad", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=300)


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
