"""Disk: float16 TIFF map size and write time per codec, and the map disk of a full run per category.

A realistic map is what the models write: a patch-score grid (one score per ViT patch: native tile width / 32
pixels apart at 448 input) upsampled bilinearly to native size, Gaussian-smoothed (sigma 4), with a few blurred
defect blobs, cast to float16. Deflate has no float predictor without imagecodecs, so the ratio depends on how
many float16 steps neighbouring pixels differ by: a coarser patch pitch (whole-image tiling) compresses better. Every codec is checked to read
back bit-exactly through `tifffile.imread` (what MVTec's checker and AU-PRO code use); only codecs tifffile
decodes without imagecodecs are offered (deflate/zlib via Python's zlib; LZMA; imagecodecs is not installed).
Write time is process CPU time (robust to a busy machine).

Per category, a run writes one map per image of validation, test_public, test_private and test_private_mixed
(`callbacks/map_writer.py`) at native size, plus 0/255 PNG masks where a threshold is set.

    python -m bench.bench_disk
"""

from __future__ import annotations

import argparse
import io
import time

import cv2
import numpy as np
import tifffile

from hybridad.run_dir import encode_mask_png, encode_tiff

NATIVE_WH = {"can": (2232, 1024), "fabric": (2448, 2048), "fruit_jelly": (2100, 1520), "rice": (2448, 2048),
             "sheet_metal": (4224, 1056), "vial": (1400, 1900), "wallplugs": (2448, 2048), "walnuts": (2448, 2048)}
# validation, test_public, test_private, test_private_mixed images per category (dataset paper, Table IV)
MAPS_PER_RUN = {"can": 46 + 162 + 321 + 321, "fabric": 43 + 156 + 314 + 314, "fruit_jelly": 37 + 80 + 255 + 255,
                "rice": 35 + 132 + 277 + 277, "sheet_metal": 19 + 114 + 142 + 142, "vial": 41 + 140 + 276 + 276,
                "wallplugs": 33 + 150 + 232 + 232, "walnuts": 48 + 150 + 228 + 228}  # fmt: skip
WINNERS_DISK_GB = 110.0  # their whole pipeline, all 8 categories (their report)


def realistic_map(w: int, h: int, pitch: int = 38, seed: int = 0) -> np.ndarray:
    """(h,w) float16: patch scores `pitch` pixels apart upsampled, Gaussian sigma 4, a few blurred blobs."""
    rng = np.random.default_rng(seed)
    grid = rng.gamma(2.0, 0.05, size=(max(h // pitch, 2), max(w // pitch, 2))).astype(np.float32)
    m = cv2.resize(grid, (w, h), interpolation=cv2.INTER_LINEAR)
    blobs = np.zeros((h, w), np.float32)
    for _ in range(4):
        y, x = int(rng.integers(50, h - 50)), int(rng.integers(50, w - 50))
        blobs[y - 15 : y + 15, x - 25 : x + 25] = 0.6
    m = cv2.GaussianBlur(m + blobs, (0, 0), 4.0)
    return m.astype(np.float16)


def realistic_mask(w: int, h: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mask = np.zeros((h, w), bool)
    for _ in range(3):
        y, x = int(rng.integers(0, h - 60)), int(rng.integers(0, w - 60))
        mask[y : y + int(rng.integers(5, 60)), x : x + int(rng.integers(5, 60))] = True
    return mask


def _encode(m: np.ndarray, codec: str) -> bytes:
    if codec.startswith("zlib-"):
        return encode_tiff(m, zlib_level=int(codec.split("-")[1]))
    if codec == "none":
        return encode_tiff(m, zlib_level=0)
    buf = io.BytesIO()
    tifffile.imwrite(buf, m, compression=codec)
    return buf.getvalue()


def codec_rows(codecs: tuple[str, ...] = ("none", "zlib-1", "zlib-6", "lzma"), repeats: int = 2) -> list[dict]:
    """Size, write and read CPU time of 2448x2048 maps per codec (patch pitch 76 px: fabric/walnuts-like 1x1
    tiling, 38 px: 2x2 tiling), with a bit-exact read-back check."""
    rows = []
    for codec, pitch in ((c, p) for p in (76, 38) for c in codecs):
        m = realistic_map(2448, 2048, pitch)
        times = []
        for _ in range(repeats):
            t0 = time.process_time()
            data = _encode(m, codec)
            times.append(time.process_time() - t0)
        t0 = time.process_time()
        back = tifffile.imread(io.BytesIO(data))
        read_s = time.process_time() - t0
        exact = back.dtype == np.float16 and np.array_equal(back.view(np.uint16), m.view(np.uint16))
        rows.append({"codec": codec, "map": f"2448x2048, {pitch}-px patches", "mb": round(len(data) / 1e6, 2),
                     "ratio": round(m.nbytes / len(data), 2), "write_cpu_s": round(min(times), 3),
                     "read_cpu_s": round(read_s, 3), "tifffile_reads_exactly": exact})  # fmt: skip
    return rows


def category_rows(zlib_level: int = 1) -> list[dict]:
    """Map (+ mask) disk of one full run per category at native size, uncompressed vs `encode_tiff`'s default."""
    from hybridad.config import load_config

    rows, total_raw, total = [], 0.0, 0.0
    for cat, (w, h) in NATIVE_WH.items():
        level = load_config([f"data.category={cat}"]).data.tiling.test_level
        m = realistic_map(w, h, pitch=max(w // (level.cols * 32), 8), seed=len(cat))
        n = MAPS_PER_RUN[cat]
        raw = n * len(encode_tiff(m, zlib_level=0)) / 1e9
        packed = n * (len(encode_tiff(m, zlib_level=zlib_level)) + len(encode_mask_png(realistic_mask(w, h)))) / 1e9
        total_raw, total = total_raw + raw, total + packed
        rows.append({"category": cat, "maps": n, "native": f"{w}x{h}", "uncompressed_gb": round(raw, 2),
                     f"zlib{zlib_level}_maps_masks_gb": round(packed, 2)})  # fmt: skip
    rows.append({"category": "all 8", "maps": sum(MAPS_PER_RUN.values()), "native": "",
                 "uncompressed_gb": round(total_raw, 1), f"zlib{zlib_level}_maps_masks_gb": round(total, 1),
                 "winners_total_gb": WINNERS_DISK_GB})  # fmt: skip
    return rows


def run() -> list[dict]:
    return codec_rows() + category_rows()


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    from bench.table import markdown_table

    print(markdown_table(codec_rows()))
    print()
    print(markdown_table(category_rows()))


if __name__ == "__main__":
    main()
