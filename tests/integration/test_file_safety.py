"""Issue 18, items 11 and 22: written files honour the umask and survive a full disk; crashes end in one line.

The full-disk cases write to a real, size-limited tmpfs (`mount -t tmpfs -o size=...`, needs root); they are
skipped, with the reason, where the machine does not allow the mount.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from hybridad.demo import demo_config
from hybridad.run_dir import RunDir
from hybridad.train import train

REPO = Path(__file__).resolve().parents[2]
FAST = ["trainer.max_epochs=1", "trainer.max_steps=2", "trainer.limit_val_batches=2",
        "trainer.enable_progress_bar=false"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m hybridad ARGS` in a fresh process: an abort (134) or a segfault (-11) shows in the code."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "hybridad", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)


def _main(capsys: pytest.CaptureFixture, *args: str) -> subprocess.CompletedProcess:
    """`hybridad ARGS` in this process (quick; for commands that cannot crash the interpreter)."""
    from hybridad.cli import main

    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as stop:
        code = int(stop.code or 0)
    out = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out.out, out.err)


def _one_line(proc: subprocess.CompletedProcess, needle: str) -> str:
    lines = [ln for ln in proc.stderr.replace("\r", "\n").splitlines() if ln.startswith("hybridad: error: ")]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert len(lines) == 1 and needle in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def can_run(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """can (4x2 test grid), tiny INP-Former with a 2-block random encoder at 56 px."""
    runs = tmp_path_factory.mktemp("runs")
    return train(demo_config("can", synthetic_root, runs,
                             [*FAST, "inp_former.tiny_depth=2", "data.tiling.input_size=56"]))


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs: a real file system that fills up."""
    mount = tmp_path / "small_fs"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here ({proc.stderr.strip() or proc.returncode})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def _image(run: Path) -> Path:
    return Path(RunDir(run).read_config()["data"]["root"]) / "can" / "test_public" / "bad" / "000_regular.png"


# item 11: permissions and fsync -------------------------------------------------------------------------------
def test_export_and_packed_submission_honour_the_umask(can_run: Path, tmp_path: Path) -> None:
    from hybridad.export import export_run
    from hybridad.submission import pack_submission, write_submission

    before = os.umask(0o002)
    try:
        export_run(can_run, tmp_path / "m.pt2")
        write_submission([can_run], tmp_path / "sub")
        counts = {"can": len(list(RunDir(can_run).iter_maps("test_private")))}
        archive = pack_submission(tmp_path / "sub", tmp_path / "sub.tar.gz", counts)
    finally:
        os.umask(before)
    assert (tmp_path / "m.pt2").stat().st_mode & 0o777 == 0o664  # was 0600 (mkstemp)
    assert archive.stat().st_mode & 0o777 == 0o664
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_overlay_writes_raise_when_the_png_is_not_written(small_fs: Path) -> None:
    """cv2.imwrite returns False on a full disk; the overlay callback used to carry on without a word."""
    import torch

    from callbacks.overlay_logger import OverlayLoggerCallback
    from hybridad.types import AnomalyOutput, Batch

    (small_fs / "fill").write_bytes(b"\0" * (4 * 2**20 - 8192))  # leave a page or two
    callback = OverlayLoggerCallback(small_fs / "run", num_overlays=1)
    image = torch.randint(0, 255, (1, 3, 256, 256), dtype=torch.uint8)
    batch = Batch(image=image, mask=torch.zeros(1, 1, 256, 256), label=torch.ones(1, dtype=torch.long),
                  sample_id=["test_public/bad/000_regular"], split=["test_public"], lighting=["regular"],
                  tile_box=None)
    outputs = AnomalyOutput(torch.rand(1, 1, 256, 256), torch.rand(1), torch.rand(1, 1, 256, 256) > 0.5)
    trainer = type("T", (), {"is_global_zero": True, "loggers": []})()
    with pytest.raises(OSError) as err:
        callback.on_test_batch_end(trainer, None, outputs, batch, 0)  # type: ignore[arg-type]
    assert "overlays" in str(err.value)


