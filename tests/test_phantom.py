"""Tests for the synthetic paired CT / MRI phantom (swinssl.data.phantom)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from swinssl.data.phantom import LABELS, Phantom, make_phantom, write_phantom_dataset

LIVER, KIDNEY, SPLEEN, LESION = 1, 2, 3, 4


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    return make_phantom(64, seed=0)


@pytest.fixture(scope="module")
def phantoms64() -> list[Phantom]:
    return [make_phantom(64, seed=s) for s in (1, 2, 3)]


def body_mask(p: Phantom) -> np.ndarray:
    """Everything inside the skin outline (lungs included), from the CT.

    Holes are filled per axial slice: the lungs reach the top of the field of view,
    so in 3D they would count as connected to the outside.
    """
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    return ndimage.binary_fill_holes(p.ct > -500, structure=in_plane)


def interior(mask: np.ndarray, iterations: int = 1) -> np.ndarray:
    """Mask without its boundary voxels, to keep partial volume out of medians."""
    return ndimage.binary_erosion(mask, iterations=iterations)


def fat_ring(p: Phantom) -> np.ndarray:
    """Voxels 1-2 voxels inside the skin: the subcutaneous fat layer."""
    body = body_mask(p)
    return interior(body, 1) & ~interior(body, 2)


def muscle_interior(p: Phantom) -> np.ndarray:
    """Unlabelled soft tissue away from edges (selected on CT only)."""
    return interior((p.ct > 45) & (p.ct < 65) & (p.label == 0), 2)


def median(image: np.ndarray, mask: np.ndarray) -> float:
    assert mask.sum() > 0
    return float(np.median(image[mask]))


def organ_medians(image: np.ndarray, p: Phantom) -> dict[int, float]:
    """Median per organ label; interior voxels for organs, all voxels for small lesions."""
    out = {k: median(image, interior(p.label == k)) for k in (LIVER, KIDNEY, SPLEEN)}
    out[LESION] = median(image, p.label == LESION)
    return out


def world_centroid(p: Phantom, mask: np.ndarray) -> np.ndarray:
    ijk = np.argwhere(mask).mean(axis=0)
    return p.affine[:3, :3] @ ijk + p.affine[:3, 3]


# ------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_phantom():
    a, b = make_phantom(48, seed=7), make_phantom(48, seed=7)
    for name in ("ct", "mri", "label", "affine"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_different_seeds_give_different_anatomy():
    a, b = make_phantom(48, seed=1), make_phantom(48, seed=2)
    # Different shapes, not just different noise: the label maps disagree somewhere
    # in every organ.
    for k in (LIVER, KIDNEY, SPLEEN):
        assert ((a.label == k) != (b.label == k)).sum() > 20, LABELS[k]
    assert not np.array_equal(a.ct, b.ct)
    assert not np.array_equal(a.mri, b.mri)


# ------------------------------------------------------------------- anatomy


def test_arrays_have_documented_shapes_and_dtypes(phantom):
    assert phantom.ct.shape == phantom.mri.shape == phantom.label.shape == (64, 64, 64)
    assert phantom.ct.dtype == np.float32
    assert phantom.mri.dtype == np.float32
    assert phantom.label.dtype == np.uint8
    assert phantom.affine.dtype == np.float64 and phantom.affine.shape == (4, 4)
    assert set(np.unique(phantom.label)) <= set(LABELS)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_every_label_present_with_sensible_sizes(seed):
    p = make_phantom(48, seed=seed)
    counts = np.bincount(p.label.ravel(), minlength=len(LABELS))
    assert counts[LESION] > 0
    assert counts[KIDNEY] > 100 and counts[SPLEEN] > 100
    # Liver is the largest organ, the lesion the smallest.
    assert counts[LIVER] > max(counts[KIDNEY], counts[SPLEEN])
    assert counts[LESION] < min(counts[KIDNEY], counts[SPLEEN])
    # Organs fill a plausible fraction of the volume, not all of it.
    assert 0.01 < counts[1:].sum() / p.label.size < 0.15
    # Everything labelled lies inside the body, with air around the body.
    body = body_mask(p)
    assert np.all(body[p.label > 0])
    assert not body[0].any() and not body[-1].any()
    # The lesion sits in the liver: it is surrounded by liver, not by other tissue.
    lesion = p.label == LESION
    shell = ndimage.binary_dilation(lesion) & ~lesion
    assert np.mean(p.label[shell] == LIVER) > 0.8


def ellipsoid_mismatch(mask: np.ndarray) -> float:
    """Voxels differing from the ellipsoid with the same centroid and second moments,
    as a fraction of the mask's size (a voxelised perfect ellipsoid gives ~0.01-0.03)."""
    pts = np.argwhere(mask).astype(float)
    centre = pts.mean(axis=0)
    inv = np.linalg.inv(np.cov((pts - centre).T) * 5.0)  # solid ellipsoid: cov = r^2 / 5
    grid = np.argwhere(np.ones(mask.shape, bool)) - centre
    fitted = (np.einsum("ni,ij,nj->n", grid, inv, grid) <= 1.0).reshape(mask.shape)
    return float((fitted != mask).sum() / mask.sum())


