"""``swinssl data check``: read every volume of a dataset and report what it is and what is wrong."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from swinssl.data.discover import Case, Dataset
from swinssl.data.io import guess_modality, orientation_of, read_image, read_label, spacing_of
from swinssl.errors import DataError


@dataclass
class VolumeReport:
    file: str
    modality: str  # "CT", "MRI", or "CT?" / "MRI?" when guessed from intensities
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    orientation: str
    intensity: tuple[float, float]
    label_classes: list[int] | None  # classes present in the label; None without label


def check_case(case: Case, dataset: Dataset) -> VolumeReport:
    """Read and check one case; raises ``DataError`` on the first problem."""
    image = read_image(case.images, channels=max(1, len(dataset.channel_names)) if len(case.images) == 1 else None)
    if torch.equal(image.amin(), image.amax()):
        raise DataError(f"{case.images[0]}: constant volume (every voxel is {image.amin().item():g})")
    classes = None
    if case.label is not None:
        label = read_label(case.label, image, case.images[0], classes=list(dataset.labels) or None)
        classes = [int(v) for v in torch.unique(label).tolist()]
    modality = case.modality or f"{guess_modality(image)}?"
    return VolumeReport(
        file=_relative(case.images[0], dataset.root),
        modality=modality,
        shape=tuple(image.shape[1:]) + ((image.shape[0],) if image.shape[0] > 1 else ()),
        spacing=spacing_of(image),
        orientation=orientation_of(image),
        intensity=(image.amin().item(), image.amax().item()),
        label_classes=classes,
    )


def check_dataset(dataset: Dataset, progress=None) -> tuple[list[VolumeReport], list[str]]:
    """Check every case; returns the reports of good cases and one line per problem."""
    reports, problems = [], []
    for case in dataset.cases:
        try:
            reports.append(check_case(case, dataset))
        except DataError as err:
            problems.append(str(err))
        if progress is not None:
            progress()
    return reports, problems


def _relative(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)
