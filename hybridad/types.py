"""The few data types every part of hybridad shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from torch import Tensor

CATEGORIES: tuple[str, ...] = (
    "can",
    "fabric",
    "fruit_jelly",
    "rice",
    "sheet_metal",
    "vial",
    "wallplugs",
    "walnuts",
)
GRAY_CATEGORIES: frozenset[str] = frozenset({"sheet_metal", "vial", "wallplugs"})


class Split(str, Enum):
    """The five MVTec AD 2 splits (value = folder name)."""

    TRAIN = "train"
    VALIDATION = "validation"
    TEST_PUBLIC = "test_public"
    TEST_PRIVATE = "test_private"
    TEST_PRIVATE_MIXED = "test_private_mixed"


PRIVATE_SPLITS: tuple[Split, ...] = (Split.TEST_PRIVATE, Split.TEST_PRIVATE_MIXED)
NO_SPLIT = ""  # `Batch.split` of an image outside every dataset split (new images given to `predict`)


@dataclass(frozen=True)
class Sample:
    """One image of the dataset on disk.

    `sample_id` keeps split and good/bad, since the same stem exists in `good/` and `bad/`:
    `"test_public/bad/000_regular"`, `"train/good/012_regular"`, `"test_private/000_regular"`; other layouts
    add the defect type: `"test_public/bad/scratch/000"` (`data_modules.formats`).
    """

    category: str
    split: Split
    image_path: Path
    mask_path: Path | None
    label: int  # 0 good, 1 bad, -1 unknown (private splits)
    lighting: str  # "regular", "overexposed", "underexposed", "shift_1", ..., "mixed"; "" outside MVTec AD 2
    sample_id: str
    defect_type: str = ""  # "good", or the layout's defect type ("bad" in MVTec AD 2); "" where unknown

    @property
    def stem(self) -> str:
        return self.image_path.stem

    @property
    def is_gray(self) -> bool:
        return self.category in GRAY_CATEGORIES


@dataclass
class TileLayout:
    """How tiles were cut from a batch of equal-sized images, so their maps can be put back.

    Tiles are ordered image-major: tile `i` belongs to image `i // len(boxes)` and box `i % len(boxes)`.
    Boxes are `(y0, x0, y1, x1)` in native pixels (end exclusive).
    """

    image_size: tuple[int, int]  # (H, W) native
    boxes: list[tuple[int, int, int, int]]
    num_images: int


@dataclass
class Batch:
    """What the DataLoader yields and the DataModule's device hook rewrites.

    As collated: eval `image` (B,3,H,W) uint8 at native size, `mask` (B,1,H,W) float {0,1} or None;
      train `image` a list of B tile crops, (3,h_i,w_i) uint8 at native size (box `tile_box[i]` cut out and
      augmented on the CPU; crops of different pyramid levels differ in size; (1,h_i,w_i) for gray categories
      without CPU augmentation), `mask` None.
    After `on_after_batch_transfer`:
      train: `image` (N,3,S,S) float [0,1] tiles (N = tiles per step), `mask` (N,1,S,S) cut-paste masks
             (zeros where nothing was pasted), `label` (N,) 1 where a tile got a pseudo-anomaly.
      eval:  `image`/`mask` unchanged (native), `tiles` (N,3,S,S) float [0,1], `layout` set.
    """

    image: Tensor | list[Tensor]
    label: Tensor  # (B,) long
    sample_id: list[str]
    lighting: list[str]
    mask: Tensor | None = None
    tiles: Tensor | None = None
    layout: TileLayout | None = None
    tile_box: Tensor | None = None  # train only: (B,4) long (y0, x0, y1, x1) of the tile each item stands for
    defect_type: list[str] | None = None  # per item: "good", the defect type, or "" where unknown
    split: list[str] = field(kw_only=True)  # per item: the `Split` value, NO_SPLIT for new images (predict)

    def __post_init__(self) -> None:
        if len(self.split) != len(self.sample_id):
            raise ValueError(f"Batch: {len(self.split)} splits for {len(self.sample_id)} sample ids")

    def __len__(self) -> int:
        return len(self.sample_id)

    def pin_memory(self) -> Batch:
        """Page-locked copy of every tensor (the DataLoader calls this with `pin_memory=True`)."""
        from dataclasses import replace

        def pin(x: object) -> object:
            if isinstance(x, list):
                return [pin(v) for v in x]
            return x.pin_memory() if hasattr(x, "pin_memory") else x

        fields = ("image", "label", "mask", "tiles", "tile_box")
        return replace(self, **{k: pin(getattr(self, k)) for k in fields})


class AnomalyOutput(NamedTuple):
    """What both branches return in eval mode, at native resolution."""

    anomaly_map: Tensor  # (B,1,H,W) float32, raw scores (higher = more anomalous)
    image_score: Tensor  # (B,)
    pred_mask: Tensor | None = None  # (B,1,H,W) bool, after threshold + post-processing (None before a threshold)
