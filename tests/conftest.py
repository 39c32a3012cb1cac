"""Shared test configuration: offline environment, the `gpu` skip, session-scoped synthetic trees."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Test configuration, not library behaviour: keep every test offline and quiet.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

SMALL_CATEGORIES: tuple[str, ...] = ("can", "vial", "sheet_metal")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked `gpu` when no CUDA device is present."""
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch  # lazy: collection of CPU-only runs should not pay for it

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def cache_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Decoded-image caches (`data.cache_dir=""`) go to a session temp folder, never ~/.cache/hybridad:
    `HYBRIDAD_CACHE_DIR` is the first place `data_modules.cache.default_cache_root` looks (subprocesses
    inherit it)."""
    before = os.environ.get("HYBRIDAD_CACHE_DIR")
    folder = tmp_path_factory.mktemp("hybridad_cache")
    os.environ["HYBRIDAD_CACHE_DIR"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("HYBRIDAD_CACHE_DIR", None)
    else:
        os.environ["HYBRIDAD_CACHE_DIR"] = before


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic tree: can, vial and sheet_metal, long side 96 px, small counts, seed 0."""
    from data_modules.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("mvtec_ad2_small")
    write_synthetic_dataset(root, SMALL_CATEGORIES, counts="small", seed=0, long_side=96, verbose=False)
    return root


@pytest.fixture(scope="session")
def synthetic_root_all(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All 8 categories, long side 64 px, small counts, seed 0."""
    from data_modules.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("mvtec_ad2_all")
    write_synthetic_dataset(root, counts="small", seed=0, long_side=64, verbose=False)
    return root


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny tensors: torch intra-op threads only add overhead (and stall on a shared CPU)."""
    import torch  # lazy, as above

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
