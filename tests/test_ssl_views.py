import pytest
import torch

from swinssl.ssl.views import box_side_bounds, cutout, cutout_views, rotate, two_views


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def changed_box(before: torch.Tensor, after: torch.Tensor) -> tuple[list[int], list[int]]:
    """Start and extent, per spatial axis, of the voxels that differ in one sample (C, D, H, W)."""
    changed = (before != after).any(0)
    starts, extents = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hit = changed.any(dim=other).nonzero().flatten()
        starts.append(int(hit[0]))
        extents.append(int(hit[-1] - hit[0] + 1))
    return starts, extents


# rotate


def test_rotate_labels_are_quarter_turns_and_undoing_them_restores_the_input():
    x = torch.randn(16, 2, 3, 5, 5)
    rotated, labels = rotate(x, gen(0))
    assert labels.dtype == torch.int64 and labels.shape == (16,)
    assert set(labels.tolist()) <= {0, 1, 2, 3}
    assert len(set(labels.tolist())) > 1  # 16 samples: more than one angle, so grouping is exercised
    for i, k in enumerate(labels.tolist()):
        assert torch.equal(rotated[i], torch.rot90(x[i], k, dims=(-2, -1)))
        assert torch.equal(torch.rot90(rotated[i], -k, dims=(-2, -1)), x[i])


def test_rotate_is_reproducible_from_the_generator_seed():
    x = torch.randn(16, 1, 2, 4, 4)
    a, la = rotate(x, gen(3))
    b, lb = rotate(x, gen(3))
    _, lc = rotate(x, gen(4))
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(la, lc)


def test_rotate_rejects_non_square_rotation_plane():
    with pytest.raises(ValueError, match=r"\(2, 1, 4, 4, 5\)"):
        rotate(torch.zeros(2, 1, 4, 4, 5), gen(0))


# cutout


def test_box_side_bounds_are_ceil_and_floor_of_the_fractions():
    assert box_side_bounds(96, 0.05, 0.25) == (5, 24)  # 0.05 * 96 = 4.8 -> 5
    assert box_side_bounds(40, 0.05, 0.25) == (2, 10)
    assert box_side_bounds(20, 0.05, 0.25) == (1, 5)
    assert box_side_bounds(2, 0.05, 0.25) == (1, 1)  # never below one voxel


def test_cutout_returns_a_new_tensor_and_leaves_the_input_untouched():
    x = torch.full((2, 1, 16, 16, 16), -1.0)
    keep = x.clone()
    cut = cutout(x, gen(0), max_fraction=0.5)
    assert torch.equal(x, keep)
    assert not torch.equal(cut, x)


def test_cutout_is_reproducible_from_the_generator_seed():
    x = torch.full((2, 1, 16, 16, 16), -1.0)
    assert torch.equal(cutout(x, gen(5)), cutout(x, gen(5)))
    assert not torch.equal(cutout(x, gen(5)), cutout(x, gen(6)))


def test_cutout_changed_fraction_stays_below_target_plus_one_box():
    # Input at -1, noise in [0, 1]: every cut voxel is visibly changed. The summed box
    # volume stops at most one box past the target; the union is at most the sum.
    size, max_fraction = 20, 0.3
    slack = 5**3 / size**3  # largest box: floor(0.25 * 20) = 5 voxels a side
    x = torch.full((4, 1, size, size, size), -1.0)
    fractions = []
    for seed in range(10):
        cut = cutout(x, gen(seed), max_fraction)
        fractions += (cut != x).float().mean(dim=(1, 2, 3, 4)).tolist()
    assert all(0.0 <= f <= max_fraction + slack for f in fractions)
    mean = sum(fractions) / len(fractions)
    assert 0.05 < mean < max_fraction / 2 + slack  # targets are U(0, max_fraction)


def test_cutout_single_box_sides_lie_within_bounds_and_inside_the_crop():
    # A target below one voxel stops after exactly one box.
    shape = (40, 20, 32)
    bounds = [box_side_bounds(s, 0.05, 0.25) for s in shape]  # (2, 10), (1, 5), (2, 8)
    assert bounds == [(2, 10), (1, 5), (2, 8)]
    x = torch.full((8, 1, *shape), -1.0)
    seen = [set() for _ in range(3)]
    for seed in range(25):
        cut = cutout(x, gen(seed), max_fraction=1e-9)
        for i in range(x.shape[0]):
            starts, extents = changed_box(x[i], cut[i])
            changed = (cut[i] != x[i]).any(0)
            assert changed.sum() == extents[0] * extents[1] * extents[2]  # a single solid box
            for axis in range(3):
                lo, hi = bounds[axis]
                assert lo <= extents[axis] <= hi
                assert starts[axis] + extents[axis] <= shape[axis]
                seen[axis].add(extents[axis])
    # Both ends of every side range are drawn (inclusive bounds).
    for axis in range(3):
        assert min(seen[axis]) == bounds[axis][0] and max(seen[axis]) == bounds[axis][1]


