"""Tiny trees of every `data.format` layout, written by the tests (no dataset download).

Each writer returns the root and leaves images whose pixel (0, 0) encodes an index, masks with one square
defect (0/255), odd names (spaces, dots), upper-case suffixes (.PNG, .JPG, .BMP) and nested defect types.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np


def write_image(path: Path, h: int = 24, w: int = 32, value: int = 0, defect: bool = False,
                gray: bool = False) -> None:
    """A smooth image (a seeded gradient) with a bright square where `defect`; pixel (0,0) = `value`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:h, 0:w]
    base = (60 + 40 * np.sin(xx / 5.0) + 30 * np.cos(yy / 4.0)).astype(np.uint8)  # (H,W)
    img = base if gray else np.stack([base, base // 2 + 40, 255 - base], axis=2)
    if defect:
        img[h // 3 : h // 3 + 6, w // 3 : w // 3 + 6] = 250
    img[0, 0] = value
    assert cv2.imwrite(str(path), img), path


def write_mask(path: Path, h: int = 24, w: int = 32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((h, w), np.uint8)
    mask[h // 3 : h // 3 + 6, w // 3 : w // 3 + 6] = 255
    assert cv2.imwrite(str(path), mask), path


def mvtec_ad_tree(root: Path, category: str = "bottle") -> Path:
    """train/good: 4 (png, JPG, bmp); test/good: 1; test/scratch: 2; test/crack: 1 (.BMP); test/cut/deep: 1."""
    cat = root / category
    for i, name in enumerate(["000.png", "001.JPG", "002.bmp", "003.png"]):
        write_image(cat / "train/good" / name, value=i)
    write_image(cat / "test/good/000.png")
    for rel in ["scratch/000.png", "scratch/001.PNG", "crack/000.BMP", "cut/deep/odd name.v2.png"]:
        write_image(cat / "test" / rel, defect=True)
        stem = Path(rel).with_suffix("").as_posix()
        write_mask(cat / "ground_truth" / f"{stem}_mask.png")
    return root


def folder_tree(root: Path, category: str = "bracket", n_normal: int = 10, size: tuple[int, int] = (24, 32),
                gray: bool = False) -> Path:
    """normal: n images; normal_test: 2; abnormal: 1 at the top (type 'abnormal'), scratch: 2, scratch/deep: 1."""
    h, w = size
    cat = root / category
    for i in range(n_normal):
        write_image(cat / "normal" / f"part {i:02d}.v2.PNG", h, w, value=i, gray=gray)
    for i in range(2):
        write_image(cat / "normal_test" / f"ok_{i}.jpg", h, w, value=100 + i, gray=gray)
    write_image(cat / "abnormal" / "top.png", h, w, defect=True, gray=gray)
    write_mask(cat / "masks" / "top.png", h, w)
    write_image(cat / "abnormal/scratch/s1.PNG", h, w, defect=True, gray=gray)
    write_mask(cat / "masks/scratch/s1_mask.png", h, w)
    write_image(cat / "abnormal/scratch/s2.bmp", h, w, defect=True, gray=gray)
    write_mask(cat / "masks/s2.png", h, w)  # flat mask folder: paired by stem
    write_image(cat / "abnormal/scratch/deep/d1.png", h, w, defect=True, gray=gray)
    write_mask(cat / "masks/scratch/deep/d1.png", h, w)
    return root


VISA_HEADER = ["object", "split", "label", "image", "mask"]


def visa_tree(root: Path) -> Path:
    """candle: 4 normal train, 1 normal test, 2 anomalies (types from image_anno.csv); capsules: 1 row."""
    rows = []
    for i in range(4):
        rel = f"candle/Data/Images/Normal/{i:04d}.JPG"
        write_image(root / rel, value=i)
        rows.append(["candle", "train", "normal", rel, ""])
    write_image(root / "candle/Data/Images/Normal/0100.JPG", value=9)
    rows.append(["candle", "test", "normal", "candle/Data/Images/Normal/0100.JPG", ""])
    anno = [["image", "label", "mask"]]
    for i, kind in enumerate(["wax melded out of the candle", "spot"]):
        rel, mask = f"candle/Data/Images/Anomaly/{i:03d}.JPG", f"candle/Data/Masks/Anomaly/{i:03d}.png"
        write_image(root / rel, defect=True)
        write_mask(root / mask)
        rows.append(["candle", "test", "anomaly", rel, mask])
        anno.append([rel, kind, mask])
    write_image(root / "capsules/Data/Images/Normal/0000.JPG")
    rows.append(["capsules", "train", "normal", "capsules/Data/Images/Normal/0000.JPG", ""])
    _write_csv(root / "split_csv" / "1cls.csv", [VISA_HEADER, *rows])
    _write_csv(root / "candle" / "image_anno.csv", anno)
    return root


def _write_csv(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def realiad_tree(root: Path, category: str = "audiojack") -> Path:
    """3 OK train, 1 OK test, 2 NG test (AK, QS), the JSON as Real-IAD ships it (meta + train + test)."""
    base = root / "realiad_1024" / category
    train, test = [], []
    for i in range(3):
        rel = f"OK/S{i:04d}/{category}_{i:04d}_OK_C1_2023.jpg"
        write_image(base / rel, value=i)
        train.append({"category": "AK", "anomaly_class": "OK", "image_path": rel, "mask_path": None})
    rel = f"OK/S0010/{category}_0010_OK_C2_2023.jpg"
    write_image(base / rel)
    test.append({"category": "AK", "anomaly_class": "OK", "image_path": rel, "mask_path": None})
    for i, cls in enumerate(["AK", "QS"]):
        rel = f"NG/{cls}/S{20 + i:04d}/{category}_{20 + i:04d}_NG_{cls}_C1_2023.jpg"
        mask = rel.replace(".jpg", ".png")
        write_image(base / rel, defect=True)
        write_mask(base / mask)
        test.append({"category": "AK", "anomaly_class": cls, "image_path": rel, "mask_path": mask})
    index = root / "realiad_jsons" / "realiad_jsons" / f"{category}.json"
    index.parent.mkdir(parents=True, exist_ok=True)
    index.write_text(json.dumps({"meta": {"prefix": "", "normal_class": "OK"}, "train": train, "test": test}))
    return root
