"""The torch-free bundle runtime (``swinssl.bundle.runtime``), step by step against MONAI's torch path on the
same input, and free of torch, MONAI and swinssl."""

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.inferers import sliding_window_inference

import swinssl.bundle.runtime as runtime
from swinssl.bundle.runtime.windows import gaussian_weights, sliding_window, window_starts

ALLOWED = {"numpy", "scipy", "nibabel", "onnxruntime", "nrrd", "SimpleITK"}


def test_runtime_imports_nothing_of_torch_monai_or_swinssl():
    """Every import in the runtime's files is the standard library, its own modules or the bundle's requirements."""
    import sys

    folder = Path(runtime.__file__).parent
    seen = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                seen |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                seen.add(node.module.split(".")[0])
    outside = {name for name in seen - ALLOWED if name not in sys.stdlib_module_names and name != "__future__"}
    assert not outside, f"the bundle runtime imports {sorted(outside)}"
    assert "numpy" in seen


@pytest.mark.parametrize("size, roi, overlap", [(64, 64, 0.25), (100, 64, 0.25), (100, 64, 0.5), (97, 32, 0.7),
                                                (65, 64, 0.0), (200, 48, 0.99)])
def test_window_starts_are_monais(size, roi, overlap):
    interval = roi if roi == size else max(int(roi * (1 - overlap)), 1)
    slices = dense_patch_slices((size,), (roi,), (interval,))
    assert window_starts(size, roi, overlap) == [s[0].start for s in slices]


@pytest.mark.parametrize("roi", [(64, 64, 64), (96, 48, 32), (5, 7, 3)])
@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_window_weights_are_monais(roi, mode):
    expected = compute_importance_map(roi, mode=mode, sigma_scale=0.125, device="cpu").numpy()
    np.testing.assert_allclose(gaussian_weights(roi, mode), expected, rtol=1e-6, atol=0)


def _network(windows):
    """Two channels that depend on the voxel's place in its window, so the blending shows: numpy or torch."""
    lib = torch if isinstance(windows, torch.Tensor) else np
    side = windows.shape[2:]
    ramp = (lib.arange(side[0]) * 0.01)[:, None, None] + (lib.arange(side[2]) * 0.003)[None, None, :]
    first = windows[:, :1] * 2 + ramp
    second = lib.sin(windows[:, 1:2] * 3) - ramp
    return lib.concatenate([first, second], 1) if lib is np else torch.cat([first, second], 1)


@pytest.mark.parametrize("shape, roi, overlap, batch, mode", [
    ((2, 70, 50, 40), (32, 32, 32), 0.25, 4, "gaussian"),
    ((2, 70, 50, 40), (32, 24, 32), 0.5, 3, "gaussian"),
    ((2, 20, 50, 33), (32, 32, 32), 0.25, 2, "gaussian"),  # smaller than the window along x: padded
    ((2, 40, 40, 40), (32, 32, 32), 0.25, 1, "constant"),
])
def test_sliding_window_blends_as_monai(shape, roi, overlap, batch, mode):
    image = np.random.default_rng(0).random(shape, dtype=np.float32)
    ours = sliding_window(image, roi, _network, overlap=overlap, batch=batch, mode=mode)
    theirs = sliding_window_inference(torch.from_numpy(image)[None], roi, batch, _network, overlap=overlap,
                                      mode=mode)[0].numpy()
    assert ours.shape == theirs.shape == (2, *shape[1:])
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("axes, signs", [((0, 1, 2), (-1, -1, 1)), ((0, 1, 2), (1, 1, 1)), ((2, 0, 1), (1, -1, -1)),
                                          ((1, 2, 0), (-1, 1, 1))])
def test_reorient_is_monais_orientation_and_turns_back(axes, signs):
    """LPS, RAS and axis-swapped grids: the same voxels and affine as MONAI's ``Orientation``, and back."""
    from monai.data import MetaTensor
    from monai.transforms import Orientation

    from swinssl.bundle.runtime.geometry import reorient, unreorient

    affine = np.zeros((4, 4))
    for voxel_axis, (world_axis, sign, spacing) in enumerate(zip(axes, signs, (0.8, 1.2, 2.5))):
        affine[world_axis, voxel_axis] = sign * spacing
    affine[:, 3] = (12.0, -7.5, 30.0, 1.0)
    array = np.random.default_rng(1).random((2, 9, 7, 5)).astype(np.float32)
    turned, turned_affine = reorient(array, affine, "RAS")
    expected = Orientation(axcodes="RAS", labels=None)(MetaTensor(torch.from_numpy(array), affine=torch.from_numpy(affine)))
    np.testing.assert_array_equal(turned, expected.numpy())
    np.testing.assert_allclose(turned_affine, np.asarray(expected.affine), atol=1e-9)
    np.testing.assert_array_equal(unreorient(turned, turned_affine, affine), array)