def test_organs_are_deformed_not_perfect_ellipsoids(phantom, phantoms64):
    # Kidneys are rarely clipped by neighbours, so their deviation from an ellipsoid
    # comes from the random deformation (undeformed they average ~0.03 here).
    mismatches = []
    for p in [phantom, *phantoms64]:
        kidneys, n = ndimage.label(p.label == KIDNEY)
        mismatches += [ellipsoid_mismatch(kidneys == i) for i in range(1, n + 1)]
    assert np.mean(mismatches) > 0.06


def test_anatomy_is_on_the_correct_sides(phantom):
    # World coordinates are RAS+: x grows towards the patient's Right, y towards
    # Anterior, z towards Superior.
    p = phantom
    liver = world_centroid(p, p.label == LIVER)
    spleen = world_centroid(p, p.label == SPLEEN)
    assert liver[0] > 0 > spleen[0]  # liver on the right, spleen on the left
    kidneys, n = ndimage.label(p.label == KIDNEY)
    assert n == 2
    k1, k2 = (world_centroid(p, kidneys == i) for i in (1, 2))
    assert k1[0] * k2[0] < 0  # one kidney either side of the midline
    assert k1[1] < liver[1] and k2[1] < liver[1]  # kidneys posterior to the liver
    assert max(k1[2], k2[2]) < liver[2]  # and below it
    # Lungs (air-like density inside the body) are in the superior part.
    lung = body_mask(p) & (p.ct < -600)
    assert world_centroid(p, lung)[2] > liver[2]


# ------------------------------------------------------------------- CT


def test_ct_intensities_are_plausible_hu(phantom):
    p = phantom
    ct = organ_medians(p.ct, p)
    assert ct[LIVER] == pytest.approx(105, abs=12)  # portal-venous phase
    assert ct[KIDNEY] == pytest.approx(150, abs=20)
    assert ct[SPLEEN] == pytest.approx(120, abs=12)
    assert 0 < ct[LESION] < ct[LIVER] - 15  # hypodense lesion
    air = ~ndimage.binary_dilation(body_mask(p), iterations=2)
    assert median(p.ct, air) == pytest.approx(-1000, abs=5)
    assert 2.0 < float(p.ct[air].std()) < 15.0  # noisy, but not absurdly
    assert median(p.ct, fat_ring(p)) == pytest.approx(-100, abs=35)
    assert median(p.ct, muscle_interior(p)) == pytest.approx(55, abs=8)
    lung = body_mask(p) & (p.ct < -600)
    assert median(p.ct, lung) == pytest.approx(-850, abs=50)
    assert p.ct.max() > 500  # bone
    assert p.ct.min() >= -1024 and p.ct.max() <= 3071


# ------------------------------------------------------------------- MRI


