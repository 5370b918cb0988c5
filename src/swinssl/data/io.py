"""Reading volumes and labels with MONAI, and checking them before anything else sees them.

Every read goes through ``read_image`` / ``read_label``, which turn library failures
and bad content into one-line ``DataError`` messages that start with the file:
missing, empty or truncated files, unknown formats, arrays that are not 3D,
NaN/Inf voxels, labels whose grid differs from their image, label values outside
the declared classes.
"""

from __future__ import annotations

import functools
import logging
import re
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImage

from swinssl.data.discover import VOLUME_SUFFIXES, Case, is_dicom_file
from swinssl.errors import DataError

# MONAI's DICOM readers warn about an optional GPU decoder when created; it is noise here.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    _loader = LoadImage(image_only=True, ensure_channel_first=True, dtype=np.float32)


@functools.cache
def _itk_loader() -> LoadImage:
    """ITK, created on first use: only NRRD files that pynrrd cannot read need it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LoadImage(reader="ITKReader", image_only=True, ensure_channel_first=True, dtype=np.float32)

AFFINE_TOLERANCE_MM = 1e-3
# Reading an image with its label or channels also allows this relative slack (a few hundredths of a mm
# at origins hundreds of mm out); evaluate does not. Kept apart so that what loaded before still loads.
_READ_RTOL = 1e-4


def read_volume(path: str | Path) -> MetaTensor:
    """Read one file (or DICOM series folder) as a channel-first float32 MetaTensor (C, X, Y, Z)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        if not any(is_dicom_file(p) for p in path.iterdir() if p.is_file()):
            raise DataError(f"{path}: folder holds no DICOM files")
    else:
        if path.stat().st_size == 0:
            raise DataError(f"{path}: empty file (0 bytes)")
        if not path.name.lower().endswith(VOLUME_SUFFIXES + (".dcm",)):
            raise DataError(f"{path}: unsupported file type (expected one of {', '.join(VOLUME_SUFFIXES)})")
    loaders = [lambda: _loader]
    if path.name.lower().endswith((".nrrd", ".nhdr")):
        loaders.append(_itk_loader)  # pynrrd needs 'space directions'; ITK also reads 'spacings'-only files
    for i, loader in enumerate(loaders):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return loader()(str(path))
        except Exception as err:  # noqa: BLE001 - any reader failure becomes one clear line
            if i == len(loaders) - 1:
                raise DataError(f"{path}: cannot read ({_reason(err, path)})") from None
    raise AssertionError("unreachable")


