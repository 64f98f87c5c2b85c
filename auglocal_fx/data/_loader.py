"""Data loaders whose order depends only on (seed, epoch), so that a resumed run sees the same batches."""
from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

__all__ = ["EpochSampler", "create_loader", "set_loader_epoch", "seeded_subset"]


def _epoch_seed(seed: int, epoch: int) -> int:
    # A fixed mix of seed and epoch; any collision-free function would do.
    return (seed * 1_000_003 + epoch * 7_919 + 12_345) % (2**63)


class EpochSampler(Sampler[int]):
    """Shuffles with a permutation drawn from ``(seed, epoch)``, optionally starting part-way in.

    ``set_epoch(epoch, start=n)`` skips the first ``n`` samples of that epoch's order: that is how a run
    stopped mid-epoch resumes on the very next batch without loading the ones it already trained on.
    """

    def __init__(self, length: int, *, seed: int = 0, shuffle: bool = True) -> None:
        self.length = length
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, *, start: int = 0) -> None:
        self.epoch = epoch
        self.start = start

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        return iter(order[self.start:])

    def __len__(self) -> int:
        return self.length - self.start


def create_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    is_training: bool,
    seed: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
    drop_last: Optional[bool] = None,
) -> DataLoader:
    """A DataLoader over an :class:`EpochSampler`. Training drops the last partial batch by default
    (a batch of one breaks BatchNorm); evaluation keeps every sample, in order."""
    sampler = EpochSampler(len(dataset), seed=seed, shuffle=is_training)
    if drop_last is None:
        drop_last = is_training and len(dataset) > batch_size
    # The generator only feeds the workers' base seed; the engine reseeds it per epoch.
    generator = torch.Generator().manual_seed(_epoch_seed(seed, -1))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        generator=generator,
        persistent_workers=False,  # fresh workers per epoch keep worker RNG a function of (seed, epoch)
    )


def set_loader_epoch(loader: DataLoader, epoch: int, *, start_batch: int = 0) -> None:
    """Position ``loader`` at ``epoch``, skipping ``start_batch`` batches (for a mid-epoch resume)."""
    loader.sampler.set_epoch(epoch, start=start_batch * loader.batch_size)
    loader.generator.manual_seed(_epoch_seed(loader.sampler.seed, epoch))


def seeded_subset(dataset: Dataset, size: Optional[int], *, seed: int = 0) -> Dataset:
    """A fixed random subset of ``size`` samples (the whole data set when ``size`` is None or too large)."""
    if size is None or size >= len(dataset):
        return dataset
    g = torch.Generator().manual_seed(_epoch_seed(seed, -2))
    indices = torch.randperm(len(dataset), generator=g)[:size].sort().values.tolist()
    return Subset(dataset, indices)
