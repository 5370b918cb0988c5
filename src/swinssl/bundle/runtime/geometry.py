"""A volume's grid in numpy and nibabel, without torch: reorientation (MONAI's ``Orientation``) and resampling
(MONAI's ``Spacing``, bilinear with border padding).
"""

from __future__ import annotations

import numpy as np
from nibabel import orientations


def reorient(array: np.ndarray, affine: np.ndarray, axcodes: str = "RAS") -> tuple[np.ndarray, np.ndarray]:
    """``array`` ``(C, X, Y, Z)`` on the grid of ``affine`` turned so that its axes point along ``axcodes``
    (flips and axis swaps only, voxels unchanged), and the affine of the turned grid."""
    turn = orientations.ornt_transform(orientations.io_orientation(affine), orientations.axcodes2ornt(axcodes))
    turned = np.stack([orientations.apply_orientation(channel, turn) for channel in array])
    return turned, affine @ orientations.inv_ornt_aff(turn, array.shape[1:])


def unreorient(array: np.ndarray, affine: np.ndarray, original_affine: np.ndarray) -> np.ndarray:
    """The inverse of ``reorient``: ``array`` on the grid of ``affine`` turned back to the orientation of
    ``original_affine``."""
    turn = orientations.ornt_transform(orientations.io_orientation(affine), orientations.io_orientation(original_affine))
    return np.stack([orientations.apply_orientation(channel, turn) for channel in array])


SPACING_TOLERANCE = 1e-3  # MONAI's AFFINE_TOL: an axis within it of the target spacing keeps its own


def resampled_grid(affine: np.ndarray, shape: tuple[int, ...], spacing: tuple[float, ...]) -> tuple[np.ndarray, tuple]:
    """The affine and shape of the grid MONAI's ``Spacing`` resamples a volume of ``shape`` on ``affine`` to:
    the same axis directions at ``spacing`` mm, covering the volume's voxel centres, starting at its corner."""
    rzs = affine[:3, :3]
    own = np.sqrt((rzs * rzs).sum(0))
    target = np.asarray(spacing, dtype=np.float64)
    target = np.where(np.abs(own - target) <= SPACING_TOLERANCE, own, target)
    zs = np.linalg.cholesky(rzs.T @ rzs).T
    rotation = rzs @ np.linalg.inv(zs)
    grid = np.eye(4)
    grid[:3, :3] = rotation @ np.diag(np.sign(np.diag(zs)) * np.abs(target))
    # The grid shares the volume's axis directions, so the volume's first voxel is its smallest corner
    # along every grid axis: the grid starts there (as MONAI's compute_shape_offset finds), and the
    # volume spans (n - 1) * own / target grid voxels per axis.
    grid[:3, 3] = affine[:3, 3]
    out_shape = tuple(int(n) for n in np.round((np.asarray(shape) - 1.0) * own / np.abs(target) + 1.0))
    return grid, out_shape


def _axis_map(affine: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """The map from ``grid``'s voxels to ``affine``'s (4 x 4), refused unless it acts per axis (a scale and a
    shift each: the grids' axes are parallel)."""
    voxels = np.linalg.solve(affine, grid)
    if np.any(np.abs(voxels[:3, :3][~np.eye(3, dtype=bool)]) > 1e-6):
        raise ValueError("the grids' axes are not parallel: resampling here acts per axis")
    return voxels


def resample_linear(array: np.ndarray, affine: np.ndarray, grid: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``array`` ``(C, X, Y, Z)`` on ``affine`` linearly interpolated onto the grid ``grid``/``shape`` with
    the same axis directions (the voxel-to-voxel map a scale and shift per axis): one linear
    interpolation per axis, positions past the edge taking the edge's value (MONAI's bilinear
    resampling with border padding)."""
    voxels = _axis_map(affine, grid)
    out = array.astype(np.float32, copy=False)
    for axis in range(3):
        size = out.shape[1 + axis]
        position = np.clip(_sampled_positions(voxels[axis, axis], voxels[axis, 3], size, shape[axis]), 0, size - 1)
        low = np.minimum(np.floor(position).astype(np.int64), size - 1)
        high = np.minimum(low + 1, size - 1)
        weight = (position - low).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(3)])
        out = np.take(out, low, axis=1 + axis) * (1 - weight) + np.take(out, high, axis=1 + axis) * weight
    return out.astype(np.float32)


def _sampled_positions(scale: float, shift: float, size_in: int, size_out: int) -> np.ndarray:
    """The source coordinate of each output voxel along one axis, in the float64 steps MONAI and torch take
    (``to_norm_affine``, ``affine_grid``, ``grid_sample`` with ``align_corners=False``), so that a voxel
    whose nearest source is a tie (exactly between two, as every other voxel of a 2x resampling) mostly
    goes the same way. Not always: torch's vectorised ``linspace`` rounds by the CPU's vector width, a
    last bit no portable code reproduces; a tie may then go to the other neighbour (measured: one plane
    of 53 in a 1.5 -> 2 mm inverse; tests/test_bundle.py)."""
    src = np.array([[2.0 / size_in, 1.0 / size_in - 1.0], [0.0, 1.0]])
    dst = np.linalg.inv(np.array([[2.0 / size_out, 1.0 / size_out - 1.0], [0.0, 1.0]]))
    mapped = src @ np.array([[scale, shift], [0.0, 1.0]])
    slope, offset = mapped[0, 0] * dst[0, 0], mapped[0, 0] * dst[0, 1] + mapped[0, 1]
    i = np.arange(size_out, dtype=np.float64)
    step = 2.0 / (size_out - 1) if size_out > 1 else 0.0
    base = np.where(i < size_out // 2, -1.0 + step * i, 1.0 - step * (size_out - 1 - i)) if size_out > 1 else np.array([-1.0])
    base = base * (size_out - 1) / size_out
    return ((base * slope + offset + 1.0) * size_in - 1.0) / 2.0


def resample_nearest(array: np.ndarray, affine: np.ndarray, grid: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``array`` ``(C, X, Y, Z)`` on ``affine`` onto the grid ``grid``/``shape`` with the same axis directions,
    each voxel taking its nearest source voxel (ties mostly as MONAI's resampling breaks them: see
    ``_sampled_positions``), positions past the edge the edge's: how a mask goes back from the network's
    grid to the file's."""
    voxels = _axis_map(affine, grid)
    out = array
    for axis in range(3):
        size = out.shape[1 + axis]
        position = _sampled_positions(voxels[axis, axis], voxels[axis, 3], size, shape[axis])
        out = np.take(out, np.rint(np.clip(position, 0, size - 1)).astype(np.int64), axis=1 + axis)
    return out
