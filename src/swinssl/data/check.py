"""``swinssl data check``: read every volume of a dataset and report what it is and what is wrong.

What a check found is remembered (``memo``, beside the cache's checksums) by the stamps (path,
size, mtime_ns) of the case's files and what the dataset declares about them, so checking an
unchanged corpus again reads no volume: only a new or changed case is read.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from swinssl.data.discover import Case, Dataset
from swinssl.data.io import guess_modality, orientation_of, read_image, read_label, spacing_of
from swinssl.errors import DataError
from swinssl.utils import atomic_write_text


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


def check_dataset(dataset: Dataset, progress=None, memo: Path | None = None) -> tuple[list[VolumeReport], list[str]]:
    """Check every case; returns the reports of good cases and one line per problem. ``memo``: a folder
    remembering each case's result (module docstring); None: every case is read."""
    reports, problems = [], []
    for case in dataset.cases:
        result = _remembered(case, dataset, memo)
        if result is None:
            try:
                result = check_case(case, dataset)
            except DataError as err:
                result = str(err)
            _remember(case, dataset, memo, result)
        (problems if isinstance(result, str) else reports).append(result)
        if progress is not None:
            progress()
    return reports, problems


def _memo_file(case: Case, dataset: Dataset, memo: Path) -> Path:
    """Where a case's result is remembered: named by its files' stamps and the dataset's declarations."""
    stamps = []
    for f in (*case.images, *([case.label] if case.label else [])):
        st = Path(f).stat()
        stamps.append([str(Path(f).resolve()), st.st_size, st.st_mtime_ns])
    key = json.dumps([stamps, case.modality, dataset.channel_names, sorted(dataset.labels), str(dataset.root)])
    return memo / f"{hashlib.sha256(key.encode()).hexdigest()}.json"


def _remembered(case: Case, dataset: Dataset, memo: Path | None) -> VolumeReport | str | None:
    if memo is None:
        return None
    try:
        saved = json.loads(_memo_file(case, dataset, memo).read_text())
    except (OSError, ValueError):
        return None  # not checked yet, changed, unreadable memo, or a file gone (check_case says which)
    if "problem" in saved:
        return saved["problem"]
    fields = saved["report"]
    return VolumeReport(**{**fields, "shape": tuple(fields["shape"]), "spacing": tuple(fields["spacing"]),
                           "intensity": tuple(fields["intensity"])})


def _remember(case: Case, dataset: Dataset, memo: Path | None, result: VolumeReport | str) -> None:
    if memo is None:
        return
    try:
        memo.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"problem": result} if isinstance(result, str) else {"report": asdict(result)})
        atomic_write_text(_memo_file(case, dataset, memo), text)
    except OSError:
        pass  # a missing file (its problem is the result) or a read-only memo: checked again next time


def _relative(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)
