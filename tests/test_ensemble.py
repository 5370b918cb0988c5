"""Ensembles in prediction: the softmax of several models (or a cross-validation's folds) averaged;
models of different plans refused. Training the folds: tests/test_finetune.py."""

import dataclasses
import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import write_nifti
from torch import nn

from swinssl.config import ModelConfig, PreprocessConfig
from swinssl.errors import CheckpointError
from swinssl.infer import PredictOptions, ensemble_probabilities, load_ensemble, predict, predict_volume
from swinssl.nn.swin_unetr import SwinUNETR
from swinssl.plan import Plan, plan_difference

# Per-class probabilities of two models, chosen so that the three ways of combining them disagree:
# the first model alone says class 0, the mean of the softmaxes class 1, the mean of the logits
# (the softmax of their mean log-probabilities, whatever each model's logit offset) class 2.
FIRST = (0.55, 1e-4, 0.45)
SECOND = (1e-4, 0.95, 0.05)
MEAN_OF_SOFTMAX = tuple((a / sum(FIRST) + b / sum(SECOND)) / 2 for a, b in zip(FIRST, SECOND))  # (0.275, 0.475, 0.25)


class ConstantNet(nn.Module):
    """Logits log(p) (plus an offset that softmax ignores) at every voxel, whatever the input."""

    def __init__(self, probabilities, offset=0.0):
        super().__init__()
        self.register_buffer("logits", torch.log(torch.tensor(probabilities)) + offset)

    def forward(self, x):
        return self.logits.view(1, -1, 1, 1, 1).expand(x.shape[0], -1, *x.shape[2:]).clone()


def test_combinations_of_the_two_models_disagree():
    """The premise of the tests below: a fusion that uses one model, or averages logits, is found out."""
    mean_logits = [(math.log(a) + math.log(b)) / 2 for a, b in zip(FIRST, SECOND)]
    assert np.argmax(FIRST) == 0 and np.argmax(MEAN_OF_SOFTMAX) == 1 and np.argmax(mean_logits) == 2


def test_ensemble_probabilities_are_the_mean_of_the_models_softmax():
    image = torch.rand(1, 8, 8, 8)
    models = [ConstantNet(FIRST, offset=3.0), ConstantNet(SECOND, offset=-2.0)]
    probs = ensemble_probabilities(models, image, (8, 8, 8), PredictOptions(overlap=0.0))
    assert probs.shape == (3, 8, 8, 8)
    expected = torch.tensor(MEAN_OF_SOFTMAX).view(3, 1, 1, 1).expand_as(probs)
    torch.testing.assert_close(probs, expected, rtol=0, atol=1e-6)
    # Each model through its own sliding windows and flips, then averaged: input-dependent models.
    torch.manual_seed(0)
    convs = [nn.Conv3d(1, 3, 3, padding=1) for _ in range(2)]
    image = torch.rand(1, 12, 10, 8)
    options = PredictOptions(overlap=0.5, flips=True)
    probs = ensemble_probabilities(convs, image, (8, 8, 8), options)
    each = [predict_volume(m, image, (8, 8, 8), 0.5, 1, "gaussian", True, "auto") for m in convs]
    torch.testing.assert_close(probs, (each[0] + each[1]) / 2, rtol=0, atol=1e-6)
    torch.testing.assert_close(probs.sum(0), torch.ones(12, 10, 8), rtol=0, atol=1e-5)


# --- end to end: checkpoints of a real SwinUNETR whose output is constant ------------------------

PREPROCESS = PreprocessConfig(spacing=None, crop_foreground=True, ct_window=(-1000.0, 1000.0), roi_size=(32, 32, 32))


def constant_checkpoint(path, probabilities, preprocess=PREPROCESS):
    """A fine-tuning checkpoint of a tiny SwinUNETR that outputs log(probabilities) everywhere:
    its 1x1x1 output convolution has zero weights and those biases."""
    network = ModelConfig(feature_size=12, depths=(1, 1, 1, 1))
    model = SwinUNETR(in_channels=1, out_channels=3, feature_size=12, depths=(1, 1, 1, 1))
    state = model.state_dict()
    state["out.conv.conv.weight"].zero_()
    state["out.conv.conv.bias"].copy_(torch.log(torch.tensor(probabilities)))
    plan = Plan(network=network, preprocess=preprocess, out_channels=3, modality="CT",
                labels={"0": "background", "1": "liver", "2": "tumour"}, channel_names=["image"])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": "swinssl", "kind": "finetune", "model": state, "plan": plan.to_dict()}, path)
    return path


