"""Per-epoch randomness that depends only on (seed, epoch, rank), not on what ran before.

An interrupted run resumed at epoch k must see the same sample order and the same
augmentations in epoch k as an uninterrupted run. A DataLoader's own shuffling draws from
one generator epoch after epoch (a resumed run would replay epoch 0's order), and
augmentation seeded once per worker continues one stream over all epochs (persistent
workers). Here instead:

* :class:`EpochSampler` shuffles with ``seed + epoch`` (torch's DistributedSampler scheme,
  rank r taking every W-th index) and tells the dataset which epoch each index is for;
* the dataset re-seeds its albumentations ``Compose`` per sample from
  (seed, epoch, index) with :func:`sample_seed`, whichever worker process loads it, so the
  result is also independent of the number of workers.
"""

from __future__ import annotations

from typing import Iterator, Sized

import numpy as np
from torch.utils.data import DistributedSampler


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed for one sample's augmentation in one epoch (well mixed, not seed + epoch)."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index]).generate_state(1)[0])


class EpochSampler(DistributedSampler):
    """Shuffled indices for ``rank`` of ``world``, yielded as ``(epoch, index)`` pairs.

    Call :meth:`set_epoch` before each epoch (the classifier does, through
    ``distributed.set_epoch``). Works without a process group: ``rank`` and ``world`` are
    given explicitly (0 and 1 in a single process). Like DistributedSampler, shards are
    padded to equal length by repeating samples so every rank takes the same number of steps.
    """

    def __init__(self, dataset: Sized, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True) -> None:
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        epoch = self.epoch
        return ((epoch, index) for index in super().__iter__())
