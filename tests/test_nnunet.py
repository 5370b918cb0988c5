"""The nnU-Net v2 bridge (``swinssl.nnunet``, ``swinssl nnunet ...``): install, plans, export, trainer.

Needs the ``swinssl[nnunet]`` extra: every test is skipped without nnU-Net. Tests that install
into nnU-Net's package folder put it back as they found it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("nnunetv2")

from swinssl.cli import app  # noqa: E402
from swinssl.config import load_config, to_dict  # noqa: E402
from swinssl.data.phantom import LABELS, write_phantom_dataset  # noqa: E402
from swinssl.checkpoint import save_checkpoint  # noqa: E402
from swinssl.errors import CheckpointError, DependencyError  # noqa: E402
from swinssl.methods import get_method  # noqa: E402
from swinssl.nnunet import install as shims  # noqa: E402
from swinssl.nnunet.export import export_for_nnunet  # noqa: E402
from swinssl.nnunet.plans import write_swinssl_plans  # noqa: E402

runner = CliRunner()
DATASET_ID = 501
WINDOW = [-500.0, 500.0]  # neither swinssl's default CT window nor anything nnU-Net would choose


# --------------------------------------------------------------------------------------------------
# Helpers: a pre-training checkpoint, phantoms in nnU-Net's raw layout, nnU-Net's planning
# --------------------------------------------------------------------------------------------------


def pretrain_checkpoint(path: Path, feature_size: int = 12, modality: str | None = "CT", plan: bool = True) -> Path:
    """A swinssl pre-training checkpoint of a small encoder whose every tensor differs from a fresh
    initialisation (so a load that did nothing cannot pass), with a plan: CT window ``WINDOW``."""
    cfg = load_config(None, [f"model.feature_size={feature_size}", "model.depths=[1,1,1,1]"])
    torch.manual_seed(7)
    ssl = get_method(cfg.method.name).build_model(cfg)
    with torch.no_grad():
        for parameter in ssl.swinViT.parameters():
            parameter.add_(0.5)
    if not plan:  # a bare state dict in MONAI's layout: no plan, so no known normalisation
        return save_checkpoint(path, {k: v for k, v in ssl.state_dict().items() if k.startswith("swinViT.")})
    return save_checkpoint(path, {"format": "swinssl", "kind": "pretrain", "step": 1, "model": ssl.state_dict(),
                                  "plan": {"network": {**to_dict(cfg.model), "patch_size": 2}, "modality": modality,
                                           "preprocess": {"ct_window": WINDOW, "spacing": [1.5, 1.5, 2.0]}}})


def write_nnunet_raw(raw: Path, phantoms: Path, dataset_id: int = DATASET_ID) -> Path:
    """The CT phantoms as an nnU-Net raw dataset (``DatasetXXX_Name/imagesTr/<case>_0000.nii.gz``, ...)."""
    folder = raw / f"Dataset{dataset_id:03d}_Phantom"
    meta = json.loads((phantoms / "dataset.json").read_text())
    for split, images, labels in (("training", "imagesTr", "labelsTr"), ("test", "imagesTs", None)):
        for entry in meta[split]:
            case = Path(entry["label"]).name.removesuffix(".nii.gz")
            (folder / images).mkdir(parents=True, exist_ok=True)
            shutil.copy(phantoms / entry["image"], folder / images / f"{case}_0000.nii.gz")
            if labels:
                (folder / labels).mkdir(parents=True, exist_ok=True)
                shutil.copy(phantoms / entry["label"], folder / labels / f"{case}.nii.gz")
    dataset = {"channel_names": {"0": "CT"}, "labels": {name: index for index, name in LABELS.items()},
               "numTraining": len(meta["training"]), "file_ending": ".nii.gz", "name": "Phantom"}
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    return folder


@pytest.fixture
def nnunet_paths(tmp_path, monkeypatch):
    """nnU-Net's three folders in ``tmp_path``; one process for its exports."""
    paths = {name: tmp_path / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for name, path in paths.items():
        path.mkdir()
        monkeypatch.setenv(name, str(path))
    monkeypatch.setenv("nnUNet_def_n_proc", "1")  # nnU-Net's default worker count, e.g. in nnUNetv2_predict
    monkeypatch.setenv("nnUNet_compile", "false")
    return paths


def plan_dataset(paths: dict[str, Path], tmp_path: Path, cases: int = 4) -> Path:
    """Phantoms (32^3) in nnU-Net's raw layout, fingerprinted and planned as
    ``nnUNetv2_plan_and_preprocess -d ID --no_pp`` does; returns nnU-Net's plans file."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments


    write_phantom_dataset(tmp_path / "phantoms", cases=cases, size=32, seed=3)
    write_nnunet_raw(paths["nnUNet_raw"], tmp_path / "phantoms")
    extract_fingerprints([DATASET_ID], num_processes=1, check_dataset_integrity=True, show_progress_bar=False)
    plan_experiments([DATASET_ID])
    return paths["nnUNet_preprocessed"] / f"Dataset{DATASET_ID:03d}_Phantom" / "nnUNetPlans.json"


@pytest.fixture
def nnunet_installed():
    """The shims installed in nnU-Net's real folder for the test; removed after unless they were there."""
    folder, _ = shims.installed_nnunet()
    was_installed = all((folder / shim.file).is_file() for shim in shims.SHIMS)
    shims.install()
    yield folder
    if not was_installed:
        shims.uninstall()


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    return lines[0]


# --------------------------------------------------------------------------------------------------
# install / uninstall
# --------------------------------------------------------------------------------------------------


LOOKUP = """
import os, sys
import nnunetv2
from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
found = []
for argument in sys.argv[1:]:
    folder, name = argument.split(":")
    found.append(recursive_find_python_class(os.path.join(nnunetv2.__path__[0], *folder.split("/")), name,
                                             "nnunetv2." + folder.replace("/", ".")))
print(" ".join(f"{c.__module__}.{c.__name__}" for c in found if c is not None))
"""
TRAINERS, NORMALIZATIONS = "training/nnUNetTrainer", "preprocessing/normalization"


def lookup_in_fresh_process(*folder_names: str) -> str:
    """nnU-Net's lookup by class name (``folder:Name``), in a new process that writes bytecode (as users'
    Python does): the modules it imports leave their ``__pycache__`` files."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    done = subprocess.run([sys.executable, "-c", LOOKUP, *folder_names], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_install_twice_then_uninstall_leaves_nnunet_folder_as_it_was():
    folder, _ = shims.installed_nnunet()
    was_installed = (folder / shims.SHIMS[0].file).is_file()
    shims.uninstall()
    # nnU-Net's modules that the lookups below import, compiled as any use of nnU-Net leaves them
    lookup_in_fresh_process(f"{TRAINERS}:nnUNetTrainer", f"{NORMALIZATIONS}:NoSuchScheme")
    before = tree_digest(folder)
    try:
        first = runner.invoke(app, ["nnunet", "install"])
        second = runner.invoke(app, ["nnunet", "install"])
        assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
        for shim in shims.SHIMS:
            assert f"wrote: {folder / shim.file}" in first.output
            assert f"unchanged: {folder / shim.file}" in second.output
        # nnU-Net's lookup finds the classes through the shims (and leaves their bytecode, removed below)
        assert lookup_in_fresh_process(f"{TRAINERS}:nnUNetTrainer_SwinUNETR", f"{NORMALIZATIONS}:SwinsslNormalization").split() == [
            "swinssl.nnunet.trainer.nnUNetTrainer_SwinUNETR", "swinssl.nnunet.normalization.SwinsslNormalization"]
        assert list(folder.rglob("swinssl_*.pyc"))
        removed = runner.invoke(app, ["nnunet", "install", "--uninstall"])
        assert removed.exit_code == 0 and removed.output.count("removed: ") == len(shims.SHIMS), removed.output
        assert tree_digest(folder) == before
    finally:  # as found, also when an assertion failed half-way
        shims.install() if was_installed else shims.uninstall()


def test_install_refuses_an_untested_nnunet_version(tmp_path, monkeypatch):
    monkeypatch.setattr(shims, "installed_nnunet", lambda: (tmp_path, "2.9.0"))
    result = runner.invoke(app, ["nnunet", "install"])
    assert result.exit_code == 2
    assert "nnunetv2) 2.9.0 is installed" in one_line_error(result) and "tested with nnunetv2 2.8.x" in result.output
    assert not list(tmp_path.iterdir())


def test_install_never_overwrites_nor_removes_a_file_it_did_not_write(tmp_path):
    for shim in shims.SHIMS:
        (tmp_path / shim.folder).mkdir(parents=True)
    foreign = tmp_path / shims.SHIMS[1].file
    foreign.write_text("class Mine: pass\n")
    with pytest.raises(DependencyError, match="exists and was not written by swinssl"):
        shims.install(tmp_path)
    assert ("kept" in dict(shims.uninstall(tmp_path)).values()) and foreign.read_text() == "class Mine: pass\n"


# --------------------------------------------------------------------------------------------------
# Normalisation, schedule
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("record", [{"modality": "CT", "ct_window": WINDOW},
                                    {"modality": "MRI", "mri_normalization": "percentile", "mri_percentiles": [1.0, 99.0]},
                                    {"modality": "MRI", "mri_normalization": "zscore"}])
def test_swinssl_normalization_scheme_equals_swinssl_pipeline_normalisation(record):
    from swinssl.data.transforms import NormalizeByModalityd
    from swinssl.nnunet.normalization import SwinsslNormalization
    from swinssl.nnunet.plans import normalization_setting

    rng = np.random.default_rng(0)
    image = np.where(rng.random((20, 18, 16)) < 0.2, 0.0, rng.normal(300, 400, (20, 18, 16))).astype(np.float32)
    scheme = SwinsslNormalization(use_mask_for_norm=False, intensityproperties={"mean": 1.0, "swinssl": record})
    cfg, modality = normalization_setting(record)
    expected = NormalizeByModalityd(cfg)({"image": torch.from_numpy(image[None].copy()), "modality": modality})["image"]
    assert np.allclose(scheme.run(image.copy()), np.asarray(expected)[0], atol=1e-6)
    if record["modality"] == "CT":
        assert np.allclose(scheme.run(image.copy()), np.clip((image + 500) / 1000, 0, 1), atol=1e-6)


def test_learning_rate_warms_up_linearly_then_decays_by_cosine():
    from swinssl.nnunet.trainer import warmup_cosine_lr

    lrs = [warmup_cosine_lr(1e-4, epoch, 4, 14) for epoch in range(15)]
    assert lrs[:4] == pytest.approx([2e-5, 4e-5, 6e-5, 8e-5])
    assert lrs[4] == pytest.approx(1e-4) and lrs[9] == pytest.approx(5e-5) and lrs[14] == pytest.approx(0.0)
    assert lrs[6] == pytest.approx(0.5e-4 * (1 + np.cos(np.pi * 0.2)))  # a cosine, not a straight line
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


# --------------------------------------------------------------------------------------------------
# plans and export on a planned phantom dataset: refusals and the stem adaptation
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planned_once(tmp_path_factory):
    """nnU-Net's plans of the phantom dataset, planned once for the module's tests."""
    root = tmp_path_factory.mktemp("planned")
    with pytest.MonkeyPatch.context() as monkeypatch:
        paths = {name: root / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
        for name, path in paths.items():
            path.mkdir()
            monkeypatch.setenv(name, str(path))
        return plan_dataset(paths, root).parent


@pytest.fixture
def planned(planned_once, nnunet_paths):
    """A copy of those plans (and dataset.json) in this test's nnU-Net folders; returns the plans file."""
    folder = nnunet_paths["nnUNet_preprocessed"] / planned_once.name
    folder.mkdir()
    for name in ("nnUNetPlans.json", "dataset.json", "dataset_fingerprint.json"):
        shutil.copy(planned_once / name, folder / name)
    return folder / "nnUNetPlans.json"


def test_plans_refuse_an_encoder_pretrained_on_another_modality(planned, tmp_path):
    mri = pretrain_checkpoint(tmp_path / "mri.pt", modality="MRI")
    result = runner.invoke(app, ["nnunet", "plans", str(planned), "--pretrained", str(mri)])
    assert result.exit_code == 3
    line = one_line_error(result)
    assert line.startswith(f"error: {mri}: the encoder was pre-trained on MRI, but channel 0 of ")
    assert "'CT'" in line and not (planned.parent / "nnUNetPlans_swinssl.json").exists()


def test_export_refuses_a_checkpoint_of_another_feature_size_than_the_plans(planned, tmp_path):
    write_swinssl_plans(planned, pretrain_checkpoint(tmp_path / "f12.pt", feature_size=12))
    wider = pretrain_checkpoint(tmp_path / "f24.pt", feature_size=24)
    out = tmp_path / "weights.pth"
    result = runner.invoke(app, ["nnunet", "export", str(wider), "--plans",
                                 str(planned.parent / "nnUNetPlans_swinssl.json"), "--out", str(out)])
    assert result.exit_code == 3
    assert one_line_error(result).startswith(f"error: {wider}: feature size 24, but the network of ")
    assert not out.exists()


def test_plans_refuse_a_checkpoint_without_a_plan_unless_normalisation_is_kept(planned, tmp_path):
    bare = pretrain_checkpoint(tmp_path / "monai.pt", plan=False)
    result = runner.invoke(app, ["nnunet", "plans", str(planned), "--pretrained", str(bare)])
    assert result.exit_code == 3
    assert "carries no swinssl plan, so the normalisation its encoder was pre-trained with is unknown" in \
        one_line_error(result)
    kept = runner.invoke(app, ["nnunet", "plans", str(planned), "--pretrained", str(bare), "--keep-normalization"])
    assert kept.exit_code == 0, kept.output
    config = json.loads((planned.parent / "nnUNetPlans_swinssl.json").read_text())["configurations"]["3d_fullres"]
    original = json.loads(planned.read_text())["configurations"]["3d_fullres"]
    assert config["normalization_schemes"] == original["normalization_schemes"] == ["CTNormalization"]
    # a foreign file's encoder sizes are read from its tensors
    assert config["swinssl"]["network"] == {"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [3, 6, 12, 24]}


def test_plans_normalise_each_channel_by_its_name_after_a_mixed_pretraining(planned, tmp_path):
    """A CT + MRI pre-training (modality None, e.g. SwinFUSE) fits any channel: the CT channel gets the
    pre-training's CT window, the T2 channel its MRI normalisation."""
    dataset_json = planned.parent / "dataset.json"
    dataset_json.write_text(json.dumps({**json.loads(dataset_json.read_text()), "channel_names": {"0": "CT", "1": "T2"}}))
    source = pretrain_checkpoint(tmp_path / "mixed.pt", modality=None)
    checkpoint = torch.load(source, weights_only=True)
    checkpoint["plan"]["preprocess"]["mri_normalization"] = "zscore"
    torch.save(checkpoint, source)
    written, _ = write_swinssl_plans(planned, source)
    plans = json.loads(written.read_text())
    assert plans["configurations"]["3d_fullres"]["normalization_schemes"] == ["SwinsslNormalization"] * 2
    assert [plans["foreground_intensity_properties_per_channel"][c]["swinssl"] for c in "01"] == [
        {"modality": "CT", "ct_window": WINDOW}, {"modality": "MRI", "mri_normalization": "zscore"}]


def test_plans_refuse_a_2d_configuration(planned, tmp_path):
    result = runner.invoke(app, ["nnunet", "plans", str(planned), "--pretrained", str(pretrain_checkpoint(tmp_path / "a.pt")),
                                 "-c", "2d"])
    assert result.exit_code == 2
    assert one_line_error(result) == (f"error: {planned}: configuration '2d' is not 3D; SwinUNETR needs a 3D one "
                                      "(3d_fullres or 3d_lowres)")


def test_export_adapts_a_one_channel_stem_to_the_datasets_channels(planned, tmp_path):
    dataset_json = planned.parent / "dataset.json"
    dataset = json.loads(dataset_json.read_text())
    dataset["channel_names"] = {"0": "CT", "1": "ct"}  # e.g. two contrast phases
    dataset_json.write_text(json.dumps(dataset))
    plans = json.loads(planned.read_text())
    plans["foreground_intensity_properties_per_channel"]["1"] = plans["foreground_intensity_properties_per_channel"]["0"]
    planned.write_text(json.dumps(plans))
    source = pretrain_checkpoint(tmp_path / "ct.pt")
    swinssl_plans, _ = write_swinssl_plans(planned, source)

    out, report = export_for_nnunet(source, swinssl_plans, tmp_path / "weights.pth")
    stem = "swinViT.patch_embed.proj.weight"
    assert stem in report.adapted
    weights = torch.load(out, weights_only=True)["network_weights"]
    one_channel = torch.load(source, weights_only=True)["model"][stem]
    assert weights[stem].shape[1] == 2 and torch.equal(weights[stem], one_channel.repeat(1, 2, 1, 1, 1) / 2)


def _trainer(plans_file: Path, dataset_json: dict):
    from swinssl.nnunet.trainer import nnUNetTrainer_SwinUNETR

    plans = {**json.loads(plans_file.read_text()), "continue_training": False}
    return nnUNetTrainer_SwinUNETR(plans, "3d_fullres", 0, dataset_json, torch.device("cpu"))


def test_trainer_says_which_normalisation_and_refuses_an_encoder_of_another_modality(planned, tmp_path):
    dataset = json.loads((planned.parent / "dataset.json").read_text())
    source = pretrain_checkpoint(tmp_path / "ct.pt")
    matched, _ = write_swinssl_plans(planned, source)
    kept, _ = write_swinssl_plans(planned, source, plans_name="nnUNetPlans_kept", keep_normalization=True)
    assert "channel 0 normalised as in pre-training: CT window [-500, 500]" in _trainer(matched, dataset).swinssl_status()[1]
    assert "warning: nnU-Net's normalisation (CTNormalization)" in _trainer(kept, dataset).swinssl_status()[1]
    trainer = _trainer(matched, {**dataset, "channel_names": {"0": "T2"}})
    with pytest.raises(CheckpointError, match=r"pre-trained on CT, but channel 0 of .* is 'T2'"):
        trainer.initialize()
    assert trainer.network is None


# --------------------------------------------------------------------------------------------------
# The smoke test: plan, preprocess, train from an exported pre-training, predict
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_nnunet_trains_from_a_swinssl_pretraining_and_predicts_in_the_input_geometry(
        nnunet_paths, nnunet_installed, tmp_path, monkeypatch, capsys):
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset
    from nnunetv2.run.run_training import run_training
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from swinssl.nnunet.trainer import nnUNetTrainer_SwinUNETR_smoke

    started = time.perf_counter()
    monkeypatch.setattr(nnunet_trainer_module, "default_num_processes", 1)  # validation export: one process
    plans_file = plan_dataset(nnunet_paths, tmp_path)
    source = pretrain_checkpoint(tmp_path / "pretrain.pt")
    swinssl_plans, said = write_swinssl_plans(plans_file, source)
    assert any("SwinsslNormalization, CT window [-500, 500] HU -> [0, 1]" in line for line in said)
    preprocess_dataset(DATASET_ID, "nnUNetPlans_swinssl", ["3d_fullres"], [1], show_progress_bar=False)
    weights, report = export_for_nnunet(source, swinssl_plans, tmp_path / "swinssl_weights.pth")
    assert report.encoder_loaded > 0 and not report.adapted and not report.mismatched

    # The encoder at the start of training: captured after nnU-Net loaded -pretrained_weights
    at_start = {}
    original_start = nnUNetTrainer_SwinUNETR_smoke.on_train_start

    def capture(trainer):
        original_start(trainer)
        at_start.update({k: v.detach().clone() for k, v in trainer.network.state_dict().items()})

    monkeypatch.setattr(nnUNetTrainer_SwinUNETR_smoke, "on_train_start", capture)
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")  # augmentation in this process (the planner needs it unset)
    run_training(str(DATASET_ID), "3d_fullres", "all", "nnUNetTrainer_SwinUNETR_smoke", "nnUNetPlans_swinssl",
                 pretrained_weights=str(weights), device=torch.device("cpu"))
    log = capsys.readouterr().out
    assert "channel 0 normalised as in pre-training: CT window [-500, 500]" in log
    loaded = re.search(r"swinssl: loaded (\d+) of (\d+) encoder tensors", log)
    assert loaded and int(loaded.group(1)) == int(loaded.group(2)) > 20, log[-2000:]
    # The smoke trainer: batch 1, small patches (recorded in the plans it saved), no mirroring, no final validation
    output = nnunet_paths["nnUNet_results"] / f"Dataset{DATASET_ID:03d}_Phantom" / \
        "nnUNetTrainer_SwinUNETR_smoke__nnUNetPlans_swinssl__3d_fullres"
    used = json.loads((output / "plans.json").read_text())["configurations"]["3d_fullres"]
    assert used["batch_size"] == 1 and max(used["patch_size"]) <= 64
    assert not (output / "fold_all" / "validation").exists() and "final validation skipped" in log
    assert json.loads((output / "fold_all" / "debug.json").read_text())["inference_allowed_mirroring_axes"] == "None"

    pretrained = torch.load(source, weights_only=True)["model"]
    encoder = [k for k in at_start if k.startswith("swinViT.") and not k.endswith("relative_position_index")]
    assert len(encoder) == report.encoder_loaded > 20
    assert all(torch.equal(at_start[k], pretrained[k]) for k in encoder)

    # nnU-Net normalised with the pre-training's window: a case's preprocessed voxels
    dataset_folder = nnunet_paths["nnUNet_preprocessed"] / f"Dataset{DATASET_ID:03d}_Phantom"
    preprocessed = dataset_folder / "nnUNetPlans_swinssl_3d_fullres"
    dataset = infer_dataset_class(str(preprocessed))(str(preprocessed), ["phantom_000"])
    data, _, _, properties = dataset.load_case("phantom_000")
    raw = nib.load(tmp_path / "phantoms" / "imagesTr" / "phantom_000_ct.nii.gz").get_fdata().astype(np.float32)
    plans = json.loads(swinssl_plans.read_text())
    # nnU-Net's array axes: SimpleITK's (z, y, x) order, then the plans' transpose, then the crop
    raw = raw.transpose(2, 1, 0).transpose(plans["transpose_forward"])
    crop = tuple(slice(a, b) for a, b in properties["bbox_used_for_cropping"])
    assert data.shape[1:] == raw[crop].shape  # same spacing: nothing resampled
    assert np.allclose(np.asarray(data[0]), np.clip((raw[crop] - WINDOW[0]) / (WINDOW[1] - WINDOW[0]), 0, 1),
                       atol=1e-6)

    # nnUNetv2_predict (another process: nnU-Net finds the trainer through the installed shim)
    images = nnunet_paths["nnUNet_raw"] / f"Dataset{DATASET_ID:03d}_Phantom" / "imagesTs"
    predictions = tmp_path / "predictions"
    command = [str(Path(sys.executable).with_name("nnUNetv2_predict")), "-i", str(images), "-o", str(predictions),
               "-d", str(DATASET_ID), "-p", "nnUNetPlans_swinssl", "-tr", "nnUNetTrainer_SwinUNETR_smoke",
               "-c", "3d_fullres", "-f", "all", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for image in sorted(images.glob("*_0000.nii.gz")):
        mask = nib.load(predictions / image.name.replace("_0000.nii.gz", ".nii.gz"))
        source_image = nib.load(image)
        assert mask.shape == source_image.shape
        assert np.allclose(mask.affine, source_image.affine, atol=1e-4)
        assert set(np.unique(np.asarray(mask.dataobj))) <= set(LABELS)
    with capsys.disabled():
        print(f"\nnnU-Net smoke test wall time: {time.perf_counter() - started:.1f} s")

