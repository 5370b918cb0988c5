"""The nnU-Net control arm (``swinssl.nnunet.arm``): nnU-Net's own plans, network and trainer on
swinssl's cases.

The raw-dataset writer, the split file and the refusals need no nnU-Net; the rest is skipped
without it (the ``swinssl[nnunet]`` extra). The end-to-end test reads what nnU-Net itself wrote
(its preprocessed cases, training log, final validation, debug.json, predictions), not what the
arm passed to it.
"""

from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from swinssl.data.discover import find_dataset
from swinssl.data.io import read_volume
from swinssl.data.phantom import LABELS, write_phantom_dataset
from swinssl.errors import ConfigError, DependencyError, SwinsslError
from swinssl.metrics import evaluate
from swinssl.nnunet import arm

needs_nnunet = pytest.mark.skipif(importlib.util.find_spec("nnunetv2") is None,
                                  reason="nnU-Net (nnunetv2) is not installed: pip install 'swinssl[nnunet]'")
RAW = arm.DATASET  # nnU-Net's dataset folder name, in each of its three folders
FOLD = f"{arm.TRAINER}__{arm.PLANS}__{arm.CONFIGURATION}/fold_{arm.FOLD}"
ROTATED = np.array([[0.0, -1.2, 0.0, 40.0], [1.2, 0.0, 0.0, -25.0], [0.0, 0.0, 2.5, 110.0], [0.0, 0.0, 0.0, 1.0]])