def _reason(err: Exception, path: Path) -> str:
    """The library's message on one line, without the path (the message starts with it already)."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    text = text.replace(str(path), "the file").replace(path.name, "the file")
    # MONAI prefixes reader failures with the list of readers it tried; keep the cause.
    text = re.sub(r"^.*?cannot find a suitable reader for file: the file\.?\s*", "", text)
    text = text[:240]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def read_image(paths: str | Path | Sequence[str | Path], channels: int | None = None) -> MetaTensor:
    """Read an image from one file or one file per channel; check it is 3D and finite.

    Returns float32 ``(C, X, Y, Z)`` with the affine in ``.affine`` (RAS world, as MONAI reads it).
    ``channels`` is the expected channel count (None: one per file).
    """
    files = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    parts = [read_volume(f) for f in files]
    per_file = channels if len(files) == 1 and channels else 1
    for f, part in zip(files, parts):
        _check_3d(f, part, per_file)
        _check_finite(f, part)
    image = parts[0]
    if len(parts) > 1:
        for f, part in zip(files[1:], parts[1:]):
            check_same_grid(f, part.shape[1:], part.affine, files[0], parts[0].shape[1:], parts[0].affine,
                            what="channel", rtol=_READ_RTOL)
        image = MetaTensor(torch.cat([p.as_tensor() for p in parts]), meta=parts[0].meta)
    if channels is not None and image.shape[0] != channels:
        raise DataError(f"{files[0]}: has {image.shape[0]} channels, expected {channels}")
    return image


def read_label(path: str | Path, image: MetaTensor, image_path: str | Path, classes: Sequence[int] | None = None) -> MetaTensor:
    """Read a label map for ``image``; check grid, integrality and class values.

    Returns float32 ``(1, X, Y, Z)`` holding class indices (MONAI's convention).
    """
    path = Path(path)
    label = read_volume(path)
    _check_3d(path, label)
    _check_finite(path, label)
    check_same_grid(path, label.shape[1:], label.affine, Path(image_path), image.shape[1:], image.affine,
                    what="label", rtol=_READ_RTOL)
    values = torch.unique(label)
    if not torch.equal(values, values.round()):
        raise DataError(f"{path}: label has non-integer values (e.g. {values[values != values.round()][0].item():g})")
    if classes is not None:
        extra = sorted(set(int(v) for v in values.tolist()) - set(int(c) for c in classes))
        if extra:
            raise DataError(f"{path}: label values {extra} are not among the declared classes {sorted(classes)}")
    return label


def _check_3d(path: Path, image: MetaTensor, channels: int = 1) -> None:
    """MONAI reads a 2D file as (1, X, Y) and a 4D one as (C, X, Y, Z): both fail here."""
    if image.ndim != 4 or image.shape[0] != channels:
        shape = tuple(image.shape[1:]) + ((image.shape[0],) if image.shape[0] > 1 else ())
        want = "a 3D volume" if channels == 1 else f"a 3D volume with {channels} channels"
        raise DataError(f"{path}: expected {want}, got a {len(shape)}D array of shape {shape}")
    if min(image.shape[1:]) < 1:
        raise DataError(f"{path}: empty volume of shape {tuple(image.shape[1:])}")


def _check_finite(path: Path, image: torch.Tensor) -> None:
    # A NaN or Inf anywhere makes the sum non-finite: one pass and no voxel-sized mask for the
    # usual, clean volume. Only a non-finite sum (or an overflow of it) counts the voxels.
    if torch.isfinite(image.sum()):
        return
    bad = (~torch.isfinite(image)).sum().item()
    if bad:
        nan = torch.isnan(image).sum().item()
        raise DataError(f"{path}: {bad} non-finite voxel{'s' if bad > 1 else ''} ({nan} NaN, {bad - nan} Inf)")


def check_same_grid(
    path: Path,
    shape: Sequence[int],
    affine: np.ndarray | torch.Tensor,
    ref_path: Path,
    ref_shape: Sequence[int],
    ref_affine: np.ndarray | torch.Tensor,
    *,
    what: str = "",
    ref_what: str = "image",
    rtol: float = 0.0,
) -> None:
    """DataError naming ``path`` and ``ref_path`` unless the two volumes share one voxel grid.

    ``shape`` and ``ref_shape`` are spatial (X, Y, Z); the 4x4 affines must agree within
    ``AFFINE_TOLERANCE_MM`` plus ``rtol`` times each reference entry. ``what`` and ``ref_what``
    are the roles written in the message ("label", "image"; an empty ``what`` writes none).
    The message says which part of the affine differs (spacing, origin or direction) and by how much.
    """
    ref = ref_path.name if ref_path.parent == path.parent else str(ref_path)  # a sibling's name is enough
    role = f"{what} " if what else ""
    if tuple(shape) != tuple(ref_shape):
        raise DataError(f"{path}: {role}shape {tuple(shape)} differs from {ref_what} {ref} shape {tuple(ref_shape)}")
    a, b = np.asarray(affine, dtype=np.float64), np.asarray(ref_affine, dtype=np.float64)
    if not np.allclose(a, b, atol=AFFINE_TOLERANCE_MM, rtol=rtol):
        raise DataError(f"{path}: {role}affine differs from {ref_what} {ref} ({_affine_difference(a, b, rtol)})")


def header_grid(path: str | Path) -> tuple[tuple[int, ...], np.ndarray] | None:
    """The voxel grid of a NIfTI or NRRD file from its header alone, no voxel read: spatial shape and
    the RAS affine, as ``read_volume`` gives them. None where the header cannot tell (DICOM, other
    formats, more than 3 dimensions, an unreadable header): the read checks those."""
    path = Path(path)
    name = path.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            image = nib.load(str(path))
            shape, affine = tuple(int(n) for n in image.shape), np.asarray(image.affine, dtype=np.float64)
        elif name.endswith((".nrrd", ".nhdr")):
            import nrrd

            header = nrrd.read_header(str(path))
            shape = tuple(int(n) for n in header["sizes"])
            affine = np.eye(4)
            affine[:3, :3] = np.asarray(header["space directions"], dtype=np.float64).T
            affine[:3, 3] = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
            space = str(header.get("space", "")).lower()
            if space not in ("left-posterior-superior", "lps", "right-anterior-superior", "ras"):
                return None
            if space in ("left-posterior-superior", "lps"):
                affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
        else:
            return None
    except Exception:  # noqa: BLE001 - a header this cannot parse is left to the reader's own message
        return None
    return (shape, affine) if len(shape) == 3 and np.isfinite(affine).all() else None


def check_grids(pairs: Sequence[tuple[Path, Path]], what: str, ref_what: str = "image",
                rtol: float = _READ_RTOL) -> None:
    """``check_same_grid`` for each (file, reference file) pair from their headers alone, before any
    work starts: the first mismatch raises ``DataError`` naming both files. Pairs whose headers do
    not tell are left to the check made when the voxels are read."""
    for path, ref_path in pairs:
        grid, ref = header_grid(path), header_grid(ref_path)
        if grid is not None and ref is not None:
            check_same_grid(Path(path), grid[0], grid[1], Path(ref_path), ref[0], ref[1], what=what,
                            ref_what=ref_what, rtol=rtol)


def check_case_grids(cases: Sequence[Case]) -> None:
    """``check_grids`` of every case's channel files and label against its first image file."""
    check_grids([(f, c.images[0]) for c in cases for f in c.images[1:]], what="channel")
    check_grids([(c.label, c.images[0]) for c in cases if c.label is not None], what="label")


def _affine_difference(a: np.ndarray, b: np.ndarray, rtol: float) -> str:
    """Which part differs (spacing, origin or direction), so the user knows what went wrong."""
    worst = f"max difference {float(np.abs(a - b).max()):.4g} mm"
    spacing_a, spacing_b = spacing_of(a), spacing_of(b)
    if not np.allclose(spacing_a, spacing_b, atol=AFFINE_TOLERANCE_MM, rtol=rtol):
        return f"spacing {_fmt(spacing_a)} vs {_fmt(spacing_b)} mm, {worst}"
    if not np.allclose(a[:3, 3], b[:3, 3], atol=AFFINE_TOLERANCE_MM, rtol=rtol):
        return f"origin {_fmt(a[:3, 3])} vs {_fmt(b[:3, 3])} mm, {worst}"
    return f"orientation/direction differs, {worst}"


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def spacing_of(image: MetaTensor | np.ndarray) -> tuple[float, ...]:
    """Voxel size in mm along X, Y, Z: column norms of the 3x3 part of the affine (a MetaTensor's, or one given)."""
    affine = np.asarray(image.affine if isinstance(image, MetaTensor) else image, dtype=np.float64)
    return tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))


def orientation_of(image: MetaTensor) -> str:
    import nibabel as nib

    return "".join(nib.aff2axcodes(np.asarray(image.affine, dtype=np.float64)))


def guess_modality(image: torch.Tensor) -> str:
    """CT if the volume holds Hounsfield-like negative values (air near -1000), else MRI."""
    low = torch.quantile(image.flatten()[:: max(1, image.numel() // 200_000)].float(), 0.01).item()
    return "CT" if low < -500 else "MRI"
