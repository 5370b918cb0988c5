import json
import os
import re
import shutil

import nibabel as nib
import nrrd
import numpy as np
import pytest
import torch
from conftest import write_nifti
from torch import nn

from swinssl import infer
from swinssl.config import ModelConfig, PreprocessConfig, to_dict
from swinssl.data.io import orientation_of, read_volume
from swinssl.errors import CheckpointError, DataError
from swinssl.infer import PredictOptions, load_model, predict, predict_case, predict_volume
from swinssl.nn.swin_unetr import SwinUNETR

TINY = ModelConfig(feature_size=12, depths=(1, 1, 1, 1))
# Resample to 2 mm, crop the body: the inverse must undo both and the reorientation.
PLAN_PREPROCESS = PreprocessConfig(spacing=(2.0, 2.0, 2.0), crop_foreground=True, ct_window=(-1000.0, 1000.0), roi_size=(32, 32, 32))

RAS = np.array([[1.0, 0, 0, -10.0], [0, 1.0, 0, 5.0], [0, 0, 1.0, 2.0], [0, 0, 0, 1]])
LPS_ANISO = np.array([[-0.8, 0, 0, 30.0], [0, -1.2, 0, 40.0], [0, 0, 3.0, -20.0], [0, 0, 0, 1]])
# Axes permuted and flipped: array axis 0 runs posterior, axis 1 left (orientation PLS).
PLS_ANISO = np.array([[0, -1.2, 0, 25.0], [-0.8, 0, 0, 12.0], [0, 0, 3.0, -7.0], [0, 0, 0, 1]])
# NRRD space directions (LPS, one row per axis): axis 0 runs posterior, axis 1 left.
NRRD_DIRECTIONS = np.array([[0.0, 0.9, 0.0], [1.1, 0.0, 0.0], [0.0, 0.0, 2.5]])


def plan(preprocess: PreprocessConfig = PLAN_PREPROCESS, network: ModelConfig = TINY, classes: int = 3) -> dict:
    """A plan written by hand, as older versions wrote them (the Plan class reads these too)."""
    return {
        "network": {**to_dict(network), "out_channels": classes, "patch_size": 2},
        "preprocess": to_dict(preprocess),
        "labels": {str(i): name for i, name in enumerate(["background", "liver", "tumour"][:classes])},
        "channel_names": ["image"],
        "modality": "CT",
    }


def save_checkpoint(path, network: ModelConfig = TINY, kind="finetune", prefix="", state=None, classes=3):
    path.parent.mkdir(parents=True, exist_ok=True)
    if state is None:
        torch.manual_seed(0)
        model = SwinUNETR(in_channels=1, out_channels=classes, feature_size=network.feature_size, depths=network.depths)
        state = {prefix + k: v for k, v in model.state_dict().items()}
    torch.save({"format": "swinssl", "kind": kind, "model": state, "plan": plan(network=network, classes=classes)}, path)
    return path


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("run") / "checkpoints" / "last.pt")


class ThresholdNet(nn.Module):
    """Class 1 where the normalised input exceeds 0.55 (a box at +400 HU, not the body at -200 HU)."""

    def forward(self, x):
        score = (x[:, :1] - 0.55) * 20
        return torch.cat([-score, score], dim=1)


class RampNet(nn.Module):
    """Class-1 logit grows along every axis of the window: not flip-equivariant."""

    def forward(self, x):
        grids = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in x.shape[2:]], indexing="ij")
        ramp = (grids[0] + 2 * grids[1] + 3 * grids[2]).expand(x.shape[0], 1, *x.shape[2:])
        return torch.cat([torch.zeros_like(ramp), ramp], dim=1)


@pytest.fixture
def threshold_checkpoint(tmp_path, monkeypatch):
    """A real finetune checkpoint whose network is ThresholdNet (no weights), so outputs are known."""
    monkeypatch.setattr(infer.model, "build_network", lambda cfg: ThresholdNet())
    tiny = ModelConfig(feature_size=12, depths=(1, 1, 1, 1))
    preprocess = PreprocessConfig(spacing=(2.0, 2.0, 2.0), crop_foreground=True, ct_window=(-1000.0, 1000.0), roi_size=(16, 16, 16))
    path = tmp_path / "threshold.pt"
    torch.save({"format": "swinssl", "kind": "finetune", "model": {}, "plan": plan(preprocess, tiny, classes=2)}, path)
    return path


