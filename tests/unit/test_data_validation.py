"""`validate_category`, `data check` and `read_mask` on bad inputs: one line naming the file, or the value."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from data_modules.checks import validate_category
from data_modules.listing import read_mask
from hybridad.errors import UserError
from hybridad.types import Split
from test_data_layer import H, W, make_tree  # tests/unit is on sys.path (no __init__.py)

REPO = Path(__file__).resolve().parents[2]
MASK = "can/test_public/ground_truth/bad/001_overexposed_mask.png"
BAD_IMAGE = "can/test_public/bad/001_overexposed.png"


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "data")


def _check(tree: Path) -> str:
    return validate_category(tree, "can", tuple(Split), progress=False, threads=2)


def _one_line_error(tree: Path) -> str:
    with pytest.raises(UserError) as e:
        _check(tree)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def _corrupt_pixels(path: Path) -> None:
    """Flip a byte inside the compressed pixel data; header and end marker stay intact."""
    data = bytearray(path.read_bytes())
    idat = data.index(b"IDAT")
    data[idat + 20] ^= 0xFF
    path.write_bytes(bytes(data))


def test_clean_tree_passes_and_summarises(tree):
    text = _check(tree)
    assert text.splitlines()[0].endswith("every image decodes, sizes agree, masks binary and fit")
    assert f"{W}x{H} RGB" in text and "(2 good, 3 bad with masks)" in text


@pytest.mark.parametrize("rel", ["can/test_public/good/001_shift_2.png", "can/test_private/001_regular.png"])
def test_truncated_png(tree, rel):
    path = tree / rel
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert _one_line_error(tree) == (
        f"image {path} is truncated (no PNG end marker); re-extract the dataset"
    )


@pytest.mark.parametrize("rel", ["can/test_private_mixed/000_mixed.png", "can/train/good/002_regular.png"])
def test_corrupt_pixel_data_with_intact_end_marker(tree, rel):
    path = tree / rel
    _corrupt_pixels(path)
    msg = _one_line_error(tree)
    assert msg == f"cannot decode image {path} (unreadable, truncated or corrupt PNG): re-extract it"


def test_mask_of_another_size(tree):
    cv2.imwrite(str(tree / MASK), np.zeros((H, W + 2), np.uint8))
    assert _one_line_error(tree) == (
        f"mask {tree / MASK} is {W + 2}x{H} but its image {tree / BAD_IMAGE} is {W}x{H}; "
        "a mask must have its image's size"
    )


def test_image_of_another_size_names_odd_file_and_reference(tree):
    odd = tree / "can/test_private/001_regular.png"
    cv2.imwrite(str(odd), np.zeros((H - 2, W, 3), np.uint8))
    msg = _one_line_error(tree)
    ref = tree / "can/train/good/000_regular.png"
    assert msg.startswith(f"image {odd} is {W}x{H - 2} but {ref} is {W}x{H}; all images of a category")


def test_mask_with_non_binary_values_is_an_error(tree):
    m = np.zeros((H, W), np.uint8)
    m[:4] = 3
    m[4:8] = 128
    cv2.imwrite(str(tree / MASK), m)
    expected = (
        f"mask {tree / MASK} is not binary: 8-bit values {{0,3,128}}; expected 0 and one of 1, 255 "
        "(fix or re-extract the mask)"
    )
    assert _one_line_error(tree) == expected
    with pytest.raises(UserError) as e:
        read_mask(tree / MASK, tree / BAD_IMAGE, (H, W))
    assert str(e.value) == expected


BINARY = [(1, np.uint16), (65535, np.uint16), (1, np.uint8), (255, np.uint8)]


@pytest.mark.parametrize(("fg", "dtype"), BINARY)
def test_binary_masks_read_correctly_in_8_and_16_bit(tree, fg, dtype):
    m = np.zeros((H, W), dtype)
    m[5:9, 10:20] = fg
    cv2.imwrite(str(tree / MASK), m)
    assert cv2.imread(str(tree / MASK), cv2.IMREAD_UNCHANGED).dtype == dtype  # really written at that depth
    out = read_mask(tree / MASK, tree / BAD_IMAGE, (H, W))
    assert out.dtype == np.float32 and out.sum() == 40 and out[5:9, 10:20].all()
    _check(tree)  # passes


def test_16_bit_mask_with_two_foreground_values_is_an_error(tree):
    m = np.zeros((H, W), np.uint16)
    m[0, 0], m[1, 1] = 1, 65535
    cv2.imwrite(str(tree / MASK), m)
    expected = "is not binary: 16-bit values {0,1,65535}; expected 0 and one of 1, 255 or 65535"
    assert expected in _one_line_error(tree)


def test_truncated_mask(tree):
    data = (tree / MASK).read_bytes()
    (tree / MASK).write_bytes(data[:40])
    expected = f"mask {tree / MASK} is truncated (no PNG end marker); re-extract the dataset"
    assert _one_line_error(tree) == expected


def test_only_listed_splits_are_checked(tree):
    _corrupt_pixels(tree / "can/test_private/000_regular.png")
    text = validate_category(tree, "can", ["train", "validation"], progress=False)
    assert [ln.split()[0] for ln in text.splitlines()[1:]] == ["train", "validation"]


def test_cli_data_check_fails_on_corrupt_pixels_with_one_line(tree):
    path = tree / "can/test_private/000_regular.png"
    _corrupt_pixels(path)
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "hybridad", "data", "check", "--root", str(tree), "--category", "can"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"cannot decode image {path}" in proc.stderr.strip().splitlines()[-1]