def test_mri_is_nonnegative_and_scaled(phantom):
    mri = phantom.mri
    assert mri.min() >= 0
    assert 500 < np.percentile(mri, 99.9) < 1300
    air = ~ndimage.binary_dilation(body_mask(phantom), iterations=2)
    assert median(mri, air) < 30  # air is dark (Rician noise floor only)


def test_mri_contrast_order_differs_from_ct(phantom, phantoms64):
    for p in [phantom, *phantoms64]:
        ct, mr = organ_medians(p.ct, p), organ_medians(p.mri, p)
        fat = fat_ring(p)
        ct_fat, mr_fat = median(p.ct, fat), median(p.mri, fat)
        ct_muscle, mr_muscle = median(p.ct, muscle_interior(p)), median(p.mri, muscle_interior(p))
        # CT (portal-venous phase): kidney > spleen > liver > muscle > fat.
        assert ct[KIDNEY] > ct[SPLEEN] > ct[LIVER] > ct_muscle > ct_fat
        # MRI (T1-like): fat > liver > kidney, spleen > muscle.
        assert mr_fat > mr[LIVER] > max(mr[KIDNEY], mr[SPLEEN])
        assert min(mr[KIDNEY], mr[SPLEEN]) > mr_muscle
        # The orderings genuinely disagree: kidney vs liver and fat vs everything.
        assert (ct[KIDNEY] > ct[LIVER]) and (mr[KIDNEY] < mr[LIVER])
        # Lesion darker than liver in both.
        assert mr[LESION] < mr[LIVER] and ct[LESION] < ct[LIVER]


def fitted_trend_range(image: np.ndarray, mask: np.ndarray) -> float:
    """max/min ratio over ``mask`` of a log-linear fit ``log I = a + g . x``."""
    n = image.shape[0]
    x = np.argwhere(mask) / n * 2 - 1
    design = np.c_[x, np.ones(len(x))]
    coef = np.linalg.lstsq(design, np.log(image[mask] + 1.0), rcond=None)[0]
    trend = design[:, :3] @ coef[:3]
    return float(np.exp(np.percentile(trend, 99) - np.percentile(trend, 1)))


def test_mri_has_bias_field(phantom, phantoms64):
    # In one homogeneous tissue (muscle) a smooth multiplicative bias shows up as a
    # large-scale intensity trend: >= ~20 % here; without bias it stays ~1-6 %
    # (texture and partial volume only). CT of the same voxels has no such trend.
    for p in [phantom, *phantoms64]:
        muscle = muscle_interior(p)
        assert fitted_trend_range(p.mri, muscle) > 1.12
        assert fitted_trend_range(p.ct + 1024.0, muscle) < 1.02


# ------------------------------------------------------------------- geometry


def test_affine_and_orientation():
    p = make_phantom(48, seed=0)
    assert nib.aff2axcodes(p.affine) == ("L", "P", "S")
    np.testing.assert_allclose(np.linalg.norm(p.affine[:3, :3], axis=0), [1.5, 1.5, 2.0])
    assert np.any(p.affine[:3, 3] != 0)
    centre = p.affine @ np.array([23.5, 23.5, 23.5, 1.0])
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-9)

    q = make_phantom(48, seed=0, spacing=(0.8, 0.9, 3.0))
    np.testing.assert_allclose(np.linalg.norm(q.affine[:3, :3], axis=0), [0.8, 0.9, 3.0])
    assert nib.aff2axcodes(q.affine) == ("L", "P", "S")
    # Spacing changes only the affine, not the drawing.
    np.testing.assert_array_equal(p.label, q.label)


@pytest.mark.parametrize("size", [0, 16, 31])
def test_size_too_small_raises(size):
    with pytest.raises(ValueError, match=str(size)):
        make_phantom(size)


# ------------------------------------------------------------------- dataset writing


