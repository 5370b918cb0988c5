"""``swinssl data check``: read every volume of a dataset and report what it is and what is wrong."""

from __future__ import annotations

from dataclasses import dataclass, field
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
    warnings: list[str] = field(default_factory=list)  # readable, but perhaps not what it claims to be

# An image of integers with at most this many distinct values looks like a label map (TotalSegmentator's
# atlas has 118, a CT thousands, an 8-bit MRI up to 256).
LABEL_LIKE_VALUES = 128
HOUNSFIELD_AIR = -500.0  # a CT of a body holds air near -1000 HU; none below this is not in HU


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
    return VolumeReport(warnings=image_warnings(image, case.images[0], case.modality),
        file=_relative(case.images[0], dataset.root),
        modality=modality,
        shape=tuple(image.shape[1:]) + ((image.shape[0],) if image.shape[0] > 1 else ()),
        spacing=spacing_of(image),
        orientation=orientation_of(image),
        intensity=(image.amin().item(), image.amax().item()),
        label_classes=classes,
    )


def image_warnings(image: torch.Tensor, path: Path, modality: str | None) -> list[str]:
    """What makes a readable image doubtful: integer values few enough for a label map, a declared
    CT with no value in Hounsfield's air range."""
    warnings = []
    low, high = image.amin().item(), image.amax().item()
    if torch.equal(image, image.round()):
        values = torch.unique(image)
        if len(values) <= LABEL_LIKE_VALUES:
            warnings.append(f"{path}: looks like a label map, not an image ({len(values)} integer values, "
                            f"{low:g}..{high:g}); labels go beside their images (labelsTr/, *_label files)")
    if modality == "CT" and low > HOUNSFIELD_AIR:
        warnings.append(f"{path}: declared CT but nothing below {HOUNSFIELD_AIR:g} (range {low:g}..{high:g}): not "
                        "Hounsfield units, or a crop without air; the CT normalisation (preprocess.ct_window) "
                        "assumes HU")
    return warnings


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