# items 11 and 22: a full disk ---------------------------------------------------------------------------------
def test_full_disk_ends_export_predict_pack_and_convert_in_one_line(can_run: Path, small_fs: Path,
                                                                    tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    line = _one_line(_cli("export", str(can_run), "--out", str(small_fs / "m.pt2")), "no space left")
    assert str(small_fs / "m.pt2") in line  # was: an abort (rc 134) from torch's zip writer
    (small_fs / "fill").write_bytes(b"\0" * (4 * 2**20 - 4096))
    _one_line(_main(capsys, "predict", str(can_run), str(_image(can_run)), "--out", str(small_fs / "pred")),
              "no space left")
    weights = tmp_path / "official.pth"
    import torch

    torch.save({"lrb.conv.0.4.weight": torch.zeros(512, 256)}, weights)  # 512 KiB of LRB weights
    _one_line(_main(capsys, "convert", "cpr", str(weights), "--out", str(small_fs / "cpr.pth")),
              "no space left")
    leftovers = [p.name for p in small_fs.rglob("*") if ".tmp" in p.name]
    assert leftovers == []


# item 22: one line, never a crash -----------------------------------------------------------------------------
def test_non_utf8_file_name_is_predicted_not_a_segfault(can_run: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    odd = os.path.join(os.fsencode(folder), b"bad\xff.png")  # not valid UTF-8
    shutil.copyfile(_image(can_run), odd)
    proc = _cli("predict", str(can_run), str(folder), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    mask = os.path.join(os.fsencode(tmp_path / "out" / "masks"), b"bad\xff.png")
    assert os.path.isfile(mask)
    assert b"bad\xff" in (tmp_path / "out" / "scores.csv").read_bytes()


def test_bad_paths_and_files_end_in_one_line(can_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    image = str(_image(can_run))
    _one_line(_main(capsys, "predict", str(can_run), image, "--out", str(tmp_path / ("x" * 300))),
              "file name too long")
    _one_line(_main(capsys, "predict", str(can_run), image, "--out", "/proc/hybridad_out"), "/proc/hybridad_out")
    _one_line(_main(capsys, "export", str(can_run), "--out", "/proc/hybridad_out/m.pt2"), "/proc/hybridad_out")
    _one_line(_main(capsys, "report", str(can_run), "--out", "/proc/hybridad_out"), "/proc/hybridad_out")
    (tmp_path / "afile").write_text("")
    _one_line(_main(capsys, "predict", str(can_run), image, "--out", str(tmp_path / "afile")), "is a file")
    _one_line(_main(capsys, "report", str(can_run), "--out", str(tmp_path / "afile")), "afile")
    _one_line(_main(capsys, "export", str(can_run), "--out", str(tmp_path / "afile" / "m.pt2")), "afile")
    (tmp_path / "weights").mkdir()
    ckpt = str(can_run / "checkpoints" / "final.ckpt")
    _one_line(_main(capsys, "convert", "cpr", ckpt, "--out", str(tmp_path / "weights")), "is a folder")
    assert list((tmp_path / "weights").iterdir()) == []  # no temporary file left
    cv2.imwrite(str(tmp_path / "one.png"), np.zeros((1, 1, 3), np.uint8))
    _one_line(_main(capsys, "predict", str(can_run), str(tmp_path / "one.png"), "--out", str(tmp_path / "o1")),
              "1x1")


def test_truncated_or_corrupt_files_end_in_one_line(can_run: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    image = str(_image(can_run))
    copy = tmp_path / "run"
    shutil.copytree(can_run, copy)
    final = copy / "checkpoints" / "final.ckpt"
    final.write_bytes(final.read_bytes()[:5000])
    _one_line(_main(capsys, "predict", str(copy), image, "--out", str(tmp_path / "o1")), "final.ckpt")
    artefact = tmp_path / "m.pt2"
    assert _main(capsys, "export", str(can_run), "--out", str(artefact)).returncode == 0
    artefact.write_bytes(artefact.read_bytes()[:100_000])
    _one_line(_main(capsys, "predict", str(artefact), image, "--out", str(tmp_path / "o2")), "m.pt2")
    tiff = sorted((copy / "maps" / "test_public" / "bad").glob("*.tiff"))[0]
    tiff.write_bytes(tiff.read_bytes()[:200])
    _one_line(_main(capsys, "evaluate", str(copy)), tiff.name)
    RunDir(copy).write_state("failed", "killed")
    last = copy / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:3000])
    _one_line(_main(capsys, "train", f"resume={copy}"), "last.ckpt is truncated or corrupt")
    bad = tmp_path / "cpr.pth"
    bad.write_bytes(b"not a checkpoint")
    cfg = ["data.category=vial", f"data.root={RunDir(can_run).read_config()['data']['root']}",
           f"out_dir={tmp_path / 'runs'}", "cpr.preset=tiny", "cpr.weights=''", f"cpr.checkpoint={bad}"]
    _one_line(_main(capsys, "train", *cfg), "cpr.checkpoint: cannot read")
