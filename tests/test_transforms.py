import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import LPS_AFFINE, body_volume, write_nifti

from swinssl.config import PreprocessConfig
from swinssl.data.io import orientation_of, spacing_of
from swinssl.data.transforms import (
    NormalizeByModalityd,
    finetune_transforms,
    inference_transforms,
    invert,
    pretrain_transforms,
)


def item(image, label=None, modality="CT"):
    return {"image": str(image), "label": str(label) if label else None, "modality": modality, "case_id": "x"}


def test_ct_window_maps_hu_to_unit_range_and_clips():
    norm = NormalizeByModalityd(PreprocessConfig(ct_window=(-1000.0, 1000.0)))
    hu = torch.tensor([[[[-2000.0, -1000.0, 0.0, 500.0, 1000.0, 3000.0]]]])
    out = norm({"image": hu, "modality": "CT"})["image"]
    assert torch.allclose(out.flatten(), torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0, 1.0]))


def test_mri_percentiles_map_to_unit_range_per_channel():
    norm = NormalizeByModalityd(PreprocessConfig(mri_percentiles=(0.0, 100.0)))
    x = torch.stack([torch.linspace(0, 100, 1000), torch.linspace(50, 5000, 1000)]).reshape(2, 10, 10, 10)
    out = norm({"image": x, "modality": "MRI"})["image"]
    for c in range(2):
        assert out[c].min().item() == pytest.approx(0.0)
        assert out[c].max().item() == pytest.approx(1.0)


def test_mri_zscore_on_nonzero_voxels():
    norm = NormalizeByModalityd(PreprocessConfig(mri_normalization="zscore"))
    x = torch.zeros(1, 10, 10, 10)
    x[0, 2:8, 2:8, 2:8] = torch.randn(6, 6, 6) * 30 + 200
    out = norm({"image": x, "modality": "MRI"})["image"]
    inside = out[x != 0]
    assert inside.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert inside.std().item() == pytest.approx(1.0, abs=1e-2)
    assert torch.all(out[x == 0] == 0)


def _offset_in(volume: torch.Tensor, crop: torch.Tensor) -> tuple[int, ...] | None:
    """Where ``crop`` (C, a, b, c) lies inside ``volume`` (C, X, Y, Z), found by brute force."""
    size = crop.shape[1:]
    for i in range(volume.shape[1] - size[0] + 1):
        for j in range(volume.shape[2] - size[1] + 1):
            for k in range(volume.shape[3] - size[2] + 1):
                if torch.equal(volume[:, i:i + size[0], j:j + size[1], k:k + size[2]], crop):
                    return i, j, k
    return None


def test_pretrain_pipeline_gives_num_crops_of_roi_cut_from_the_preprocessed_volume(ct_case):
    cfg = PreprocessConfig(roi_size=(16, 16, 16), num_crops=3, spacing=(2.0, 2.0, 2.0))
    head = inference_transforms(cfg)(item(ct_case[0]))["image"]  # the same head: RAS, 2 mm, [0, 1]
    assert orientation_of(head) == "RAS" and spacing_of(head) == pytest.approx((2.0, 2.0, 2.0))
    crops = pretrain_transforms(cfg)(item(ct_case[0]))
    assert len(crops) == 3
    for crop in crops:
        image = crop["image"]
        assert type(image) is torch.Tensor and image.shape == (1, 16, 16, 16) and image.dtype == torch.float32
        assert 0.0 <= image.min().item() and image.max().item() <= 1.0
        assert _offset_in(head.as_tensor(), image) is not None
        assert "label" not in crop and crop["modality"] == "CT"


def test_pretrain_crops_are_seeded(ct_case):
    cfg = PreprocessConfig(roi_size=(16, 16, 16), num_crops=2)
    pipeline = pretrain_transforms(cfg)
    pipeline.set_random_state(seed=5)
    first = [c["image"] for c in pipeline(item(ct_case[0]))]
    pipeline.set_random_state(seed=5)
    second = [c["image"] for c in pipeline(item(ct_case[0]))]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_volume_smaller_than_roi_is_padded(tmp_path):
    image, _ = body_volume(shape=(20, 18, 14))
    path = write_nifti(tmp_path / "small_ct.nii.gz", image)
    crops = pretrain_transforms(PreprocessConfig(roi_size=(32, 32, 32), num_crops=1))(item(path))
    assert crops[0]["image"].shape == (1, 32, 32, 32)


