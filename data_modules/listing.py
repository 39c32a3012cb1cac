"""MVTec AD 2 on disk: listing the five splits and decoding images and masks.

Disk layout (one category):
    <root>/<category>/train/good/*.png, validation/good/*.png, test_public/{good,bad}/*.png,
    test_public/ground_truth/bad/<stem>_mask.png, test_private/*.png, test_private_mixed/*.png
"""

from __future__ import annotations

import re
import os
import struct
from pathlib import Path

import cv2
import numpy as np

from hybridad.errors import UserError
from hybridad.types import PRIVATE_SPLITS, Sample, Split

DOWNLOAD_URL = "https://www.mvtec.com/company/research/datasets/mvtec-ad-2"
_LAYOUT = (
    "<root>/<category>/{train/good, validation/good, test_public/{good,bad,ground_truth/bad}, "
    "test_private, test_private_mixed}"
)

_LIGHTING = re.compile(r"\d+_(regular|overexposed|underexposed|shift_\d+|mixed)")


def _lighting(stem: str) -> str:
    """`000_regular` -> `regular`, `000_shift_2` -> `shift_2`, `000_mixed` -> `mixed`; '' for other names."""
    match = _LIGHTING.fullmatch(stem)
    return match.group(1) if match else ""


def category_dir(root: str | Path, category: str) -> Path:
    root = Path(root)
    hint = (
        f"download MVTec AD 2 from {DOWNLOAD_URL} and unpack it so that "
        f"{root}/{category}/train/good/*.png exists"
    )
    if not root.is_dir():
        raise UserError(f"data root {root} does not exist: {hint} (layout: {_LAYOUT})")
    if not (root / category).is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))[:12]
        raise UserError(f"category folder {root / category} does not exist (found: {', '.join(found) or 'none'}): "
                        f"{hint} (layout: {_LAYOUT})")
    return root / category


def _pngs(folder: Path, split: Split) -> list[Path]:
    if not folder.is_dir():
        raise UserError(f"split folder {folder} is missing (split '{split.value}'; layout: {_LAYOUT})")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png" and p.is_file())
    if not files:
        raise UserError(f"split folder {folder} holds no .png images (split '{split.value}')")
    return files


def list_samples(root: str | Path, category: str, split: Split | str) -> list[Sample]:
    """Every image of one split, in a sorted, deterministic order (test_public: good first, then bad).

    Raises:
        UserError: missing root/category/split folder, empty split, bad image without mask.
    """
    try:
        split = Split(split)
    except ValueError:
        raise UserError(f"unknown split '{split}'; valid: {', '.join(s.value for s in Split)}") from None
    cat_dir = category_dir(root, category)
    if split in PRIVATE_SPLITS:
        return [
            Sample(category, split, p, None, -1, _lighting(p.stem), f"{split.value}/{p.stem}", "")
            for p in _pngs(cat_dir / split.value, split)
        ]
    kinds = ("good", "bad") if split == Split.TEST_PUBLIC else ("good",)
    samples = []
    for kind in kinds:
        for p in _pngs(cat_dir / split.value / kind, split):
            mask = None
            if kind == "bad":
                mask = cat_dir / split.value / "ground_truth" / "bad" / f"{p.stem}_mask.png"
                if not mask.is_file():
                    raise UserError(f"bad image {p} has no mask: expected {mask}")
            label = int(kind == "bad")
            sample_id = f"{split.value}/{kind}/{p.stem}"
            samples.append(Sample(category, split, p, mask, label, _lighting(p.stem), sample_id, kind))
    return samples





def png_size(path: Path, kind: str = "image") -> tuple[int, int, int]:
    """(height, width, channels) from a PNG's header, without decoding; checks the file is complete (IEND)."""
    channels_of = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}  # PNG colour type -> channels (palette counts as RGB)
    try:
        with open(path, "rb") as f:
            head = f.read(29)
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 12))
            tail = f.read(12)
    except OSError as err:
        raise UserError(f"cannot read {kind} {path} ({err.strerror})") from None
    if len(head) < 29 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise UserError(f"{path} is not a PNG image (unreadable or corrupt)")
    if tail[4:8] != b"IEND":
        raise UserError(f"{kind} {path} is truncated (no PNG end marker); re-extract the dataset")
    width, height = struct.unpack(">II", head[16:24])
    return height, width, channels_of.get(head[25], 0)


