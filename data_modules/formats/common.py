"""What every layout reader shares: where files are (`LayoutConfig`), what it returns (`Listing`), helpers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hybridad.errors import UserError
from hybridad.types import Sample, Split

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass
class LayoutConfig:
    """Where a layout's files are (`data.layout.<key>`); empty = the layout's release default."""

    index: str = ""  # visa: split CSV (split_csv/1cls.csv); realiad: JSON folder (realiad_jsons/realiad_jsons)
    images: str = ""  # realiad: the image folder below data.root (realiad_1024)
    normal: str = "normal"  # folder: normal training images, below <root>/<category>/
    abnormal: str = "abnormal"  # folder: defective test images (sub-folders = defect types)
    masks: str = "masks"  # folder: masks paired with abnormal images by stem (<stem>.png or <stem>_mask.png)
    normal_test: str = ""  # folder: optional normal test images


@dataclass
class Listing:
    """One category as a reader found it.

    Attributes:
        folder: the category's image folder (named in messages; keys the decoded-image cache).
        splits: samples per split, each list in a fixed sorted order.
        carved: validation samples taken out of train by `list_splits` (empty when the layout has its own).
        one_size: the layout's images share one size (MVTec AD 2): a differing image is an error, not a
            mixed-size set.
    """

    folder: Path
    splits: dict[Split, list[Sample]]
    carved: list[Sample] = field(default_factory=list)
    one_size: bool = False


def images_in(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files (any case of `IMAGE_SUFFIXES`) in `folder`, sorted; hidden files skipped."""
    walk = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in walk if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def require_dir(folder: Path, what: str, layout: str) -> Path:
    if not folder.is_dir():
        raise UserError(f"{what} folder {folder} does not exist ({layout}; see docs/own_data.md)")
    return folder


def safe_name(text: str) -> str:
    """A defect type or path as sample-id components: '/'-separated, no empty, '.' or '..' parts."""
    parts = [p.strip() for p in text.replace("\\", "/").split("/")]
    return "/".join(p if p not in ("", ".", "..") else "_" for p in parts) or "_"


def make_sample(category: str, split: Split, image: Path, mask: Path | None, defect_type: str, name: str,
                lighting: str = "") -> Sample:
    """A labelled sample: label 1 unless `defect_type` is 'good'; id `<split>/<good|bad>/<name>`."""
    label = 0 if defect_type == "good" else 1
    kind = "bad" if label else "good"
    return Sample(category, split, image, mask, label, lighting, f"{split.value}/{kind}/{safe_name(name)}",
                  defect_type)


def good_samples(category: str, split: Split, folder: Path) -> list[Sample]:
    """Every image below `folder` (sub-folders too) as a good sample named by its path relative to `folder`."""
    return [make_sample(category, split, p, None, "good", p.relative_to(folder).with_suffix("").as_posix())
            for p in images_in(folder, recursive=True)]


def mask_index(mask_dir: Path) -> dict[tuple[str, str], list[Path]]:
    """Every image file below `mask_dir` keyed by (relative folder, stem without a `_mask` suffix)."""
    index: dict[tuple[str, str], list[Path]] = {}
    if mask_dir.is_dir():
        for m in images_in(mask_dir, recursive=True):
            stem = m.stem[: -len("_mask")] if m.stem.endswith("_mask") else m.stem
            index.setdefault((m.parent.relative_to(mask_dir).as_posix(), stem), []).append(m)
    return index


def pair_mask(index: dict[tuple[str, str], list[Path]], rel_folder: str, image: Path, expected: Path,
              used: set[Path]) -> Path:
    """The mask of `image` from `mask_index`: same relative folder first, then the top of the mask folder.

    Raises:
        UserError: no mask (naming `expected`), or two candidate masks.
    """
    for key in ((rel_folder, image.stem), (".", image.stem)):
        found = index.get(key, [])
        if len(found) > 1:
            raise UserError(f"image {image} has {len(found)} masks ({', '.join(str(f) for f in found)}): "
                            "keep one")
        if found:
            used.add(found[0])
            return found[0]
    raise UserError(f"image {image} has no mask: expected {expected} (or <stem>.png beside it)")


def check_orphan_masks(index: dict[tuple[str, str], list[Path]], used: set[Path], where: str) -> None:
    """`UserError` for the first mask that no image claimed."""
    for paths in sorted(index.values()):
        for m in paths:
            if m not in used:
                raise UserError(f"mask {m} has no image: expected an image named {m.stem.removesuffix('_mask')}"
                                f".* in {where}")