def test_write_dataset_layout(tmp_path):
    out = tmp_path / "phantom"
    calls = []
    result = write_phantom_dataset(out, cases=4, size=48, seed=3,
                                   progress=lambda done, total: calls.append((done, total)))
    assert result == out / "dataset.json"
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]

    ct_meta = json.loads((out / "dataset.json").read_text())
    mr_meta = json.loads((out / "dataset_mri.json").read_text())
    views = ((ct_meta, "CT", "dataset_mri.json"), (mr_meta, "MRI", "dataset.json"))
    for meta, modality, pair in views:
        for key in ("name", "description", "tensorImageSize", "modality", "labels",
                    "numTraining", "numTest", "training", "test"):
            assert key in meta
        assert meta["tensorImageSize"] == "3D"
        assert meta["modality"] == {"0": modality}
        assert meta["labels"] == {str(k): v for k, v in LABELS.items()}
        assert meta["pair"] == pair
        # round(4 * 0.25) = 1 held-out case, the last one.
        assert meta["numTraining"] == len(meta["training"]) == 3
        assert meta["numTest"] == len(meta["test"]) == 1
        assert meta["test"][0]["image"].startswith("./imagesTs/phantom_003_")
    assert ct_meta["name"] == "phantom-ct" and mr_meta["name"] == "phantom-mri"
    assert ct_meta["training"][0] == {"image": "./imagesTr/phantom_000_ct.nii.gz",
                                      "label": "./labelsTr/phantom_000.nii.gz"}
    # Paired: same labels, same order, the image differs only by modality suffix.
    for split in ("training", "test"):
        for c, m in zip(ct_meta[split], mr_meta[split]):
            assert c["label"] == m["label"]
            assert c["image"].replace("_ct.nii.gz", "_mri.nii.gz") == m["image"]
            for entry in (c, m):
                assert (out / entry["image"]).is_file() and (out / entry["label"]).is_file()
    assert (out / "labelsTs" / "phantom_003.nii.gz").is_file()

    # Files hold the phantom of the documented seed, with its affine.
    expected = make_phantom(48, seed=3 * 100003 + 0)
    image = nib.load(out / "imagesTr" / "phantom_000_ct.nii.gz")
    label = nib.load(out / "labelsTr" / "phantom_000.nii.gz")
    mri = nib.load(out / "imagesTr" / "phantom_000_mri.nii.gz")
    for img in (image, label, mri):
        assert img.shape == (48, 48, 48)
        np.testing.assert_allclose(img.affine, expected.affine)
        np.testing.assert_allclose(img.get_qform(), expected.affine)
        np.testing.assert_allclose(img.get_sform(), expected.affine)
        assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
        np.testing.assert_allclose(img.header.get_zooms(), (1.5, 1.5, 2.0))
    np.testing.assert_array_equal(np.asarray(image.dataobj), expected.ct)
    np.testing.assert_array_equal(np.asarray(mri.dataobj), expected.mri)
    assert label.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(label.dataobj), expected.label)
    assert set(np.unique(np.asarray(label.dataobj))) == set(LABELS)

    # No temporary files left anywhere.
    files = [f.name for f in out.rglob("*") if f.is_file()]
    assert [name for name in files if name.startswith(".") or "tmp" in name] == []
    assert sorted(f.name for f in (out / "imagesTr").iterdir()) == [
        f"phantom_00{i}_{m}.nii.gz" for i in range(3) for m in ("ct", "mri")]

    # Writing again over the same folder works (atomic replace of existing files).
    write_phantom_dataset(out, cases=4, size=48, seed=3)
    assert json.loads((out / "dataset.json").read_text()) == ct_meta


@pytest.mark.parametrize("cases, expected_test", [(1, 0), (2, 1), (4, 1), (8, 2)])
def test_test_split_size(tmp_path, cases, expected_test):
    # The split arithmetic does not depend on the image content: use tiny phantoms.
    out = write_phantom_dataset(tmp_path, cases=cases, size=32, seed=0)
    meta = json.loads(out.read_text())
    assert meta["numTest"] == expected_test
    assert meta["numTraining"] == cases - expected_test