def box_volume(shape, box):
    """CT: air, a body at -200 HU with a 2-voxel air margin, a box at +400 HU; returns (image, box mask)."""
    image = np.full(shape, -1000.0, np.float32)
    image[2:-2, 2:-2, 1:-1] = -200.0
    inside = np.zeros(shape, bool)
    inside[box] = True
    image[inside] = 400.0
    return image, inside


def dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


# Off-centre on every axis, so a flipped or transposed mask misses most of it.
SHAPE, BOX = (48, 40, 16), np.s_[4:28, 22:38, 2:9]


def write_nrrd(path, array, directions=NRRD_DIRECTIONS, origin=(5.0, -3.0, 7.0)):
    header = {"space": "left-posterior-superior", "space directions": directions, "space origin": np.array(origin)}
    nrrd.write(str(path), array, header=header)
    return path


# --- geometry and alignment ---------------------------------------------------------------------


@pytest.mark.parametrize("output_format", ["nifti", "same"])
def test_masks_have_input_shape_affine_and_land_on_the_box(tmp_path, threshold_checkpoint, output_format):
    image, box = box_volume(SHAPE, BOX)
    inputs = {
        "ras": write_nifti(tmp_path / "in" / "ras.nii.gz", image, RAS),
        "lps": write_nifti(tmp_path / "in" / "lps.nii.gz", image, LPS_ANISO),
        "scan": write_nrrd(tmp_path / "in" / "scan.nrrd", image),
    }
    written = predict(threshold_checkpoint, list(inputs.values()), tmp_path / "out", PredictOptions(output_format=output_format),
                      progress=False)

    nrrd_suffix = ".nrrd" if output_format == "same" else ".nii.gz"
    expected = {tmp_path / "out" / "ras.nii.gz", tmp_path / "out" / "lps.nii.gz", tmp_path / "out" / f"scan{nrrd_suffix}"}
    assert set(written) == expected
    for name, source in inputs.items():
        out = next(p for p in written if p.name.startswith(name))
        original, mask = read_volume(source), read_volume(out)
        assert mask.shape == original.shape == (1, *SHAPE)
        np.testing.assert_allclose(np.asarray(mask.affine), np.asarray(original.affine), atol=1e-4)
        if source.suffix == ".gz":  # independent of MONAI: the file's own affine
            np.testing.assert_allclose(nib.load(out).affine, nib.load(source).affine, atol=1e-4)
        assert set(np.unique(mask.numpy())) <= {0.0, 1.0}
        assert dice(mask[0].numpy() == 1, box) > 0.9, f"{out.name} misaligned"

    if output_format == "same":  # NRRD keeps its LPS space directions and origin
        header = nrrd.read_header(str(tmp_path / "out" / "scan.nrrd"))
        assert header["space"] == "left-posterior-superior"
        np.testing.assert_allclose(header["space directions"], NRRD_DIRECTIONS, atol=1e-6)
        np.testing.assert_allclose(header["space origin"], [5.0, -3.0, 7.0], atol=1e-6)
    assert nib.load(tmp_path / "out" / "lps.nii.gz").get_data_dtype() == np.uint8


def test_mask_lands_on_the_box_of_a_permuted_anisotropic_grid(tmp_path, threshold_checkpoint):
    image, box = box_volume(SHAPE, BOX)
    path = write_nifti(tmp_path / "pls.nii.gz", image, PLS_ANISO)
    model, the_plan = load_model(threshold_checkpoint)
    mask = predict_case(model, the_plan, path)
    assert orientation_of(read_volume(path)) == "PLS"
    assert mask.shape == (1, *SHAPE) and mask.dtype == torch.uint8
    np.testing.assert_allclose(np.asarray(mask.affine), PLS_ANISO, atol=1e-4)
    assert dice(mask[0].numpy() == 1, box) > 0.9
    for axis in range(3):  # the same mask flipped along any axis would not fit
        assert dice(np.flip(mask[0].numpy() == 1, axis), box) < 0.6


