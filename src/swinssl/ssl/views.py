"""Views for Swin UNETR self-supervised pre-training (Tang et al., CVPR 2022, sec. 3.2).

Each crop ``(B, C, D, H, W)`` becomes two views: two independent random 90-degree
rotations of the crop (the rotation task's labels), each then damaged by cut-out boxes
(the inpainting task restores the rotated, un-cut view; the contrastive task pulls the
two views of a crop together).

Reference: research-contributions ``SwinUNETR/Pretrain/utils/ops.py`` (``rot_rand``,
``patch_rand_drop``, ``aug_rand``). Differences, all deliberate:

* boxes lie fully inside the crop (their start is drawn so that they fit) instead of
  being drawn anywhere and clipped at the border, so every box has the drawn size;
  box sides are drawn from ``ceil(min_box * S) .. floor(max_box * S)`` inclusive;
* the second cut-out pass of ``cutout_views`` copies from the other sample's crop as it
  was after the *first* pass (the reference, looping over samples in place, copies from
  a sample that may or may not have had its own second pass already);
* all randomness comes from one explicit CPU ``torch.Generator``, never from global
  state, so a seed reproduces the views exactly on any device.

Random numbers are drawn on the CPU with the generator; only the results (labels,
noise) move to the input's device.
"""

from __future__ import annotations

import math

import torch

from swinssl.nn.axes import PERMUTATIONS, check_volume, permute, unpermute  # noqa: F401 (the views' axis orders)

# Slack for sides such as 0.05 * 96 = 4.800000000000001, so that ceil/floor of a
# product that is an integer up to rounding give that integer.
_EPS = 1e-9


def _check_generator(generator: torch.Generator) -> None:
    if generator.device.type != "cpu":
        raise ValueError(f"views draw random numbers on the CPU: expected a CPU generator, got {generator.device}")


