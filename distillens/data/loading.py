"""Training order: a sampler whose order depends on (seed, epoch) only, and a DataLoader that resumes mid-epoch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader


class EpochShuffleSampler(torch.utils.data.Sampler[int]):
    """A random order of the rows that depends on (seed, epoch) only.

    PyTorch's RandomSampler draws its order from the global random state, which a resumed run does not share with
    the interrupted one; this order is recomputed identically after a restart. Lightning calls `set_epoch` before
    every epoch, directly or through the DistributedSamplerWrapper it puts around this sampler under DDP.
    """

    def __init__(self, num_rows: int, seed: int) -> None:
        self.num_rows, self.seed, self.epoch = num_rows, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_rows

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_rows, generator=generator).tolist())  # (N,)


class ResumableDataLoader(DataLoader):
    """A DataLoader that continues an interrupted epoch at the exact next batch.

    Its state (`state_dict()`) is the epoch and the number of batches handed out in it. Lightning fetches batches
    one by one from a loader that has a length (it prefetches only when the length is unknown), so when a
    checkpoint is written that number is exactly the batches the training loop has taken. The first pass over the
    saved epoch after `load_state_dict` (or the `resume_at` argument) skips those batches: they are still read,
    which costs a few milliseconds each and works with any sampler Lightning substitutes (DDP, workers); another
    epoch is not skipped. Resume with the same batch size and number of devices.

    Args:
        resume_at: a `state_dict()` to resume from. An argument as well as `load_state_dict`, because Lightning
            rebuilds the loader from its arguments when it inserts a distributed sampler.
    """

    def __init__(
        self, dataset: Any, *args: Any, resume_at: dict[str, int] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(dataset, *args, **kwargs)
        self.resume_at = dict(resume_at) if resume_at else None
        self._position = {"epoch": 0, "batches": 0}

    def state_dict(self) -> dict[str, int]:
        return dict(self._position)

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.resume_at = dict(state_dict)

    def __iter__(self) -> Iterator[Any]:
        """Batches of the current epoch, minus those already trained on before a restart.

        A generator, so nothing happens before the first batch is asked for: Lightning creates the iterator before
        it restores the checkpoint and sets the sampler's epoch.
        """
        epoch = getattr(self.sampler, "epoch", 0)
        skip = self._batches_to_skip(epoch)
        self._position = {"epoch": epoch, "batches": 0}
        batches = super().__iter__()
        for batch in batches:
            self._position["batches"] += 1
            if self._position["batches"] > skip:
                yield batch

    def _batches_to_skip(self, epoch: int) -> int:
        """The saved position's batch count if it is this epoch's, once; 0 otherwise."""
        resume, self.resume_at = self.resume_at, None
        return resume["batches"] if resume is not None and resume["epoch"] == epoch else 0