def test_real_checkpoint_predicts_an_input_smaller_than_the_roi(tmp_path, tiny_checkpoint):
    image, _ = box_volume((20, 18, 16), np.s_[5:12, 4:10, 6:12])
    path = write_nifti(tmp_path / "small_ct.nii.gz", image, LPS_ANISO)  # about 8 x 11 x 24 voxels at 2 mm < ROI 32
    written = predict(tiny_checkpoint, path, tmp_path / "out", progress=False)

    assert written == [tmp_path / "out" / "small_ct.nii.gz"]
    out = nib.load(written[0])
    assert out.shape == (20, 18, 16) and out.get_data_dtype() == np.uint8
    np.testing.assert_allclose(out.affine, LPS_ANISO, atol=1e-4)
    assert set(np.unique(np.asarray(out.dataobj))) <= {0, 1, 2}
    record = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert record["predictions"] == {str(path): str(written[0])}
    assert record["checkpoint"] == str(tiny_checkpoint.resolve())
    assert record["options"]["roi_size"] == [32, 32, 32] and record["options"]["flips"] is False
    assert record["labels"]["1"] == "liver"


def test_volume_without_foreground_gives_an_all_background_mask(tmp_path, threshold_checkpoint):
    path = write_nifti(tmp_path / "air.nii.gz", np.full((20, 18, 12), -1000.0, np.float32), LPS_ANISO)
    model, the_plan = load_model(threshold_checkpoint)
    mask = predict_case(model, the_plan, path)  # the foreground crop is empty: nothing to run the model on
    assert mask.shape == (1, 20, 18, 12) and not mask.any()
    np.testing.assert_allclose(np.asarray(mask.affine), LPS_ANISO, atol=1e-4)


# --- preprocessing cache ------------------------------------------------------------------------


def test_second_prediction_reads_the_cache_and_writes_the_same_mask(tmp_path, threshold_checkpoint, monkeypatch):
    from swinssl.data import transforms

    image, box = box_volume(SHAPE, BOX)
    path = write_nifti(tmp_path / "pls.nii.gz", image, PLS_ANISO)
    reads = []
    real_read = transforms.read_image
    monkeypatch.setattr(transforms, "read_image", lambda *a, **k: reads.append(a[0]) or real_read(*a, **k))
    masks = {}
    for run, cache in [("off", "off"), ("first", tmp_path / "cache"), ("second", tmp_path / "cache")]:
        reads.clear()
        written = predict(threshold_checkpoint, path, tmp_path / run, PredictOptions(cache=cache), progress=False)
        masks[run] = nib.load(written[0])
        assert reads == ([] if run == "second" else [str(path)]), run  # the second run decodes nothing
        record = json.loads((tmp_path / run / "predictions.json").read_text())
        assert record["options"]["cache"] == (None if cache == "off" else str(cache))
    assert len(list((tmp_path / "cache" / "entries").iterdir())) == 1
    for run in ("first", "second"):
        assert np.array_equal(np.asarray(masks[run].dataobj), np.asarray(masks["off"].dataobj)), run
        np.testing.assert_array_equal(masks[run].affine, masks["off"].affine)
    assert dice(np.asarray(masks["second"].dataobj) == 1, box) > 0.9


def test_auto_cache_is_the_training_cache_while_it_exists(tmp_path):
    trained = tmp_path / "train_out" / "cache"
    assert infer.prediction_cache("auto", str(trained)) is None  # gone (or elsewhere): none
    trained.mkdir(parents=True)
    assert infer.prediction_cache("auto", str(trained)) == trained
    assert infer.prediction_cache("auto", None) is None  # a checkpoint that names no cache
    assert infer.prediction_cache("off", str(trained)) is None
    assert infer.prediction_cache(tmp_path / "mine", str(trained)) == tmp_path / "mine"


# --- sliding windows and flips ------------------------------------------------------------------


