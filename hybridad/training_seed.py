"""Seeds of the random draws made per training micro-batch (cut-paste pastes, CPR's pairs, references, noise).

One formula for every consumer, keyed by the micro-batch index rather than the optimiser step: with
`trainer.accumulate_grad_batches > 1` every micro-batch of an accumulation window draws its own pastes and pairs.
The index is Lightning's count of completed training batches (over all epochs), which holds this batch's index
from its transfer to the device until its step ends and is restored exactly on resume; the rank keeps DDP ranks
apart.
"""

from __future__ import annotations

from typing import Any


def micro_batch_seed(seed: int, micro_batch: int, rank: int) -> int:
    """Seed of one micro-batch's generator on one rank."""
    return ((seed * 1_000_003 + micro_batch) * 1009 + rank) % 2**62


def trainer_micro_batch(trainer: Any) -> int:
    """Index (over all epochs) of the training micro-batch a running Lightning `trainer` is processing."""
    return int(trainer.fit_loop.epoch_loop.batch_progress.total.completed)