def image_header(path: Path, kind: str = "image") -> tuple[int, int, int]:
    """(height, width, channels) from the file header: `png_size` for PNG, PIL for the other formats."""
    if path.suffix.lower() == ".png":
        return png_size(path, kind)
    from PIL import Image

    try:
        with Image.open(path) as img:
            w, h = img.size
            channels = {"1": 1, "L": 1, "I;16": 1, "I": 1, "LA": 2, "RGBA": 4}.get(img.mode, 3)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {kind} {path} ({err})") from None
    return h, w, channels


def imread(path: Path | str, flags: int = cv2.IMREAD_UNCHANGED) -> np.ndarray | None:
    """`cv2.imread` for any file name: the bytes are read by Python and decoded by `cv2.imdecode`.

    OpenCV given a name that is not valid UTF-8 (a surrogate `str`) can crash the process; Python's own
    open takes any name. None, as `cv2.imread`, for a missing, empty or undecodable file.
    """
    try:
        data = np.fromfile(os.fsencode(path), dtype=np.uint8)
    except (OSError, ValueError):
        return None
    if data.size == 0:
        return None
    try:
        return cv2.imdecode(data, flags)
    except cv2.error:
        return None


def decode_image(path: Path) -> np.ndarray:
    """Decode an image (PNG, JPEG, BMP, TIFF) at native size -> (H,W,1) gray or (H,W,3) RGB uint8 (16-bit
    scaled down, alpha dropped).

    The whole pixel stream is decoded, so a truncated or corrupt PNG fails here (UserError naming the file).
    """
    img = imread(path, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise UserError(f"cannot decode image {path} (unreadable, truncated or corrupt PNG): re-extract it")
    if img.dtype == np.uint16:
        img = (img // 257).astype(np.uint8)
    if img.dtype != np.uint8:
        raise UserError(f"image {path} has unsupported pixel type {img.dtype} (expected 8- or 16-bit PNG)")
    if img.ndim == 2:
        return img[:, :, None]  # (H,W) -> (H,W,1)
    if img.ndim == 3 and img.shape[2] == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if img.ndim == 3 and img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    raise UserError(f"image {path} has unsupported shape {img.shape} (expected gray or RGB)")


def read_image(path: Path) -> np.ndarray:
    """Decode a PNG at native size -> (H,W,3) uint8 RGB; gray becomes 3 identical channels."""
    img = decode_image(path)
    return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img  # (H,W,1) -> (H,W,3)


def mask_to_binary(raw: np.ndarray, path: Path) -> np.ndarray:
    """A decoded mask (8- or 16-bit, gray or equal-channel colour) -> (H,W) bool defect pixels.

    Accepted: 0 plus one foreground value of 1, 255 or (16-bit) 65535; an all-zero mask. Anything else is a
    UserError naming the file (e.g. {3,128} would otherwise become 100 % defect).
    """
    if raw.ndim == 3:
        if raw.shape[2] == 4:
            raw = raw[:, :, :3]  # alpha is not part of the label
        if not (raw == raw[:, :, :1]).all():
            raise UserError(f"mask {path} has colour pixels: expected a gray 0/255 or 0/1 PNG")
        raw = raw[:, :, 0]  # (H,W,C) -> (H,W)
    values = np.unique(raw)
    allowed = {1, 255} | ({65535} if raw.dtype == np.uint16 else set())
    fg = [int(v) for v in values if v != 0]
    if raw.dtype not in (np.uint8, np.uint16) or len(fg) > 1 or (fg and fg[0] not in allowed):
        shown = ",".join(str(int(v)) for v in values[:6]) + (",..." if len(values) > 6 else "")
        bits = 16 if raw.dtype == np.uint16 else 8
        raise UserError(
            f"mask {path} is not binary: {bits}-bit values {{{shown}}}; expected 0 and one of 1, 255"
            f"{' or 65535' if bits == 16 else ''} (fix or re-extract the mask)"
        )
    return raw != 0


def read_mask(path: Path, image_path: Path, image_hw: tuple[int, int]) -> np.ndarray:
    """Decode a ground-truth mask -> (H,W) float32 {0,1}; checks its size and binary values (8 or 16 bit)."""
    raw = imread(path, cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise UserError(f"cannot decode mask {path} (unreadable, truncated or corrupt PNG): re-extract it")
    if raw.shape[:2] != tuple(image_hw):
        h, w = image_hw
        raise UserError(f"mask {path} is {raw.shape[1]}x{raw.shape[0]} but its image {image_path} is {w}x{h}")
    return mask_to_binary(raw, path).astype(np.float32)