def test_flips_do_not_change_a_flip_equivariant_model():
    torch.manual_seed(0)
    image = torch.rand(1, 21, 17, 13)  # asymmetric: a flip not undone would show
    plain = predict_volume(ThresholdNet(), image, (8, 8, 8), overlap=0.5)
    flipped = predict_volume(ThresholdNet(), image, (8, 8, 8), overlap=0.5, flips=True)
    assert plain.shape == (2, 21, 17, 13)
    torch.testing.assert_close(flipped, plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(plain[1], torch.sigmoid((image[0] - 0.55) * 40), atol=1e-5, rtol=0)


def test_flips_average_all_eight_flips():
    image = torch.zeros(1, 20, 16, 11)  # constant: the flip-averaged prediction must be symmetric
    plain = predict_volume(RampNet(), image, (32, 32, 32))
    fused = predict_volume(RampNet(), image, (32, 32, 32), flips=True)
    for axis in (1, 2, 3):
        assert not torch.allclose(plain, plain.flip(axis), atol=1e-3)
        torch.testing.assert_close(fused, fused.flip(axis), atol=1e-5, rtol=0)
    torch.testing.assert_close(fused.sum(0), torch.ones(20, 16, 11))


def test_fused_views_do_not_change_a_permutation_equivariant_model():
    torch.manual_seed(0)
    image = torch.rand(1, 21, 17, 13)
    plain = predict_volume(ThresholdNet(), image, (8, 8, 8), overlap=0.5)
    fused = predict_volume(ThresholdNet(), image, (8, 8, 8), overlap=0.5, views="fused")
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=0)


def test_fused_views_average_the_softmax_of_the_three_axis_orders():
    from swinssl.ssl.views import PERMUTATIONS, permute, unpermute

    x = torch.zeros(1, 1, 16, 16, 16)  # one window: the ramp's weights 1, 2, 3 differ per axis
    fused = predict_volume(RampNet(), x[0], (16, 16, 16), views="fused")
    plain = predict_volume(RampNet(), x[0], (16, 16, 16))
    expected = sum(torch.softmax(unpermute(RampNet()(permute(x, o)), o), 1) for o in PERMUTATIONS.values()) / 3
    torch.testing.assert_close(fused, expected[0], atol=1e-5, rtol=0)
    assert (fused - plain).abs().max() > 0.1


def test_single_view_predicts_the_permuted_window_mapped_back():
    from swinssl.ssl.views import PERMUTATIONS, permute, unpermute

    x = torch.zeros(1, 1, 16, 16, 16)
    views = {name: predict_volume(RampNet(), x[0], (16, 16, 16), views=name) for name in PERMUTATIONS}
    for name, order in PERMUTATIONS.items():
        expected = torch.softmax(unpermute(RampNet()(permute(x, order)), order), 1)[0]
        torch.testing.assert_close(views[name], expected, atol=1e-5, rtol=0)
    assert (views["swap_xy"] - views["identity"]).abs().max() > 0.1  # the orders do differ for this model
    fused = predict_volume(RampNet(), x[0], (16, 16, 16), views="fused")
    torch.testing.assert_close(fused, sum(views.values()) / 3, atol=1e-5, rtol=0)


def test_single_view_of_a_multiview_model_pairs_it_with_the_next_order():
    from swinssl.nn.multiview import MultiViewSwinUNETR
    from swinssl.ssl.views import PERMUTATIONS

    torch.manual_seed(0)
    model = MultiViewSwinUNETR(in_channels=1, out_channels=2, feature_size=12, depths=(1, 1, 1, 1)).eval()
    x = torch.rand(1, 1, 32, 32, 32)
    orders = list(PERMUTATIONS.values())
    with torch.no_grad():
        for i, name in enumerate(PERMUTATIONS):
            got = predict_volume(model, x[0], (32, 32, 32), views=name)
            expected = torch.softmax(model(x, orders=(orders[i], orders[(i + 1) % 3]))[0], 1)[0]
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_swin_unetr_probabilities_for_an_input_smaller_than_the_roi(tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint)
    probs = predict_volume(model, torch.rand(1, 10, 12, 9), (32, 32, 32))
    assert probs.shape == (3, 10, 12, 9)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(0), torch.ones(10, 12, 9))


# --- many inputs, bad inputs --------------------------------------------------------------------


