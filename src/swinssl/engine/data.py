"""Deterministic, resumable loading of random crops.

Which volume and which random crop a step sees is a function of (seed, step, global
position) only: the sampler yields ``(case index, sample seed)`` keys and the dataset
reseeds the MONAI pipeline with that seed before running it. So a resumed run sees
exactly the batches the uninterrupted run would have seen, whatever the number of
loader workers, and no RNG state has to be saved for the data.

Pre-training skips a bad volume (``skip_bad``): the slot takes the first readable volume of a
permutation drawn from the slot's own seed, so which volume replaces it depends only on the seed
and on which volumes are bad, not on which worker met it first or on what a resume already knew.

A step's data are defined globally: ``world_size * batch_size`` positions, of which rank r
takes ``r * batch_size .. (r + 1) * batch_size - 1``. So the processes of a distributed run
together see exactly the batch that one process with ``world_size`` times the batch size
would see (rank 0's crops first), and one process (``world_size`` 1) sees what it always did.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from monai.data import list_data_collate
from torch.utils.data import DataLoader, Dataset, Sampler

from swinssl.data.cache import cache_root  # noqa: F401  (the engine's stages read it here)
from swinssl.data.discover import Case
from swinssl.data.transforms import Pipeline, case_item, volume_file
from swinssl.errors import DataError


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
        self._epoch, self._order = -1, np.empty(0, np.int64)

    def _case(self, index: int) -> int:
        epoch, offset = divmod(index, self.num_cases)
        if self._epoch != epoch:  # one permutation held at a time: 8 bytes per volume
            # The 0 once was the rank (one permutation per rank): kept, so single-process runs keep their data.
            self._order = np.random.default_rng([self.seed, 0, epoch, 7]).permutation(self.num_cases)
            self._epoch = epoch
        return int(self._order[offset])

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
    """Runs ``pipeline`` on case ``index`` with the pipeline's random state set from the key's seed.

    ``skip_bad``: a volume that raises ``DataError`` is replaced (module docstring) and the item is
    ``(output, [(file, message) of each bad volume met])``; ``known_bad``: files known to be bad
    (a resumed run's skipped list), replaced without being read.
    """

    def __init__(self, cases: Sequence[Case], pipeline: Pipeline, skip_bad: bool = False,
                 known_bad: Iterable[str] = ()):
        self.items = [case_item(c) for c in cases]
        self.pipeline, self.skip_bad = pipeline, skip_bad
        known = set(known_bad)
        self.bad = {i for i, item in enumerate(self.items) if volume_file(item) in known}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        if not self.skip_bad:
            return self._run(index, seed)
        met: list[tuple[str, str]] = []
        for candidate in self._candidates(index, seed):
            if candidate in self.bad:
                continue
            try:
                return self._run(candidate, seed), met
            except DataError as err:
                self.bad.add(candidate)
                met.append((volume_file(self.items[candidate]), str(err)))
        first = met[0][1] if met else f"{volume_file(self.items[index])}: listed as bad"
        raise DataError(f"{first} (every one of the {len(self.items)} volumes is bad)")

    def _run(self, index: int, seed: int) -> Any:
        self.pipeline.set_random_state(seed=seed)
        return self.pipeline(dict(self.items[index]))

    def _candidates(self, index: int, seed: int) -> Iterator[int]:
        yield index
        yield from np.random.default_rng([seed, 17]).permutation(len(self.items)).tolist()


def _collate_skipping(items: list[tuple[Any, list]]) -> dict:
    """``list_data_collate`` of a skipping dataset's outputs, with the bad volumes met on the way in
    ``bad_volumes``."""
    batch = list_data_collate([output for output, _ in items])
    batch["bad_volumes"] = [entry for _, met in items for entry in met]
    return batch


def crop_loader(cases: Sequence[Case], pipeline: Pipeline, batch_size: int, seed: int, rank: int = 0,
                start_step: int = 0, steps: int | None = None, num_workers: int = 0,
                world_size: int = 1, skip_bad: bool = False, known_bad: Iterable[str] = ()) -> DataLoader:
    """Batches of ``batch_size`` volumes (each giving the pipeline's crops), one batch per step: rank
    ``rank``'s share of the step's ``world_size * batch_size`` volumes (see the module docstring).
    ``skip_bad``: bad volumes are replaced and listed in each batch's ``bad_volumes``."""
    sampler = StepSampler(len(cases), batch_size, seed, rank, start_step, steps, world_size)
    return DataLoader(
        SeededDataset(cases, pipeline, skip_bad, known_bad),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        # flattens each volume's list of crops into the batch
        collate_fn=_collate_skipping if skip_bad else list_data_collate,
        persistent_workers=num_workers > 0,
        prefetch_factor=2 if num_workers > 0 else None,
    )


class BadVolumes:
    """The volumes a pre-training skipped: each warned about once and listed in the run folder
    (``RunDir.skipped``, kept by a resume); a ``DataError`` when more than ``max_fraction`` of the
    ``total`` training volumes are bad."""

    def __init__(self, run, total: int, max_fraction: float, warn: Callable[[str], None]):
        self.run, self.total, self.max_fraction, self.warn = run, total, max_fraction, warn
        self.skipped = run.read_skipped()

    @property
    def known(self) -> set[str]:
        return set(self.skipped)

    def prepared(self, found: dict[str, str], rank_zero: bool = True) -> None:
        """Volumes ``swinssl data prepare`` recorded as bad (``data.cache.prepared_bad``): listed with the
        others and never read; said in one line, by the first process only."""
        new = {file: reason for file, reason in found.items() if file not in self.skipped}
        if not new:
            return
        for file, reason in new.items():
            self.skipped[file] = reason
            if rank_zero:
                self.run.add_skipped(file, reason)
        if rank_zero:
            self.warn(f"skipping {len(new)} volume(s) that swinssl data prepare found bad, listed with the reason "
                      f"in {self.run.skipped}: " + ", ".join(Path(f).name for f in list(new)[:5])
                      + (", ..." if len(new) > 5 else ""))
        if len(self.skipped) > self.max_fraction * self.total:
            raise DataError(f"{len(self.skipped)} of {self.total} volumes bad, more than data.max_bad_fraction="
                            f"{self.max_fraction:g} (swinssl data prepare listed them in its report; the run's "
                            f"list is in {self.run.skipped})")

    def met(self, entries: Iterable[tuple[str, str]]) -> None:
        for file, message in entries:
            if file in self.skipped:
                continue
            self.skipped[file] = message
            self.run.add_skipped(file, message)
            if len(self.skipped) > self.max_fraction * self.total:
                raise DataError(f"{message} ({len(self.skipped)} of {self.total} volumes bad, more than "
                                f"data.max_bad_fraction={self.max_fraction:g}; the list is in {self.run.skipped})")
            self.warn(f"warning: {message}; skipped, another volume takes its place "
                      f"({len(self.skipped)} of {self.total} bad so far, listed in {self.run.skipped})")


def common_modality(cases: Sequence[Case]) -> str | None:
    """The one modality of ``cases``, or None (mixed or none)."""
    found = {c.modality for c in cases}
    return found.pop() if len(found) == 1 else None


def checksum_memo(cfg) -> Path:
    """The folder remembering data files' checksums (``swinssl.data.checksums``): the cache's, also
    when ``data.cache`` is off (then only checksums are kept there)."""
    return (cache_root(cfg) or Path(cfg.train.out) / "cache") / "checksums"


def images_of(batch: dict) -> torch.Tensor:
    """The image tensor of a collated batch, as a plain tensor (no MetaTensor bookkeeping in the model)."""
    image = batch["image"]
    return image.as_tensor() if hasattr(image, "as_tensor") else image


def labels_of(batch: dict) -> torch.Tensor:
    """The label tensor (B, 1, ...) of a collated batch, as a plain tensor."""
    label = batch["label"]
    return label.as_tensor() if hasattr(label, "as_tensor") else label
