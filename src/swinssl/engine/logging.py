"""What a run shows: CSV metrics, TensorBoard scalars, PNG previews."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Mapping

import torch

from swinssl.utils import atomic_path


class MetricLogger:
    """Appends ``step, split, name, value`` rows to ``metrics.csv`` and mirrors them to TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool = True):
        self.csv_path = run_dir / "metrics.csv"
        new = not self.csv_path.exists()
        self.file = open(self.csv_path, "a", newline="")
        self.writer = csv.writer(self.file)
        if new:
            self.writer.writerow(["step", "split", "name", "value"])
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, step: int, split: str, values: Mapping[str, float]) -> None:
        for name, value in values.items():
            self.writer.writerow([step, split, name, f"{value:.6g}"])
            if self.tb is not None:
                self.tb.add_scalar(f"{split}/{name}", value, step)
        self.file.flush()

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: Path) -> list[dict]:
    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        return [{**row, "step": int(row["step"]), "value": float(row["value"])} for row in csv.DictReader(f)]


def save_figure(path: Path, fig) -> Path:
    """Write a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    return path


def save_preview(path: Path, panels: Mapping[str, torch.Tensor], title: str = "") -> Path:
    """One row of mid-slices: each panel a (D, H, W) or (C, D, H, W) volume; the middle slice of D is shown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.2), squeeze=False)
    for ax, (name, volume) in zip(axes[0], panels.items()):
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    image = image.detach().float().cpu().numpy()
    masks = {name: m.detach().cpu().numpy() for name, m in masks.items()}
    first = next(iter(masks.values()))
    z = int(np.argmax((first > 0).sum(axis=(0, 1)))) if first.any() else image.shape[2] // 2
    top = max(max(int(m.max()) for m in masks.values()), 1)
    panels = [("image", None), *masks.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.2), squeeze=False)
    for ax, (name, mask) in zip(axes[0], panels):
        ax.imshow(image[:, :, z].T, cmap="gray", origin="lower", vmin=0.0, vmax=1.0)
        if mask is not None:
            shown = np.ma.masked_equal(mask[:, :, z].T, 0)
            ax.imshow(shown, cmap="tab10", vmin=1, vmax=max(top, 10), origin="lower", alpha=0.5, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(path, fig)


def save_heatmap_overlay(path: Path, image: torch.Tensor, maps: Mapping[str, torch.Tensor], title: str = "") -> Path:
    """The image, then the image under each heat map (jet, half transparent), on the middle axial
    slice (last axis). ``image`` (X, Y, Z) in [0, 1]; maps the same shape, scaled to [0, 1] each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = image.detach().float().cpu()
    z = image.shape[2] // 2
    panels = [("image", None), *maps.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.2), squeeze=False)
    for ax, (name, heat) in zip(axes[0], panels):
        ax.imshow(image[:, :, z].T, cmap="gray", origin="lower", vmin=0.0, vmax=1.0)
        if heat is not None:
            heat = heat.detach().float().cpu()
            heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-12)
            ax.imshow(heat[:, :, z].T, cmap="jet", origin="lower", vmin=0.0, vmax=1.0, alpha=0.5)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(path, fig)
