"""Metrics: hand-computed Dice/HD95/NSD, the empty-mask conventions, and ``evaluate`` on folders."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import LPS_AFFINE, write_nifti, write_volume
from monai.data import MetaTensor

from swinssl.data.discover import volume_stem
from swinssl.data.io import AFFINE_TOLERANCE_MM, check_same_grid, spacing_of
from swinssl.errors import ConfigError, DataError
from swinssl.metrics import case_metrics, evaluate, format_summary, summarize, worst_distance

ANISO = (1.0, 1.5, 2.0)  # mm along X, Y, Z: a wrong axis order changes the distances below


def cube(shape=(24, 24, 24), start=(10, 10, 10), size=6, value=1) -> np.ndarray:
    mask = np.zeros(shape, np.int16)
    x, y, z = start
    mask[x : x + size, y : y + size, z : z + size] = value
    return mask


def assert_finite(metrics: dict[int, dict[str, float]]) -> None:
    assert all(math.isfinite(v) for per_class in metrics.values() for v in per_class.values())


# --- case_metrics -------------------------------------------------------------------------------


def test_dice_of_two_boxes_overlapping_by_half_is_half():
    a = np.zeros((12, 12, 12), np.int16)
    b = np.zeros_like(a)
    a[0:4, 0:4, 0:4] = 1  # |A| = 64
    b[2:6, 0:4, 0:4] = 1  # |B| = 64, overlap 2*4*4 = 32 -> 2*32 / (64+64) = 0.5
    assert case_metrics(b, a, ANISO, [1])[1]["dice"] == pytest.approx(0.5)


def test_hd95_of_cube_shifted_2_voxels_along_1p5mm_axis_is_3mm():
    # MONAI measures distances between edge voxels (mask minus its erosion), Euclidean in mm.
    # Label cube y 10..15, prediction y 12..17. Each cube's face on the far side (label y=10,
    # prediction y=17: 36 of its 152 edge voxels, 24% > 5%) is 2 voxels * 1.5 mm = 3.0 mm from the
    # nearest edge of the other; every other edge voxel is closer (side faces overlap, the inner
    # faces are within 2 voxels of a side face: at most 2 mm in x, or 3 mm via the shifted face).
    # So both directed 95th percentiles are exactly 3.0 mm.
    label, pred = cube(), cube(start=(10, 12, 10))
    assert case_metrics(pred, label, ANISO, [1])[1]["hd95"] == pytest.approx(3.0)
    # The same shift along X (1.0 mm) is 2.0 mm: spacing is applied per axis, in X, Y, Z order.
    assert case_metrics(cube(start=(12, 10, 10)), label, ANISO, [1])[1]["hd95"] == pytest.approx(2.0)


def test_hd95_ignores_a_single_outlier_voxel_that_the_maximum_would_report():
    label = cube()
    pred = label.copy()
    pred[0, 0, 0] = 1  # 1 of 153 prediction edge voxels; the other 152 lie on the label's surface (0 mm)
    # 95th percentile of [0]*152 + [d]: index 0.95*152 = 144.4 falls among the zeros -> 0 mm,
    # whereas the plain Hausdorff distance would be d = |(10,10,10)*ANISO| = sqrt(100+225+400).
    result = case_metrics(pred, label, ANISO, [1])[1]
    assert result["hd95"] == pytest.approx(0.0)
    assert result["dice"] == pytest.approx(2 * 216 / (216 + 217))


def test_nsd_of_shifted_cube_is_one_above_the_shift_and_counts_far_faces_below():
    label, pred = cube(), cube(start=(10, 12, 10))
    assert case_metrics(pred, label, ANISO, [1], nsd_tolerance=3.5)[1]["nsd"] == pytest.approx(1.0)
    assert case_metrics(pred, label, ANISO, [1], nsd_tolerance=3.0)[1]["nsd"] == pytest.approx(1.0)  # d <= tau counts
    below = case_metrics(pred, label, ANISO, [1], nsd_tolerance=2.9)[1]["nsd"]
    # As in the HD95 test, only the two far faces (36 edge voxels each) are 3.0 mm away; every other
    # edge voxel is within 2 mm. 152 edge voxels per cube (6^3 - 4^3): NSD = (304 - 72) / 304.
    assert 0 < below < 1
    assert below == pytest.approx((304 - 72) / 304)
    assert case_metrics(label, label, ANISO, [1], nsd_tolerance=0.0)[1] == {"dice": 1.0, "hd95": 0.0, "nsd": 1.0}


def test_empty_masks_have_documented_finite_values():
    empty, full = np.zeros((20, 20, 20), np.int16), cube(shape=(20, 20, 20), start=(5, 5, 5))
    worst = math.sqrt((20 * 1.0) ** 2 + (20 * 1.5) ** 2 + (20 * 2.0) ** 2)  # field-of-view diagonal
    assert worst_distance((20, 20, 20), ANISO) == pytest.approx(worst)
    both = case_metrics(empty, empty, ANISO, [1])
    label_only = case_metrics(empty, full, ANISO, [1])
    pred_only = case_metrics(full, empty, ANISO, [1])
    assert both[1] == {"dice": 1.0, "hd95": 0.0, "nsd": 1.0}
    for result in (label_only, pred_only):
        assert result[1]["dice"] == 0.0 and result[1]["nsd"] == 0.0
        assert result[1]["hd95"] == pytest.approx(worst)
    for result in (both, label_only, pred_only):
        assert_finite(result)
    rows = [{"case_id": i, "class": 1, **r[1]} for i, r in enumerate((both, label_only, pred_only))]
    summary = summarize(rows)
    values = [v for m in ("dice", "hd95", "nsd") for v in summary["classes"]["1"][m].values()]
    assert all(math.isfinite(v) for v in values + list(summary["mean"].values()))
    assert summary["classes"]["1"]["dice"]["mean"] == pytest.approx(1 / 3)


def test_classes_are_scored_independently():
    label = cube(shape=(30, 24, 24), start=(2, 4, 4)) + cube(shape=(30, 24, 24), start=(14, 10, 10), value=2)
    pred = cube(shape=(30, 24, 24), start=(2, 4, 4)) + cube(shape=(30, 24, 24), start=(14, 12, 10), value=2)
    result = case_metrics(torch.as_tensor(pred), torch.as_tensor(label), ANISO, [1, 2, 3], nsd_tolerance={1: 0.0, 2: 2.9, 3: 1.0})
    assert result[1] == {"dice": 1.0, "hd95": 0.0, "nsd": 1.0}  # identical class 1, untouched by class 2's error
    assert result[2]["hd95"] == pytest.approx(3.0)  # class 2 as in the single-cube tests above
    assert result[2]["nsd"] == pytest.approx((304 - 72) / 304)
    assert result[2]["dice"] == pytest.approx(2 * (6 * 4 * 6) / (2 * 216))
    assert result[3] == {"dice": 1.0, "hd95": 0.0, "nsd": 1.0}  # in neither mask
    with pytest.raises(ConfigError, match=r"class\(es\) \[2\]"):
        case_metrics(pred, label, ANISO, [1, 2], nsd_tolerance={1: 1.0})


def test_summary_std_is_population_std_and_mean_is_over_classes():
    rows = [
        {"case_id": "a", "class": 1, "class_name": "liver", "dice": 1.0, "hd95": 0.0, "nsd": 1.0},
        {"case_id": "b", "class": 1, "class_name": "liver", "dice": 0.5, "hd95": 4.0, "nsd": 0.5},
        {"case_id": "a", "class": 2, "class_name": "tumour", "dice": 0.25, "hd95": 2.0, "nsd": 0.0},
        {"case_id": "b", "class": 2, "class_name": "tumour", "dice": 0.25, "hd95": 2.0, "nsd": 0.0},
    ]
    summary = summarize(rows)
    liver = summary["classes"]["1"]
    assert liver["name"] == "liver" and liver["n"] == 2
    assert liver["dice"] == pytest.approx({"mean": 0.75, "std": 0.25})  # ddof=1 would give 0.354
    assert liver["hd95"] == pytest.approx({"mean": 2.0, "std": 2.0})
    assert summary["classes"]["2"]["dice"]["std"] == 0.0
    assert summary["mean"] == pytest.approx({"dice": 0.5, "hd95": 2.0, "nsd": 0.375})
    assert summary["n_cases"] == 2
    table = format_summary(summary)
    assert "1 liver" in table and "0.7500 ± 0.2500" in table and "2.00 ± 2.00" in table
    assert table.splitlines()[-1].split()[:3] == ["mean", "2", "0.5000"]


# --- evaluate -----------------------------------------------------------------------------------

SHAPE = (20, 20, 20)  # LPS_AFFINE spacing 1.5, 1.5, 2.0 mm
WORST = math.sqrt((20 * 1.5) ** 2 + (20 * 1.5) ** 2 + (20 * 2.0) ** 2)


def two_class(shift1: int = 0, drop2: bool = False) -> np.ndarray:
    """Class 1: 6^3 cube (shifted along X, 1.5 mm voxels); class 2: 4^3 cube (absent if drop2)."""
    mask = cube(SHAPE, start=(4 + shift1, 4, 4))
    if not drop2:
        mask += cube(SHAPE, start=(12, 12, 12), size=4, value=2)
    return mask


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    labels, preds = tmp_path / "labels", tmp_path / "preds"
    for case in ("a", "b", "c"):
        write_nifti(labels / f"{case}.nii.gz", two_class())
    write_nifti(preds / "a.nii.gz", two_class())  # perfect
    write_nifti(preds / "b.nii.gz", two_class(shift1=2))  # class 1 moved 2 voxels = 3.0 mm
    write_nifti(preds / "c.nii.gz", two_class(drop2=True))  # class 2 missed
    return preds, labels


def check_hand_values(summary: dict) -> None:
    # Class 1 per case: dice 1, 2/3 (overlap 4*6*6 of 216), 1; hd95 0, 3, 0; nsd 1 (tolerance 3 mm).
    c1, c2 = summary["classes"]["1"], summary["classes"]["2"]
    assert c1["n"] == c2["n"] == 3
    assert c1["dice"] == pytest.approx({"mean": 8 / 9, "std": math.sqrt(2) / 9})
    assert c1["hd95"] == pytest.approx({"mean": 1.0, "std": math.sqrt(2)})
    assert c1["nsd"] == pytest.approx({"mean": 1.0, "std": 0.0})
    # Class 2: perfect, perfect, missed (dice 0, nsd 0, hd95 = field-of-view diagonal).
    assert c2["dice"] == pytest.approx({"mean": 2 / 3, "std": math.sqrt(2) / 3})
    assert c2["hd95"]["mean"] == pytest.approx(WORST / 3)
    assert summary["mean"]["dice"] == pytest.approx((8 / 9 + 2 / 3) / 2)


def test_evaluate_writes_csv_and_summary_with_hand_values(folders, tmp_path):
    preds, labels = folders
    out = tmp_path / "out"
    summary = evaluate(preds, labels, out_dir=out, nsd_tolerance=3.0)
    check_hand_values(summary)
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["case_id", "class", "class_name", "dice", "hd95", "nsd"]
    assert [(r["case_id"], r["class"]) for r in rows] == [(c, k) for c in "abc" for k in "12"]
    b1 = rows[2]
    assert float(b1["dice"]) == pytest.approx(2 / 3) and float(b1["hd95"]) == pytest.approx(3.0)
    assert float(rows[5]["hd95"]) == pytest.approx(WORST) and float(rows[5]["nsd"]) == 0.0
    on_disk = json.loads((out / "summary.json").read_text())
    check_hand_values(on_disk)
    assert on_disk["classes"]["1"]["nsd_tolerance_mm"] == 3.0
    assert "one_empty" in on_disk["conventions"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_evaluate_reads_labels_from_msd_dataset_json(folders, tmp_path):
    preds, labels = folders
    root = tmp_path / "Task01"
    entries = []
    for case in ("a", "b", "c"):
        write_volume(root / "imagesTr" / f"{case}.nii.gz", shape=SHAPE, affine=LPS_AFFINE)
        (root / "labelsTr").mkdir(parents=True, exist_ok=True)
        (root / "labelsTr" / f"{case}.nii.gz").write_bytes((labels / f"{case}.nii.gz").read_bytes())
        entries.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    meta = {"labels": {"0": "background", "1": "liver", "2": "tumour"}, "modality": {"0": "CT"}, "training": entries}
    (root / "dataset.json").write_text(json.dumps(meta))
    out = tmp_path / "out"
    summary = evaluate(preds, root / "dataset.json", out_dir=out, nsd_tolerance={1: 3.0, 2: 1.0})
    check_hand_values(summary)
    assert summary["classes"]["1"]["name"] == "liver" and summary["classes"]["2"]["name"] == "tumour"
    assert "tumour" in (out / "metrics.csv").read_text()
    # Only the test split: a and b move to "test" and c stays in training; c's prediction is unlabelled there.
    meta["test"], meta["training"] = entries[:2], entries[2:]
    (root / "dataset.json").write_text(json.dumps(meta))
    summary = evaluate(preds, root / "dataset.json", nsd_tolerance={1: 3.0, 2: 1.0}, split="test")
    assert summary["n_cases"] == 2 and summary["missing_predictions"] == []
    assert [Path(p).name for p in summary["unlabelled_predictions"]] == ["c.nii.gz"]


def test_evaluate_skips_unlabelled_predictions_and_reports_missing_ones(folders, caplog):
    preds, labels = folders
    write_nifti(preds / "extra.nii.gz", two_class())
    (preds / "c.nii.gz").unlink()
    spurious = two_class()
    spurious[0:2, 0:2, 0:2] = 3  # a class no label has: warned about, not scored, needs no tolerance
    write_nifti(preds / "a.nii.gz", spurious)
    with caplog.at_level(logging.WARNING, logger="swinssl.metrics"):
        summary = evaluate(preds, labels, nsd_tolerance={1: 3.0, 2: 3.0})
    messages = [r.getMessage() for r in caplog.records]
    assert any("extra.nii.gz" in m and "skipped" in m for m in messages)
    assert any("no prediction" in m and m.endswith(": c") for m in messages)
    assert any("classes [3]" in m for m in messages)
    assert summary["n_cases"] == 2 and summary["missing_predictions"] == ["c"]
    assert sorted(summary["classes"]) == ["1", "2"]
    assert summary["classes"]["1"]["dice"]["mean"] == pytest.approx((1 + 2 / 3) / 2)


def test_evaluate_rejects_prediction_on_another_grid(folders):
    preds, labels = folders
    moved = LPS_AFFINE.copy()
    moved[0, 3] += 1.0  # origin 1 mm off
    write_nifti(preds / "b.nii.gz", two_class(), affine=moved)
    with pytest.raises(DataError, match=r"b\.nii\.gz: affine differs from label .*origin"):
        evaluate(preds, labels)
    write_nifti(preds / "b.nii.gz", np.zeros((20, 20, 18), np.int16))
    with pytest.raises(DataError, match=r"b\.nii\.gz: shape \(20, 20, 18\) differs"):
        evaluate(preds, labels)
    write_nifti(preds / "b.nii.gz", two_class() * 0.5)
    with pytest.raises(DataError, match=r"b\.nii\.gz: prediction has non-integer values"):
        evaluate(preds, labels)


def test_evaluate_without_any_pair_names_both_folders(folders, tmp_path):
    preds, _ = folders
    other = tmp_path / "other_labels"
    write_nifti(other / "z.nii.gz", two_class())
    with pytest.raises(DataError, match=rf"^{preds}: no prediction matches a label in {other} "):
        evaluate(preds, other)


# --- what evaluate reads through swinssl.data ----------------------------------------------------


def test_check_same_grid_names_both_files_and_the_part_that_differs(tmp_path):
    pred, label, beside = tmp_path / "preds" / "a.nii.gz", tmp_path / "labels" / "a.nii.gz", tmp_path / "preds" / "b.nii.gz"

    def message(affine, shape=SHAPE, ref=label, **roles) -> str:
        with pytest.raises(DataError) as excinfo:
            check_same_grid(pred, shape, affine, ref, SHAPE, LPS_AFFINE, **roles)
        return str(excinfo.value)

    check_same_grid(pred, SHAPE, LPS_AFFINE + AFFINE_TOLERANCE_MM / 2, label, SHAPE, LPS_AFFINE)  # within tolerance
    assert message(LPS_AFFINE, shape=(20, 20, 18), ref_what="label") == (
        f"{pred}: shape (20, 20, 18) differs from label {label} shape (20, 20, 20)"
    )
    moved = LPS_AFFINE.copy()
    moved[0, 3] += 1.0
    assert message(moved, ref_what="label") == (
        f"{pred}: affine differs from label {label} (origin (31, 40, -20) vs (30, 40, -20) mm, max difference 1 mm)"
    )
    assert message(moved, ref=beside, what="label") == f"{pred}: label affine differs from image b.nii.gz " + (
        "(origin (31, 40, -20) vs (30, 40, -20) mm, max difference 1 mm)"  # a file beside it: named without its folder
    )
    assert "spacing (1.5, 1.5, 2.5) vs (1.5, 1.5, 2) mm" in message(LPS_AFFINE @ np.diag([1, 1, 1.25, 1]))
    assert "orientation/direction differs, max difference 3 mm" in message(LPS_AFFINE @ np.diag([-1, 1, 1, 1]))
    # rtol widens the tolerance in proportion to each reference entry: 0.002 mm at an origin of 30 mm.
    slightly = LPS_AFFINE.copy()
    slightly[0, 3] += 0.002
    assert "origin" in message(slightly)
    check_same_grid(pred, SHAPE, slightly, label, SHAPE, LPS_AFFINE, rtol=1e-4)


def test_spacing_of_is_the_column_norms_of_an_affine_or_a_volumes_affine():
    angle = math.radians(30)
    rotation = np.array([[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(ANISO)  # rotated anisotropic voxels: row norms would mix the axes
    assert spacing_of(affine) == pytest.approx(ANISO)
    assert spacing_of(MetaTensor(torch.zeros(1, 2, 2, 2), affine=torch.as_tensor(affine))) == pytest.approx(ANISO)


def test_volume_stem_drops_only_the_volume_suffix():
    # Predictions pair with labels by this name, so an image token such as _0000 stays in it.
    assert [volume_stem(Path(n)) for n in ("a.b.nii.gz", "Case_0000.nii.gz", "x.NRRD", "notes.txt")] == [
        "a.b", "Case_0000", "x", "notes.txt"
    ]


def test_evaluate_reads_a_nested_folder_of_image_label_pairs_as_data_check_does(tmp_path):
    from conftest import body_volume, write_nifti

    image, label = body_volume()
    write_nifti(tmp_path / "data" / "ct" / "case1_image.nii.gz", image)
    write_nifti(tmp_path / "data" / "ct" / "case1_label.nii.gz", label)
    write_nifti(tmp_path / "pred" / "case1.nii.gz", label)
    summary = evaluate(tmp_path / "pred", tmp_path / "data")
    assert summary["classes"]["1"]["dice"]["mean"] == 1.0