def test_bad_files_are_reported_and_skipped_the_good_one_written(tmp_path, threshold_checkpoint, caplog):
    image, _ = box_volume(SHAPE, BOX)
    write_nifti(tmp_path / "in" / "good.nii.gz", image, LPS_ANISO)
    bad = write_nifti(tmp_path / "in" / "truncated.nii.gz", image, LPS_ANISO)
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    image[3, 3, 3] = np.nan
    write_nifti(tmp_path / "in" / "nan.nii.gz", image, LPS_ANISO)

    with caplog.at_level("WARNING", logger="swinssl.infer"):
        written = predict(threshold_checkpoint, tmp_path / "in", tmp_path / "out", progress=False)

    assert written == [tmp_path / "out" / "good.nii.gz"]
    # besides the masks and predictions.json: the per-case records a resumed prediction reads (.predict/)
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")) == [
        "good.nii.gz", "predictions.json"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2
    assert any("truncated.nii.gz" in w and "cannot read" in w for w in warnings)
    assert any("nan.nii.gz" in w and "NaN" in w for w in warnings)
    assert all("\n" not in w for w in warnings)
    record = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert set(record["failed"]) == {str(tmp_path / "in" / "truncated.nii.gz"), str(tmp_path / "in" / "nan.nii.gz")}


def test_only_bad_inputs_raise_data_error(tmp_path, threshold_checkpoint):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataError, match="no mask written.*broken.nii.gz"):
        predict(threshold_checkpoint, [tmp_path / "in", tmp_path / "missing.nii.gz"], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_failing_write_leaves_no_partial_file(tmp_path, threshold_checkpoint, monkeypatch):
    image, _ = box_volume(SHAPE, BOX)
    path = write_nifti(tmp_path / "ct.nii.gz", image, LPS_ANISO)

    def half_write(target, array, affine):
        target.write_bytes(b"\x1f\x8b half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr(infer.write, "_write_nifti", half_write)
    with pytest.raises(OSError, match="No space"):
        predict(threshold_checkpoint, path, tmp_path / "out", progress=False)
    assert list((tmp_path / "out").iterdir()) == []  # neither the mask, nor its temporary file


def test_nnunet_dataset_predicts_training_and_test_cases(tmp_path, threshold_checkpoint):
    image, box = box_volume(SHAPE, BOX)
    root = tmp_path / "Dataset001"
    write_nifti(root / "imagesTr" / "liver_001_0000.nii.gz", image, LPS_ANISO)
    write_nifti(root / "labelsTr" / "liver_001.nii.gz", box.astype(np.uint8), LPS_ANISO)
    write_nifti(root / "imagesTs" / "liver_002_0000.nii.gz", image, RAS)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1}, "numTraining": 1, "file_ending": ".nii.gz",
    }))
    written = predict(threshold_checkpoint, root, tmp_path / "out", progress=False)
    assert sorted(p.name for p in written) == ["liver_001.nii.gz", "liver_002.nii.gz"]
    np.testing.assert_allclose(nib.load(tmp_path / "out" / "liver_002.nii.gz").affine, RAS, atol=1e-4)


def test_repeated_case_ids_get_distinct_files(tmp_path, threshold_checkpoint):
    image, _ = box_volume(SHAPE, BOX)
    write_nifti(tmp_path / "in" / "patient_a" / "ct.nii.gz", image, LPS_ANISO)
    write_nifti(tmp_path / "in" / "patient_b" / "ct.nii.gz", image, RAS)
    written = predict(threshold_checkpoint, tmp_path / "in", tmp_path / "out", progress=False)
    assert sorted(p.name for p in written) == ["patient_a_ct.nii.gz", "patient_b_ct.nii.gz"]


# --- checkpoints --------------------------------------------------------------------------------


