"""Resumable training order: which items each rank sees, as a pure function of (seed, epoch, rank).

`EpochSampler` draws a permutation of the training items from `seed + epoch` (as `DistributedSampler` does),
pads it to a multiple of the world size and gives rank r the items r, r + world, ...; it yields
`epoch * len(dataset) + index`, so the dataset can seed each item's augmentation from (seed, epoch, index)
(see `decode_item_index`): the same item gets the same augmentation whatever the number of loader workers and
whether or not the run was interrupted.

`ResumableLoader` is a `DataLoader` with Lightning's `state_dict`/`load_state_dict` protocol: the state is the
epoch and the number of batches the training loop has started in it, so a run resumed from a mid-epoch
checkpoint skips exactly those batches and continues the same epoch's order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def decode_item_index(index: int, size: int) -> tuple[int, int]:
    """`EpochSampler` index -> (epoch, item index); plain indices below `size` are epoch 0."""
    return divmod(index, size)


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed for one item's augmentation in one epoch."""
    return ((seed * 1_000_003 + epoch) * 1_000_033 + index) % 2**32


class EpochSampler(DistributedSampler):
    """Shuffled training order from (seed, epoch), sharded over ranks, with a one-shot skip for resuming.

    Args:
        dataset: the training dataset (only its length is used).
        seed: seed of the permutations.
        num_replicas: number of ranks (world size).
        rank: this process's global rank.
    """

    def __init__(self, dataset: Dataset, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=False)
        self._skip: tuple[int, int] | None = None  # (epoch, items) to skip once

    def skip_once(self, epoch: int, items: int) -> None:
        """The next iteration over `epoch` starts after this rank's first `items` items."""
        self._skip = (epoch, items)

    def __iter__(self) -> Iterator[int]:
        epoch, size = self.epoch, len(self.dataset)  # type: ignore[arg-type]
        g = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(size, generator=g).tolist()
        order += order[: self.total_size - size]  # pad so every rank gets num_samples items
        mine = order[self.rank : self.total_size : self.num_replicas]
        start = 0
        if self._skip is not None and self._skip[0] == epoch:
            start, self._skip = self._skip[1], None
        for index in mine[start:]:
            yield epoch * size + index


class ResumableLoader(DataLoader):
    """A training `DataLoader` over an `EpochSampler` whose position survives a checkpoint.

    Args:
        started_batches: returns how many batches of the current epoch the training loop has started
            (Lightning's `fit_loop.epoch_loop.batch_progress.current.ready`).
        *args, **kwargs: as `DataLoader`; `sampler` must be an `EpochSampler` and `drop_last` True.
    """

    def __init__(self, *args: Any, started_batches: Callable[[], int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        assert isinstance(self.sampler, EpochSampler) and self.drop_last and self.batch_size is not None
        self.started_batches = started_batches

    def state_dict(self) -> dict[str, int]:
        sampler = self.sampler
        assert isinstance(sampler, EpochSampler)
        return {"epoch": int(sampler.epoch), "batches": int(self.started_batches())}

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler = self.sampler
        assert isinstance(sampler, EpochSampler) and self.batch_size is not None
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches >= len(self):  # the epoch had ended: the next one starts from its beginning
            sampler.set_epoch(epoch + 1)
            return
        sampler.set_epoch(epoch)
        sampler.skip_once(epoch, batches * self.batch_size)