def test_mixed_ct_and_mri_normalised_by_their_own_modality(ct_case, mri_case):
    cfg = PreprocessConfig(roi_size=(16, 16, 16), num_crops=1, crop_foreground=False)
    pipeline = pretrain_transforms(cfg)
    ct = pipeline(item(ct_case[0], modality="CT"))[0]
    mri = pipeline(item(mri_case[0], modality="MRI"))[0]
    assert ct["modality"] == "CT" and mri["modality"] == "MRI"
    for crop in (ct, mri):
        assert 0.0 <= crop["image"].min().item() and crop["image"].max().item() <= 1.0


def test_modality_guessed_from_intensities_when_unknown(ct_case, mri_case):
    cfg = PreprocessConfig(roi_size=(16, 16, 16), num_crops=1)
    assert pretrain_transforms(cfg)(item(ct_case[0], modality=None))[0]["modality"] == "CT"
    assert pretrain_transforms(cfg)(item(mri_case[0], modality=None))[0]["modality"] == "MRI"


def test_finetune_train_crops_follow_labels(ct_case):
    cfg = PreprocessConfig(roi_size=(16, 16, 16), num_crops=4, pos_fraction=1.0, augment=True)
    crops = finetune_transforms(cfg, classes=[0, 1, 2])(item(*ct_case))
    assert len(crops) == 4
    for crop in crops:
        assert crop["image"].shape == crop["label"].shape == (1, 16, 16, 16)
        values = set(torch.unique(crop["label"]).tolist())
        assert values <= {0.0, 1.0, 2.0}
        assert values - {0.0}, "pos_fraction=1 crops must be centred on a labelled voxel"


@pytest.mark.parametrize("roi", [(16, 8, 8), (8, 16, 8), (8, 12, 16)])
def test_augmented_crops_of_a_non_cubic_roi_keep_its_shape(ct_case, roi):
    """Quarter turns only in a plane of two equal sides (none when all differ): 60 crops, about 4 of
    them turned by an odd number of quarters, all of the ROI's shape, so they batch."""
    cfg = PreprocessConfig(roi_size=roi, num_crops=60, augment=True)
    pipeline = finetune_transforms(cfg, classes=[0, 1, 2])
    pipeline.set_random_state(seed=0)
    for crop in pipeline(item(*ct_case)):
        assert crop["image"].shape == crop["label"].shape == (1, *roi)


@pytest.mark.parametrize("sampling, expected", [("classes", (0.35, 0.65)), ("posneg", (0.0, 0.05))])
def test_class_balanced_crops_reach_a_small_class_as_often_as_a_large_one(tmp_path, sampling, expected):
    """A 16^3 class 1 and a 2^3 class 2 far apart: foreground crops of 6^3 centred by class see class 2 in
    about half of them; centred on any foreground voxel, in about 8 of 4104 (its share of the voxels)."""
    image, label = np.full((48, 48, 48), 40.0, np.float32), np.zeros((48, 48, 48), np.uint8)
    label[4:20, 4:20, 4:20] = 1
    label[40:42, 40:42, 40:42] = 2
    paths = write_nifti(tmp_path / "i.nii.gz", image), write_nifti(tmp_path / "l.nii.gz", label)
    cfg = PreprocessConfig(roi_size=(6, 6, 6), num_crops=200, pos_fraction=1.0, augment=False,
                           crop_foreground=False, crop_sampling=sampling)
    pipeline = finetune_transforms(cfg, classes=[0, 1, 2])
    pipeline.set_random_state(seed=0)
    crops = pipeline(item(*paths))
    assert all(c["label"].max() > 0 for c in crops)  # pos_fraction 1: every crop on a foreground voxel
    share = sum(bool((c["label"] == 2).any()) for c in crops) / len(crops)
    assert expected[0] <= share <= expected[1]
    assert PreprocessConfig().crop_sampling == "classes"  # the default, also where no preset says it


def test_finetune_validation_keeps_whole_volume_and_label_grid(ct_case):
    cfg = PreprocessConfig(crop_foreground=False)
    out = finetune_transforms(cfg, train=False)(item(*ct_case))
    assert out["image"].shape == out["label"].shape == (1, 40, 36, 28)
    assert orientation_of(out["label"]) == "RAS"
    assert set(torch.unique(out["label"]).tolist()) == {0.0, 1.0, 2.0}
    assert out["label"].sum().item() == pytest.approx(nib.load(ct_case[1]).get_fdata().sum())


