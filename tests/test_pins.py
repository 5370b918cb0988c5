"""Pins for one-line semantic changes that the rest of the suite let through (issue 33, item 6).

An audit changed single lines of four functions and the whole suite still passed. Each test here
fails on one of those changes (and on neighbouring ones found the same way) and passes on the
code as it is; all are fast (no training, no probe process, tiny arrays):

- ``workflows.verdict.paired_verdict``: "helps" / "hurts" need the rank test to reject *and* the bootstrap
  interval to exclude 0. Dropping the rank test (``elif high < 0``) calls a few consistently
  negative pairs an effect; also pinned: ``p < alpha`` is strict, the interval is the
  ``alpha/2..1-alpha/2`` quantiles of the given ``alpha``, an interval touching 0 is no effect,
  zeros are dropped before ranking (``zero_method="wilcox"``), the test is two-sided, and the
  sentence names ``subject`` and ``metric``.
- ``data.transforms.label_guided_crops``: class-balanced crops keep a background share of
  ``1 - pos_fraction`` (``[0.0] + ...`` would centre every crop on foreground), the foreground
  share split evenly over the foreground classes; the posneg sampler's ratio is ``pos_fraction``.
- ``workflows.estimate._estimate_predict`` (through ``estimate(..., "predict")`` with the probe
  process replaced by fixed numbers): seconds per volume = windows x seconds per batch /
  ``sw_batch_size``; the output buffers; the peak on CUDA leaves them out; what fits a budget.
- ``report.volumes.encode_mask`` / ``encode_image``: a downsampled label keeps the image's
  downsampled affine (voxel size x step), so image and label overlay in world space; the
  viewer's start position is in that world; no axis is shown longer than ``max_side``.
"""

import base64
import gzip
import math

import nibabel as nib
import numpy as np
import pytest
import torch

from swinssl.config import PreprocessConfig, load_config
from swinssl.data.transforms import label_guided_crops
from swinssl.engine.memory import GIB
from swinssl.report.volumes import display_step, encode_image, encode_mask, read_grid
from swinssl.workflows import estimate as est
from swinssl.workflows.verdict import paired_verdict

# --- verdict.paired_verdict -------------------------------------------------------------------------------


def test_few_consistently_negative_pairs_are_not_called_hurt():
    # Four pairs, all worse: the bootstrap interval lies below 0, but the smallest exact two-sided
    # Wilcoxon p with n=4 is 2/16 = 0.125, so the rank test cannot reject and there is no verdict.
    diff = np.array([-0.10, -0.12, -0.08, -0.14])
    v = paired_verdict(0.6 + diff, np.full(4, 0.6))
    assert v.high < 0 and v.p_value == pytest.approx(0.125) and v.p_value >= 0.05
    assert v.sentence.startswith("no detectable difference: -0.110 Dice")
    assert "hurts" not in v.sentence


def test_few_consistently_positive_pairs_are_not_called_help():
    diff = np.array([0.10, 0.12, 0.08, 0.14])
    v = paired_verdict(0.6 + diff, np.full(4, 0.6))
    assert v.low > 0 and v.p_value == pytest.approx(0.125)
    assert v.sentence.startswith("no detectable difference: +0.110 Dice") and "helps" not in v.sentence


def test_enough_consistent_pairs_are_an_effect_either_way():
    # Six pairs of one sign: the exact two-sided p is 2/64 = 0.03125 < 0.05, the interval excludes 0.
    diff = np.array([0.10, 0.12, 0.08, 0.11, 0.09, 0.13])
    helps = paired_verdict(0.5 + diff, np.full(6, 0.5))
    hurts = paired_verdict(0.5 - diff, np.full(6, 0.5))
    assert helps.p_value == pytest.approx(0.03125) and helps.sentence.startswith("pre-training helps: +0.105 Dice")
    assert hurts.p_value == pytest.approx(0.03125) and hurts.sentence.startswith("pre-training hurts: -0.105 Dice")