def test_pretraining_checkpoint_has_no_segmentation_head(tmp_path):
    path = save_checkpoint(tmp_path / "pretrain.pt", kind="pretrain", state={})
    with pytest.raises(CheckpointError, match="no segmentation head") as err:
        load_model(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_run_directory_uses_best_then_last(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(CheckpointError, match="no checkpoints/best.pt or checkpoints/last.pt"):
        load_model(run)
    save_checkpoint(run / "checkpoints" / "last.pt", classes=2, prefix="module.")  # saved under DDP
    model, the_plan = load_model(run)
    assert model.out.conv.conv.out_channels == 2 and not model.training
    assert the_plan.preprocess.spacing == (2.0, 2.0, 2.0) and the_plan.out_channels == 2
    save_checkpoint(run / "checkpoints" / "best.pt")
    model, _ = load_model(run)
    assert model.out.conv.conv.out_channels == 3


def test_weights_that_do_not_fit_the_plan_are_refused(tmp_path):
    path = save_checkpoint(tmp_path / "x.pt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["plan"]["network"]["out_channels"] = 5
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="do not fit the network of its plan .*2 shape-mismatched"):
        load_model(path)


def test_every_prediction_option_reaches_the_sliding_window_and_the_record(tmp_path, threshold_checkpoint, monkeypatch):
    from swinssl.infer import cases as predict_module

    image, _ = box_volume(SHAPE, BOX)
    path = write_nifti(tmp_path / "ct.nii.gz", image, LPS_ANISO)
    seen = {}
    real = predict_module.predict_volume

    def spy(model, image, roi_size, overlap, sw_batch_size, mode, flips, views, on_windows=None, method=None):
        seen.update(roi_size=tuple(roi_size), overlap=overlap, sw_batch_size=sw_batch_size, mode=mode, flips=flips,
                    views=views, method=method.name)
        return real(model, image, roi_size, overlap, sw_batch_size, mode, flips, views, on_windows, method=method)

    monkeypatch.setattr(predict_module, "predict_volume", spy)
    options = PredictOptions(roi_size=24, overlap=0.25, sw_batch_size=3, mode="constant", flips=True, views="swap_xy",
                             cache="off")
    predict(threshold_checkpoint, path, tmp_path / "out", options, progress=False)
    assert seen == {"roi_size": (24, 24, 24), "overlap": 0.25, "sw_batch_size": 3, "mode": "constant", "flips": True,
                    "views": "swap_xy", "method": "swin_unetr"}  # the plan's hooks (auto for a plan without the name)
    record = json.loads((tmp_path / "out" / "predictions.json").read_text())["options"]
    assert record == {"roi_size": [24, 24, 24], "overlap": 0.25, "sw_batch_size": 3, "mode": "constant", "flips": True,
                      "views": "swap_xy", "output_format": "nifti", "device": "cpu", "cache": None}
    monkeypatch.setattr(predict_module, "window_batch", lambda model, roi, method=None: 5)
    predict(threshold_checkpoint, path, tmp_path / "default", progress=False)
    assert seen["roi_size"] == (16, 16, 16) and seen["views"] == "single"  # the plan's crop; auto -> plain: single
    assert seen["sw_batch_size"] == 5  # no window batch given: window_batch's, and the record says which
    assert seen["overlap"] == 0.5  # a plan without the fine-tuning's overlap (older checkpoints)
    default = json.loads((tmp_path / "default" / "predictions.json").read_text())["options"]
    assert default["sw_batch_size"] == 5 and default["overlap"] == 0.5

    ckpt = torch.load(threshold_checkpoint, weights_only=True)
    ckpt["plan"]["overlap"] = 0.7  # fine-tuned at 70% overlap (finetune/swinmm): predicted so too
    torch.save(ckpt, threshold_checkpoint)
    predict(threshold_checkpoint, path, tmp_path / "planned", PredictOptions(cache="off"), progress=False)
    assert seen["overlap"] == 0.7
    assert json.loads((tmp_path / "planned" / "predictions.json").read_text())["options"]["overlap"] == 0.7
    predict(threshold_checkpoint, path, tmp_path / "given", PredictOptions(cache="off", overlap=0.25), progress=False)
    assert seen["overlap"] == 0.25  # --overlap wins over the plan


def test_predict_says_what_each_case_costs_and_counts_its_windows(tmp_path, threshold_checkpoint, capsys,
                                                                  monkeypatch):
    image, _ = box_volume(SHAPE, BOX)
    path = write_nifti(tmp_path / "ct.nii.gz", image, LPS_ANISO)
    bars = []

    class RecordedBar(infer.cases.tqdm):
        def close(self):
            bars.append((self.desc, self.total, self.n))
            super().close()

    monkeypatch.setattr(infer.cases, "tqdm", RecordedBar)
    predict(threshold_checkpoint, path, tmp_path / "out", PredictOptions(cache="off", sw_batch_size=2, flips=True),
            progress=True)
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if line.startswith("ct: "))
    shape = re.search(r"ct: (\d+)x(\d+)x(\d+) voxels after preprocessing, (\d+) windows of 16x16x16 at overlap 0.5 "
                      r"x 8 passes, 2 per forward pass", line)
    assert shape, line
    from swinssl.utils import count_windows

    windows = count_windows([int(shape.group(i)) for i in (1, 2, 3)], (16, 16, 16), 0.5)
    assert int(shape.group(4)) == windows
    assert ("  ct", 8 * windows, 8 * windows) in bars  # the window bar: every window of every flip, counted


def test_a_case_of_another_modality_than_the_model_is_said(tmp_path, threshold_checkpoint, caplog, monkeypatch):
    import nibabel

    loads = []  # every file nibabel opens: the modality is guessed from the pipeline's own read
    real_load = nibabel.load
    monkeypatch.setattr(nibabel, "load", lambda path, *a, **k: loads.append(os.path.basename(str(path))) or real_load(path, *a, **k))
    image, _ = box_volume(SHAPE, BOX)
    ct = write_nifti(tmp_path / "ct.nii.gz", image, LPS_ANISO)
    mri = write_nifti(tmp_path / "head.nii.gz", image + 1000.0, LPS_ANISO)  # no air: MRI-like intensities
    declared = write_nifti(tmp_path / "data" / "mri" / "t1.nii.gz", image, LPS_ANISO)  # its folder says MRI
    ckpt = torch.load(threshold_checkpoint, weights_only=True)
    ckpt["plan"]["modality"] = "CT"
    torch.save(ckpt, threshold_checkpoint)
    with caplog.at_level("WARNING"):
        predict(threshold_checkpoint, [ct, mri, tmp_path / "data"], tmp_path / "out", PredictOptions(cache="off"),
                progress=False)
    said = [r.getMessage() for r in caplog.records if "but the model was fine-tuned on CT" in r.getMessage()]
    assert len(said) == 2, said  # not the CT
    assert said[0].startswith(f"{mri}: a MRI volume (by its intensities") or said[1].startswith(f"{mri}: a MRI volume (by")
    assert any(line.startswith(f"{declared}: a MRI volume (declared)") for line in said)
    assert sorted(loads) == ["ct.nii.gz", "head.nii.gz", "t1.nii.gz"]  # each input read once


def test_a_run_without_best_checkpoint_is_said_to_predict_with_last(tmp_path, threshold_checkpoint, caplog):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(threshold_checkpoint, run / "checkpoints" / "last.pt")
    image, _ = box_volume(SHAPE, BOX)
    path = write_nifti(tmp_path / "ct.nii.gz", image, LPS_ANISO)
    with caplog.at_level("WARNING"):
        predict(run, path, tmp_path / "out", PredictOptions(cache="off"), progress=False)
    assert any("no best.pt" in r.getMessage() and "last.pt" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING"):  # named explicitly: nothing to say
        predict(run / "checkpoints" / "last.pt", path, tmp_path / "out2", PredictOptions(cache="off"), progress=False)
    assert not any("no best.pt" in r.getMessage() for r in caplog.records)


def test_window_batch_is_one_per_cpu_thread_within_a_quarter_of_free_memory(monkeypatch):
    from swinssl.infer import volume

    net = SwinUNETR(1, 2, feature_size=12)
    roi = (32, 32, 32)
    per_window = volume.WINDOW_BYTES_PER_VOXEL_FEATURE * 32**3 * 12
    monkeypatch.setattr(volume.torch, "get_num_threads", lambda: 6)
    monkeypatch.setattr(volume, "_available_memory", lambda: 2**40)
    assert volume.window_batch(net, roi) == 6
    monkeypatch.setattr(volume.torch, "get_num_threads", lambda: 64)
    assert volume.window_batch(net, roi) == volume.MAX_WINDOW_BATCH
    monkeypatch.setattr(volume, "_available_memory", lambda: 4 * 3 * per_window)  # a quarter holds 3 windows
    assert volume.window_batch(net, roi) == 3
    from swinssl.methods import get_method

    assert volume.window_batch(net, roi, get_method("swinmm")) == 1  # its hooks: three views per window, one fits
    monkeypatch.setattr(volume, "_available_memory", lambda: per_window)  # not even one: still one
    assert volume.window_batch(net, roi) == 1
    seen = []
    monkeypatch.setattr(volume, "sliding_window_inference",
                        lambda x, roi, batch, *args, **kwargs: seen.append(batch) or torch.zeros(1, 2, *x.shape[2:]))
    monkeypatch.setattr(volume, "window_batch", lambda model, roi, method=None: 7)
    volume.predict_volume(net, torch.zeros(1, 8, 8, 8), 8)
    assert seen == [7]
