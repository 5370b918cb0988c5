"""Deterministic, resumable loading of random crops.

Which volume and which random crop a step sees is a function of (seed, step, global
position) only: the sampler yields ``(case index, sample seed)`` keys and the dataset
reseeds the MONAI pipeline with that seed before running it. So a resumed run sees
exactly the batches the uninterrupted run would have seen, whatever the number of
loader workers, and no RNG state has to be saved for the data.

A step's data are defined globally: ``world_size * batch_size`` positions, of which rank r
takes ``r * batch_size .. (r + 1) * batch_size - 1``. So the processes of a distributed run
together see exactly the batch that one process with ``world_size`` times the batch size
would see (rank 0's crops first), and one process (``world_size`` 1) sees what it always did.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from monai.data import list_data_collate
from torch.utils.data import DataLoader, Dataset, Sampler

from swinssl.data.discover import Case
from swinssl.data.transforms import Pipeline, case_item


def sample_seed(seed: int, step: int, rank: int, position: int) -> int:
    """A 31-bit seed for one sample, distinct across steps, ranks and positions."""
    rng = np.random.default_rng([seed, step, rank, position])
    return int(rng.integers(0, 2**31 - 1))


class StepSampler(Sampler):
    """Yields ``(case index, seed)`` for steps ``start_step`` onwards, ``per_step`` items per step: this
    rank's share of the step's ``world_size * per_step`` global positions.

    Cases are visited in one global permutation per pass over the data (global position
    ``step * world_size * per_step + position``), so each volume is seen once per pass by the
    processes together; the permutation of pass p depends only on (seed, p), and the sample seed
    of an item on (seed, step, global position).
    """

    def __init__(self, num_cases: int, per_step: int, seed: int, rank: int = 0, start_step: int = 0,
                 steps: int | None = None, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not one of world_size={world_size} processes: a distributed run "
                             f"must pass world_size (fabric.world_size) to crop_loader / StepSampler")
        self.num_cases, self.per_step, self.seed, self.rank = num_cases, per_step, seed, rank
        self.start_step, self.steps, self.world_size = start_step, steps, world_size

    def _case(self, index: int) -> int:
        epoch, offset = divmod(index, self.num_cases)
        # The 0 once was the rank (one permutation per rank): kept, so single-process runs keep their data.
        order = np.random.default_rng([self.seed, 0, epoch, 7]).permutation(self.num_cases)
        return int(order[offset])

    def __iter__(self) -> Iterator[tuple[int, int]]:
        step, global_per_step = self.start_step, self.world_size * self.per_step
        while self.steps is None or step < self.steps:
            for position in range(self.rank * self.per_step, (self.rank + 1) * self.per_step):
                yield self._case(step * global_per_step + position), sample_seed(self.seed, step, 0, position)
            step += 1

    def __len__(self) -> int:
        if self.steps is None:
            raise TypeError("an endless sampler has no length")
        return (self.steps - self.start_step) * self.per_step


class SeededDataset(Dataset):
    """Runs ``pipeline`` on case ``index`` with the pipeline's random state set from the key's seed."""

    def __init__(self, cases: Sequence[Case], pipeline: Pipeline):
        self.items = [case_item(c) for c in cases]
        self.pipeline = pipeline

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        self.pipeline.set_random_state(seed=seed)
        return self.pipeline(dict(self.items[index]))


def crop_loader(cases: Sequence[Case], pipeline: Pipeline, batch_size: int, seed: int, rank: int = 0,
                start_step: int = 0, steps: int | None = None, num_workers: int = 0,
                world_size: int = 1) -> DataLoader:
    """Batches of ``batch_size`` volumes (each giving the pipeline's crops), one batch per step: rank
    ``rank``'s share of the step's ``world_size * batch_size`` volumes (see the module docstring)."""
    sampler = StepSampler(len(cases), batch_size, seed, rank, start_step, steps, world_size)
    return DataLoader(
        SeededDataset(cases, pipeline),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=list_data_collate,  # flattens each volume's list of crops into the batch
        persistent_workers=num_workers > 0,
        prefetch_factor=2 if num_workers > 0 else None,
    )


def split_cases(cases: list[Case], val_fraction: float, seed: int) -> tuple[list[Case], list[Case]]:
    """Held-out volumes for the validation loss: a seeded subset, at least one when asked and possible."""
    if val_fraction <= 0 or len(cases) < 2:
        return cases, []
    n_val = min(len(cases) - 1, max(1, round(len(cases) * val_fraction)))
    order = np.random.default_rng([seed, 11]).permutation(len(cases))
    val = set(order[:n_val].tolist())
    return [c for i, c in enumerate(cases) if i not in val], [c for i, c in enumerate(cases) if i in val]


def common_modality(cases: Sequence[Case]) -> str | None:
    """The one modality of ``cases``, or None (mixed or none)."""
    found = {c.modality for c in cases}
    return found.pop() if len(found) == 1 else None


def cache_root(cfg) -> Path | None:
    """The preprocessing cache folder of a config (``data.cache``): None when ``off``."""
    if cfg.data.cache in ("off", ""):
        return None
    return Path(cfg.train.out) / "cache" if cfg.data.cache == "auto" else Path(cfg.data.cache)


def images_of(batch: dict) -> torch.Tensor:
    """The image tensor of a collated batch, as a plain tensor (no MetaTensor bookkeeping in the model)."""
    image = batch["image"]
    return image.as_tensor() if hasattr(image, "as_tensor") else image


def labels_of(batch: dict) -> torch.Tensor:
    """The label tensor (B, 1, ...) of a collated batch, as a plain tensor."""
    label = batch["label"]
    return label.as_tensor() if hasattr(label, "as_tensor") else label