def test_alpha_is_a_strict_threshold():
    # Five pairs of one sign: p is exactly 2/32 = 0.0625; at alpha = 0.0625 the test does not reject.
    diff = np.array([0.10, 0.12, 0.08, 0.11, 0.09])
    for sign, word in ((1, "helps"), (-1, "hurts")):
        at = paired_verdict(0.5 + sign * diff, np.full(5, 0.5), alpha=0.0625)
        assert at.p_value == 0.0625 and at.sentence.startswith("no detectable difference")
        above = paired_verdict(0.5 + sign * diff, np.full(5, 0.5), alpha=0.07)
        assert above.sentence.startswith(f"pre-training {word}")


def test_the_interval_follows_the_given_alpha():
    diff = np.array([0.1, -0.2, 0.3, 0.05, 0.0, 0.12])
    v = paired_verdict(diff + 1, np.ones(6), alpha=0.2, resamples=5000, seed=3)
    rng = np.random.default_rng(3)
    means = diff[rng.integers(0, 6, (5000, 6))].mean(axis=1)
    assert (v.low, v.high) == pytest.approx(tuple(np.quantile(means, [0.1, 0.9])), abs=1e-12)


def test_zero_differences_are_dropped_before_the_two_sided_rank_test():
    # Three ties and eight mixed changes: ranked without the ties (zero_method="wilcox") the p is that of
    # the eight alone; ranking the ties too ("pratt", "zsplit") gives another p here.
    from scipy.stats import wilcoxon

    changes = np.array([0.10, 0.20, -0.05, 0.30, -0.15, 0.40, 0.25, 0.35])
    diff = np.concatenate([np.zeros(3), changes])
    v = paired_verdict(0.5 + diff, np.full(11, 0.5))
    assert v.n == 11 and v.p_value == pytest.approx(wilcoxon(changes).pvalue, rel=1e-9)
    assert v.p_value != pytest.approx(wilcoxon(diff, zero_method="pratt").pvalue, rel=1e-3)
    # Two-sided: the p of all-negative pairs is that of all-positive ones (n=4: 2/16, not 1/16 or 1).
    gains = np.array([0.10, 0.12, 0.08, 0.11])
    assert paired_verdict(0.5 - gains, np.full(4, 0.5)).p_value == pytest.approx(0.125)
    assert paired_verdict(0.5 + gains, np.full(4, 0.5)).p_value == pytest.approx(0.125)


def test_an_interval_that_touches_zero_is_no_verdict():
    # Nineteen gains of 0.25 and one loss of 4.75: the rank test rejects (p < 0.001), the mean is exactly
    # 0, and a resample holding the loss once has mean exactly 0; at alpha = 0.6 the interval is the
    # 30%..70% quantiles, 0..+0.25: it does not lie above 0 (``low > 0`` is strict), and mirrored, not below.
    diff = np.array([0.25] * 19 + [-4.75])
    v = paired_verdict(diff, np.zeros(20), alpha=0.6)
    assert v.p_value < 0.001 and (v.low, v.high) == (0.0, 0.25)
    assert v.sentence.startswith("no detectable difference")
    v = paired_verdict(-diff, np.zeros(20), alpha=0.6)
    assert v.p_value < 0.001 and (v.low, v.high) == (-0.25, 0.0)
    assert v.sentence.startswith("no detectable difference")


def test_the_sentence_names_the_subject_and_the_metric():
    diff = np.array([0.10, 0.12, 0.08, 0.11, 0.09, 0.13])
    v = paired_verdict(0.5 + diff, np.full(6, 0.5), metric="NSD", subject="pseudo-labelling")
    assert v.sentence.startswith("pseudo-labelling helps: +0.105 NSD (95% CI ")
    v = paired_verdict(0.5 - diff, np.full(6, 0.5), metric="NSD", subject="pseudo-labelling")
    assert v.sentence.startswith("pseudo-labelling hurts: -0.105 NSD")


