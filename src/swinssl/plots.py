"""PNG figures: training previews, label/prediction overlays, heat maps, curves.

Figures are ``matplotlib.figure.Figure`` objects drawn without pyplot, so no global backend is
set and nothing is left open; each file is written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from swinssl.utils import atomic_path


def figure(cols: int = 1, width: float = 3.0, height: float = 3.2):
    """A figure with one row of ``cols`` axes of ``width`` x ``height`` inches: (figure, axes)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * cols, height))
    return fig, fig.subplots(1, cols, squeeze=False)[0]


def save_figure(path: Path, fig, dpi: int = 80) -> Path:
    """Write a figure as PNG, atomically."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return path


def save_preview(path: Path, panels: Mapping[str, torch.Tensor], title: str = "") -> Path:
    """One row of mid-slices: each panel a (D, H, W) or (C, D, H, W) volume; the middle slice of D is shown."""
    fig, axes = figure(len(panels))
    for ax, (name, volume) in zip(axes, panels.items()):
        volume = volume.detach().float().cpu()
        volume = volume[0] if volume.ndim == 4 else volume
        ax.imshow(volume[volume.shape[0] // 2].T, cmap="gray", origin="lower", vmin=0.0, vmax=1.0)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(path, fig)


def save_overlay(path: Path, image: torch.Tensor, masks: Mapping[str, torch.Tensor], title: str = "") -> Path:
    """The image, then the image under each mask, on the axial slice (last axis) where the first mask
    has the most voxels. ``image`` (X, Y, Z) in [0, 1]; masks integer, same shape (e.g. label, prediction).
    """
    image = image.detach().float().cpu().numpy()
    masks = {name: m.detach().cpu().numpy() for name, m in masks.items()}
    first = next(iter(masks.values()))
    z = int(np.argmax((first > 0).sum(axis=(0, 1)))) if first.any() else image.shape[2] // 2
    top = max(max(int(m.max()) for m in masks.values()), 1)

    def draw(ax, mask):
        shown = np.ma.masked_equal(mask[:, :, z].T, 0)
        ax.imshow(shown, cmap="tab10", vmin=1, vmax=max(top, 10), origin="lower", alpha=0.5, interpolation="nearest")

    return _layers_on_slice(path, image[:, :, z], masks, draw, title)


def save_heatmap_overlay(path: Path, image: torch.Tensor, maps: Mapping[str, torch.Tensor], title: str = "") -> Path:
    """The image, then the image under each heat map (jet, half transparent), on the middle axial
    slice (last axis). ``image`` (X, Y, Z) in [0, 1]; maps the same shape, scaled to [0, 1] each."""
    image = image.detach().float().cpu()
    z = image.shape[2] // 2

    def draw(ax, heat):
        heat = heat.detach().float().cpu()
        heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-12)
        ax.imshow(heat[:, :, z].T, cmap="jet", origin="lower", vmin=0.0, vmax=1.0, alpha=0.5)

    return _layers_on_slice(path, image[:, :, z], maps, draw, title)


def _layers_on_slice(path: Path, image_slice, layers: Mapping, draw, title: str) -> Path:
    """The image slice alone, then under each layer (``draw(axes, layer)``), in one row."""
    panels = [("image", None), *layers.items()]
    fig, axes = figure(len(panels))
    for ax, (name, layer) in zip(axes, panels):
        ax.imshow(image_slice.T, cmap="gray", origin="lower", vmin=0.0, vmax=1.0)
        if layer is not None:
            draw(ax, layer)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(path, fig)


def save_lines(path: Path, points: Sequence[Mapping], series: str, x: str, xlabel: str, ylabel: str) -> Path:
    """Lines of mean Dice against ``x``, one per ``series`` value; each point's ``dice`` is
    (mean, std) and the std is drawn as an error bar."""
    fig, (ax,) = figure(1, 5.0, 3.5)
    for name in dict.fromkeys(p[series] for p in points):
        mine = [p for p in points if p[series] == name]
        ax.errorbar([p[x] for p in mine], [p["dice"][0] for p in mine], yerr=[p["dice"][1] for p in mine],
                    marker="o", capsize=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(alpha=0.3)
    return save_figure(path, fig, dpi=120)


def save_probe_curve(path: Path, curve: Mapping[int, float], random: float | None, title: str = "") -> Path:
    """The probe during a pre-training (``runs.probe_curve``): its mean Dice against the step, and
    the random encoder's as a dashed line."""
    fig, (ax,) = figure(1, 5.0, 3.5)
    steps = sorted(curve)
    ax.plot(steps, [curve[s] for s in steps], marker="o", label="pre-trained encoder")
    if random is not None:
        ax.axhline(random, linestyle="--", color="gray", label="random encoder")
    ax.set(xlabel="pre-training step", ylabel="probe mean Dice (held-out)", title=title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(path, fig, dpi=120)
