"""Data loaders whose order depends only on (seed, epoch), so that a resumed run sees the same batches, sharded
over the ranks of a data-parallel run so that their batches together are the single-process batch."""
from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

__all__ = ["EpochSampler", "create_loader", "set_loader_epoch", "seeded_subset"]


def _epoch_seed(seed: int, epoch: int) -> int:
    # A fixed mix of seed and epoch; any collision-free function would do.
    return (seed * 1_000_003 + epoch * 7_919 + 12_345) % (2**63)


class EpochSampler(DistributedSampler):
    """Shuffles with a permutation drawn from ``(seed, epoch)``, optionally starting part-way in, and shards it.

    A :class:`~torch.utils.data.DistributedSampler` whose order is the same for every world size: the epoch's
    permutation of all samples is cut into consecutive global batches, and rank ``r`` of ``num_replicas`` takes
    positions ``r, r + W, r + 2W, ...``, so the ranks' ``i``-th batches together hold exactly the samples of
    the ``i``-th batch of a single-process run with the same (global) batch size.

    ``set_epoch(epoch, start=n)`` skips the first ``n`` samples of that epoch's global order (a multiple of
    the global batch): that is how a run stopped mid-epoch resumes on the very next batch, on any number of
    ranks, without loading the ones it already trained on. ``drop_last`` drops the tail that does not divide
    among the ranks (training); otherwise no sample is repeated and the last ranks get one fewer (evaluation;
    reduce the counts). ``limit`` keeps only the first ``limit`` samples of the order.
    """

    def __init__(self, length: int, *, seed: int = 0, shuffle: bool = True, num_replicas: int = 1, rank: int = 0,
                 drop_last: bool = False, limit: Optional[int] = None) -> None:
        super().__init__(range(length), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.length = length
        self.limit = limit
        self.start = 0

    def set_epoch(self, epoch: int, *, start: int = 0) -> None:
        self.epoch = epoch
        self.start = start

    def _total(self) -> int:
        total = self.length if self.limit is None else min(self.limit, self.length)
        total -= self.start
        if self.drop_last:
            total -= total % self.num_replicas
        return max(total, 0)

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        order = order[:self.limit] if self.limit is not None else order
        order = order[self.start:self.start + self._total()]
        return iter(order[self.rank::self.num_replicas])

    def __len__(self) -> int:
        total = self._total()
        return total // self.num_replicas + (1 if self.rank < total % self.num_replicas else 0)


def create_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    is_training: bool,
    seed: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
    drop_last: Optional[bool] = None,
    num_replicas: int = 1,
    rank: int = 0,
    limit: Optional[int] = None,
) -> DataLoader:
    """A DataLoader over an :class:`EpochSampler`. Training drops the last partial batch by default
    (a batch of one breaks BatchNorm); evaluation keeps every sample, in order.

    ``batch_size`` is the global batch; with ``num_replicas`` ranks each loader yields ``batch_size //
    num_replicas`` samples of it (it must divide). ``limit`` keeps the first ``limit`` samples only.
    """
    if batch_size % num_replicas:
        raise ValueError(f"batch size {batch_size} does not divide among {num_replicas} ranks; use a multiple of "
                         f"{num_replicas} (it is the global batch, split evenly over the ranks)")
    if drop_last is None:
        drop_last = is_training and len(dataset) > batch_size
    sampler = EpochSampler(len(dataset), seed=seed, shuffle=is_training, num_replicas=num_replicas, rank=rank,
                           drop_last=drop_last, limit=limit)
    # The generator only feeds the workers' base seed; the engine reseeds it per epoch (and per rank).
    generator = torch.Generator().manual_seed(_epoch_seed(seed, -1) + _rank_offset(rank))
    return DataLoader(
        dataset,
        batch_size=batch_size // num_replicas,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        generator=generator,
        persistent_workers=False,  # fresh workers per epoch keep worker RNG a function of (seed, epoch)
    )


def _rank_offset(rank: int) -> int:
    # Rank 0 keeps the stream of a single-process run; the others get streams of their own.
    return rank * 104_729


def set_loader_epoch(loader: DataLoader, epoch: int, *, start_batch: int = 0) -> None:
    """Position ``loader`` at ``epoch``, skipping ``start_batch`` (global) batches (for a mid-epoch resume)."""
    sampler = loader.sampler
    sampler.set_epoch(epoch, start=start_batch * loader.batch_size * sampler.num_replicas)
    loader.generator.manual_seed(_epoch_seed(sampler.seed, epoch) + _rank_offset(sampler.rank))


def seeded_subset(dataset: Dataset, size: Optional[int], *, seed: int = 0) -> Dataset:
    """A fixed random subset of ``size`` samples (the whole data set when ``size`` is None or too large)."""
    if size is None or size >= len(dataset):
        return dataset
    g = torch.Generator().manual_seed(_epoch_seed(seed, -2))
    indices = torch.randperm(len(dataset), generator=g)[:size].sort().values.tolist()
    return Subset(dataset, indices)