# --- data.transforms.label_guided_crops -------------------------------------------------------------------


@pytest.mark.parametrize("pos_fraction, classes", [(0.5, 3), (0.2, 2), (0.8, 5)])
def test_class_balanced_ratios_keep_the_background_share(pos_fraction, classes):
    cfg = PreprocessConfig(roi_size=(3, 3, 3), num_crops=7, pos_fraction=pos_fraction, crop_sampling="classes",
                           foreground_threshold=0.25)
    crop = label_guided_crops(cfg, ["image", "label"], classes)
    ratios = crop.cropper.ratios
    assert len(ratios) == classes
    assert ratios[0] == pytest.approx(1 - pos_fraction)  # the background
    assert ratios[1:] == pytest.approx([pos_fraction / (classes - 1)] * (classes - 1))  # split evenly
    assert sum(ratios) == pytest.approx(1.0)
    assert crop.cropper.num_classes == classes and crop.cropper.num_samples == 7
    assert crop.cropper.image_threshold == 0.25 and tuple(crop.cropper.spatial_size) == (3, 3, 3)


def test_posneg_crops_keep_the_positive_share():
    cfg = PreprocessConfig(roi_size=(3, 3, 3), num_crops=5, pos_fraction=0.8, crop_sampling="posneg")
    crop = label_guided_crops(cfg, ["image", "label"], 3)
    assert crop.cropper.pos_ratio == pytest.approx(0.8) and crop.cropper.num_samples == 5


def _background_share(pos_fraction: float, crops: int = 300, seed: int = 0) -> float:
    """The share of 3^3 crops of a 24^3 volume with no foreground voxel: a 4^3 class 1 and a 2^3 class 2
    in its middle, so a crop centred on foreground always holds some and one on background mostly not."""
    label = torch.zeros((1, 24, 24, 24))
    label[0, 8:12, 8:12, 8:12] = 1
    label[0, 14:16, 14:16, 14:16] = 2
    image = torch.ones((1, 24, 24, 24))
    cfg = PreprocessConfig(roi_size=(3, 3, 3), num_crops=crops, pos_fraction=pos_fraction, crop_sampling="classes")
    crop = label_guided_crops(cfg, ["image", "label"], 3)
    crop.set_random_state(seed=seed)
    out = crop({"image": image, "label": label})
    assert len(out) == crops and all(tuple(c["label"].shape) == (1, 3, 3, 3) for c in out)
    return sum(not bool((c["label"] > 0).any()) for c in out) / crops


def test_class_balanced_crops_centre_some_crops_on_background():
    # pos_fraction 0.5: about half the crops on background (a background centre next to the
    # foreground blocks, about 2% of the background, still holds some: a little under half).
    assert 0.35 <= _background_share(0.5) <= 0.6
    assert 0.6 <= _background_share(0.2) <= 0.85
    assert _background_share(1.0) == 0.0


# --- workflows.estimate: the predict estimate ---------------------------------------------------------------


def _fake_predict_probe(monkeypatch, peak=GIB, batch_s=0.8, classes=3, loaded=False, per_window=100 * 2**20):
    specs = []

    def probe(spec, tmp):
        specs.append(spec)
        assert spec["kind"] == "predict"
        return {"peak": peak, "batch_s": batch_s, "shape": spec["shape"], "classes": classes,
                "input_loaded": loaded, "what": "the given shape", "per_window": per_window,
                "times": [2.0, batch_s, batch_s, batch_s]}

    monkeypatch.setattr(est, "run_probe", probe)
    monkeypatch.setattr(est, "device_memory", lambda device: 64 * GIB)
    return specs


def _predict_cfg():
    return load_config("finetune/tiny", ["preprocess.roi_size=[32,32,32]"])


VOXELS = 64 ** 3
# classes x voxels x 4 bytes x 2 (blended output, softmax) + the count map + the image (not loaded by the probe)
BUFFERS = 3 * VOXELS * 4 * 2 + VOXELS * 4 + 1 * VOXELS * 4


