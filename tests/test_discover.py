"""Finding volumes: folder, MSD dataset.json and nnU-Net raw layouts; NRRD/MHA/DICOM reading;
the real sample volumes; ``swinssl data check`` on good data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write_volume
from typer.testing import CliRunner

from swinssl.cli import app
from swinssl.data.check import check_case, check_dataset
from swinssl.data.discover import find_dataset
from swinssl.data.io import read_image, spacing_of
from swinssl.data.transforms import LoadCased, case_item

pytestmark = pytest.mark.filterwarnings("ignore:builtin type:DeprecationWarning")  # SWIG noise from itk

_rng = np.random.default_rng(0)

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"



def write_label(path: Path, shape=(16, 16, 16), classes=(0, 1)) -> Path:
    arr = np.zeros(shape, dtype=np.uint8)
    for i, c in enumerate(classes):
        arr[i] = c
    return write_volume(path, arr)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    # Modality hints look at the last three folders of a file; nesting the dataset keeps
    # pytest's own folder names (derived from test names) out of them.
    path = tmp_path / "n1" / "n2" / "dataset"
    path.mkdir(parents=True)
    return path


def pairs_of(dataset) -> dict[str, str | None]:
    """{image path relative to root: label path relative to root (or None)}."""
    rel = lambda p: p.relative_to(dataset.root).as_posix()  # noqa: E731
    return {rel(c.images[0]): (rel(c.label) if c.label else None) for c in dataset.cases}


# --- folder layout ------------------------------------------------------------------------------


def test_folder_pairs_images_with_labels_by_name(root):
    write_volume(root / "case1_image.nii.gz")
    write_label(root / "case1_label.nii.gz")
    write_volume(root / "ct_x.nii.gz")
    write_label(root / "ct_x_seg.nii.gz")
    write_volume(root / "imagesTr" / "a.nii.gz")
    write_label(root / "labelsTr" / "a.nii.gz")
    write_volume(root / "imagesTr" / "b.nii.gz")
    write_label(root / "labelsTr" / "b.nii.gz")

    ds = find_dataset(root)

    assert ds.layout == "folder"
    assert ds.root == root
    assert pairs_of(ds) == {
        "case1_image.nii.gz": "case1_label.nii.gz",
        "ct_x.nii.gz": "ct_x_seg.nii.gz",
        "imagesTr/a.nii.gz": "labelsTr/a.nii.gz",
        "imagesTr/b.nii.gz": "labelsTr/b.nii.gz",
    }
    ids = {c.case_id for c in ds.cases}
    assert ids == {"case1", "ct_x", "a", "b"}
    assert all(len(c.images) == 1 and c.split == "training" for c in ds.cases)


@pytest.mark.parametrize("short, long, label", [("itk", "itk_t1", "itk_t1_tissue_seg"), ("scan", "scan-b", "scan-b_seg")])
def test_folder_prefers_the_longest_matching_image_name(root, short, long, label):
    # itk_t1_tissue_seg belongs to itk_t1, not to itk (the second set sorts the longer name first)
    write_volume(root / f"{short}.nii.gz")
    write_volume(root / f"{long}.nii.gz")
    write_label(root / f"{label}.nii.gz")

    assert pairs_of(find_dataset(root)) == {f"{short}.nii.gz": None, f"{long}.nii.gz": f"{label}.nii.gz"}


def test_folder_search_is_recursive_and_ignores_hidden_files(root):
    write_volume(root / "top.nii.gz")
    write_volume(root / "sub" / "deeper" / "b_image.nii.gz")
    write_label(root / "sub" / "deeper" / "b_label.nii.gz")
    write_volume(root / "sub" / "other.nii")
    write_volume(root / ".hidden_file.nii.gz")
    write_volume(root / ".cache" / "c.nii.gz")
    write_volume(root / "sub" / ".git" / "d.nii.gz")
    (root / "notes.txt").write_text("not a volume")
    (root / "sub" / "table.csv").write_text("a,b\n")

    assert pairs_of(find_dataset(root)) == {
        "top.nii.gz": None,
        "sub/deeper/b_image.nii.gz": "sub/deeper/b_label.nii.gz",
        "sub/other.nii": None,
    }


def test_image_without_label_has_label_none(root):
    write_volume(root / "lonely.nii.gz")
    write_volume(root / "paired_image.nii.gz")
    write_label(root / "paired_label.nii.gz")

    ds = find_dataset(root)

    by_id = {c.case_id: c for c in ds.cases}
    assert by_id["lonely"].label is None
    assert by_id["paired"].label == root / "paired_label.nii.gz"
    assert [c.case_id for c in ds.labelled] == ["paired"]


def test_single_volume_file_is_a_one_case_dataset(root):
    path = write_volume(root / "only.nii.gz")

    ds = find_dataset(path)

    assert ds.layout == "folder"
    assert [c.images for c in ds.cases] == [(path,)]


def _write_hinted_folder(root: Path) -> None:
    write_volume(root / "ct" / "a.nii.gz")
    write_volume(root / "mri" / "b.nii.gz")
    write_volume(root / "c_ct.nii.gz")
    write_volume(root / "d_t1.nii.gz")
    write_volume(root / "e.nii.gz")


def test_modality_hint_from_folder_names_and_file_tokens(root):
    _write_hinted_folder(root)

    tags = {c.images[0].relative_to(root).as_posix(): c.modality for c in find_dataset(root).cases}

    assert tags == {"ct/a.nii.gz": "CT", "mri/b.nii.gz": "MRI", "c_ct.nii.gz": "CT", "d_t1.nii.gz": "MRI", "e.nii.gz": None}


@pytest.mark.parametrize("given", ["CT", "MRI"])
def test_modality_argument_tags_unhinted_cases_and_keeps_hinted_ones(root, given):
    _write_hinted_folder(root)

    tags = {c.images[0].relative_to(root).as_posix(): c.modality for c in find_dataset(root, modality=given).cases}

    assert tags == {"ct/a.nii.gz": "CT", "mri/b.nii.gz": "MRI", "c_ct.nii.gz": "CT", "d_t1.nii.gz": "MRI", "e.nii.gz": given}


def test_modality_hint_ignores_folders_above_the_dataset_root(tmp_path):
    root = tmp_path / "pd" / "scans" / "abdomen"  # 'pd' (proton density) is an MRI word, but it is not part of the dataset
    write_volume(root / "case1.nii.gz")

    assert [c.modality for c in find_dataset(root).cases] == [None]


# --- NRRD, MHA, DICOM ---------------------------------------------------------------------------


def test_nrrd_volume_is_found_and_read_with_its_spacing(root):
    import nrrd

    arr = _rng.random((16, 18, 20), dtype=np.float32)
    path = root / "scan.nrrd"
    nrrd.write(
        str(path),
        arr,
        header={
            "space": "left-posterior-superior",
            "space directions": np.diag([0.5, 0.75, 2.0]),
            "space origin": np.array([1.0, 2.0, 3.0]),
        },
    )

    assert [c.images for c in find_dataset(root).cases] == [(path,)]
    image = read_image(path)
    assert tuple(image.shape) == (1, 16, 18, 20)
    assert spacing_of(image) == pytest.approx((0.5, 0.75, 2.0))
    np.testing.assert_allclose(image[0].numpy(), arr)


def test_nrrd_without_space_directions_is_read(root):
    import nrrd

    arr = _rng.random((16, 18, 20), dtype=np.float32)
    path = root / "plain.nrrd"
    nrrd.write(str(path), arr, header={"spacings": [0.5, 0.75, 2.0]})

    image = read_image(path)
    assert tuple(image.shape) == (1, 16, 18, 20)
    assert spacing_of(image) == pytest.approx((0.5, 0.75, 2.0))


def test_mha_volume_is_found_and_read_with_its_spacing(root):
    import itk

    arr = _rng.random((16, 18, 20), dtype=np.float32)  # (X, Y, Z)
    itk_image = itk.image_from_array(np.ascontiguousarray(arr.transpose(2, 1, 0)))  # ITK takes (Z, Y, X)
    itk_image.SetSpacing([0.5, 0.75, 2.0])
    path = root / "scan.mha"
    itk.imwrite(itk_image, str(path))

    assert [c.images for c in find_dataset(root).cases] == [(path,)]
    image = read_image(path)
    assert tuple(image.shape) == (1, 16, 18, 20)
    assert spacing_of(image) == pytest.approx((0.5, 0.75, 2.0))
    np.testing.assert_allclose(image[0].numpy(), arr)


def write_dicom_series(folder: Path, slices: np.ndarray, pixel_spacing=(0.5, 0.75), thickness=2.0) -> None:
    """Write ``slices`` (Z, rows, columns) int16 as a CT series, one file per slice, rescale intercept -1024."""
    from pydicom.dataset import Dataset as DicomDataset
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for k, plane in enumerate(slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = DicomDataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientID, ds.PatientName = "CT", "anon", "anon"
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [0.0, 0.0, k * thickness]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = list(pixel_spacing)
        ds.SliceThickness = thickness
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = plane.astype(np.int16).tobytes()
        ds.save_as(folder / f"slice{k:03d}.dcm", enforce_file_format=True)


def test_dicom_series_folder_is_one_volume_read_as_3d(root):
    slices = _rng.integers(0, 2000, size=(4, 16, 20)).astype(np.int16)  # 4 slices of 16 rows x 20 columns
    write_dicom_series(root / "patient1" / "series1", slices)
    write_volume(root / "other.nii.gz")

    ds = find_dataset(root)

    assert [c.images for c in ds.cases] == [(root / "other.nii.gz",), (root / "patient1" / "series1",)]
    image = read_image(ds.cases[1].images)
    assert tuple(image.shape) == (1, 20, 16, 4)  # (columns, rows, slices)
    # PixelSpacing is (between rows, between columns): X (columns) is 0.75 mm, Y (rows) 0.5 mm
    assert spacing_of(image) == pytest.approx((0.75, 0.5, 2.0))
    # the rescale intercept is applied: HU = stored - 1024
    assert image.min().item() == slices.min() - 1024
    assert image.max().item() == slices.max() - 1024


def test_hidden_dicom_files_do_not_make_a_series(root):
    write_volume(root / "a.nii.gz")
    junk = root / "copied_from_mac"
    junk.mkdir()
    (junk / "._slice000.dcm").write_bytes(b"\x00\x05\x16\x07" + bytes(200))

    assert [c.images for c in find_dataset(root).cases] == [(root / "a.nii.gz",)]


# --- MSD dataset.json ---------------------------------------------------------------------------


def write_msd(root: Path, modality: dict, training_extra: dict | None = None, name="dataset.json") -> Path:
    for i in range(2):
        write_volume(root / "imagesTr" / f"case_{i}.nii.gz")
        write_label(root / "labelsTr" / f"case_{i}.nii.gz", classes=(0, 1, 2))
    write_volume(root / "imagesTs" / "case_9.nii.gz")
    training = [{"image": f"./imagesTr/case_{i}.nii.gz", "label": f"./labelsTr/case_{i}.nii.gz"} for i in range(2)]
    if training_extra:
        training[1].update(training_extra)
    data = {
        "name": "Test",
        "modality": modality,
        "labels": {"0": "background", "1": "liver", "2": "tumour"},
        "numTraining": 2,
        "numTest": 1,
        "training": training,
        "test": ["./imagesTs/case_9.nii.gz"],
    }
    path = root / name
    path.write_text(json.dumps(data, indent=2))
    return path


def test_msd_dataset_json_gives_splits_labels_and_ct_modality(root):
    path = write_msd(root, {"0": "CT"})

    for ds in (find_dataset(root), find_dataset(path)):  # the folder or the file itself
        assert ds.layout == "msd"
        assert ds.root == root
        assert ds.labels == {0: "background", 1: "liver", 2: "tumour"}
        assert ds.channel_names == ["CT"]
        assert [c.case_id for c in ds.split("training")] == ["case_0", "case_1"]
        assert [c.case_id for c in ds.split("test")] == ["case_9"]
        train0 = ds.split("training")[0]
        assert train0.images == (root / "imagesTr" / "case_0.nii.gz",)
        assert train0.label == root / "labelsTr" / "case_0.nii.gz"
        assert ds.split("test")[0].label is None
        assert {c.modality for c in ds.cases} == {"CT"}


def test_msd_mri_channel_name_gives_mri_modality(root):
    write_msd(root, {"0": "T1"})

    ds = find_dataset(root)

    assert {c.modality for c in ds.cases} == {"MRI"}
    assert ds.channel_names == ["T1"]


def test_msd_per_entry_modality_overrides_the_dataset_one(root):
    write_msd(root, {"0": "T1"}, training_extra={"modality": "CT"})

    tags = {c.case_id: c.modality for c in find_dataset(root).cases}

    assert tags == {"case_0": "MRI", "case_1": "CT", "case_9": "MRI"}


def test_msd_cases_pass_check_dataset_with_declared_classes(root):
    write_msd(root, {"0": "CT"})

    reports, problems = check_dataset(find_dataset(root))

    assert problems == []
    assert [r.file for r in reports] == ["imagesTr/case_0.nii.gz", "imagesTr/case_1.nii.gz", "imagesTs/case_9.nii.gz"]
    assert [r.label_classes for r in reports] == [[0, 1, 2], [0, 1, 2], None]
    assert {r.modality for r in reports} == {"CT"}


# --- nnU-Net raw --------------------------------------------------------------------------------


def write_nnunet(root: Path, n_train=2, channels=("T1", "T2"), shape=(16, 18, 20)) -> Path:
    for i in range(n_train):
        for c in range(len(channels)):
            write_volume(root / "imagesTr" / f"case_{i:03d}_{c:04d}.nii.gz", np.full(shape, 10 * i + c + 1, np.float32)
                         + _rng.random(shape, dtype=np.float32))
        write_label(root / "labelsTr" / f"case_{i:03d}.nii.gz", shape=shape)
    data = {
        "channel_names": {str(c): name for c, name in enumerate(channels)},
        "labels": {"background": 0, "tumour": 1},
        "numTraining": n_train,
        "file_ending": ".nii.gz",
    }
    path = root / "dataset.json"
    path.write_text(json.dumps(data))
    return path


def test_nnunet_raw_dataset_has_one_file_per_channel_and_mri_modality(root):
    write_nnunet(root)

    ds = find_dataset(root)

    assert ds.layout == "nnunet"
    assert ds.channel_names == ["T1", "T2"]
    assert ds.labels == {0: "background", 1: "tumour"}
    assert [c.case_id for c in ds.cases] == ["case_000", "case_001"]
    case = ds.cases[0]
    assert case.images == (root / "imagesTr" / "case_000_0000.nii.gz", root / "imagesTr" / "case_000_0001.nii.gz")
    assert case.label == root / "labelsTr" / "case_000.nii.gz"
    assert {c.modality for c in ds.cases} == {"MRI"}
    assert {c.split for c in ds.cases} == {"training"}


def test_nnunet_channels_load_as_one_multichannel_image(root):
    write_nnunet(root)
    case = find_dataset(root).cases[1]

    item = LoadCased(classes=[0, 1], channels=2)(case_item(case))

    assert tuple(item["image"].shape) == (2, 16, 18, 20)
    assert tuple(item["label"].shape) == (1, 16, 18, 20)
    # channel order follows the _0000, _0001 suffixes (case_001: values 11.x then 12.x)
    assert 11 <= item["image"][0].min() and item["image"][0].max() < 12
    assert 12 <= item["image"][1].min() and item["image"][1].max() < 13
    assert item["modality"] == "MRI"
    assert tuple(read_image(case.images, channels=2).shape) == (2, 16, 18, 20)


def test_nnunet_check_case_reports_channels_last_in_shape(root):
    write_nnunet(root)
    ds = find_dataset(root)

    report = check_case(ds.cases[0], ds)

    assert report.shape == (16, 18, 20, 2)
    assert report.label_classes == [0, 1]
    assert report.modality == "MRI"


def test_nnunet_test_images_become_the_test_split(root):
    write_nnunet(root)
    for c in range(2):
        write_volume(root / "imagesTs" / f"new_{c:04d}.nii.gz")

    ds = find_dataset(root)

    test = ds.split("test")
    assert [(c.case_id, c.label, len(c.images)) for c in test] == [("new", None, 2)]
    assert len(ds.split("training")) == 2


# --- the real sample volumes (absent in a fresh clone) ------------------------------------------


@pytest.fixture
def real_data() -> Path:
    if not (REAL_DATA / "README.md").is_file():
        pytest.skip(f"real sample volumes not found at {REAL_DATA}")
    return REAL_DATA


def test_real_data_is_found_paired_and_tagged(real_data):
    ds = find_dataset(real_data)

    assert ds.layout == "folder"
    assert pairs_of(ds) == {
        "ct/head_ct_template_1mm.nii.gz": None,
        "ct/lung1_image.nrrd": "ct/lung1_label.nrrd",
        "mri/brain1_t1c_image.nrrd": "mri/brain1_t1c_label.nrrd",
        "mri/itk_t1.nii.gz": "mri/itk_t1_tissue_seg.nii.gz",
        "mri/mni152_gm_prob.nii.gz": None,
        "mri/mni152_t1.nii.gz": None,
        "mri/mni152_wm_prob.nii.gz": None,
    }
    tags = {c.case_id: c.modality for c in ds.cases}
    assert tags == {
        "head_ct_template_1mm": "CT",
        "lung1": "CT",
        "brain1_t1c": "MRI",
        "itk_t1": "MRI",
        "mni152_gm_prob": "MRI",
        "mni152_t1": "MRI",
        "mni152_wm_prob": "MRI",
    }


def test_real_labelled_mri_volumes_check_with_their_geometry(real_data):
    ds = find_dataset(real_data)
    by_id = {c.case_id: c for c in ds.cases}

    brain = check_case(by_id["brain1_t1c"], ds)
    assert brain.shape == (256, 256, 25)
    assert brain.spacing == pytest.approx((0.78125, 0.78125, 6.5), abs=1e-3)
    assert brain.label_classes == [0, 1]
    assert brain.modality == "MRI"

    itk_t1 = check_case(by_id["itk_t1"], ds)
    assert itk_t1.shape == (128, 128, 62)
    assert itk_t1.spacing == pytest.approx((2.0, 2.0, 3.0))
    assert itk_t1.label_classes == list(range(7))


# --- `swinssl data check` on good data ----------------------------------------------------------


def test_data_check_cli_lists_every_file_with_its_shape(root):
    write_volume(root / "a_image.nii.gz", shape=(16, 18, 20))
    write_label(root / "a_label.nii.gz", shape=(16, 18, 20))
    write_volume(root / "ct" / "b.nii.gz", _rng.uniform(-1000, 400, (20, 16, 16)).astype(np.float32))

    result = CliRunner().invoke(app, ["data", "check", str(root)])

    assert result.exit_code == 0, result.output
    assert "a_image.nii.gz" in result.stdout and "16x18x20" in result.stdout
    assert "ct/b.nii.gz" in result.stdout and "20x16x16" in result.stdout
    assert "folder layout, 2 volumes" in result.stdout
    assert "all 2 volumes readable and consistent" in result.stdout
    assert "error" not in result.stderr


def test_data_check_cli_on_real_data_lists_all_seven_volumes(real_data):
    result = CliRunner().invoke(app, ["data", "check", str(real_data)])

    assert result.exit_code == 0, result.output
    names = [
        "head_ct_template_1mm.nii.gz",
        "lung1_image.nrrd",
        "brain1_t1c_image.nrrd",
        "itk_t1.nii.gz",
        "mni152_gm_prob.nii.gz",
        "mni152_t1.nii.gz",
        "mni152_wm_prob.nii.gz",
    ]
    for name in names:
        assert name in result.stdout
    lung_row = next(line for line in result.stdout.splitlines() if "lung1_image.nrrd" in line)
    assert "512x512x48" in lung_row and "0.57x0.57x5" in lung_row and "CT" in lung_row
    assert "all 7 volumes readable and consistent" in result.stdout
