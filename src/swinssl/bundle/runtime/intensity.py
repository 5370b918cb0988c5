"""Intensities and the foreground box in numpy, without torch: what swinssl's pipeline does after the
geometry (``swinssl.data.transforms``: ``intensity_normalizer``, ``CropForegroundd``, ``guess_modality``).

- CT: the HU window ``ct_window`` mapped to [0, 1], clipped (MONAI's ``ScaleIntensityRange``);
- MRI ``percentile``: per channel, the ``mri_percentiles`` (linear interpolation) mapped to [0, 1],
  clipped (``ScaleIntensityRangePercentiles``); a channel whose two percentiles are equal is only
  shifted by the lower;
- MRI ``zscore``: per channel, the non-zero voxels to mean 0 and standard deviation 1 (population
  sd; 1 where it is 0), zeros kept (``NormalizeIntensity(nonzero=True, channel_wise=True)``);
- foreground: the box of voxels above ``foreground_threshold`` in any channel.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np


def guess_modality(image: np.ndarray) -> str:
    """CT if the volume holds Hounsfield-like negative values (air near -1000), else MRI."""
    flat = image.reshape(-1)
    low = float(np.quantile(flat[:: max(1, flat.size // 200_000)].astype(np.float32), 0.01))
    return "CT" if low < -500 else "MRI"


def _scale(x: np.ndarray, low: float, high: float) -> np.ndarray:
    if high - low == 0:
        return x - np.float32(low)
    return np.clip((x - np.float32(low)) / np.float32(high - low), 0.0, 1.0)


def normalize(image: np.ndarray, modality: str, preprocess: Mapping) -> np.ndarray:
    """``image`` ``(C, X, Y, Z)`` scaled for the network by its ``modality`` and the plan's ``preprocess``."""
    image = image.astype(np.float32, copy=False)
    if modality == "CT":
        low, high = preprocess["ct_window"]
        return _scale(image, low, high).astype(np.float32)
    if modality != "MRI":
        raise ValueError(f"unknown modality {modality!r} (expected CT or MRI)")
    out = np.empty_like(image)
    for c, channel in enumerate(image):
        if preprocess.get("mri_normalization", "percentile") == "percentile":
            low, high = np.percentile(channel, preprocess["mri_percentiles"])
            out[c] = _scale(channel, float(low), float(high))
        else:
            out[c] = channel
            nonzero = channel != 0
            if nonzero.any():
                values = channel[nonzero]
                sd = values.std()
                out[c][nonzero] = (values - values.mean()) / (sd if sd != 0 else 1.0)
    return out


def foreground_box(image: np.ndarray, threshold: float) -> tuple[slice, slice, slice]:
    """The smallest box holding every voxel above ``threshold`` in any channel (empty slices when none)."""
    inside = (image > threshold).any(0)
    box = []
    for axis in range(3):
        hits = np.flatnonzero(inside.any(tuple(a for a in range(3) if a != axis)))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1) if hits.size else slice(0, 0))
    return tuple(box)
