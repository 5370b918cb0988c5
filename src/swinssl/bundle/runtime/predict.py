"""One volume's mask from a window network, in numpy: the steps of ``swinssl predict`` without torch.

Reorient to the plan's orientation, resample to its spacing, normalise by modality, crop to the
foreground, slide windows at the plan's overlap with Gaussian blending, argmax, put the crop back,
resample the mask to the reoriented file grid (nearest) and turn it back to the file's orientation.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from .geometry import reorient, resample_linear, resample_nearest, resampled_grid, unreorient
from .intensity import foreground_box, guess_modality, normalize
from .windows import sliding_window

DEFAULT_OVERLAP = 0.5  # a plan without one: swinssl predict's default


def predict_array(image: np.ndarray, affine: np.ndarray, plan: Mapping, network: Callable[[np.ndarray], np.ndarray],
                  batch: int = 2, modality: str | None = None) -> np.ndarray:
    """The mask ``(X, Y, Z)`` (uint8) of ``image`` ``(C, X, Y, Z)`` on ``affine``, in its own grid;
    ``network`` maps windows ``(B, C, *roi)`` to logits ``(B, classes, *roi)``; ``plan`` is the model's
    (``Plan.to_dict``); ``modality``: the image's, else the plan's, else guessed from its intensities."""
    pre = plan["preprocess"]
    turned, turned_affine = reorient(image.astype(np.float32, copy=False), affine, pre["orientation"])
    grid, shape, x = turned_affine, turned.shape[1:], turned
    if pre.get("spacing"):
        grid, shape = resampled_grid(turned_affine, turned.shape[1:], tuple(pre["spacing"]))
        x = resample_linear(turned, turned_affine, grid, shape)
    x = normalize(x, modality or plan.get("modality") or guess_modality(image), pre)
    box = foreground_box(x, pre["foreground_threshold"]) if pre.get("crop_foreground") else (slice(None),) * 3
    labels = np.zeros((1, *shape), np.uint8)
    crop = x[(slice(None), *box)]
    if min(crop.shape[1:]) > 0:
        overlap = plan.get("overlap")
        logits = sliding_window(crop, pre["roi_size"], network, DEFAULT_OVERLAP if overlap is None else overlap, batch)
        labels[(slice(None), *box)] = logits.argmax(0)
    if pre.get("spacing"):
        labels = resample_nearest(labels, grid, turned_affine, turned.shape[1:])
    return unreorient(labels, turned_affine, affine)[0]
