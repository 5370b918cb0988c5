"""Bad input: every kind of broken file or dataset gives one line that names the file and the problem."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import write_volume
from typer.testing import CliRunner

from swinssl.cli import app
from swinssl.config import PreprocessConfig
from swinssl.data.check import check_dataset
from swinssl.data.discover import find_dataset
from swinssl.data.io import read_image, read_label, read_volume
from swinssl.data.transforms import pretrain_transforms
from swinssl.errors import DataError

pytestmark = pytest.mark.filterwarnings("ignore:builtin type:DeprecationWarning")  # SWIG noise from itk

_rng = np.random.default_rng(0)



def data_error(call, path: Path, *fragments: str) -> str:
    """Run ``call``; assert it raises one-line DataError starting with ``path`` and holding every fragment."""
    with pytest.raises(DataError) as excinfo:
        call()
    message = str(excinfo.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message, message
    problem = message[len(f"{path}: "):]  # fragments are looked for after the path, never in it
    for fragment in fragments:
        assert fragment in problem, message
    return problem


def one_problem(dataset, path: Path, *fragments: str) -> str:
    """check_dataset reports exactly one problem; it starts with ``path`` and holds every fragment."""
    _, problems = check_dataset(dataset)
    assert len(problems) == 1, problems
    message = problems[0]
    assert message.startswith(f"{path}: "), message
    problem = message[len(f"{path}: "):]
    for fragment in fragments:
        assert fragment in problem, message
    return problem


# --- files that cannot be read ------------------------------------------------------------------


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "absent.nii.gz"
    data_error(lambda: read_image(path), path, "file not found")


def test_zero_byte_file_is_reported_empty(tmp_path):
    path = tmp_path / "zero.nii.gz"
    path.write_bytes(b"")
    data_error(lambda: read_image(path), path, "empty file (0 bytes)")


def test_cut_short_gzip_nifti_cannot_be_read(tmp_path):
    good = write_volume(tmp_path / "good.nii.gz").read_bytes()
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(good[: len(good) // 2])

    problem = data_error(lambda: read_image(path), path, "cannot read")
    assert re.search(r"EOF|ended before|truncated", problem), problem


def test_cut_short_plain_nifti_says_how_many_bytes_are_missing(tmp_path):
    good = write_volume(tmp_path / "good.nii").read_bytes()
    path = tmp_path / "cut.nii"
    path.write_bytes(good[: len(good) // 2])

    problem = data_error(lambda: read_image(path), path, "cannot read")
    assert "bytes" in problem, problem


def test_text_file_with_volume_extension_cannot_be_read(tmp_path):
    path = tmp_path / "x.nii.gz"
    path.write_text("this is a text file, not a volume\n")
    data_error(lambda: read_image(path), path, "cannot read", "not a gzip file")


def test_unsupported_extension_is_refused(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("1 2 3\n")
    data_error(lambda: read_volume(path), path, "unsupported file type", ".nii.gz")


# --- arrays that are not a finite 3D volume -----------------------------------------------------


def test_2d_array_is_not_a_volume(tmp_path):
    path = write_volume(tmp_path / "slice.nii.gz", shape=(16, 16))
    data_error(lambda: read_image(path), path, "expected a 3D volume", "got a 2D array of shape (16, 16)")


def test_4d_array_where_3d_expected(tmp_path):
    path = write_volume(tmp_path / "timeseries.nii.gz", shape=(8, 8, 8, 3))
    data_error(lambda: read_image(path), path, "expected a 3D volume", "got a 4D array of shape (8, 8, 8, 3)")


def test_nan_voxels_are_counted(tmp_path):
    arr = _rng.random((16, 16, 16), dtype=np.float32)
    arr[1, 2, 3] = arr[4, 5, 6] = np.nan
    path = write_volume(tmp_path / "nan.nii.gz", arr)
    data_error(lambda: read_image(path), path, "2 non-finite voxels (2 NaN, 0 Inf)")


def test_inf_voxels_are_counted(tmp_path):
    arr = _rng.random((16, 16, 16), dtype=np.float32)
    arr[1, 2, 3], arr[4, 5, 6] = np.inf, -np.inf
    path = write_volume(tmp_path / "inf.nii.gz", arr)
    data_error(lambda: read_image(path), path, "2 non-finite voxels (0 NaN, 2 Inf)")


def test_huge_finite_values_are_not_called_non_finite(tmp_path):
    path = write_volume(tmp_path / "huge.nii.gz", np.full((8, 8, 8), 3e38, np.float32))  # their sum overflows
    assert float(read_image(path).max()) == pytest.approx(3e38, rel=1e-6)


# --- labels that do not fit their image ---------------------------------------------------------


def _image(tmp_path: Path):
    path = write_volume(tmp_path / "img.nii.gz")
    return path, read_image(path)


def test_label_with_another_shape_names_both_files(tmp_path):
    image_path, image = _image(tmp_path)
    label = write_volume(tmp_path / "lab.nii.gz", np.zeros((16, 16, 8), np.uint8))
    data_error(
        lambda: read_label(label, image, image_path),
        label,
        "label shape (16, 16, 8) differs from image img.nii.gz shape (16, 16, 16)",
    )


def test_label_with_another_affine_names_both_files(tmp_path):
    image_path, image = _image(tmp_path)
    shifted = np.eye(4)
    shifted[0, 3] = 5.0
    label = write_volume(tmp_path / "lab.nii.gz", np.zeros((16, 16, 16), np.uint8), affine=shifted)
    data_error(lambda: read_label(label, image, image_path), label, "label affine differs from image img.nii.gz", "5 mm")


def test_label_values_outside_declared_classes_via_read_label(tmp_path):
    image_path, image = _image(tmp_path)
    arr = np.zeros((16, 16, 16), np.uint8)
    arr[0, 0, 0], arr[1, 1, 1] = 1, 3
    label = write_volume(tmp_path / "lab.nii.gz", arr)
    data_error(
        lambda: read_label(label, image, image_path, classes=[0, 1]),
        label,
        "label values [3] are not among the declared classes [0, 1]",
    )


def test_label_values_outside_msd_labels_via_check_dataset(tmp_path):
    write_volume(tmp_path / "imagesTr" / "a.nii.gz")
    arr = np.zeros((16, 16, 16), np.uint8)
    arr[0, 0, 0], arr[1, 1, 1] = 1, 4
    label = write_volume(tmp_path / "labelsTr" / "a.nii.gz", arr)
    (tmp_path / "dataset.json").write_text(
        json.dumps(
            {
                "modality": {"0": "CT"},
                "labels": {"0": "background", "1": "liver"},
                "training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}],
            }
        )
    )
    one_problem(find_dataset(tmp_path), label, "label values [4] are not among the declared classes [0, 1]")


def test_non_integer_label_values(tmp_path):
    image_path, image = _image(tmp_path)
    arr = np.zeros((16, 16, 16), np.float32)
    arr[2, 2, 2] = 0.5
    label = write_volume(tmp_path / "lab.nii.gz", arr)
    data_error(lambda: read_label(label, image, image_path), label, "label has non-integer values (e.g. 0.5)")


# --- datasets that cannot be discovered ---------------------------------------------------------


def test_folder_without_volumes_is_named(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "README.txt").write_text("no volumes here")
    (folder / ".hidden.nii.gz").write_bytes(b"")
    data_error(lambda: find_dataset(folder), folder, "no volumes found")


def _msd(root: Path, training: list, **extra) -> Path:
    path = root / "dataset.json"
    path.write_text(json.dumps({"modality": {"0": "CT"}, "labels": {"0": "background"}, "training": training, **extra}))
    return path


def test_dataset_json_entry_pointing_to_a_missing_file(tmp_path):
    write_volume(tmp_path / "imagesTr" / "a.nii.gz")
    write_volume(tmp_path / "labelsTr" / "a.nii.gz")
    path = _msd(
        tmp_path,
        [
            {"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"},
            {"image": "./imagesTr/b.nii.gz", "label": "./labelsTr/a.nii.gz"},
        ],
    )
    data_error(lambda: find_dataset(tmp_path), path, "training[1].image './imagesTr/b.nii.gz' does not exist")


def test_dataset_json_entry_outside_the_dataset_folder(tmp_path):
    root = tmp_path / "ds"
    write_volume(tmp_path / "x.nii.gz")  # exists, but outside the dataset
    write_volume(root / "labelsTr" / "x.nii.gz")
    path = _msd(root, [{"image": "../x.nii.gz", "label": "./labelsTr/x.nii.gz"}])
    data_error(lambda: find_dataset(root), path, "training[0].image '../x.nii.gz' points outside the dataset folder")


def test_malformed_dataset_json(tmp_path):
    path = tmp_path / "dataset.json"
    path.write_text('{\n  "modality": {"0": "CT"},\n  "training": [\n')
    data_error(lambda: find_dataset(tmp_path), path, "malformed JSON (line")


def test_dataset_json_that_is_neither_msd_nor_nnunet(tmp_path):
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"name": "something", "files": ["a.nii.gz"]}))
    data_error(lambda: find_dataset(path), path, "not an MSD dataset.json", "nor an nnU-Net one")


def _nnunet(root: Path, n_cases=2, num_training=2) -> Path:
    for i in range(n_cases):
        for c in range(2):
            write_volume(root / "imagesTr" / f"case_{i:03d}_{c:04d}.nii.gz")
        write_volume(root / "labelsTr" / f"case_{i:03d}.nii.gz", np.zeros((16, 16, 16), np.uint8))
    path = root / "dataset.json"
    path.write_text(
        json.dumps(
            {
                "channel_names": {"0": "T1", "1": "T2"},
                "labels": {"background": 0, "tumour": 1},
                "numTraining": num_training,
                "file_ending": ".nii.gz",
            }
        )
    )
    return path


def test_nnunet_missing_channel_file_is_named(tmp_path):
    path = _nnunet(tmp_path)
    missing = tmp_path / "imagesTr" / "case_001_0001.nii.gz"
    missing.unlink()
    data_error(lambda: find_dataset(tmp_path), missing, "missing channel file", f"2 channels declared in {path}")


def test_nnunet_num_training_mismatch(tmp_path):
    path = _nnunet(tmp_path, n_cases=2, num_training=3)
    data_error(lambda: find_dataset(tmp_path), path, "numTraining is 3 but 2 training cases were found")


def test_nnunet_missing_training_label_is_named(tmp_path):
    _nnunet(tmp_path)
    label = tmp_path / "labelsTr" / "case_000.nii.gz"
    label.unlink()
    data_error(lambda: find_dataset(tmp_path), label, "missing label for training case case_000")


def test_constant_volume_is_reported_by_check_dataset(tmp_path):
    write_volume(tmp_path / "good.nii.gz")
    flat = write_volume(tmp_path / "flat.nii.gz", np.full((16, 16, 16), 7.0, np.float32))
    one_problem(find_dataset(tmp_path), flat, "constant volume (every voxel is 7)")


# --- `swinssl data check` on bad data -----------------------------------------------------------


def test_data_check_cli_reports_one_line_per_bad_volume(tmp_path):
    write_volume(tmp_path / "good.nii.gz", shape=(16, 18, 20))
    arr = _rng.random((16, 16, 16), dtype=np.float32)
    arr[0, 0, 0] = np.nan
    bad = write_volume(tmp_path / "broken.nii.gz", arr)

    result = CliRunner().invoke(app, ["data", "check", str(tmp_path)])

    assert result.exit_code == 1, result.output
    assert "good.nii.gz" in result.stdout and "16x18x20" in result.stdout
    assert "broken.nii.gz" not in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {bad}: 1 non-finite voxel (1 NaN, 0 Inf)"]
    assert "1 of 2 volumes have problems" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("kind", ["nonexistent", "empty"])
def test_data_check_cli_without_volumes_exits_3_with_one_line(tmp_path, kind):
    path = tmp_path / kind
    if kind == "empty":
        path.mkdir()
    problem = "no such file or folder" if kind == "nonexistent" else "no volumes found"

    result = CliRunner().invoke(app, ["data", "check", str(path)])

    assert result.exit_code == 3, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {path}: ") and problem in lines[0]
    assert result.stdout == ""
    assert "Traceback" not in result.output


# --- a bad volume inside a MONAI pipeline -------------------------------------------------------


def _nan_item(tmp_path: Path) -> tuple[Path, dict]:
    arr = _rng.random((16, 16, 16), dtype=np.float32)
    arr[3, 3, 3] = np.nan
    path = write_volume(tmp_path / "nan_in_pipeline.nii.gz", arr)
    return path, {"image": str(path), "label": None, "modality": "MRI", "case_id": "nan_in_pipeline"}


def test_bad_volume_in_pretraining_pipeline_carries_the_data_error(tmp_path):
    path, item = _nan_item(tmp_path)

    with pytest.raises(Exception) as excinfo:
        pretrain_transforms(PreprocessConfig(roi_size=(16, 16, 16)))(item)

    chain, err = [], excinfo.value
    while err is not None:
        chain.append(err)
        err = err.__cause__ or err.__context__
    data_errors = [e for e in chain if isinstance(e, DataError)]
    assert data_errors, [type(e).__name__ for e in chain]
    assert str(data_errors[0]).startswith(f"{path}: ")
    assert "non-finite" in str(data_errors[0])


def test_bad_volume_in_pretraining_pipeline_error_message_names_the_file(tmp_path):
    path, item = _nan_item(tmp_path)

    with pytest.raises(Exception) as excinfo:
        pretrain_transforms(PreprocessConfig(roi_size=(16, 16, 16)))(item)

    assert str(path) in str(excinfo.value)
    assert "non-finite" in str(excinfo.value)


# --- the same problems met by the training commands ---------------------------------------------

TINY_TRAINING = ["model.feature_size=12", "model.depths=[1,1,1,1]", "train.num_workers=0", "train.val_fraction=0",
                 "train.steps=2", "train.batch_size=1", "preprocess.num_crops=1", "preprocess.spacing=null"]


def _bad_case(folder: Path, kind: str) -> Path:
    """One CT case (image + label) with the named defect; returns the file that must be named."""
    from conftest import body_volume, write_nifti

    image, label = body_volume(modality="CT")
    if kind == "nan voxels":
        image[5, 5, 5] = np.nan
    if kind == "4D image":
        image = np.stack([image, image], axis=-1)
    image_path = write_nifti(folder / "ct_case1.nii.gz", image)
    if kind == "label of another shape":
        label = label[:-2]
    if kind == "label value 7":
        label[0, 0, 0] = 7
    label_path = write_nifti(folder / "ct_case1_label.nii.gz", label)
    if kind == "truncated gzip":
        image_path.write_bytes(image_path.read_bytes()[:200])
    return label_path if kind.startswith("label") else image_path


BAD_CASES = [
    ("pretrain", "truncated gzip", "cannot read"),
    ("pretrain", "nan voxels", "non-finite voxel"),
    ("pretrain", "4D image", "4D"),
    ("finetune", "nan voxels", "non-finite voxel"),
    ("finetune", "label of another shape", "shape"),
    ("finetune", "label value 7", "7"),
]


@contextlib.contextmanager
def start_method(method: str | None):
    """Data workers started by ``method`` (fork, spawn) for the block: DataLoader takes the default."""
    if method is None:
        yield
        return
    before = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method(method, force=True)
    try:
        yield
    finally:
        multiprocessing.set_start_method(before, force=True)


def _stop_on_bad_case(tmp_path, command, kind, fragment, workers: int, method: str | None, debug: bool = False):
    bad = _bad_case(tmp_path / "data", kind)
    config = {"pretrain": "pretrain/swin_unetr_tiny", "finetune": "finetune/tiny"}[command]
    extra = ["preprocess.roi_size=64"] if command == "pretrain" else ["preprocess.roi_size=32", "train.val_every=100"]
    if kind == "label value 7":  # declared classes 0..2 (a folder's classes are otherwise read from its labels)
        extra.append("data.num_classes=3")
    with start_method(method):
        result = CliRunner().invoke(app, [*(["--debug"] if debug else []), command, "--no-estimate", "--config", config,
                                          f"data={tmp_path / 'data'}", f"train.out={tmp_path / 'runs'}", "train.name=bad",
                                          *TINY_TRAINING, *extra, f"train.num_workers={workers}"])
    assert result.exit_code == 3, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {bad}: "), result.output
    assert fragment in errors[0][len(f"error: {bad}: "):], errors[0]
    assert not (tmp_path / "runs" / "bad" / "checkpoints" / "last.pt").exists()  # no step was taken on it
    return result.output


@pytest.mark.parametrize("command, kind, fragment", BAD_CASES)
@pytest.mark.parametrize("workers, method", [(0, None), (1, "fork")], ids=["no workers", "forked workers"])
def test_training_commands_stop_on_a_bad_case_with_one_line_naming_it(tmp_path, command, kind, fragment, workers,
                                                                      method):
    output = _stop_on_bad_case(tmp_path, command, kind, fragment, workers, method)
    assert "Traceback" not in output and "DataLoader worker" not in output


@pytest.mark.parametrize("command, kind, fragment", [
    # One kind in the default suite (a spawned worker costs seconds of imports); every kind with -m slow.
    pytest.param(*case, marks=[] if case[:2] == ("finetune", "nan voxels") else pytest.mark.slow) for case in BAD_CASES
])
def test_spawned_data_workers_give_the_same_one_line(tmp_path, command, kind, fragment):
    output = _stop_on_bad_case(tmp_path, command, kind, fragment, 1, "spawn")
    assert "Traceback" not in output and "DataLoader worker" not in output


def test_debug_shows_the_data_workers_traceback_before_the_line(tmp_path):
    output = _stop_on_bad_case(tmp_path, "finetune", "nan voxels", "non-finite voxel", 1, "fork", debug=True)
    assert "Caught DataError in DataLoader worker process" in output and "_check_finite" in output
    assert output.rstrip().splitlines()[-1].startswith("error: ")


# --- readable, but not what it claims to be ------------------------------------------------------


def test_data_check_warns_about_label_like_images_and_a_ct_without_hounsfield_air(tmp_path):
    from conftest import body_volume, write_nifti

    image, _ = body_volume(modality="CT")
    write_nifti(tmp_path / "ct" / "body.nii.gz", image)
    write_nifti(tmp_path / "ct" / "bone_mask.nii.gz", (image > 0).astype(np.uint8))  # 0..1, in a CT folder
    atlas = np.random.default_rng(0).integers(0, 117, image.shape).astype(np.int16)
    write_nifti(tmp_path / "mri" / "atlas.nii.gz", atlas)
    mri = np.random.default_rng(1).integers(0, 4000, image.shape).astype(np.int16)  # integers, but thousands
    write_nifti(tmp_path / "mri" / "t1.nii.gz", mri)

    result = CliRunner().invoke(app, ["data", "check", str(tmp_path)])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning: ")]
    mask, atlas_path = tmp_path / "ct" / "bone_mask.nii.gz", tmp_path / "mri" / "atlas.nii.gz"
    assert f"warning: {mask}: looks like a label map, not an image (2 integer values, 0..1)" in "\n".join(warnings)
    assert f"warning: {mask}: declared CT but nothing below -500" in "\n".join(warnings)
    assert f"warning: {atlas_path}: looks like a label map, not an image (117 integer values, 0..116)" in "\n".join(warnings)
    assert len(warnings) == 3, warnings  # the body CT (air at -1000) and the integer MRI are fine
    assert "all 4 volumes readable and consistent; 2 with warnings above" in result.output