def body_image(tmp_path):
    """CT: air around a -200 HU body (voxels [3:-3, 3:-3, 2:-2]); the foreground crop is the body."""
    image = np.full((36, 34, 30), -1000.0, np.float32)
    image[3:-3, 3:-3, 2:-2] = -200.0
    body = np.zeros(image.shape, bool)
    body[3:-3, 3:-3, 2:-2] = True
    return write_nifti(tmp_path / "in" / "ct.nii.gz", image, np.eye(4)), body


def test_predict_averages_the_softmax_of_every_model_and_records_them(tmp_path):
    first = constant_checkpoint(tmp_path / "a" / "checkpoints" / "best.pt", FIRST)
    second = constant_checkpoint(tmp_path / "b.pt", SECOND)
    path, body = body_image(tmp_path)
    out = tmp_path / "out"
    [written] = predict([tmp_path / "a", second], path, out, PredictOptions(cache="off"), progress=False)
    mask = np.asanyarray(nib.load(written).dataobj)
    assert set(np.unique(mask[body])) == {1}  # the mean of the softmaxes; the first alone: 0, the logits: 2
    assert set(np.unique(mask[~body])) == {0}  # outside the foreground crop: background
    record = json.loads((out / "predictions.json").read_text())
    assert record["models"] == [str(first.resolve()), str(second.resolve())]
    assert record["model"] == str(tmp_path / "a") and record["checkpoint"] == str(first.resolve())
    assert set(record) >= {"labels", "options", "predictions", "failed"}
    # One model: as before, with a list of one.
    predict(second, path, tmp_path / "one", PredictOptions(cache="off"), progress=False)
    assert json.loads((tmp_path / "one" / "predictions.json").read_text())["models"] == [str(second.resolve())]


def test_models_of_different_plans_are_refused_naming_both_and_the_key(tmp_path):
    first = constant_checkpoint(tmp_path / "a.pt", FIRST)
    other = dataclasses.replace(PREPROCESS, spacing=(2.0, 2.0, 2.0))
    second = constant_checkpoint(tmp_path / "b.pt", SECOND, preprocess=other)
    with pytest.raises(CheckpointError, match="preprocess.spacing") as err:
        load_ensemble([first, second])
    message = str(err.value)
    assert "\n" not in message and str(first) in message and str(second) in message
    path, _ = body_image(tmp_path)
    with pytest.raises(CheckpointError, match="preprocess.spacing"):
        predict([first, second], path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "predictions.json").exists()


def test_plans_that_differ_only_in_provenance_predict_alike():
    plan = Plan(network=ModelConfig(), preprocess=PreprocessConfig(), out_channels=3, labels={"0": "bg", "1": "a"})
    moved = dataclasses.replace(plan, cache="/elsewhere", pretrained="run", manifest_sha256="ab", package_version="9",
                                network=dataclasses.replace(plan.network, use_checkpoint=True, dropout_path_rate=0.1))
    assert plan_difference(plan, moved) is None
    assert plan_difference(plan, dataclasses.replace(plan, out_channels=4)) == ("network.out_channels", 3, 4)
    assert plan_difference(plan, dataclasses.replace(plan, labels={"0": "bg", "1": "b"})) == ("labels.1", "a", "b")
    roi = dataclasses.replace(plan, preprocess=dataclasses.replace(plan.preprocess, roi_size=(64, 64, 64)))
    assert plan_difference(plan, roi) == ("preprocess.roi_size", [96, 96, 96], [64, 64, 64])
    wider = dataclasses.replace(plan, network=dataclasses.replace(plan.network, feature_size=24))
    assert plan_difference(plan, wider)[0] == "network.feature_size"


def test_a_cross_validation_folder_stands_for_every_fold_and_refuses_a_missing_one(tmp_path):
    from swinssl.runs import resolve_checkpoints

    parent = tmp_path / "cv"
    parent.mkdir()
    (parent / "folds.json").write_text(json.dumps({"folds": 2, "runs": ["fold_0", "fold_1"]}))
    first = constant_checkpoint(parent / "fold_0" / "checkpoints" / "best.pt", FIRST)
    with pytest.raises(CheckpointError, match="fold_1 has no checkpoint yet; finish the folds with swinssl finetune "
                                              "--resume") as err:
        load_ensemble([parent])
    assert "\n" not in str(err.value) and str(parent) in str(err.value)
    second = constant_checkpoint(parent / "fold_1" / "checkpoints" / "last.pt", SECOND)
    assert resolve_checkpoints(parent) == [first, second]  # each fold's best.pt, else last.pt
    assert resolve_checkpoints(first) == [first]
