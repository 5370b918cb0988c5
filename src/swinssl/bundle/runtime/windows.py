"""Sliding-window inference in numpy: MONAI's ``sliding_window_inference`` (the windows, their
Gaussian weights and the blending) for one image, without torch.

The same windows as MONAI's: per axis, a step of ``int(roi * (1 - overlap))`` (at least 1; the whole
axis when the window spans it), as many windows as reach the end, the last one moved back to end at
the border; an image smaller than the window is zero-padded around its centre first (the larger half
after). Weights ``exp(-d^2 / (2 (0.125 roi)^2))`` per axis about the window's centre, multiplied,
clamped below at 1e-3, as MONAI's ``compute_importance_map``; every
voxel's output is the weighted sum of its windows' outputs over the sum of their weights.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

SIGMA_SCALE = 0.125  # MONAI's default: sigma = 0.125 * window side


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """The start of each window along an axis of ``size`` voxels (``size >= roi``), in MONAI's order."""
    step = roi if roi == size else max(int(roi * (1 - overlap)), 1)
    count = next((i for i in range(math.ceil(size / step)) if i * step + roi >= size), 0) + 1
    return [i * step - max(i * step + roi - size, 0) for i in range(count)]


def gaussian_weights(roi: Sequence[int], mode: str = "gaussian") -> np.ndarray:
    """The weight of each voxel of a window ``roi`` (float32), as MONAI's ``compute_importance_map``."""
    if mode == "constant":
        return np.ones(tuple(roi), np.float32)
    if mode != "gaussian":
        raise ValueError(f"blend mode {mode!r}: expected 'gaussian' or 'constant'")
    weights = None
    for side in roi:
        x = np.arange(-(side - 1) / 2.0, (side - 1) / 2.0 + 1, dtype=np.float32)
        g = np.exp(x**2 / np.float32(-2 * (side * SIGMA_SCALE) ** 2)).astype(np.float32)
        weights = g if weights is None else weights[..., None] * g
    # MONAI clamps below at max(smallest weight, 1e-3): at 1e-3, since clamping at the smallest changes nothing.
    return np.maximum(weights, np.float32(1e-3)).astype(np.float32)


def sliding_window(image: np.ndarray, roi: Sequence[int], predict: Callable[[np.ndarray], np.ndarray],
                   overlap: float = 0.25, batch: int = 1, mode: str = "gaussian") -> np.ndarray:
    """The blended outputs ``(C_out, X, Y, Z)`` (float32) of ``predict`` over windows of ``image``
    ``(C_in, X, Y, Z)``; ``predict`` maps windows ``(B, C_in, *roi)`` to ``(B, C_out, *roi)``, called
    with up to ``batch`` windows at a time."""
    if image.ndim != 4:
        raise ValueError(f"expected one image (C, X, Y, Z), got shape {image.shape}")
    roi = tuple(int(r) for r in roi)
    size = image.shape[1:]
    pad = [(0, 0)] + [((max(r - s, 0)) // 2, max(r - s, 0) - max(r - s, 0) // 2) for s, r in zip(size, roi)]
    padded = np.pad(image.astype(np.float32, copy=False), pad) if any(sum(p) for p in pad) else image.astype(np.float32)
    starts = [window_starts(s, r, overlap) for s, r in zip(padded.shape[1:], roi)]
    corners = [(a, b, c) for a in starts[0] for b in starts[1] for c in starts[2]]
    weights = gaussian_weights(roi, mode)
    total, count = None, np.zeros(padded.shape[1:], np.float32)
    for first in range(0, len(corners), batch):
        chunk = corners[first : first + batch]
        windows = np.stack([padded[(slice(None), *(slice(s, s + r) for s, r in zip(c, roi)))] for c in chunk])
        outputs = np.asarray(predict(windows), dtype=np.float32)
        if total is None:
            total = np.zeros((outputs.shape[1], *padded.shape[1:]), np.float32)
        for corner, output in zip(chunk, outputs):
            region = tuple(slice(s, s + r) for s, r in zip(corner, roi))
            total[(slice(None), *region)] += output * weights
            count[region] += weights
    total /= count
    crop = tuple(slice(before, before + s) for (before, _), s in zip(pad[1:], size))
    return total[(slice(None), *crop)]