def test_cutout_noise_box_is_min_max_scaled_to_zero_one_over_all_its_channels():
    x = torch.full((6, 2, 24, 24, 24), -1.0)
    cut = cutout(x, gen(1), max_fraction=1e-9)
    assert cut.min() >= -1.0 and cut.max() <= 1.0
    for i in range(x.shape[0]):
        starts, extents = changed_box(x[i], cut[i])
        box = cut[i][(slice(None),) + tuple(slice(s, s + e) for s, e in zip(starts, extents))]
        assert (box >= 0).all() and (box <= 1).all()
        assert box.min() == 0.0 and box.max() == 1.0
        # Scaled over the whole box, not per channel: 0 and 1 each occur in one channel only.
        assert (box == 0).flatten(1).any(1).sum() == 1 and (box == 1).flatten(1).any(1).sum() == 1
        outside = cut[i].clone()
        outside[(slice(None),) + tuple(slice(s, s + e) for s, e in zip(starts, extents))] = -1.0
        assert torch.equal(outside, x[i])


def test_cutout_copy_fill_equals_the_source_in_the_box():
    x = torch.full((4, 2, 24, 24, 24), -1.0)
    source = torch.rand(4, 2, 24, 24, 24)
    cut = cutout(x, gen(2), max_fraction=0.3, source=source)
    changed = cut != x
    assert changed.any()
    assert torch.equal(cut[changed], source[changed])
    # Boxes span all channels: a voxel is changed in every channel or none.
    assert torch.equal(changed[:, 0], changed[:, 1])


def test_cutout_rejects_a_source_of_another_shape():
    with pytest.raises(ValueError, match="source shape"):
        cutout(torch.zeros(1, 1, 8, 8, 8), gen(0), source=torch.zeros(1, 1, 8, 8, 4))


# cutout_views


def test_cutout_views_with_one_sample_only_adds_noise_boxes():
    x = torch.full((1, 1, 16, 16, 16), -1.0)
    assert torch.equal(cutout_views(x, gen(7)), cutout(x, gen(7)))


def test_cutout_views_second_pass_copies_from_another_sample_half_the_time_for_two_samples():
    # Sample i holds -(i + 1); noise is in [0, 1]. A voxel of one sample holding the other's
    # value can only come from a box copied from the other sample, which happens when the
    # partner draw j ~ U{0, 1} differs from i: for about half of the samples.
    x = torch.stack([torch.full((1, 16, 16, 16), -1.0), torch.full((1, 16, 16, 16), -2.0)])
    received = 0
    for seed in range(40):
        out = cutout_views(x, gen(seed), max_fraction=0.5)
        for i, other in enumerate((-2.0, -1.0)):
            values = out[i]
            noise = (values >= 0) & (values <= 1)
            assert ((values == -1.0) | (values == -2.0) | noise).all()
            received += bool((values == other).any())
    assert 20 <= received <= 60  # of 80 samples; Binomial(80, 1/2) has sd 4.5


# two_views


def test_two_views_targets_are_rotations_of_the_crop_and_views_their_cut_outs():
    x = torch.randn(4, 1, 16, 16, 16)
    out = two_views(x, gen(11))
    for target, rot in zip(out["targets"], out["rotations"]):
        for i, k in enumerate(rot.tolist()):
            assert torch.equal(torch.rot90(target[i], -k, dims=(-2, -1)), x[i])
    # Same draws in the same order as the composition of the pieces.
    g = gen(11)
    x1, r1 = rotate(x, g)
    x2, r2 = rotate(x, g)
    expected = (cutout_views(x1, g), cutout_views(x2, g))
    assert all(torch.equal(a, b) for a, b in zip(out["views"], expected))
    assert torch.equal(out["rotations"][0], r1) and torch.equal(out["rotations"][1], r2)
    # Views differ from their targets only in cut-out boxes: a bounded part of the crop.
    for view, target in zip(out["views"], out["targets"]):
        fraction = (view != target).float().mean().item()
        assert 0.0 < fraction <= 2 * (0.3 + 4**3 / 16**3)


def test_two_views_is_reproducible_and_seed_dependent():
    x = torch.randn(2, 1, 16, 16, 16)
    a, b, c = two_views(x, gen(0)), two_views(x, gen(0)), two_views(x, gen(1))
    assert all(torch.equal(u, v) for u, v in zip(a["views"], b["views"]))
    assert not torch.equal(a["views"][0], c["views"][0])
