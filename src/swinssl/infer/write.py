"""Writing masks atomically: NIfTI (nibabel, scanner coordinates in both qform and sform) and NRRD
(pynrrd, in LPS space, as 3D Slicer and ITK expect).

MONAI 1.6's ``NibabelWriter`` / ``ITKWriter`` were tried here: with ``resample=False`` their
``set_metadata`` still runs ``spatial_resample`` of the array onto its own affine, which
failed on a prediction of the real volumes (tests/test_finetune.py, "Affine ... is not
invertible"), so the two formats are written directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import nibabel as nib
import nrrd
import numpy as np
from monai.data import MetaTensor

from swinssl.utils import atomic_path

OutputFormat = Literal["nifti", "same"]
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # NRRD files are written in LPS, as 3D Slicer and ITK expect


def output_suffix(source: Path, output_format: OutputFormat) -> str:
    """``.nii.gz`` by default; with ``same``, NRRD stays NRRD and NIfTI keeps its extension.

    Formats we do not write (MHA/MHD, DICOM series) get NIfTI either way.
    """
    name = source.name.lower()
    if output_format == "same":
        if name.endswith((".nrrd", ".nhdr")):
            return ".nrrd"
        if name.endswith(".nii"):
            return ".nii"
    return ".nii.gz"


def write_mask(mask: MetaTensor, path: str | Path) -> Path:
    """Write ``mask`` (1, X, Y, Z) with its affine to ``path`` (.nii, .nii.gz or .nrrd), atomically.

    Stored as uint8, or uint16 when a class index exceeds 255. A failure leaves no file behind.
    """
    path = Path(path)
    array = mask[0].detach().cpu().numpy()
    array = array.astype(np.uint8 if array.max(initial=0) <= 255 else np.uint16)
    affine = np.asarray(mask.affine, dtype=np.float64)  # MONAI's world: RAS
    with atomic_path(path) as tmp:
        if path.name.lower().endswith(".nrrd"):
            _write_nrrd(tmp, array, affine)
        else:
            _write_nifti(tmp, array, affine)
    return path


def _write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    image = nib.Nifti1Image(array, affine)
    # Scanner coordinates in both qform and sform: viewers that read either agree on the placement.
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.set_data_dtype(array.dtype)
    nib.save(image, str(path))


def _write_nrrd(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    lps = RAS_TO_LPS @ affine
    header = {
        "space": "left-posterior-superior",
        "space directions": lps[:3, :3].T,  # one row per array axis: the step of that axis in mm
        "space origin": lps[:3, 3],
        "kinds": ["domain", "domain", "domain"],
        "encoding": "gzip",
    }
    nrrd.write(str(path), array, header=header, index_order="F")
