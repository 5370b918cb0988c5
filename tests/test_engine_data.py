"""The step sampler: a step's data are defined globally, so ranks of a distributed run split one batch."""

import numpy as np
import pytest

from swinssl.engine.data import StepSampler, sample_seed


def old_single_process_keys(num_cases, per_step, seed, start_step, steps):
    """The sampler's keys for rank 0 before ``world_size`` existed (hard copy of the old formula:
    permutation per pass from [seed, rank, pass, 7], sample seed from (seed, step, rank, position))."""
    keys = []
    for step in range(start_step, steps):
        for position in range(per_step):
            epoch, offset = divmod(step * per_step + position, num_cases)
            order = np.random.default_rng([seed, 0, epoch, 7]).permutation(num_cases)
            rng = np.random.default_rng([seed, step, 0, position])
            keys.append((int(order[offset]), int(rng.integers(0, 2**31 - 1))))
    return keys


# The first keys of StepSampler(5, 2, 42, steps=4) as the old sampler gave them (seeded runs and resumes rely on them).
OLD_KEYS = [(3, 191664963), (0, 160274382), (4, 1370068125), (2, 648912903), (1, 476981972), (0, 371886377),
            (4, 1661759922), (2, 1058463022)]


def test_single_process_keys_are_unchanged():
    assert list(StepSampler(5, 2, 42, steps=4)) == OLD_KEYS
    assert list(StepSampler(5, 2, 42, start_step=2, steps=4)) == OLD_KEYS[4:]  # a resumed run
    for num_cases, per_step, seed in [(5, 1, 0), (3, 4, 7), (7, 3, 123)]:
        assert list(StepSampler(num_cases, per_step, seed, steps=6, world_size=1)) == \
            old_single_process_keys(num_cases, per_step, seed, 0, 6)
    assert sample_seed(42, 1, 0, 1) == OLD_KEYS[3][1]


@pytest.mark.parametrize("world, batch, num_cases", [(2, 1, 5), (2, 3, 4), (3, 2, 7), (4, 1, 3)])
def test_ranks_split_the_single_process_batch(world, batch, num_cases):
    steps, start = 7, 2
    single = list(StepSampler(num_cases, world * batch, 5, start_step=start, steps=steps))
    ranks = [list(StepSampler(num_cases, batch, 5, rank=r, start_step=start, steps=steps, world_size=world))
             for r in range(world)]
    for r, keys in enumerate(ranks):
        assert len(keys) == len(StepSampler(num_cases, batch, 5, rank=r, start_step=start, steps=steps,
                                            world_size=world)) == (steps - start) * batch
    for i in range(steps - start):  # step start + i: rank 0's items, then rank 1's, ...
        together = [key for keys in ranks for key in keys[i * batch:(i + 1) * batch]]
        assert together == single[i * world * batch:(i + 1) * world * batch]
    # One pass over the data visits every case once across the ranks together.
    first_pass = list(StepSampler(num_cases, world * batch, 5, steps=steps))[:num_cases]
    assert sorted(case for case, _ in first_pass) == list(range(num_cases))


def test_ranks_see_different_crops():
    a, b = (list(StepSampler(5, 2, 0, rank=r, steps=3, world_size=2)) for r in (0, 1))
    assert not set(a) & set(b)


def test_rank_must_be_one_of_the_processes():
    with pytest.raises(ValueError):
        StepSampler(5, 1, 0, rank=2, world_size=2)
    with pytest.raises(ValueError):
        StepSampler(5, 1, 0, rank=1)