def test_predict_seconds_divide_the_windows_by_the_window_batch(monkeypatch):
    specs = _fake_predict_probe(monkeypatch)
    # 64^3 at a 32^3 ROI and overlap 0.5: a step of 16, 3 windows per axis, 27 windows;
    # 4 windows per forward pass of 0.8 s: 27 x 0.8 / 4 = 5.4 s per volume.
    e = est.estimate(_predict_cfg(), "predict", "cpu", shape=(64, 64, 64), overlap=0.5, sw_batch_size=4)
    assert specs[0]["sw_batch_size"] == 4 and specs[0]["shape"] == [64, 64, 64]
    assert e.windows == 27 and e.crops == 4 and e.shape == (64, 64, 64)
    assert e.seconds == pytest.approx(27 * 0.8 / 4) == pytest.approx(5.4)
    # overlap 0: a step of 32, 2 windows per axis; one window per pass: 8 x 0.8 s.
    e = est.estimate(_predict_cfg(), "predict", "cpu", shape=(64, 64, 64), overlap=0.0, sw_batch_size=1)
    assert e.windows == 8 and e.seconds == pytest.approx(6.4)


def test_predict_peak_adds_the_stitching_buffers_on_cpu(monkeypatch):
    _fake_predict_probe(monkeypatch)
    e = est.estimate(_predict_cfg(), "predict", "cpu", shape=(64, 64, 64), sw_batch_size=2)
    assert e.output_bytes == BUFFERS == 8 * 2**20 and e.peak == GIB + BUFFERS and e.classes == 3
    _fake_predict_probe(monkeypatch, loaded=True)  # the probe read the image: it is in the measured peak
    e = est.estimate(_predict_cfg(), "predict", "cpu", shape=(64, 64, 64), sw_batch_size=2)
    assert e.output_bytes == BUFFERS - VOXELS * 4 and e.peak == GIB + BUFFERS - VOXELS * 4


def test_predict_peak_on_cuda_leaves_the_host_buffers_out(monkeypatch):
    _fake_predict_probe(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    e = est.estimate(_predict_cfg(), "predict", "cuda", shape=(64, 64, 64), sw_batch_size=2)
    assert e.peak == GIB and e.output_bytes == BUFFERS
    assert any("output buffers" in note and "host memory" in note for note in e.notes)


@pytest.mark.parametrize("below, fewer", [(0, None), (200, 2), (250, 1), (300, 1), (350, None)])
def test_predict_budget_suggests_fewer_windows_per_pass(monkeypatch, below, fewer):
    """Peak P at 4 windows per pass, 100 MiB a window: a budget of P - 200 MiB holds 2 (P - 200 MiB exactly),
    P - 250 or P - 300 MiB one; at P - 350 MiB not even one; a budget of P fits as it is."""
    mib = 2**20
    _fake_predict_probe(monkeypatch, per_window=100 * mib)
    peak = GIB + BUFFERS
    e = est.estimate(_predict_cfg(), "predict", "cpu", shape=(64, 64, 64), sw_batch_size=4,
                     budget_gib=(peak - below * mib) / GIB)
    assert e.peak == peak and e.budget == peak - below * mib
    if fewer is None:
        assert e.batch is None
    else:
        assert e.batch.overrides == [f"--sw-batch-size {fewer}"]
        assert e.batch.peak == peak - (4 - fewer) * 100 * mib <= e.budget


# --- report.volumes: the downsampled report volumes ------------------------------------------------------


def _decode(data: str) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(data)))


def _world(affine: np.ndarray, ijk) -> np.ndarray:
    return (affine @ np.append(np.asarray(ijk, float), 1.0))[:3]


