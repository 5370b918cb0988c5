"""The checkpoint plan and the run directory: one typed Plan (round trip, old layouts, validation)
and one RunDir naming a run's files."""

import dataclasses

import pytest

from swinssl.config import MethodConfig, ModelConfig, PreprocessConfig, to_dict
from swinssl.errors import CheckpointError
from swinssl.nn.build import build_network
from swinssl.plan import Plan, adopt_architecture, architecture_of
from swinssl.runs import RunDir, resolve_checkpoint

PLAN = Plan(network=ModelConfig(feature_size=12, multiview=True), preprocess=PreprocessConfig(roi_size=(32, 32, 32)),
            out_channels=4, method=MethodConfig(name="swinmm", views="masked"), labels={"0": "background", "1": "liver"},
            channel_names=["t1", "t2"], modality="MRI", cache="/tmp/cache", manifest_sha256="abc")


def test_plan_round_trips_through_plain_data():
    raw = PLAN.to_dict()
    assert raw["network"]["out_channels"] == 4 and raw["network"]["patch_size"] == 2
    assert raw["network"]["multiview"] is True and raw["preprocess"]["roi_size"] == [32, 32, 32]
    assert Plan.from_dict(raw) == PLAN


def test_plan_of_an_older_checkpoint_is_read():
    # As version 0.x wrote them: network with out_channels (a ModelConfig field then), no method views.
    network = {k: v for k, v in to_dict(ModelConfig(feature_size=12)).items() if k != "single_voxel_bottleneck"}
    old = {"network": {**network, "out_channels": 3, "patch_size": 2},
           "preprocess": to_dict(PreprocessConfig()), "labels": {0: "background", 1: "liver", 2: "kidney"},
           "method": {k: v for k, v in to_dict(MethodConfig()).items() if k != "views"}}
    plan = Plan.from_dict(old, "old.pt")
    assert plan.out_channels == 3 and plan.network.feature_size == 12 and plan.method.views == ""
    assert plan.labels == {"0": "background", "1": "liver", "2": "kidney"}  # JSON keys are text
    assert plan.modality is None and plan.cache is None
    # Its segmentation network was trained padding 32^3 crops to 64 along the last axis: it keeps
    # that; a plan without a segmentation head (pre-training) takes today's rule.
    assert plan.network.single_voxel_bottleneck == "pad"
    assert build_network(plan.network_fields()).single_voxel_bottleneck == "pad"
    pretraining = {"network": {k: v for k, v in to_dict(ModelConfig()).items() if k != "single_voxel_bottleneck"},
                   "preprocess": to_dict(PreprocessConfig())}
    assert Plan.from_dict(pretraining).network.single_voxel_bottleneck == "exact"


@pytest.mark.parametrize("raw, message", [
    ({"network": {}}, r"old.pt: the checkpoint's plan lacks its 'network' or 'preprocess' section"),
    ({"network": {"feature_size": "big"}, "preprocess": {}}, r"old.pt: plan.network.feature_size must be an integer"),
    ({"network": {"wings": 2}, "preprocess": {}}, r"old.pt: unknown key 'plan.network.wings'"),
    ({"network": {}, "preprocess": {"roi_size": [1, 2]}}, r"plan.preprocess.roi_size must be a list of 3 values"),
    ({"network": {}, "preprocess": {}, "labels": ["a"]}, r"plan.labels must be a dict"),
])
def test_bad_plans_are_refused_in_one_line_naming_the_key(raw, message):
    with pytest.raises(CheckpointError, match=message) as err:
        Plan.from_dict(raw, "old.pt")
    assert "\n" not in str(err.value)


def test_adopting_a_pretrained_architecture_says_what_changed(capsys):
    pretrained = architecture_of({"network": {"feature_size": 24, "use_v2": True, "in_channels": 1, "future": 0}},
                                 "pre.pt")
    assert pretrained == {"feature_size": 24, "use_v2": True}  # what the plan holds of the architecture only
    model = adopt_architecture(ModelConfig(feature_size=48, in_channels=4, downsample="mergingv2"), pretrained, "pre.pt")
    # Channels stay the data's; a field the plan does not hold (downsample) stays the config's.
    assert (model.feature_size, model.use_v2, model.in_channels, model.downsample) == (24, True, 4, "mergingv2")
    assert "feature_size 48 -> 24" in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="pre.pt: plan.network.feature_size must be an integer"):
        architecture_of({"network": {"feature_size": "big"}}, "pre.pt")


def test_run_dir_names_the_files_and_checkpoints_resolve(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.last == tmp_path / "run/checkpoints/last.pt" and run.preview(12).name == "step_0000012.png"
    run.checkpoints.mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no checkpoints/best.pt or checkpoints/last.pt"):
        resolve_checkpoint(run.path)
    run.last.write_bytes(b"")
    assert resolve_checkpoint(run.path) == run.last
    run.best.write_bytes(b"")
    assert resolve_checkpoint(run.path) == run.best and resolve_checkpoint(run.checkpoints) == run.best
    assert resolve_checkpoint(run.path, prefer_best=False) == run.last
    assert resolve_checkpoint(run.last) == run.last


def test_a_plan_without_the_hooks_name_ensembles_with_one_that_has_it():
    from swinssl.plan import plan_difference

    older = Plan(network=ModelConfig(), preprocess=PreprocessConfig(), out_channels=2)
    newer = dataclasses.replace(older, finetune_method="swin_unetr")
    assert plan_difference(older, newer) is None  # the older one's hooks follow from the same network
    assert plan_difference(newer, dataclasses.replace(older, finetune_method="swinmm")) == (
        "finetune_method", "swin_unetr", "swinmm")
