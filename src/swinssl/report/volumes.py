"""Volumes for the report's viewer: read once, downsampled where large, written as gzipped NIfTI-1
in memory and base64-encoded, which NiiVue reads from an ArrayBuffer.

An image is quantised to 256 grey levels between its 0.5th and 99.5th percentiles (the NIfTI
scale slope and intercept keep its intensities); a CT image (``data.io.guess_modality``) opens in
the soft-tissue window of the CT presets. Masks keep their integer class values (uint8, uint16
beyond 255 classes) with the NIfTI label intent. A volume longer than ``max_side`` voxels along an
axis keeps every k-th voxel along it (nearest neighbour, so masks stay masks); the affine is
scaled to match, so image and masks still overlay in world space.
"""

from __future__ import annotations

import base64
import gzip
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from swinssl.data.io import guess_modality, read_volume
from swinssl.errors import DataError

MAX_SIDE = 192  # voxels along an axis before a volume is downsampled for display
CT_WINDOW = (-175.0, 250.0)  # HU: the window a CT image opens in (the CT fine-tuning presets' window)


@dataclass(frozen=True)
class Embedded:
    """One volume as the page holds it."""

    data: str  # base64 of a gzipped NIfTI-1 file
    shape: tuple[int, ...]  # the file's shape
    shown: tuple[int, ...]  # the embedded shape
    step: tuple[int, ...]  # every step-th voxel kept along each axis
    values: tuple[int, ...] = ()  # a mask's nonzero values, as shown
    centre: list[float] | None = None  # a mask's mean foreground position (mm, world), as shown

    @property
    def downsampled(self) -> bool:
        return self.shown != self.shape


def read_grid(path: str | Path, what: str) -> tuple[np.ndarray, np.ndarray]:
    """A 3D volume ``(X, Y, Z)`` (the first channel of a multi-channel file) and its affine;
    ``DataError`` naming the file otherwise."""
    volume = read_volume(path)
    if volume.ndim != 4:
        raise DataError(f"{path}: expected a 3D {what}, got an array of shape {tuple(volume.shape)}")
    return volume.as_tensor()[0].numpy(), np.asarray(volume.affine, dtype=np.float64)


def display_step(shape: Sequence[int], max_side: int = MAX_SIDE) -> tuple[int, ...]:
    """Keep every k-th voxel along each axis so that no axis is longer than ``max_side``."""
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    return tuple(max(1, math.ceil(n / max_side)) for n in shape)


def encode_image(array: np.ndarray, affine: np.ndarray, max_side: int = MAX_SIDE) -> Embedded:
    step = display_step(array.shape, max_side)
    shown = _strided(array, step).astype(np.float32)
    finite = shown[np.isfinite(shown)]
    lo, hi = (float(v) for v in np.percentile(finite, [0.5, 99.5])) if finite.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    data = np.clip(np.nan_to_num(shown, nan=lo, posinf=hi, neginf=lo), lo, hi)
    window = None
    if guess_modality(_as_tensor(finite)) == "CT":  # NiiVue trusts a window inside the data's range
        window = (max(CT_WINDOW[0], float(data.min())), min(CT_WINDOW[1], float(data.max())))
    return Embedded(_nifti(data, _scaled(affine, step), np.uint8, window=window), tuple(array.shape),
                    tuple(data.shape), step)


def encode_mask(array: np.ndarray, affine: np.ndarray, max_side: int = MAX_SIDE, outline: bool = False) -> Embedded:
    """A label map for the viewer; ``outline``: only its boundary voxels (``outline_of``), so that it
    shows as contours over a filled prediction of the same class colours."""
    step = display_step(array.shape, max_side)
    shown = np.rint(np.nan_to_num(_strided(array, step))).clip(0, None)
    dtype = np.uint8 if shown.max(initial=0) <= 255 else np.uint16
    values = tuple(int(v) for v in np.unique(shown) if v > 0)
    centre = foreground_centre(shown, _scaled(affine, step))
    drawn = outline_of(shown) if outline else shown
    return Embedded(_nifti(drawn.astype(dtype), _scaled(affine, step), dtype, label=True), tuple(array.shape),
                    tuple(shown.shape), step, values, centre)


def outline_of(mask: np.ndarray) -> np.ndarray:
    """``mask`` kept where a voxel has a 6-neighbour of another value (the surface of each structure,
    also between touching classes), 0 elsewhere; the volume's own edge is no boundary."""
    edge = np.zeros(mask.shape, bool)
    for axis in range(mask.ndim):
        differs = np.diff(mask, axis=axis) != 0
        lower = [slice(None)] * mask.ndim
        upper = [slice(None)] * mask.ndim
        lower[axis], upper[axis] = slice(None, -1), slice(1, None)
        edge[tuple(lower)] |= differs
        edge[tuple(upper)] |= differs
    return np.where(edge, mask, 0)


def foreground_centre(mask: np.ndarray, affine: np.ndarray) -> list[float] | None:
    """World position (mm) of the mean foreground voxel of a mask: where the viewer's crosshair starts,
    so that all three planes cut the structures; None for an empty mask."""
    voxels = np.argwhere(mask > 0)
    if not len(voxels):
        return None
    centre = voxels.mean(axis=0)
    return [round(float(v), 3) for v in (affine @ np.append(centre, 1.0))[:3]]


def _strided(array: np.ndarray, step: Sequence[int]) -> np.ndarray:
    return np.ascontiguousarray(array[:: step[0], :: step[1], :: step[2]])


def _scaled(affine: np.ndarray, step: Sequence[int]) -> np.ndarray:
    return affine @ np.diag([*map(float, step), 1.0])


def _as_tensor(values: np.ndarray):
    import torch

    return torch.from_numpy(values if values.size else np.zeros(1, np.float32))


def _nifti(data: np.ndarray, affine: np.ndarray, dtype, label: bool = False,
           window: tuple[float, float] | None = None) -> str:
    import nibabel as nib

    image = nib.Nifti1Image(data, affine)
    image.set_data_dtype(dtype)  # a float image is scaled into it (slope and intercept in the header)
    header = image.header
    header.set_xyzt_units("mm")
    if label:
        header.set_intent("label")
    if window is not None:
        header["cal_min"], header["cal_max"] = window
    raw = gzip.compress(image.to_bytes(), compresslevel=9, mtime=0)
    return base64.b64encode(raw).decode("ascii")