@pytest.fixture
def case_files(tmp_path):
    """A 40x24x12 image and label on an oblique grid (rotation, 1.5/0.8/2.5 mm, an origin), as files."""
    c, s = math.cos(0.3), math.sin(0.3)
    affine = np.array([[c * 1.5, -s * 0.8, 0, -20.0], [s * 1.5, c * 0.8, 0, 35.0], [0, 0, 2.5, 12.0], [0, 0, 0, 1]])
    rng = np.random.default_rng(0)
    image = rng.normal(40, 10, (40, 24, 12)).astype(np.float32)
    label = np.zeros((40, 24, 12), np.uint8)
    label[8:20, 4:12, 2:6] = 1
    label[28:36, 16:20, 8:10] = 2
    image_path, label_path = tmp_path / "image.nii.gz", tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), str(image_path))
    nib.save(nib.Nifti1Image(label, affine), str(label_path))
    return image_path, label_path, affine, label


def test_downsampled_label_keeps_the_images_downsampled_affine(case_files):
    image_path, label_path, affine, label = case_files
    image = encode_image(*read_grid(image_path, "image"), max_side=10)
    mask = encode_mask(*read_grid(label_path, "label"), max_side=10)
    assert image.step == mask.step == (4, 3, 2) and image.shown == mask.shown == (10, 8, 6)
    shown_image, shown_label = _decode(image.data), _decode(mask.data)
    scaled = affine @ np.diag([4.0, 3.0, 2.0, 1.0])
    np.testing.assert_allclose(shown_image.affine, scaled, atol=1e-4)
    np.testing.assert_allclose(shown_label.affine, shown_image.affine, atol=1e-6)
    # The voxel sizes are the file's times the step; the origin (voxel 0) stays where it was.
    np.testing.assert_allclose(shown_label.header.get_zooms()[:3], [1.5 * 4, 0.8 * 3, 2.5 * 2], atol=1e-4)
    np.testing.assert_allclose(shown_label.affine[:3, 3], affine[:3, 3], atol=1e-4)
    # Corners and centre of the shown grid are the same world points in image and label, and the
    # same as the file's voxels they were taken from.
    last = np.array(mask.shown) - 1
    for ijk in ([0, 0, 0], last, [last[0], 0, 0], [0, last[1], last[2]], last / 2):
        point = _world(shown_label.affine, ijk)
        np.testing.assert_allclose(point, _world(shown_image.affine, ijk), atol=1e-4)
        np.testing.assert_allclose(point, _world(affine, np.asarray(ijk) * [4, 3, 2]), atol=1e-4)
    # And the labels shown there are the file's labels at those voxels.
    np.testing.assert_array_equal(np.asarray(shown_label.dataobj), label[::4, ::3, ::2])


def test_downsampled_label_starts_the_viewer_at_its_world_centre(case_files):
    _, label_path, affine, label = case_files
    mask = encode_mask(*read_grid(label_path, "label"), max_side=10)
    shown = label[::4, ::3, ::2]
    expected = _world(affine, np.argwhere(shown > 0).mean(axis=0) * [4, 3, 2])
    np.testing.assert_allclose(mask.centre, expected, atol=2e-3)
    assert mask.values == (1, 2)
    # Outlined, the same grid and start position.
    outlined = encode_mask(*read_grid(label_path, "label"), max_side=10, outline=True)
    np.testing.assert_allclose(_decode(outlined.data).affine, _decode(mask.data).affine, atol=1e-6)
    assert outlined.centre == mask.centre


def test_no_shown_axis_is_longer_than_max_side():
    assert display_step((40, 24, 12), 10) == (4, 3, 2)
    assert display_step((50, 16, 17), 16) == (4, 1, 2)
    for shape, side in (((50, 16, 17), 16), ((193, 192, 7), 192), ((300, 299, 1), 100)):
        step = display_step(shape, side)
        assert all(math.ceil(n / k) <= side for n, k in zip(shape, step))
        assert all(k == 1 or math.ceil(n / (k - 1)) > side for n, k in zip(shape, step))  # no coarser than needed
