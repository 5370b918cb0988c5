"""Bad volumes met during a run: pre-training skips and lists them (up to data.max_bad_fraction),
fine-tuning and evaluation refuse a label of another grid from the headers before any work, and a
label that turns bad mid-run stops fine-tuning with its last good checkpoint intact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import LPS_AFFINE, TINY_PRETRAIN, body_volume, write_nifti
from typer.testing import CliRunner

from swinssl.cli import app
from swinssl.config import PreprocessConfig, load_config
from swinssl.data.discover import find_dataset
from swinssl.data.io import check_case_grids, header_grid
from swinssl.data.transforms import pretrain_transforms
from swinssl.engine import pretrain as engine
from swinssl.checkpoint import read_checkpoint
from swinssl.engine.data import BadVolumes, SeededDataset, StepSampler
from swinssl.errors import DataError
from swinssl.metrics import evaluate
from swinssl.runs import RunDir

TINY = [*TINY_PRETRAIN, "train.batch_size=2", "train.val_fraction=0", "train.checkpoint_every=2", "train.val_every=100",
        "train.preview_every=100", "data.cache=off"]


def corpus(folder: Path, phantoms: Path, good: int, nan: int = 0, truncated: int = 0) -> list[Path]:
    """``good`` copies of phantom CT volumes, ``nan`` with NaN/Inf voxels and ``truncated`` cut-short
    files in ``folder``; returns the bad files."""
    folder.mkdir(parents=True)
    sources = sorted((phantoms / "imagesTr").glob("*_ct.nii.gz"))
    for i in range(good):
        shutil.copy(sources[i % len(sources)], folder / f"good_{i}.nii.gz")
    bad = []
    for i in range(nan):
        image = np.random.default_rng(i).normal(0, 100, (64, 64, 64)).astype(np.float32)
        image[1, 1, 1], image[2, 2, 2] = np.nan, np.inf
        bad.append(write_nifti(folder / f"nan_{i}.nii.gz", image))
    for i in range(truncated):
        path = folder / f"cut_{i}.nii.gz"
        path.write_bytes(sources[0].read_bytes()[:300])
        bad.append(path)
    return bad


def pretrain_cli(data: Path, out: Path, name: str, *extra: str):
    return CliRunner().invoke(app, ["pretrain", "--no-estimate", "--config", "pretrain/swin_unetr_tiny", f"data={data}",
                                    f"train.out={out}", f"train.name={name}", *TINY, *extra])


def test_pretraining_skips_bad_volumes_lists_them_and_finishes(phantoms, tmp_path):
    bad = corpus(tmp_path / "data", phantoms, good=4, nan=1, truncated=1)
    # 4 steps of 2 volumes: the first pass over the 6 volumes meets both bad ones; forked workers.
    result = pretrain_cli(tmp_path / "data", tmp_path / "runs", "a", "train.steps=4", "train.num_workers=1",
                          "data.max_bad_fraction=0.5")

    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2, result.output  # once per bad volume
    assert {w.split(": ")[1] for w in warnings} == {str(p) for p in bad}
    skipped = RunDir(tmp_path / "runs" / "a").read_skipped()
    assert set(skipped) == {str(p) for p in bad}
    assert "non-finite voxels (1 NaN, 1 Inf)" in skipped[str(bad[0])] and "cannot read" in skipped[str(bad[1])]
    assert read_checkpoint(tmp_path / "runs" / "a" / "checkpoints" / "last.pt")["step"] == 4


def test_too_many_bad_volumes_stop_in_one_line(phantoms, tmp_path):
    bad = corpus(tmp_path / "data", phantoms, good=2, nan=1, truncated=1)
    result = pretrain_cli(tmp_path / "data", tmp_path / "runs", "a", "train.steps=4", "train.num_workers=1")

    assert result.exit_code == 3, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and any(errors[0].startswith(f"error: {p}: ") for p in bad), result.output
    assert "1 of 4 volumes bad, more than data.max_bad_fraction=0.01" in errors[0]
    assert "Traceback" not in result.output


def test_a_corpus_of_bad_volumes_stops_whatever_the_limit(phantoms, tmp_path):
    corpus(tmp_path / "data", phantoms, good=0, nan=2)
    result = pretrain_cli(tmp_path / "data", tmp_path / "runs", "a", "train.steps=2", "train.num_workers=0",
                          "data.max_bad_fraction=1")

    assert result.exit_code == 3, result.output
    assert "(every one of the 2 volumes is bad)" in result.output


def test_max_bad_fraction_outside_0_1_is_refused(phantoms, tmp_path):
    result = pretrain_cli(phantoms, tmp_path / "runs", "a", "data.max_bad_fraction=2")
    assert result.exit_code == 2 and "data.max_bad_fraction must be between 0 and 1, got 2" in result.output


def test_the_replacement_depends_on_the_seed_and_the_bad_set_only(phantoms, tmp_path):
    bad = corpus(tmp_path / "data", phantoms, good=3, nan=1)
    cases = find_dataset(tmp_path / "data").cases
    bad_index = next(i for i, c in enumerate(cases) if c.images[0] == bad[0])
    pipeline = pretrain_transforms(PreprocessConfig(roi_size=(16, 16, 16), spacing=None, num_crops=1))

    fresh = SeededDataset(cases, pipeline, skip_bad=True)
    resumed = SeededDataset(cases, pipeline, skip_bad=True, known_bad=[str(bad[0])])
    (a, met_a), (b, met_b) = fresh[(bad_index, 1234)], resumed[(bad_index, 1234)]

    assert met_a == [(str(bad[0]), met_a[0][1])] and "non-finite" in met_a[0][1]
    assert met_b == []  # known from the skipped list: not read again
    torch.testing.assert_close(a[0]["image"], b[0]["image"], rtol=0, atol=0)
    read = []
    run = fresh._run
    fresh._run = lambda index, seed: read.append(index) or run(index, seed)
    for seed in range(12):
        fresh[(bad_index, seed)]
    assert len(set(read)) > 1 and bad_index not in read  # drawn from the seed, never the bad one again


def test_resume_keeps_the_skipped_list_and_the_weights_of_an_uninterrupted_run(phantoms, tmp_path, monkeypatch):
    bad = corpus(tmp_path / "data", phantoms, good=3, nan=1)
    config = lambda name, *extra: load_config("pretrain/swin_unetr_tiny", [
        f"data={tmp_path / 'data'}", f"train.out={tmp_path / 'runs'}", f"train.name={name}", *TINY,
        "data.max_bad_fraction=0.5", *extra])
    full = engine.pretrain(config("full", "train.steps=4", "train.num_workers=2"), progress=False)
    method = engine.get_method("swin_unetr")
    calls, real_losses = [], method.compute_losses

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the third step: after the step-2 checkpoint
            raise KeyboardInterrupt
        return real_losses(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(method, "compute_losses", interrupted)
        with pytest.raises(KeyboardInterrupt):
            engine.pretrain(config("cut", "train.steps=4", "train.num_workers=0"), progress=False)
    cut = tmp_path / "runs" / "cut"
    assert set(RunDir(cut).read_skipped()) == {str(bad[0])}  # met in the first 2 steps

    import swinssl.data.transforms as transforms
    read = []
    real = transforms.read_image
    monkeypatch.setattr(transforms, "read_image", lambda path, **kw: read.append(str(path)) or real(path, **kw))
    engine.pretrain(resume=cut, progress=False)

    assert str(bad[0]) not in read and read  # the resume knew it from the list
    assert set(RunDir(cut).read_skipped()) == {str(bad[0])}
    a, b = read_checkpoint(full / "checkpoints" / "last.pt"), read_checkpoint(cut / "checkpoints" / "last.pt")
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=1e-6, msg=key)


def test_a_bad_validation_volume_leaves_the_validation(phantoms, tmp_path):
    bad = corpus(tmp_path / "data", phantoms, good=2, nan=1)
    cfg = load_config("pretrain/swin_unetr_tiny", [f"data={tmp_path / 'data'}", *TINY])
    stage = engine.PretrainStage(cfg)
    good = [c for c in stage.train_cases if c.images[0] != bad[0]]
    stage.val_cases = [c for c in stage.train_cases if c.images[0] == bad[0]] + good[:1]
    stage.bad = BadVolumes(RunDir(tmp_path), total=3, max_fraction=0.5, warn=lambda line: None)

    assert [len(crops) for _, crops in stage.validation_batches()] == [1]  # batch 2: the good one
    assert stage.val_cases == good[:1]
    assert set(RunDir(tmp_path).read_skipped()) == {str(bad[0])}


def test_bad_volumes_past_the_limit_raise_and_within_it_warn_once(tmp_path):
    lines = []
    bad = BadVolumes(RunDir(tmp_path), total=10, max_fraction=0.2, warn=lines.append)
    bad.met([("a.nii.gz", "a.nii.gz: cannot read"), ("a.nii.gz", "a.nii.gz: cannot read")])
    bad.met([("b.nii.gz", "b.nii.gz: cannot read")])
    assert len(lines) == 2 and bad.known == {"a.nii.gz", "b.nii.gz"}
    with pytest.raises(DataError, match=r"^c.nii.gz: cannot read \(3 of 10 volumes bad, more than data.max_bad"):
        bad.met([("c.nii.gz", "c.nii.gz: cannot read")])
    assert BadVolumes(RunDir(tmp_path), 10, 0.2, lines.append).known == {"a.nii.gz", "b.nii.gz", "c.nii.gz"}


# --- grids from the headers ---------------------------------------------------------------------


def _cut_data(path: Path) -> Path:
    """An uncompressed NIfTI whose voxel data is cut short: its header still reads, its voxels do not."""
    path.write_bytes(path.read_bytes()[:400])
    return path


def test_case_grids_are_checked_from_the_headers_without_reading_voxels(tmp_path):
    image, label = body_volume()
    image_path = _cut_data(write_nifti(tmp_path / "case_image.nii", image))
    assert header_grid(image_path)[0] == image.shape
    other_shape = _cut_data(write_nifti(tmp_path / "case_label.nii", label[:-2]))
    cases = find_dataset(tmp_path).cases
    with pytest.raises(DataError, match=r"label shape \(38, 36, 28\) differs from image case_image.nii shape"):
        check_case_grids(cases)

    moved = LPS_AFFINE.copy()
    moved[0, 3] += 5.0
    _cut_data(write_nifti(other_shape, label, affine=moved))
    with pytest.raises(DataError, match=r"case_label.nii: label affine differs from image case_image.nii \(origin"):
        check_case_grids(find_dataset(tmp_path).cases)


def test_nrrd_header_grid_is_the_grid_monai_reads(tmp_path):
    import nrrd

    from swinssl.data.io import read_volume

    data = np.zeros((5, 6, 7), np.int16)
    directions = np.array([[-0.7, 0.1, 0], [0, 0.8, 0], [0, 0, 2.5]])
    path = tmp_path / "v.nrrd"
    nrrd.write(str(path), data, {"space": "left-posterior-superior", "space directions": directions,
                                 "space origin": np.array([10.0, -20.0, 30.0])})
    shape, affine = header_grid(path)
    volume = read_volume(path)
    assert shape == tuple(volume.shape[1:])
    np.testing.assert_allclose(affine, np.asarray(volume.affine), atol=1e-6)


def test_evaluation_refuses_a_mismatched_pair_before_scoring_any(tmp_path):
    _, label = body_volume()
    for case in ("a", "b"):
        write_nifti(tmp_path / "labels" / f"{case}.nii.gz", label)
    write_nifti(tmp_path / "pred" / "a.nii.gz", label)
    _cut_data(write_nifti(tmp_path / "pred" / "b.nii", label[:, :-1]))  # unreadable voxels: only its header is read
    with pytest.raises(DataError, match=r"b.nii: shape \(40, 35, 28\) differs from label .*b.nii.gz shape"):
        evaluate(tmp_path / "pred", tmp_path / "labels")


def test_a_label_that_turns_bad_mid_run_stops_finetuning_with_the_last_checkpoint_intact(tmp_path):
    data = tmp_path / "data"
    for i in range(2):
        image, label = body_volume(seed=i)
        write_nifti(data / f"ct_case{i}.nii.gz", image)
        write_nifti(data / f"ct_case{i}_label.nii.gz", label)
    cases = find_dataset(data).cases
    second = cases[next(iter(StepSampler(2, 1, seed=0, start_step=1)))[0]]  # the case step 2 trains on
    _, label = body_volume()
    label[0, 0, 0] = 7  # read only when step 2 draws it; its header is fine
    write_nifti(second.label, label)

    result = CliRunner().invoke(app, [
        "finetune", "--no-estimate", "--config", "finetune/tiny", f"data={data}", f"train.out={tmp_path / 'runs'}",
        "train.name=ft", "model.feature_size=12", "model.depths=[1,1,1,1]", "train.steps=3", "train.batch_size=1",
        "train.checkpoint_every=1", "train.val_fraction=0", "train.num_workers=1", "preprocess.num_crops=1",
        "preprocess.spacing=null", "preprocess.roi_size=32", "data.num_classes=3", "data.cache=off", "seed=0"])

    assert result.exit_code == 3, result.output
    assert "warning: no validation case" in result.output and "no checkpoints/best.pt" in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {second.label}: label values [7]"), result.output
    last = read_checkpoint(tmp_path / "runs" / "ft" / "checkpoints" / "last.pt")
    assert last["step"] == 1 and json.dumps(last["plan"])


def test_finetuning_refuses_a_label_of_another_grid_before_reading_any_voxel(tmp_path):
    image, label = body_volume()
    _cut_data(write_nifti(tmp_path / "data" / "ct_case1.nii", image))  # its voxels cannot be read
    write_nifti(tmp_path / "data" / "ct_case1_label.nii", label[:, :-3])
    result = CliRunner().invoke(app, [
        "finetune", "--no-estimate", "--config", "finetune/tiny", f"data={tmp_path / 'data'}",
        f"train.out={tmp_path / 'runs'}", "train.name=ft", "train.num_workers=0", "train.steps=1"])
    assert result.exit_code == 3, result.output
    assert f"error: {tmp_path / 'data' / 'ct_case1_label.nii'}: label shape (40, 33, 28) differs from image" in result.output
    assert not (tmp_path / "runs" / "ft").exists()  # refused before the run folder
