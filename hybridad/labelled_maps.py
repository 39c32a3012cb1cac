"""The one reader of a run's labelled test maps: each test_public sample with its cached map and ground truth.

`evaluate` (re-scoring), the threshold-rule comparison (`score_candidates`) and the report all read the maps a
run cached (`<run>/maps/test_public/...`, float16 values) beside the masks of the run's dataset, listed in the
run's layout (`data.format`). They read them through `labelled_test_maps`, one image at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from hybridad.errors import UserError
from hybridad.run_dir import RunDir
from hybridad.types import Sample, Split

if TYPE_CHECKING:
    from data_modules.datamodule import DataConfig


@dataclass
class LabelledMap:
    """One labelled test image: its sample, its cached map and its ground truth at the map's size."""

    sample: Sample
    anomaly_map: Tensor  # (1,1,H,W) float32, the cached float16 values (already smoothed by the run)
    mask: Tensor  # (1,1,H,W) bool ground truth; all False for good images


def ground_truth(sample: Sample, shape: tuple[int, int]) -> np.ndarray:
    """(H,W) bool ground truth of `sample` at `shape`; all-normal for good images."""
    from data_modules.listing import read_mask

    if sample.mask_path is None:
        return np.zeros(shape, dtype=bool)
    return np.asarray(read_mask(sample.mask_path, sample.image_path, shape) > 0)


def load_cached_map(run: RunDir, sample_id: str) -> Tensor:
    """(1,1,H,W) float32 cached map of `sample_id`; `UserError` when the run has none."""
    path = run.map_path(sample_id)
    if not path.is_file():
        raise UserError(f"{path} missing: the run has no cached map for {sample_id} (re-run `hybridad train`)")
    return torch.from_numpy(run.read_map(sample_id))[None, None]


def labelled_samples(data: DataConfig, run: RunDir, require_all: bool = True) -> list[Sample]:
    """The test_public samples of `data`'s layout; with `require_all=False` only those the run has maps of
    (a run that limited its test batches)."""
    from data_modules.formats import list_split

    samples = list_split(data, Split.TEST_PUBLIC)
    if require_all:
        return samples
    return [s for s in samples if run.map_path(s.sample_id).is_file()]


def labelled_test_maps(run: RunDir, data: DataConfig, desc: str | None = None, require_all: bool = True,
                       samples: list[Sample] | None = None) -> Iterator[LabelledMap]:
    """Every test_public sample of `data` with its cached map and ground truth, one at a time.

    Args:
        run: the run whose cached maps to read.
        data: the dataset (root, category, layout) whose ground truth scores them; usually the run's own.
        desc: a progress bar with this label (None: no bar).
        require_all: a sample without a cached map is an error (`UserError`); False skips it.
        samples: these samples instead of listing `data` (e.g. the list `labelled_samples` returned).
    """
    listed = samples if samples is not None else labelled_samples(data, run, require_all)
    if desc is not None:
        from tqdm import tqdm

        listed = tqdm(listed, desc=desc, leave=False)
    for s in listed:
        if not require_all and not run.map_path(s.sample_id).is_file():
            continue
        amap = load_cached_map(run, s.sample_id)
        yield LabelledMap(s, amap, torch.from_numpy(ground_truth(s, tuple(amap.shape[-2:])))[None, None])