def test_inference_inverse_restores_input_grid_exactly_without_resampling(ct_case):
    cfg = PreprocessConfig(spacing=None, crop_foreground=True)
    pipeline = inference_transforms(cfg)
    data = pipeline(item(ct_case[0]))
    assert orientation_of(data["image"]) == "RAS"
    assert data["image"].shape[1:] != (40, 36, 28)  # foreground crop removed the air margin
    # A "prediction" on the transformed grid: the label pushed through the same spatial steps.
    label_on_grid = finetune_transforms(cfg, train=False)(item(*ct_case))["label"]
    back = invert(pipeline, data, label_on_grid)
    original = nib.load(ct_case[1])
    assert back.shape == (1, *original.shape)
    np.testing.assert_allclose(np.asarray(back.affine), original.affine, atol=1e-5)
    np.testing.assert_array_equal(back[0].numpy(), original.get_fdata())


def test_inference_inverse_after_resampling_lands_on_input_grid(ct_case):
    cfg = PreprocessConfig(spacing=(1.0, 1.0, 1.0))
    pipeline = inference_transforms(cfg)
    data = pipeline(item(ct_case[0]))
    assert spacing_of(data["image"]) == pytest.approx((1.0, 1.0, 1.0))
    label_on_grid = finetune_transforms(cfg, train=False)(item(*ct_case))["label"]
    back = invert(pipeline, data, label_on_grid)
    original = nib.load(ct_case[1]).get_fdata()
    assert back.shape == (1, *original.shape)
    np.testing.assert_allclose(np.asarray(back.affine), LPS_AFFINE, atol=1e-5)
    assert set(torch.unique(back).tolist()) <= {0.0, 1.0, 2.0}  # nearest: still class indices
    for c in (1, 2):
        pred, ref = back[0].numpy() == c, original == c
        dice = 2 * (pred & ref).sum() / (pred.sum() + ref.sum())
        assert dice > 0.9, f"class {c}: Dice {dice:.3f} after resample + inverse"


def test_invert_maps_a_plain_tensor_back_too(ct_case):
    # MONAI's Invertd skips plain tensors with only a logged warning; a network's output is one.
    cfg = PreprocessConfig(spacing=(1.0, 1.0, 1.0))
    pipeline = inference_transforms(cfg)
    data = pipeline(item(ct_case[0]))
    plain = finetune_transforms(cfg, train=False)(item(*ct_case))["label"].as_tensor()
    back = invert(pipeline, data, plain)
    assert back.shape == (1, *nib.load(ct_case[1]).shape)
    np.testing.assert_allclose(np.asarray(back.affine), LPS_AFFINE, atol=1e-5)


def test_invert_rejects_output_of_wrong_shape(ct_case):
    pipeline = inference_transforms(PreprocessConfig())
    data = pipeline(item(ct_case[0]))
    with pytest.raises(ValueError, match="differs from the transformed image"):
        invert(pipeline, data, torch.zeros(1, 4, 4, 4))


@pytest.mark.parametrize("cache", [None, "cache"])
def test_every_pipeline_pickles_for_spawned_data_workers(tmp_path, cache):
    """DataLoader workers started by spawn (macOS, Windows, a spawned process such as the demo's
    fine-tuning arms; forkserver from Python 3.14) receive the pipeline pickled."""
    import pickle

    from swinssl.data.transforms import finetune_transforms, inference_transforms, pretrain_transforms

    cfg = PreprocessConfig(crop_foreground=True, crop_sampling="classes")
    root = tmp_path / cache if cache else None
    pipelines = [pretrain_transforms(cfg, cache=root), inference_transforms(cfg, cache=root),
                 finetune_transforms(cfg, classes=[0, 1, 2], train=True, cache=root),
                 finetune_transforms(cfg, classes=[0, 1, 2], train=False, cache=root)]
    for pipeline in pipelines:
        assert type(pickle.loads(pickle.dumps(pipeline))) is type(pipeline)