def write_nrrd(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    """``array`` as NRRD in LPS space, its voxel grid the RAS ``affine`` (as swinssl's reader reads it)."""
    import nrrd

    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    nrrd.write(str(path), array, {"space": "left-posterior-superior", "space directions": lps[:3, :3].T,
                                  "space origin": lps[:3, 3]})
    return path


def as_nrrd(case, folder: Path, affine: np.ndarray | None = None):
    """The case with its image and label as NRRD files (on ``affine``, default: the NIfTI's own grid)."""
    folder.mkdir(parents=True, exist_ok=True)
    image, label = nib.load(case.images[0]), nib.load(case.label)
    grid = image.affine if affine is None else affine
    nrrd_image = write_nrrd(folder / f"{case.case_id}_image.nrrd", image.get_fdata(dtype=np.float32), grid)
    return replace(case, images=(nrrd_image,),
                   label=write_nrrd(folder / f"{case.case_id}_label.nrrd", np.asarray(label.dataobj), grid))


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """7 CT phantoms of 32^3 (5 training cases, 2 test cases) as swinssl discovers them, by case id."""
    folder = tmp_path_factory.mktemp("arm_phantoms")
    write_phantom_dataset(folder, cases=7, size=32, seed=5)
    return {c.case_id: c for c in find_dataset(folder / "dataset.json").cases}


def case_ids(folder: Path, suffix: str) -> set[str]:
    return {p.name[: -len(suffix)] for p in folder.iterdir() if p.name.endswith(suffix)}


# --------------------------------------------------------------------------------------------------
# Without nnU-Net: the raw dataset, the split file, refusals
# --------------------------------------------------------------------------------------------------


def test_raw_dataset_holds_the_given_cases_in_nnunets_layout_with_nrrd_converted_keeping_geometry(cases, tmp_path):
    nrrd_case = as_nrrd(cases["phantom_002_ct"], tmp_path / "nrrd", affine=ROTATED)
    training = [cases["phantom_000_ct"], nrrd_case, cases["phantom_003_ct"]]
    test = [cases["phantom_005_ct"]]
    folder = arm.write_raw_dataset(tmp_path / "raw", training, test, LABELS, ["CT"])

    assert json.loads((folder / "dataset.json").read_text()) == {
        "name": "swinssl", "channel_names": {"0": "CT"}, "numTraining": 3, "file_ending": ".nii.gz",
        "labels": {"background": 0, "liver": 1, "kidney": 2, "spleen": 3, "lesion": 4}}
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == [
        "phantom_000_ct_0000.nii.gz", "phantom_002_ct_0000.nii.gz", "phantom_003_ct_0000.nii.gz"]
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == [
        "phantom_000_ct.nii.gz", "phantom_002_ct.nii.gz", "phantom_003_ct.nii.gz"]
    assert sorted(p.name for p in (folder / "imagesTs").iterdir()) == ["phantom_005_ct_0000.nii.gz"]
    # NIfTI copied byte for byte; NRRD read by swinssl's reader and written as NIfTI on the same grid
    copied = folder / "imagesTr" / "phantom_000_ct_0000.nii.gz"
    assert copied.read_bytes() == cases["phantom_000_ct"].images[0].read_bytes()
    for converted, source in ((folder / "imagesTr" / "phantom_002_ct_0000.nii.gz", nrrd_case.images[0]),
                              (folder / "labelsTr" / "phantom_002_ct.nii.gz", nrrd_case.label)):
        written, original = read_volume(converted), read_volume(source)
        np.testing.assert_allclose(np.asarray(written.affine), ROTATED, atol=1e-5)
        np.testing.assert_allclose(np.asarray(written.affine), np.asarray(original.affine), atol=1e-5)
        assert np.array_equal(np.asarray(written), np.asarray(original))
    label = nib.load(folder / "labelsTr" / "phantom_002_ct.nii.gz")
    assert label.get_data_dtype() == np.uint8  # class indices as integers
    assert set(np.unique(np.asarray(label.dataobj))) <= set(LABELS)

    splits = arm.write_splits(tmp_path / "pre", ["phantom_000_ct", "phantom_003_ct"], ["phantom_002_ct"])
    assert json.loads(splits.read_text()) == [{"train": ["phantom_000_ct", "phantom_003_ct"],
                                               "val": ["phantom_002_ct"]}]


def test_raw_dataset_names_the_classes_found_when_none_are_given(cases, tmp_path):
    folder = arm.write_raw_dataset(tmp_path / "raw", [cases["phantom_000_ct"]], [cases["phantom_005_ct"]], {}, ["CT"])
    found = np.unique(np.asarray(nib.load(cases["phantom_000_ct"].label).dataobj))
    assert json.loads((folder / "dataset.json").read_text())["labels"] == {
        "background": 0, **{f"class_{v}": int(v) for v in found if v}}


@pytest.mark.parametrize("change, message", [
    (lambda c: ([c["phantom_000_ct"]], [], [c["phantom_005_ct"]]),
     "validation: no cases (nnU-Net's fold 0 is validated"),
    (lambda c: ([c["phantom_000_ct"]], [c["phantom_000_ct"]], [c["phantom_005_ct"]]),
     "case phantom_000_ct: in train and in validation; each case belongs to one"),
    (lambda c: ([c["phantom_000_ct"]], [replace(c["phantom_001_ct"], label=None)], [c["phantom_005_ct"]]),
     "validation case phantom_001_ct has no label"),
])
def test_arm_refuses_a_split_nnunet_cannot_train_as_given_before_any_work(cases, tmp_path, change, message):
    train, validation, test = change(cases)
    with pytest.raises(SwinsslError) as raised:
        arm.run_nnunet_arm(train, validation, test, tmp_path / "arm", LABELS, ["CT"], progress=False)
    assert message in str(raised.value) and "\n" not in str(raised.value)
    assert not list((tmp_path / "arm").iterdir())


def test_arm_refuses_a_non_positive_schedule(cases, tmp_path):
    with pytest.raises(ConfigError, match=r"SWINSSL_NNUNET_ITERATIONS: 0 is not a positive integer"):
        arm.run_nnunet_arm([cases["phantom_000_ct"]], [cases["phantom_001_ct"]], [cases["phantom_005_ct"]], tmp_path,
                           LABELS, ["CT"], iterations=0, progress=False)


def test_arm_without_nnunet_is_a_dependency_error_naming_the_extra(cases, tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "nnunetv2" else find_spec(name, *a))
    with pytest.raises(DependencyError, match=r"nnU-Net \(nnunetv2\) is not installed: pip install 'swinssl\[nnunet"):
        arm.run_nnunet_arm([cases["phantom_000_ct"]], [cases["phantom_001_ct"]], [cases["phantom_005_ct"]],
                           tmp_path / "arm", LABELS, ["CT"], progress=False)
    assert not list((tmp_path / "arm").iterdir())


# --------------------------------------------------------------------------------------------------
# With nnU-Net
# --------------------------------------------------------------------------------------------------


@needs_nnunet
def test_short_trainer_reads_its_schedule_from_the_environment():
    from swinssl.nnunet.trainer import nnUNetTrainer_short, short_schedule

    assert short_schedule({}) == {"num_epochs": 10, "num_iterations_per_epoch": 25, "num_val_iterations_per_epoch": 5}
    assert short_schedule({"SWINSSL_NNUNET_EPOCHS": "3", "SWINSSL_NNUNET_VAL_ITERATIONS": " 2 "}) == {
        "num_epochs": 3, "num_iterations_per_epoch": 25, "num_val_iterations_per_epoch": 2}
    with pytest.raises(ConfigError, match=r"SWINSSL_NNUNET_ITERATIONS='ten': expected a positive integer"):
        short_schedule({"SWINSSL_NNUNET_ITERATIONS": "ten"})
    # nnU-Net's own trainer otherwise: nothing but __init__ is overridden
    assert [name for name in vars(nnUNetTrainer_short) if not name.startswith("__")] == []


@needs_nnunet
def test_a_failing_nnunet_command_is_one_line_naming_it_and_its_log(cases, tmp_path):
    """Class 4 (lesion) left out of the labels: nnU-Net's dataset check fails in planning."""
    labels = {k: v for k, v in LABELS.items() if k != 4}
    training = [c for c in cases.values() if c.split == "training"]
    lesion = [4 in np.unique(np.asarray(nib.load(c.label).dataobj)) for c in training]
    assert any(lesion), "no phantom has a lesion"
    train, validation = training[lesion.index(True)], training[lesion.index(True) - 1]
    out = tmp_path / "arm"
    with pytest.raises(arm.NnunetFailed) as raised:
        arm.run_nnunet_arm([train], [validation], [cases["phantom_005_ct"]], out, labels, ["CT"], progress=False)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("nnUNetv2_plan_and_preprocess failed (exit code 1) after ")
    assert f"{out / 'logs' / 'plan.log'}: " in message
    assert "Some segmentation images contained unexpected labels" in message, message
    assert "Unexpected labels found" in (out / "logs" / "plan.log").read_text()


@needs_nnunet
@pytest.mark.slow
def test_nnunet_arm_trains_on_exactly_the_given_split_predicts_the_test_cases_and_resumes(cases, tmp_path, monkeypatch,
                                                                                         capsys):
    started = time.perf_counter()
    nrrd = tmp_path / "nrrd"
    # phantom_001_ct is left out; one training and one test case come as NRRD (converted by the arm)
    train = [cases["phantom_000_ct"], as_nrrd(cases["phantom_002_ct"], nrrd), cases["phantom_003_ct"]]
    validation = [cases["phantom_004_ct"]]
    test = [cases["phantom_005_ct"], as_nrrd(cases["phantom_006_ct"], nrrd)]
    out = tmp_path / "arm"
    masks = arm.run_nnunet_arm(train, validation, test, out, LABELS, ["CT"], epochs=1, iterations=2,
                               val_iterations=1, progress=False)
    took = time.perf_counter() - started

    # nnU-Net preprocessed exactly the training and validation cases ...
    preprocessed = out / "nnUNet_preprocessed" / RAW / f"{arm.PLANS}_{arm.CONFIGURATION}"
    assert case_ids(preprocessed, ".pkl") == {"phantom_000_ct", "phantom_002_ct", "phantom_003_ct", "phantom_004_ct"}
    # ... trained fold 0 on 3 of them and validated on the fourth (its log and final validation)
    fold = out / "nnUNet_results" / RAW / FOLD
    log = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert "This split has 3 training and 1 validation cases." in log
    assert case_ids(fold / "validation", ".nii.gz") == {"phantom_004_ct"}
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert [Path(c["reference_file"]).name for c in summary["metric_per_case"]] == ["phantom_004_ct.nii.gz"]
    # ... with nnU-Net's own network, deep supervision and loss, on the short schedule
    debug = json.loads((fold / "debug.json").read_text())
    assert (debug["num_epochs"], debug["num_iterations_per_epoch"], debug["num_val_iterations_per_epoch"]) == (
        "1", "2", "1")
    assert debug["network"] == "PlainConvUNet" and debug["enable_deep_supervision"] == "True"
    assert debug["loss"].startswith("DeepSupervisionWrapper(") and debug["device"] == "cpu"
    plans = json.loads((out / "nnUNet_results" / RAW / FOLD.split("/")[0] / "plans.json").read_text())
    assert plans["plans_name"] == "nnUNetPlans"

    # One mask per test case, named by case id, on the test image's grid (as swinssl reads both)
    assert masks == out / "predictions"
    assert sorted(p.name for p in masks.iterdir()) == ["phantom_005_ct.nii.gz", "phantom_006_ct.nii.gz"]
    for case in test:
        mask, image = read_volume(masks / f"{case.case_id}.nii.gz"), read_volume(case.images[0])
        assert mask.shape == image.shape
        np.testing.assert_allclose(np.asarray(mask.affine), np.asarray(image.affine), atol=1e-4)
        assert set(np.unique(np.asarray(mask)).tolist()) <= set(LABELS)
    # swinssl's evaluator pairs them with the test labels by case id
    scored = evaluate(masks, cases["phantom_005_ct"].label.parents[1] / "dataset.json", split="test")
    assert scored["n_cases"] == 2 and not scored["missing_predictions"]
    record = json.loads((out / "arm.json").read_text())
    assert record["nnunet_version"].startswith("2.8.") and record["trainer"] == "nnUNetTrainer_short"
    assert (record["epochs"], record["iterations"]) == (1, 2) and record["train_s"] > 0 and record["predict_s"] > 0
    assert record["cases"] == {"train": ["phantom_000_ct", "phantom_002_ct", "phantom_003_ct"],
                               "validation": ["phantom_004_ct"], "test": ["phantom_005_ct", "phantom_006_ct"]}

    # Resume: a finished arm runs no nnU-Net command; a missing mask reruns only the prediction
    steps: list[str] = []
    real_run = arm._run
    monkeypatch.setattr(arm, "_run", lambda step, *args: steps.append(step) or real_run(step, *args))

    def again() -> Path:
        return arm.run_nnunet_arm(train, validation, test, out, LABELS, ["CT"], epochs=1, iterations=2,
                                  val_iterations=1, progress=False)

    assert again() == masks and steps == []
    (masks / "phantom_006_ct.nii.gz").unlink()
    assert again() == masks and steps == ["predict"] and (masks / "phantom_006_ct.nii.gz").is_file()

    # A training stopped midway continues (--c); one stopped in its final validation reruns only that (--val)
    commands: list[list[str]] = []
    monkeypatch.setattr(arm, "_run", lambda step, command, *args: commands.append(command) or 0.0)
    (fold / "validation" / "summary.json").unlink()
    again()
    (fold / "checkpoint_final.pth").rename(fold / "checkpoint_latest.pth")
    again()
    assert [c[-1] for c in commands] == ["--val", "--c"] and all("nnUNetv2_train" in c[0] for c in commands)

    # Another split in the same folder is refused, not silently skipped
    with pytest.raises(ConfigError, match="holds an nnU-Net arm of other cases"):
        arm.run_nnunet_arm(train[:2], validation, test, out, LABELS, ["CT"], epochs=1, iterations=2,
                           val_iterations=1, progress=False)
    with capsys.disabled():
        print(f"\nnnU-Net arm, tiny schedule, end to end: {took:.1f} s "
              f"(plan {record.get('plan_s', 0):.1f} s, train {record['train_s']:.1f} s, "
              f"predict {record['predict_s']:.1f} s)")