@pytest.mark.parametrize("spacing_file, spacing, tilt", [
    ((0.8, 0.8, 2.5), (2.0, 2.0, 2.0), 0.0),
    ((1.5, 1.5, 2.0), (3.0, 1.0, 1.5), 0.0),
    ((1.0, 1.0, 1.0), (1.0005, 2.0, 0.7), 0.0),  # within MONAI's tolerance of its own spacing: x is kept
    ((-0.9, 1.1, 3.0), (2.0, 2.0, 2.0), 0.15),  # a flipped, tilted grid: resampled along its own axes
])
def test_resampling_is_monais_spacing(spacing_file, spacing, tilt):
    """The grid (affine, shape) and the linearly interpolated voxels of MONAI's ``Spacing`` (bilinear, border)."""
    from monai.data import MetaTensor
    from monai.transforms import Spacing

    from swinssl.bundle.runtime.geometry import resample_linear, resampled_grid

    affine = np.diag([*spacing_file, 1.0])
    affine[:3, :3] = np.array([[1, 0, 0], [0, np.cos(tilt), -np.sin(tilt)], [0, np.sin(tilt), np.cos(tilt)]]) @ affine[:3, :3]
    affine[:3, 3] = (-40.0, 12.5, 7.0)
    array = np.random.default_rng(2).random((1, 31, 26, 17)).astype(np.float32)
    expected = Spacing(pixdim=spacing, mode="bilinear")(MetaTensor(torch.from_numpy(array), affine=torch.from_numpy(affine)))
    grid, shape = resampled_grid(affine, array.shape[1:], spacing)
    assert shape == tuple(expected.shape[1:])
    np.testing.assert_allclose(grid, np.asarray(expected.affine), atol=1e-9)
    np.testing.assert_allclose(resample_linear(array, affine, grid, shape), expected.numpy(), rtol=1e-5, atol=1e-5)


