"""Synthetic paired CT / MRI abdominal phantoms with organ labels.

This is the always-available default data set for demos and tests: no download,
deterministic per seed, small enough to generate on the fly.

Every phantom is one anatomy drawn at random (per seed) and rendered twice, as CT
(Hounsfield units) and as a T1-weighted-like MRI, on one shared voxel grid with one
affine and one label map. The two modalities deliberately order the tissues
differently (in CT kidney > spleen > liver > muscle > fat, in MRI fat > liver >
kidney/spleen > muscle), so that cross-modal methods have something real to learn.

Conventions
-----------
* Arrays are indexed ``[x, y, z]`` with shape ``(size, size, size)``.
* The affine maps voxel indices to world millimetres in the NIfTI RAS+ world
  convention. Like many DICOM-converted CTs the voxel axes point Left, Posterior
  and Superior (``nibabel.aff2axcodes(affine) == ("L", "P", "S")``), so increasing
  index 0 moves towards the patient's left and increasing index 1 towards the back.
* Anatomy is defined in a normalised frame ``u in [-1, 1]^3`` (one unit = half the
  field of view), so ``spacing`` only scales the world size, not the drawing.

Only numpy and scipy.ndimage are needed to generate; nibabel is used for writing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
from scipy import ndimage

from swinssl.utils import atomic_path, atomic_write_text, writable_dir

__all__ = ["LABELS", "Phantom", "make_phantom", "write_phantom_dataset"]

LABELS: dict[int, str] = {0: "background", 1: "liver", 2: "kidney", 3: "spleen", 4: "lesion"}

MIN_SIZE = 32
DEFAULT_SPACING = (1.5, 1.5, 2.0)


@dataclass
class Phantom:
    """One synthetic case: a CT and an MRI of the same anatomy on one grid.

    Attributes:
        ct: float32 ``(X, Y, Z)``, Hounsfield units, clipped to ``[-1024, 3071]``.
        mri: float32 ``(X, Y, Z)``, arbitrary MR units, ``>= 0``, roughly ``0..1000``.
        label: uint8 ``(X, Y, Z)``, values are keys of :data:`LABELS`.
        affine: float64 ``(4, 4)``, voxel index -> world mm (NIfTI RAS+ world).
    """

    ct: np.ndarray
    mri: np.ndarray
    label: np.ndarray
    affine: np.ndarray


# --------------------------------------------------------------------------------------
# Tissue table
# --------------------------------------------------------------------------------------


class _Tissue(NamedTuple):
    name: str
    label: int  # organ label written to the label map (0 = not labelled)
    hu: float  # CT value, Hounsfield units
    t1: float  # MRI value before bias field and noise, arbitrary units (0..1000 scale)
    texture_hu: float  # std of the smooth low-frequency CT texture, HU
    texture_t1: float  # std of the smooth MRI texture, as a fraction of ``t1``


# Index in this tuple == value in the internal tissue map. Values are typical
# portal-venous-phase CT numbers (liver ~105, spleen ~120, muscle ~55 HU, as the contrast-filled
# aorta and enhanced kidneys here imply; until 2026-11 liver, spleen and muscle had unenhanced
# values, 60 / 50 / 40) and T1-weighted signal orderings; the T1 scale is
# chosen so that fat times the strongest bias (1.3) plus noise stays near 1000.
# MRI gaps between neighbouring organs exceed the bias change across an organ
# pair, so the intended ordering survives the bias field.
_TISSUES: tuple[_Tissue, ...] = (
    _Tissue("air", 0, -1000.0, 0.0, 0.0, 0.0),
    _Tissue("lung", 0, -850.0, 15.0, 25.0, 0.10),
    _Tissue("fat", 0, -100.0, 780.0, 6.0, 0.025),
    _Tissue("muscle", 0, 55.0, 260.0, 4.0, 0.025),
    _Tissue("bone", 0, 700.0, 60.0, 40.0, 0.10),
    _Tissue("vessel", 0, 180.0, 90.0, 4.0, 0.05),  # contrast-filled aorta; MR flow void
    _Tissue("liver", 1, 105.0, 560.0, 4.0, 0.025),
    _Tissue("kidney", 2, 150.0, 400.0, 5.0, 0.025),
    _Tissue("spleen", 3, 120.0, 380.0, 4.0, 0.025),
    _Tissue("lesion", 4, 50.0, 220.0, 3.0, 0.025),  # hypodense metastasis
)
_T = {t.name: i for i, t in enumerate(_TISSUES)}

# Image formation parameters.
_CT_NOISE_HU = 18.0  # white noise std before the blur (the blur then correlates it)
_MRI_NOISE = 12.0  # std of each channel of the complex Gaussian noise
_PV_SIGMA = 0.7  # partial-volume blur, voxels
_CT_RANGE = (-1024.0, 3071.0)  # 12-bit CT range


# --------------------------------------------------------------------------------------
# Random smooth fields
# --------------------------------------------------------------------------------------


def _gaussian_basis(size: int, n_ctrl: int) -> np.ndarray:
    """Interpolation weights ``(size, n_ctrl)`` from control points to voxels.

    Control points are spread evenly over ``[-1, 1]``; each voxel is a normalised
    Gaussian-weighted average of them, which is smooth and (being separable) far
    cheaper than upsampling a 3D volume with ``ndimage.zoom``.
    """
    u = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    centres = np.linspace(-1.0, 1.0, n_ctrl)
    width = 2.0 / max(n_ctrl - 1, 1)
    w = np.exp(-0.5 * ((u[:, None] - centres[None, :]) / width) ** 2)
    w /= w.sum(axis=1, keepdims=True)
    return w.astype(np.float32)


def _smooth_field(rng: np.random.Generator, shape: int | Sequence[int], n_ctrl: int) -> np.ndarray:
    """Smooth random field, float32 of ``shape`` (an int means a cube), zero mean, unit std.

    ``n_ctrl`` control points per axis (spread over the whole shape) set the
    frequency: 3 is a gentle tilt, 8 a few blobs across.
    """
    shape = (shape,) * 3 if isinstance(shape, (int, np.integer)) else tuple(shape)
    ctrl = rng.standard_normal((n_ctrl, n_ctrl, n_ctrl), dtype=np.float32)
    bx, by, bz = (_gaussian_basis(n, n_ctrl) for n in shape)
    f = np.tensordot(bx, ctrl, axes=([1], [0]))  # (x, b, c)
    f = np.tensordot(f, by, axes=([1], [1]))  # (x, c, y)
    f = np.tensordot(f, bz, axes=([1], [1]))  # (x, y, z)
    f -= f.mean()
    f /= f.std() + 1e-6
    return f


# --------------------------------------------------------------------------------------
# Geometry helpers (normalised frame)
# --------------------------------------------------------------------------------------


class _Grid(NamedTuple):
    """Voxel-centre coordinates of the normalised frame plus a displacement field."""

    u: tuple[np.ndarray, np.ndarray, np.ndarray]  # each (size,), in [-1, 1]
    disp: np.ndarray  # float32 (3, size, size, size), normalised units
    max_disp: float  # max |disp|, to pad bounding boxes

    @property
    def size(self) -> int:
        return self.u[0].shape[0]


def _make_grid(rng: np.random.Generator, size: int) -> _Grid:
    """Coordinates plus one smooth random displacement field shared by all shapes.

    One field is enough: organs sit in different places, so each sees a different
    part of it and gets its own deformation. Amplitude: std ~0.035 normalised units,
    i.e. 1-2 voxels std and a few voxels at the peaks for size 64-96.
    """
    u = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    amplitude = rng.uniform(0.03, 0.04)
    disp = np.stack([_smooth_field(rng, size, 6) * amplitude for _ in range(3)])
    return _Grid((u, u, u), disp, float(np.abs(disp).max()))


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """Random rotation matrix (3, 3) with each Euler angle within ``+-max_deg``."""
    a, b, c = np.deg2rad(rng.uniform(-max_deg, max_deg, size=3))
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _bbox(grid: _Grid, centre: Sequence[float], reach: float) -> tuple[slice, slice, slice]:
    """Index slices covering the cube ``centre +- reach`` (normalised units)."""
    size = grid.size
    out = []
    for c in centre:
        lo = int(np.floor(((c - reach) + 1.0) * size / 2.0 - 0.5))
        hi = int(np.ceil(((c + reach) + 1.0) * size / 2.0 - 0.5)) + 1
        out.append(slice(max(lo, 0), min(hi, size)))
    return tuple(out)  # type: ignore[return-value]


def _ellipsoid(
    grid: _Grid,
    centre: Sequence[float],
    radii: Sequence[float],
    rotation: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
    wobble: float = 0.0,
    deform: bool = True,
) -> tuple[tuple[slice, slice, slice], np.ndarray]:
    """Boolean mask of a rotated, deformed ellipsoid, on its bounding box.

    Two displacements warp the outline: the grid's shared field (``deform``), which
    bends the organ as a whole, and, if ``wobble > 0``, an organ-scale field drawn
    from ``rng`` with std ``wobble * mean(radii)`` (clipped at 3 std) that makes
    lobulations the shared field is too smooth to produce on small organs.

    Returns ``(slices, mask)`` where ``mask`` has the shape of ``volume[slices]``;
    working on the bounding box only keeps small organs cheap on large grids.
    """
    local_amp = wobble * float(np.mean(radii))
    reach = (max(radii) + (grid.max_disp if deform else 0.0) + 3.0 * local_amp
             + 2.0 / grid.size)
    slices = _bbox(grid, centre, reach)
    p = [
        grid.u[0][slices[0], None, None],
        grid.u[1][None, slices[1], None],
        grid.u[2][None, None, slices[2]],
    ]
    if deform:
        # Sampling the ellipsoid at displaced positions x + d(x) warps its outline.
        p = [p[a] + grid.disp[(a, *slices)] for a in range(3)]
    if local_amp > 0.0:
        shape = tuple(s.stop - s.start for s in slices)
        amp = np.float32(local_amp)
        p = [p[a] + np.clip(_smooth_field(rng, shape, 6), -3.0, 3.0) * amp for a in range(3)]
    d = [p[a] - np.float32(centre[a]) for a in range(3)]
    r = np.eye(3) if rotation is None else rotation
    value = 0.0
    for k in range(3):
        # Coordinate along the ellipsoid's k-th own axis: (R^T d)_k.
        q = d[0] * np.float32(r[0, k]) + d[1] * np.float32(r[1, k]) + d[2] * np.float32(r[2, k])
        value = value + (q / np.float32(radii[k])) ** 2
    return slices, value <= 1.0


def _elliptic_cylinder(grid: _Grid, cx: float, cy: float, a: float, b: float,
                       taper: float = 0.0, deform: float = 0.5) -> np.ndarray:
    """Normalised radius ``rho`` of a deformed elliptic cylinder along z, full grid.

    ``rho <= 1`` is inside. ``taper`` widens the section linearly towards +z
    (superior), fraction per normalised unit. ``deform`` scales the displacement
    field: long structures along z look bent rather than lumpy at full strength.
    Shape float32 ``(size, size, size)``.
    """
    k = np.float32(deform)
    x = grid.u[0][:, None, None] + k * grid.disp[0]
    y = grid.u[1][None, :, None] + k * grid.disp[1]
    scale = 1.0 + np.float32(taper) * grid.u[2][None, None, :]
    return np.sqrt(((x - cx) / (a * scale)) ** 2 + ((y - cy) / (b * scale)) ** 2)


def _paint(tissue: np.ndarray, slices, mask: np.ndarray, value: int,
           within: np.ndarray | None = None) -> None:
    """Set ``tissue[slices][mask] = value``, optionally only where ``within`` (full grid)."""
    if within is not None:
        mask = mask & within[slices]
    tissue[slices][mask] = value


# --------------------------------------------------------------------------------------
# Anatomy
# --------------------------------------------------------------------------------------


def _draw_anatomy(rng: np.random.Generator, grid: _Grid) -> np.ndarray:
    """Tissue map, uint8 ``(size, size, size)``, values index :data:`_TISSUES`.

    Normalised frame: +u0 = patient left, +u1 = posterior, +u2 = superior (matching
    the LPS voxel axes of the affine). Structures are painted in a fixed order (body,
    lungs, spine, aorta, liver, spleen, kidneys, lesions) and a later one overwrites
    an earlier one where they touch, so the label map never has overlaps.
    """
    size = grid.size
    tissue = np.zeros((size, size, size), dtype=np.uint8)

    # Body: elliptic cylinder along z, leaving air around it, with a fat shell.
    body_a = rng.uniform(0.78, 0.88)  # half width (left-right)
    body_b = rng.uniform(0.58, 0.68)  # half depth (anterior-posterior)
    body_cy = rng.uniform(-0.04, 0.02)
    fat = rng.uniform(0.06, 0.10)  # subcutaneous fat thickness
    taper = rng.uniform(-0.06, 0.06)
    rho_body = _elliptic_cylinder(grid, 0.0, body_cy, body_a, body_b, taper)
    rho_inner = _elliptic_cylinder(grid, 0.0, body_cy, body_a - fat, body_b - fat, taper)
    tissue[rho_body <= 1.0] = _T["fat"]
    inner = rho_inner <= 1.0
    tissue[inner] = _T["muscle"]
    # Organs stay inside the muscle wall; lungs additionally leave room for the ribs.
    cavity = rho_inner <= 0.93
    thorax = rho_inner <= 0.85
    del rho_body, rho_inner

    # Lungs: upper part, one on each side.
    for side in (-1.0, 1.0):
        centre = (side * rng.uniform(0.36, 0.44), rng.uniform(-0.04, 0.06), rng.uniform(0.70, 0.82))
        radii = (rng.uniform(0.26, 0.32), rng.uniform(0.36, 0.42) * body_b / 0.63,
                 rng.uniform(0.45, 0.55))
        region = _ellipsoid(grid, centre, radii, _rotation(rng, 8), rng, wobble=0.06)
        _paint(tissue, *region, _T["lung"], thorax)

    # Spine: posterior bone cylinder along z with a spinal canal behind its centre.
    spine_x = rng.uniform(-0.02, 0.02)
    spine_r = rng.uniform(0.08, 0.10)
    spine_y = body_cy + (body_b - fat) - spine_r - rng.uniform(0.07, 0.10)
    rho_spine = _elliptic_cylinder(grid, spine_x, spine_y, spine_r, spine_r)
    tissue[rho_spine <= 1.0] = _T["bone"]
    rho_canal = _elliptic_cylinder(grid, spine_x, spine_y + 0.45 * spine_r,
                                   0.35 * spine_r, 0.35 * spine_r)
    tissue[rho_canal <= 1.0] = _T["muscle"]  # cord and CSF: soft tissue density

    # Aorta: in front of the spine, slightly to the patient's left. Not labelled.
    aorta_r = rng.uniform(0.04, 0.055)
    rho_aorta = _elliptic_cylinder(grid, spine_x + rng.uniform(0.04, 0.09),
                                   spine_y - spine_r - aorta_r - 0.02, aorta_r, aorta_r)
    tissue[rho_aorta <= 1.0] = _T["vessel"]
    del rho_spine, rho_canal, rho_aorta

    # Liver: the largest organ, a right lobe on the patient's right (-u0) under the
    # right lung plus a thinner left lobe reaching across the midline anteriorly.
    liver_c = (-rng.uniform(0.28, 0.36), rng.uniform(-0.08, 0.02), rng.uniform(0.15, 0.25))
    liver_r = (rng.uniform(0.34, 0.40), rng.uniform(0.34, 0.42), rng.uniform(0.32, 0.40))
    region = _ellipsoid(grid, liver_c, liver_r, _rotation(rng, 12), rng, wobble=0.1)
    _paint(tissue, *region, _T["liver"], cavity)
    lobe_c = (liver_c[0] + rng.uniform(0.30, 0.38), liver_c[1] - rng.uniform(0.12, 0.18),
              liver_c[2] + rng.uniform(0.0, 0.08))
    lobe_r = (rng.uniform(0.22, 0.28), rng.uniform(0.13, 0.17), rng.uniform(0.13, 0.18))
    region = _ellipsoid(grid, lobe_c, lobe_r, _rotation(rng, 10), rng, wobble=0.1)
    _paint(tissue, *region, _T["liver"], cavity)

    # Spleen: left, posterior-lateral, at about the level of the liver.
    spleen_c = (rng.uniform(0.45, 0.53), rng.uniform(0.14, 0.26), rng.uniform(0.25, 0.40))
    spleen_r = (rng.uniform(0.12, 0.16), rng.uniform(0.20, 0.26), rng.uniform(0.18, 0.24))
    region = _ellipsoid(grid, spleen_c, spleen_r, _rotation(rng, 15), rng, wobble=0.15)
    _paint(tissue, *region, _T["spleen"], cavity)

    # Kidneys: posterior, either side of the spine, below the liver.
    for side in (-1.0, 1.0):
        centre = (spine_x + side * rng.uniform(0.27, 0.32), spine_y - rng.uniform(0.02, 0.08),
                  rng.uniform(-0.48, -0.32))
        radii = (rng.uniform(0.10, 0.13), rng.uniform(0.13, 0.17), rng.uniform(0.20, 0.26))
        region = _ellipsoid(grid, centre, radii, _rotation(rng, 15), rng, wobble=0.15)
        _paint(tissue, *region, _T["kidney"], cavity)

    _draw_lesions(rng, grid, tissue)
    return tissue


def _draw_lesions(rng: np.random.Generator, grid: _Grid, tissue: np.ndarray) -> None:
    """Paint 1-3 small hypodense lesions inside the liver, in place.

    Radius 0.045-0.085 normalised units (about 2.5-5 % of the body width, i.e.
    1.5-3 voxels at size 64), never below 1.5 voxels. Centres are liver voxels deep
    enough that the lesion fits; on a very small liver the deepest voxel is used,
    so a lesion always exists.
    """
    liver = tissue == _T["liver"]
    if not liver.any():  # cannot happen with the ranges above, but stay safe
        return
    # Distance to the liver boundary, computed on the liver's bounding box only.
    box = ndimage.find_objects(liver.astype(np.uint8))[0]
    depth = ndimage.distance_transform_edt(np.pad(liver[box], 1), sampling=2.0 / grid.size)
    depth = depth[1:-1, 1:-1, 1:-1]
    n_lesions = int(rng.integers(1, 4))
    for _ in range(n_lesions):
        # At least 1.5 voxels, so that coarse grids still get a visible lesion.
        radius = max(rng.uniform(0.045, 0.085), 3.0 / grid.size)
        radii = radius * rng.uniform(0.8, 1.2, size=3)
        candidates = np.argwhere(depth >= radii.max() + 2.0 / grid.size)
        if len(candidates):
            idx = candidates[rng.integers(len(candidates))]
        else:
            idx = np.array(np.unravel_index(np.argmax(depth), depth.shape))
        # Centre exactly on a voxel centre so the lesion contains at least that voxel.
        centre = [float(grid.u[a][box[a].start + idx[a]]) for a in range(3)]
        slices, mask = _ellipsoid(grid, centre, radii, _rotation(rng, 30), deform=False)
        _paint(tissue, slices, mask, _T["lesion"], liver)


# --------------------------------------------------------------------------------------
# Image formation
# --------------------------------------------------------------------------------------


def _lut(column: str) -> np.ndarray:
    return np.array([getattr(t, column) for t in _TISSUES], dtype=np.float32)


def _textures(rng: np.random.Generator, tissue: np.ndarray) -> np.ndarray:
    """Per-voxel unit texture, float32 ``(size,)*3``: a separate smooth field per tissue.

    The same texture feeds both modalities (scaled per modality), because tissue
    heterogeneity is a property of the anatomy and shows up in CT and MRI alike.
    """
    texture = np.zeros(tissue.shape, dtype=np.float32)
    for index, t in enumerate(_TISSUES):
        if t.name == "air":
            continue
        mask = tissue == index
        field = _smooth_field(rng, tissue.shape[0], 8)
        texture[mask] = field[mask]
    return texture


def _render_ct(rng: np.random.Generator, tissue: np.ndarray, texture: np.ndarray) -> np.ndarray:
    """CT in HU, float32: tissue values + texture + noise, blurred, clipped."""
    ct = _lut("hu")[tissue] + _lut("texture_hu")[tissue] * texture
    ct += rng.standard_normal(tissue.shape, dtype=np.float32) * np.float32(_CT_NOISE_HU)
    # Blur after the noise: CT noise is spatially correlated by the reconstruction
    # kernel, and the same blur gives edges a partial-volume ramp.
    ct = ndimage.gaussian_filter(ct, _PV_SIGMA)
    return np.clip(ct, *_CT_RANGE, out=ct)


def _bias_field(rng: np.random.Generator, size: int) -> np.ndarray:
    """Multiplicative MR bias field, float32 ``(size,)*3``, about 0.7..1.3.

    A linear ramp in a random direction (so the inhomogeneity is always clearly
    there) plus a very low-frequency blob. It is scaled so that over the central
    region, where the body is, it spans ``1 +- amplitude`` (amplitude 0.22-0.3);
    the empty corners may go a little beyond and are clipped at ``1 +- 1.3 amplitude``.
    """
    u = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction)
    ramp = (direction[0] * u[:, None, None] + direction[1] * u[None, :, None]
            + direction[2] * u[None, None, :]).astype(np.float32)
    field = ramp + np.float32(0.15) * _smooth_field(rng, size, 3)
    # Normalise on the central box |u0|, |u1| <= 0.7 (all z): the body's extent.
    inner = slice(int(0.15 * size), size - int(0.15 * size))
    centre = field[inner, inner, :]
    lo, hi = float(centre.min()), float(centre.max())
    field = (field - np.float32((lo + hi) / 2)) / np.float32((hi - lo) / 2)
    np.clip(field, -1.3, 1.3, out=field)
    amplitude = np.float32(rng.uniform(0.22, 0.3))
    return 1.0 + amplitude * field


def _render_mri(rng: np.random.Generator, tissue: np.ndarray, texture: np.ndarray) -> np.ndarray:
    """T1-weighted-like MRI, float32, >= 0: tissue values x texture, blur, bias, Rician noise."""
    t1 = _lut("t1")[tissue]
    mri = t1 * (1.0 + _lut("texture_t1")[tissue] * texture)
    # Blur before the noise: MR noise is added in k-space and is white in the image,
    # whereas partial volume is a property of the object sampling.
    mri = ndimage.gaussian_filter(mri, _PV_SIGMA)
    mri *= _bias_field(rng, tissue.shape[0])
    # Magnitude of complex Gaussian noise gives the Rician distribution (>= 0, and a
    # non-zero Rayleigh floor in air as in real magnitude images).
    sigma = np.float32(_MRI_NOISE)
    real = mri + rng.standard_normal(tissue.shape, dtype=np.float32) * sigma
    imag = rng.standard_normal(tissue.shape, dtype=np.float32) * sigma
    return np.sqrt(real * real + imag * imag, out=real)


def _affine(size: int, spacing: Sequence[float]) -> np.ndarray:
    """Voxel -> world (mm) affine, float64 (4, 4): LPS voxel axes, grid centred at 0."""
    sx, sy, sz = (float(s) for s in spacing)
    affine = np.diag([-sx, -sy, sz, 1.0])
    centre = (size - 1) / 2.0
    affine[:3, 3] = -affine[:3, :3] @ np.full(3, centre)
    return affine


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def make_phantom(
    size: int = 96, seed: int = 0, spacing: Sequence[float] = DEFAULT_SPACING
) -> Phantom:
    """Generate one paired CT / MRI phantom.

    Args:
        size: edge length in voxels; the volume is ``(size, size, size)``. Must be
            >= 32 (all labels are reliably present from 48 on).
        seed: seed for :func:`numpy.random.default_rng`. The same seed gives
            bit-identical arrays; different seeds give different anatomy.
        spacing: voxel size in mm along the three voxel axes.

    Returns:
        :class:`Phantom` with ``ct`` (float32 HU), ``mri`` (float32, >= 0),
        ``label`` (uint8, :data:`LABELS`) and ``affine`` (float64 (4, 4), LPS axes).
    """
    size = int(size)
    if size < MIN_SIZE:
        raise ValueError(f"phantom size must be >= {MIN_SIZE}, got {size}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(s > 0 for s in spacing):
        raise ValueError(f"spacing must be three positive numbers (mm), got {spacing}")

    rng = np.random.default_rng(seed)
    grid = _make_grid(rng, size)
    tissue = _draw_anatomy(rng, grid)
    del grid  # the displacement field is three float32 volumes; free it early
    texture = _textures(rng, tissue)
    ct = _render_ct(rng, tissue, texture)
    mri = _render_mri(rng, tissue, texture)
    label = np.array([t.label for t in _TISSUES], dtype=np.uint8)[tissue]
    return Phantom(ct=ct, mri=mri, label=label, affine=_affine(size, spacing))


def write_phantom_dataset(
    out: str | Path,
    cases: int,
    size: int = 96,
    seed: int = 0,
    test_fraction: float = 0.25,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write paired CT / MRI phantoms as a Medical-Segmentation-Decathlon-style dataset.

    Layout::

        out/dataset.json        CT view   (modality {"0": "CT"},  "pair": "dataset_mri.json")
        out/dataset_mri.json    MRI view  (modality {"0": "MRI"}, "pair": "dataset.json")
        out/imagesTr/phantom_000_ct.nii.gz, phantom_000_mri.nii.gz, ...
        out/labelsTr/phantom_000.nii.gz, ...
        out/imagesTs/..., out/labelsTs/...   held-out cases

    Case ``i`` is ``make_phantom(size, seed * 100003 + i)``. The last ``n_test``
    cases are held out, ``n_test = max(1, round(cases * test_fraction))`` when
    ``cases >= 2`` (and at most ``cases - 1`` so training is never empty), else 0.

    Unlike the original MSD, whose ``test`` entries are bare image paths, ``test``
    here lists ``{"image", "label"}`` dicts and the held-out labels are written to
    ``labelsTs`` so that test cases can be evaluated.

    Every file is written under a temporary name in its final folder and then
    moved into place with :func:`os.replace`, so readers never see half a file.

    Args:
        out: dataset folder (created if needed; an existing dataset is overwritten).
        cases: number of cases, >= 1.
        size: phantom edge length in voxels.
        seed: dataset seed.
        test_fraction: fraction of cases held out, in ``[0, 1)``.
        progress: optional ``progress(done, total)`` called after each case.

    Returns:
        Path of ``out/dataset.json``.
    """
    cases = int(cases)
    if cases < 1:
        raise ValueError(f"cases must be >= 1, got {cases}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    n_test = min(max(1, round(cases * test_fraction)), cases - 1) if cases >= 2 else 0

    out = writable_dir(out)
    for folder in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (out / folder).mkdir(parents=True, exist_ok=True)

    entries: dict[str, dict[str, list]] = {"ct": {"training": [], "test": []},
                                           "mri": {"training": [], "test": []}}
    for i in range(cases):
        split, suffix = ("test", "Ts") if i >= cases - n_test else ("training", "Tr")
        name = f"phantom_{i:03d}"
        phantom = make_phantom(size, seed * 100003 + i)
        label_rel = f"labels{suffix}/{name}.nii.gz"
        _save_nifti(phantom.label, phantom.affine, out / label_rel)
        for modality in ("ct", "mri"):
            image_rel = f"images{suffix}/{name}_{modality}.nii.gz"
            _save_nifti(getattr(phantom, modality), phantom.affine, out / image_rel)
            entries[modality][split].append({"image": f"./{image_rel}", "label": f"./{label_rel}"})
        if progress is not None:
            progress(i + 1, cases)

    views = (("ct", "CT", "dataset.json", "dataset_mri.json"),
             ("mri", "MRI", "dataset_mri.json", "dataset.json"))
    for modality, modality_name, file, pair in views:
        meta = {
            "name": f"phantom-{modality}",
            "description": (
                f"Synthetic paired CT/MRI abdominal phantoms (swinssl), {modality_name} view, "
                f"size {size}, seed {seed}. {pair} lists the same cases in the other "
                "modality. Test entries carry labels (in labelsTs) for evaluation."
            ),
            "tensorImageSize": "3D",
            "modality": {"0": modality_name},
            "labels": {str(k): v for k, v in LABELS.items()},
            "numTraining": cases - n_test,
            "numTest": n_test,
            "training": entries[modality]["training"],
            "test": entries[modality]["test"],
            "pair": pair,
        }
        atomic_write_text(out / file, json.dumps(meta, indent=2) + "\n")
    return out / "dataset.json"


def _save_nifti(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Save ``data`` as NIfTI-1 with qform = sform = ``affine`` (codes 1), atomically."""
    import nibabel as nib  # only needed for writing

    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)  # also sets pixdim from the affine
    image.set_sform(affine, code=1)
    image.set_data_dtype(data.dtype)
    with atomic_path(path) as tmp:
        nib.save(image, tmp)