def rotate(x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate each sample by its own random multiple of 90 degrees in the (H, W) plane.

    x: ``(B, C, D, H, W)`` with ``H == W`` (a quarter turn swaps H and W, and the batch
    must stay one tensor). Sample ``i`` gets ``k_i ~ U{0, 1, 2, 3}`` and becomes
    ``torch.rot90(x[i], k_i, dims=(-2, -1))``, as the reference's ``rot_rand``.

    Returns the rotated batch ``(B, C, D, H, W)`` (a new tensor) and the labels
    ``k`` as int64 ``(B,)`` on ``x.device``.
    """
    check_volume(x)
    _check_generator(generator)
    if x.shape[-2] != x.shape[-1]:
        raise ValueError(f"rotation in the (H, W) plane needs H == W, got shape {tuple(x.shape)}")
    labels = torch.randint(0, 4, (x.shape[0],), generator=generator)
    return rotate_by(x, labels), labels.to(x.device)


def box_side_bounds(size: int, min_box: float, max_box: float) -> tuple[int, int]:
    """Smallest and largest box side (inclusive, in voxels) along an axis of ``size`` voxels.

    ``ceil(min_box * size) .. floor(max_box * size)``, at least 1 and at most ``size``;
    when the range is empty (tiny axes) it collapses to its lower end.
    """
    lo = min(size, max(1, math.ceil(min_box * size - _EPS)))
    hi = min(size, max(lo, math.floor(max_box * size + _EPS)))
    return lo, hi


def draw_boxes(batch: int, spatial: tuple[int, int, int], generator: torch.Generator, max_fraction: float = 0.3,
               min_box: float = 0.05, max_box: float = 0.25) -> list[list[tuple[tuple[int, ...], tuple[int, ...]]]]:
    """Draw cut-out boxes for every sample of a batch, all in batched tensor ops.

    Per sample: a target of ``U(0, max_fraction) * D * H * W`` voxels; boxes are added
    until their summed volume (overlaps counted twice, as the reference) reaches the
    target, so the last box may overshoot it. Per axis of size S, a box's side is
    ``U{box_side_bounds(S)}`` and its start ``U{0 .. S - side}``: the box lies inside.

    Boxes are drawn in pools of a few more than the expected count per sample; a pool's
    boxes are kept while the summed volume before them is below the target, and another
    pool is drawn only if some sample still falls short.

    Returns, per sample, a list of ``(start, side)`` pairs of 3-tuples (D, H, W order).
    """
    if not 0.0 <= max_fraction <= 1.0:
        raise ValueError(f"max_fraction must be in [0, 1], got {max_fraction}")
    if not 0.0 <= min_box <= max_box <= 1.0:
        raise ValueError(f"need 0 <= min_box <= max_box <= 1, got min_box={min_box}, max_box={max_box}")
    bounds = [box_side_bounds(s, min_box, max_box) for s in spatial]
    size = torch.tensor(spatial, dtype=torch.float64)
    lo = torch.tensor([b[0] for b in bounds], dtype=torch.float64)
    hi = torch.tensor([b[1] for b in bounds], dtype=torch.float64)

    volume = math.prod(spatial)
    target = torch.rand(batch, generator=generator, dtype=torch.float64) * max_fraction * volume
    mean_box = math.prod((a + b) / 2 for a, b in bounds)
    pool = 2 * math.ceil(max_fraction * volume / mean_box) + 8

    covered = torch.zeros(batch, dtype=torch.float64)  # summed volume of the boxes kept so far
    starts, sides, keeps = [], [], []
    while bool((covered < target).any()):
        u = torch.rand(batch, pool, 2, 3, generator=generator, dtype=torch.float64)
        side = torch.minimum(lo + torch.floor(u[..., 0, :] * (hi - lo + 1)), hi)  # (B, pool, 3)
        start = torch.minimum(torch.floor(u[..., 1, :] * (size - side + 1)), size - side)
        box_volume = side.prod(-1)  # (B, pool)
        before = covered[:, None] + box_volume.cumsum(1) - box_volume
        keep = before < target[:, None]  # a prefix of the pool in every row
        covered = covered + (box_volume * keep).sum(1)
        starts.append(start)
        sides.append(side)
        keeps.append(keep)
    if not keeps:
        return [[] for _ in range(batch)]

    start, side, keep = torch.cat(starts, 1).long(), torch.cat(sides, 1).long(), torch.cat(keeps, 1)
    boxes: list[list] = [[] for _ in range(batch)]
    for i, k in keep.nonzero().tolist():  # row-major: each sample's boxes in drawing order
        boxes[i].append((tuple(start[i, k].tolist()), tuple(side[i, k].tolist())))
    return boxes


def _scaled_noise(sizes: list[int], generator: torch.Generator) -> list[torch.Tensor]:
    """N(0, 1) noise for boxes of ``sizes`` elements, each min-max scaled to [0, 1] on its own.

    Drawn as one CPU vector and scaled with segment reductions, so the caller moves it to
    the device once. A one-element box (no range) becomes 0.
    """
    noise = torch.randn(sum(sizes), generator=generator)
    segment = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    inf = torch.full((len(sizes),), math.inf)
    low = inf.scatter_reduce(0, segment, noise, "amin")
    high = (-inf).scatter_reduce(0, segment, noise, "amax")
    noise = (noise - low[segment]) / (high - low).clamp_min(torch.finfo(noise.dtype).tiny)[segment]
    return list(noise.split(sizes))


def cutout(x: torch.Tensor, generator: torch.Generator, max_fraction: float = 0.3, min_box: float = 0.05,
           max_box: float = 0.25, source: torch.Tensor | None = None) -> torch.Tensor:
    """Replace random boxes of each sample with noise or with another volume's content.

    x: ``(B, C, D, H, W)``; returns a new tensor of the same shape (x is untouched).

    Per sample, a target of ``U(0, max_fraction) * D * H * W`` voxels is drawn and boxes
    are added until their summed volume reaches it (overlaps count twice, so the
    changed fraction is at most about ``max_fraction`` plus one box). A box's side along
    an axis of size S is ``U{ceil(min_box * S) .. floor(max_box * S)}`` voxels (at least
    1) and its start ``U{0 .. S - side}``, so boxes lie fully inside the crop (the
    reference clips boxes at the border instead). A box spans all channels.

    Fill: with ``source=None``, N(0, 1) noise min-max scaled to [0, 1] over the whole box
    (all its channels together), as the reference's ``patch_rand_drop``; otherwise the
    same box of ``source`` (same shape as x), i.e. ``out[b, :, box] = source[b, :, box]``.
    Boxes are painted in drawing order, a later box overwriting an earlier one.
    """
    check_volume(x)
    _check_generator(generator)
    if source is not None and source.shape != x.shape:
        raise ValueError(f"source shape {tuple(source.shape)} differs from x shape {tuple(x.shape)}")
    b, c = x.shape[:2]
    boxes = draw_boxes(b, tuple(x.shape[2:]), generator, max_fraction, min_box, max_box)
    out = x.clone()
    flat = [(i, start, side) for i, sample in enumerate(boxes) for start, side in sample]
    if source is None and flat:
        noise = _scaled_noise([c * math.prod(side) for _, _, side in flat], generator)
        noise = torch.cat(noise).to(device=x.device, dtype=x.dtype).split([n.numel() for n in noise])
    # One slice assignment per box touches only that box's voxels: a few hundred small
    # copies per batch, far less work than one forward/backward pass of the network.
    for n, (i, start, side) in enumerate(flat):
        region = (i, slice(None)) + tuple(slice(s, s + l) for s, l in zip(start, side))
        out[region] = noise[n].view(c, *side) if source is None else source[region]
    return out


def cutout_views(x: torch.Tensor, generator: torch.Generator, max_fraction: float = 0.3) -> torch.Tensor:
    """Two cut-out passes per sample, as the reference's ``aug_rand``.

    x: ``(B, C, D, H, W)``; returns a new tensor of the same shape.

    First pass: noise boxes on every sample (``cutout`` with ``source=None``). Second
    pass: sample ``i`` draws ``j ~ U{0 .. B-1}``; if ``j != i`` (probability (B-1)/B)
    it gets boxes copied from sample ``j`` of the batch after the first pass, else it
    stays as after the first pass. With B = 1 nothing is copied.
    """
    check_volume(x)
    first = cutout(x, generator, max_fraction)
    b = x.shape[0]
    partner = torch.randint(0, b, (b,), generator=generator)
    chosen = (partner != torch.arange(b)).nonzero().flatten()
    if chosen.numel() == 0:
        return first
    out = first.clone()
    rows, sources = chosen.to(x.device), partner[chosen].to(x.device)
    out[rows] = cutout(first[rows], generator, max_fraction, source=first[sources])
    return out


def two_views(x: torch.Tensor, generator: torch.Generator, max_fraction: float = 0.3) -> dict:
    """The two views of Swin UNETR SSL for a batch of crops ``(B, C, D, H, W)``, H == W.

    Two independent rotations of the same crops, each then cut out (``cutout_views``).

    Returns a dict:
      ``views``: ``(x1_cut, x2_cut)``, the network inputs, each ``(B, C, D, H, W)``;
      ``targets``: ``(x1, x2)``, the rotated un-cut views the reconstruction must restore;
      ``rotations``: ``(rot1, rot2)``, int64 ``(B,)`` quarter-turn labels.
    """
    x1, rot1 = rotate(x, generator)
    x2, rot2 = rotate(x, generator)
    views = (cutout_views(x1, generator, max_fraction), cutout_views(x2, generator, max_fraction))
    return {"views": views, "targets": (x1, x2), "rotations": (rot1, rot2)}


# --- SwinMM (Wang et al., MICCAI 2023): axis permutations and patch masking ------------------------

# The views of SwinMM are axis orders (``PERMUTATIONS``); the network needs them too, so they live in nn.


def rotate_by(x: torch.Tensor, k: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Sample i turned by ``k[i]`` quarter turns in the (H, W) plane (``-k[i]`` with ``inverse``)."""
    check_volume(x)
    out = torch.empty_like(x)
    k = k.cpu()
    # One batched rot90 per angle instead of one call per sample.
    for turns in range(4):
        index = (k == turns).nonzero().flatten().to(x.device)
        if index.numel():
            out[index] = torch.rot90(x[index], -turns if inverse else turns, dims=(-2, -1))
    return out


def patch_mask(batch: int, spatial: tuple[int, int, int], generator: torch.Generator, ratio: float = 0.5,
               patch: int = 16) -> torch.Tensor:
    """Boolean mask ``(B, 1, X, Y, Z)``, True where masked: of the ``patch^3`` cubes tiling the
    crop, ``round(ratio * cubes)`` per sample, chosen independently per sample.

    ``ratio`` is the masked fraction (the SwinMM code's ``mask_ratio`` kept that fraction
    instead). Sides must be multiples of ``patch``, so the masked voxel fraction is exactly
    the masked cube fraction.
    """
    _check_generator(generator)
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")
    if any(s % patch for s in spatial):
        raise ValueError(f"crop {tuple(spatial)}: masking cubes of {patch} voxels need sides that are multiples of {patch}")
    grid = tuple(s // patch for s in spatial)
    cubes = math.prod(grid)
    masked = round(ratio * cubes)
    # A random permutation per sample (argsort of uniform noise): its first `masked` cubes are masked.
    rank = torch.rand(batch, cubes, generator=generator).argsort(1).argsort(1)
    mask = (rank < masked).view(batch, 1, *grid)
    for axis in range(3):
        mask = mask.repeat_interleave(patch, dim=2 + axis)
    return mask


def multi_views(x: torch.Tensor, generator: torch.Generator, ratio: float = 0.5, patch: int = 16) -> dict:
    """The two views of SwinMM pre-training for crops ``(B, C, X, Y, Z)`` with Y == Z.

    View 1 is the crop, view 2 one of the two swapped axis orders (drawn per batch). Each
    view is turned by its own random quarter turns per sample (rotation labels) and loses
    the same cubes: one mask per sample in the common frame, carried into both views, so
    that their reconstructions of the hidden voxels can be compared there (mutual loss).

    Returns a dict:
      ``views``: the two masked network inputs ``(B, C, ...)``;
      ``targets``: the two views before masking;
      ``masks``: the two views' boolean masks ``(B, 1, ...)``; ``mask``: the common-frame mask;
      ``rotations``: the two int64 ``(B,)`` label tensors; ``orders``: the two axis orders.
    """
    check_volume(x)
    _check_generator(generator)
    if len(set(x.shape[2:])) != 1:
        raise ValueError(f"SwinMM views permute the axes of cubic crops, got shape {tuple(x.shape)}")
    b = x.shape[0]
    swapped = [PERMUTATIONS["swap_xy"], PERMUTATIONS["swap_xz"]]
    orders = (PERMUTATIONS["identity"], swapped[int(torch.randint(0, 2, (1,), generator=generator))])
    mask = patch_mask(b, tuple(x.shape[2:]), generator, ratio, patch).to(x.device)
    out: dict = {"views": [], "targets": [], "masks": [], "rotations": [], "orders": orders, "mask": mask}
    for order in orders:
        k = torch.randint(0, 4, (b,), generator=generator)
        target = rotate_by(permute(x, order), k)
        view_mask = rotate_by(permute(mask, order), k)
        out["views"].append(target.masked_fill(view_mask, 0.0))
        out["targets"].append(target)
        out["masks"].append(view_mask)
        out["rotations"].append(k.to(x.device))
    return out


def to_common_frame(x: torch.Tensor, order: tuple[int, int, int], k: torch.Tensor) -> torch.Tensor:
    """Undo a view of ``multi_views``: turn back by ``k``, then restore the axis order."""
    return unpermute(rotate_by(x, k, inverse=True), order)