def test_linear_resampling_onto_a_shifted_grid_is_monais():
    """A grid that starts between voxels and reaches past the volume: MONAI's bilinear values, the edge's past it."""
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    from swinssl.bundle.runtime.geometry import resample_linear

    affine = np.diag([1.2, 0.9, 2.0, 1.0])
    grid = np.diag([2.0, 0.7, 1.5, 1.0])
    grid[:3, 3] = (-3.1, 0.45, 2.2)
    array = np.random.default_rng(3).random((2, 15, 12, 9)).astype(np.float32)
    shape = (11, 18, 14)
    expected = SpatialResample(mode="bilinear", padding_mode="border")(
        MetaTensor(torch.from_numpy(array), affine=torch.from_numpy(affine)), dst_affine=torch.from_numpy(grid),
        spatial_size=shape)
    np.testing.assert_allclose(resample_linear(array, affine, grid, shape), expected.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("modality, how", [("CT", "percentile"), ("MRI", "percentile"), ("MRI", "zscore")])
def test_normalisation_is_the_pipelines(modality, how):
    """CT window, MRI percentiles (per channel, one channel constant) and MRI z-score on non-zero voxels, as
    swinssl's ``intensity_normalizer``."""
    from swinssl.config import PreprocessConfig, to_dict
    from swinssl.bundle.runtime.intensity import normalize
    from swinssl.data.transforms import intensity_normalizer

    rng = np.random.default_rng(4)
    image = (rng.normal(0, 400, (2, 20, 18, 14)) if modality == "CT" else rng.gamma(2.0, 80.0, (2, 20, 18, 14)))
    image = image.astype(np.float32)
    image[:, :4] = 0.0  # background zeros (kept by the z-score)
    if how == "zscore":
        image[1, 4:] = 7.0  # non-zero voxels without spread: sd taken as 1
    elif modality == "MRI":
        image[1] = 7.0  # constant but for a few voxels: equal percentiles, so shifted only, not clipped
        image[1, 0, 0, :5] = 100.0
    cfg = PreprocessConfig(ct_window=(-175.0, 250.0), mri_normalization=how)
    expected = np.asarray(intensity_normalizer(cfg, modality)(torch.from_numpy(image.copy())))
    np.testing.assert_allclose(normalize(image, modality, to_dict(cfg)), expected, rtol=1e-5, atol=1e-5)


def test_foreground_box_and_modality_guess_are_the_pipelines():
    from monai.transforms import CropForeground

    from swinssl.bundle.runtime.intensity import foreground_box, guess_modality
    from swinssl.data.io import guess_modality as pipeline_guess
    from swinssl.data.transforms import Above

    image = np.zeros((2, 30, 25, 20), np.float32)
    image[0, 5:12, 3:20, 7:8] = 0.4
    image[1, 20:26, 10:11, 2:15] = 0.9
    box = foreground_box(image, 0.1)
    expected = CropForeground(select_fn=Above(0.1), allow_smaller=True)(torch.from_numpy(image))
    np.testing.assert_array_equal(image[(slice(None), *box)], np.asarray(expected))
    assert foreground_box(image, 1.0) == (slice(0, 0),) * 3
    ct = np.full((1, 20, 20, 20), -1000.0, np.float32)
    ct[:, 5:15] = 40.0
    for volume in (ct, np.abs(ct) / 10, ct * 0.3):  # air, no negatives, lows of -300 (not air: MRI)
        assert guess_modality(volume) == pipeline_guess(torch.from_numpy(volume))
    assert [guess_modality(v) for v in (ct, np.abs(ct) / 10, ct * 0.3)] == ["CT", "MRI", "MRI"]


@pytest.mark.parametrize("spacing_file, spacing", [((0.8, 0.8, 2.5), (2.0, 2.0, 2.0)), ((1.5, 1.1, 2.0), (3.0, 1.0, 1.5))])
def test_a_mask_goes_back_to_the_files_grid_as_the_pipeline_inverts_it(spacing_file, spacing):
    """Random labels on the resampled grid, back onto the file's grid: the voxels of MONAI's nearest inverse."""
    from monai.data import MetaTensor
    from monai.transforms import Spacing

    from swinssl.bundle.runtime.geometry import resample_nearest, resampled_grid

    affine = np.diag([*spacing_file, 1.0])
    affine[:3, 3] = (-40.0, 12.5, 7.0)
    shape = (53, 47, 31)
    spacing_step = Spacing(pixdim=spacing, mode="nearest")
    coarse = spacing_step(MetaTensor(torch.zeros(1, *shape), affine=torch.from_numpy(affine)))
    labels = torch.randint(0, 4, coarse.shape, generator=torch.Generator().manual_seed(5)).float()
    expected = spacing_step.inverse(MetaTensor(labels, meta=coarse.meta, applied_operations=coarse.applied_operations))
    grid, _ = resampled_grid(affine, shape, spacing)
    back = resample_nearest(labels.numpy(), grid, affine, shape)
    assert back.shape == tuple(expected.shape)
    differing = float((back != expected.numpy()).mean())
    assert differing == 0.0, f"{differing:.2e} of the voxels differ"


@pytest.mark.parametrize("spacing, crop", [((2.0, 2.0, 2.0), True), (None, False)])
def test_the_runtimes_mask_is_swinssl_predicts(tmp_path, spacing, crop):
    """A phantom CT on an LPS grid through a small random SwinUNETR: the runtime's mask (the network run
    through numpy) equals ``predict_case``'s in the file's shape, but for voxels whose source on the network's
    grid is a tie between two voxels (a random network's classes change from voxel to voxel, so a tie broken
    the other way shows; see ``geometry._sampled_positions``)."""
    import nibabel as nib
    from conftest import body_volume, write_nifti

    from swinssl.bundle.runtime.predict import predict_array
    from swinssl.config import ModelConfig, PreprocessConfig
    from swinssl.infer.cases import predict_case
    from swinssl.nn.swin_unetr import SwinUNETR
    from swinssl.plan import Plan

    image, _ = body_volume(shape=(53, 47, 31))
    path = write_nifti(tmp_path / "ct.nii.gz", (image * 300 - 200).astype(np.int16))
    torch.manual_seed(0)
    network = SwinUNETR(in_channels=1, out_channels=3, feature_size=12, depths=(1, 1, 1, 1)).eval()
    plan = Plan(network=ModelConfig(feature_size=12, depths=(1, 1, 1, 1)),
                preprocess=PreprocessConfig(spacing=spacing, crop_foreground=crop, ct_window=(-175.0, 250.0),
                                            roi_size=(32, 32, 32)),
                out_channels=3, modality="CT", overlap=0.25)
    expected = predict_case(network, plan, path)[0].numpy()

    def windows(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return network(torch.from_numpy(batch)).numpy()

    volume = nib.load(path)
    mask = predict_array(np.asarray(volume.dataobj)[None], volume.affine, plan.to_dict(), windows)
    assert mask.shape == expected.shape == (53, 47, 31) and mask.dtype == np.uint8
    assert len(np.unique(expected)) > 1  # the network's mask is not all one class
    ties = np.zeros(mask.shape, bool)
    if spacing is not None:  # the file voxels whose source coordinate lies halfway between two voxels
        turned = np.diag(np.abs(np.diag(volume.affine)[:3]))  # the reoriented grid's spacing
        for axis in range(3):
            position = np.arange(mask.shape[axis]) * turned[axis, axis] / spacing[axis]
            on_tie = np.isclose(position % 1, 0.5, atol=1e-9)
            flipped = volume.affine[axis, axis] < 0  # LPS: the file's axis runs against the reoriented one
            on_tie = on_tie[::-1] if flipped else on_tie
            ties |= on_tie.reshape([-1 if a == axis else 1 for a in range(3)])
    assert not (mask != expected)[~ties].any()
    assert (mask != expected).mean() <= 0.01
