"""A volume's grid in numpy and nibabel: reorientation (MONAI's ``Orientation``), without torch."""

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