@pytest.mark.parametrize("spacing_file, spacing, tilted, crop", [
    ((0.8, 0.8, 2.5), (2.0, 2.0, 2.0), False, True),  # 2.5x along x, y: source coordinates on exact halves
    ((1.5, 1.5, 2.0), (3.0, 1.0, 1.5), False, False),  # no crop: the file's edge voxels lie past the grid's
    ((0.7, 1.1, 3.0), (1.5, 3.0, 1.0), False, True),
    # A tilted file: its grid and the resampled one share their tilt, but the map between them holds rounding
    # residue off the diagonal (~1e-17), and MONAI's sampling rounds with it: MONAI's inverse runs.
    ((1.0, 1.0, 1.0), (2.0, 2.0, 2.0), True, False),
])
def test_inverse_resampling_of_a_mask_equals_monais_voxel_for_voxel(tmp_path, monkeypatch, spacing_file, spacing,
                                                                     tilted, crop):
    """The separable nearest-neighbour inverse (``SeparableNearestResample``) gives MONAI's inverse exactly:
    every voxel (the border padding past the grid's edge, the foreground crop's zeros outside its box)
    and the affine; MONAI's full-grid inverse does not run for a grid with axes along the world's."""
    from monai.transforms import SpatialResample

    from swinssl.data.transforms import SeparableNearestResample

    affine = np.diag([-spacing_file[0], spacing_file[1], spacing_file[2], 1.0])  # L-flipped: reoriented first
    affine[:3, 3] = (17.3, -4.1, 9.9)
    if tilted:
        affine[:3, :3] = affine[:3, :3] @ np.array([[1, 0, 0], [0, np.cos(0.1), -np.sin(0.1)],
                                                     [0, np.sin(0.1), np.cos(0.1)]])
    image, _ = body_volume(shape=(53, 47, 31))
    path = write_nifti(tmp_path / "ct.nii.gz", image.astype(np.int16), affine)
    pipeline = inference_transforms(PreprocessConfig(spacing=spacing, crop_foreground=crop))
    data = pipeline(item(path))
    labels = torch.randint(1, 4, data["image"].shape, generator=torch.Generator().manual_seed(1)).float()

    monai_inverse = SpatialResample.inverse

    def refused(self, data):
        raise AssertionError("MONAI's full-grid inverse ran")

    if not tilted:
        monkeypatch.setattr(SpatialResample, "inverse", refused)
    fast = invert(pipeline, pipeline(item(path)), labels)
    monkeypatch.setattr(SeparableNearestResample, "inverse", monai_inverse)
    reference = invert(pipeline, data, labels)
    assert fast.shape == reference.shape == (1, 53, 47, 31)
    assert torch.equal(fast.as_tensor(), reference.as_tensor())
    np.testing.assert_allclose(np.asarray(fast.affine), np.asarray(reference.affine), atol=1e-9)
    np.testing.assert_allclose(np.asarray(fast.affine), affine, atol=1e-5)
    assert len(torch.unique(reference)) == (4 if crop else 3)  # classes 1-3 reached the file, and the crop's zeros


def test_inverse_of_a_rotating_resample_is_monais():
    """A resampling that turns the grid (not separable per axis) is inverted by MONAI's own code."""
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    from swinssl.data.transforms import SeparableNearestResample

    turn = np.eye(4)
    turn[:2, :2] = [[np.cos(0.3), -np.sin(0.3)], [np.sin(0.3), np.cos(0.3)]]
    volume = MetaTensor(torch.rand(1, 20, 22, 18, generator=torch.Generator().manual_seed(0)),
                        affine=torch.eye(4, dtype=torch.float64))
    ours, theirs = SeparableNearestResample(mode="nearest"), SpatialResample(mode="nearest")
    back = [r.inverse(r(volume.clone(), dst_affine=torch.from_numpy(turn))) for r in (ours, theirs)]
    assert back[0].shape == back[1].shape == (1, 20, 22, 18)
    assert torch.equal(back[0].as_tensor(), back[1].as_tensor())


@pytest.mark.parametrize("padding", ["border", "zeros", "reflection"])
def test_inverse_past_the_grids_edge_pads_as_monai(padding):
    """A resampled grid smaller than the volume: its inverse reaches past the grid's edge, where each padding
    mode gives what MONAI's gives."""
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    from swinssl.data.transforms import SeparableNearestResample

    coarse = np.diag([2.5, 1.5, 2.0, 1.0])
    coarse[:3, 3] = (3.0, -2.0, 1.0)
    volume = MetaTensor(torch.rand(1, 20, 22, 18, generator=torch.Generator().manual_seed(0)),
                        affine=torch.eye(4, dtype=torch.float64))
    ours = SeparableNearestResample(mode="nearest", padding_mode=padding)
    theirs = SpatialResample(mode="nearest", padding_mode=padding)
    back = [r.inverse(r(volume.clone(), dst_affine=torch.from_numpy(coarse), spatial_size=(6, 11, 7)))
            for r in (ours, theirs)]
    assert back[0].shape == back[1].shape == (1, 20, 22, 18)
    assert torch.equal(back[0].as_tensor(), back[1].as_tensor())
