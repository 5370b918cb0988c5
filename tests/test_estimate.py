"""swinssl estimate: the probe's config, the phases it measures (training, validation, checkpoint)
and the largest validation volume it picks, the cache's disk from headers, window counting, the
memory fit and what fits a budget, the line at the start of a run, the one line a run that runs
out of memory ends with, and (slow) a real tiny estimate against a real 3-step run."""

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from swinssl.cli import app
from swinssl.config import Config, from_dict, load_config, to_dict
from swinssl.workflows import estimate as est
from swinssl.utils import count_windows
from swinssl.engine.memory import (GIB, Fit, fitting_setting, is_out_of_memory, largest_batch, largest_roi,
                                   smaller_setting)
from swinssl.errors import TrainingError

runner = CliRunner()


# --- the probe's config and the request -----------------------------------------------------------------


def test_probe_config_runs_only_training_steps_on_one_device(tmp_path):
    cfg = load_config("finetune/tiny", ["data=/some/data.json", "train.devices=4", "train.probe_data=/p",
                                        "finetune.folds=5", "finetune.fold=all", "train.batch_size=3"])
    data = {"path": "/some/data.json", "cache": "/cache", "what": ""}
    probe = est._probe_config(cfg, "cpu", 3, tmp_path, data, after_steps=False)
    t = probe.train
    assert (t.steps, t.val_every, t.checkpoint_every, t.preview_every, t.log_every) == (3, 0, 0, 0, 1)
    assert (t.devices, t.num_nodes, t.accelerator, t.probe_data) == (1, 1, "cpu", "")
    assert Path(t.out).parent == tmp_path and probe.finetune.fold == 0
    assert (probe.data.path, probe.data.cache) == ("/some/data.json", "/cache")
    # What the user asked for stays: batch, crops, ROI, network, precision.
    assert (t.batch_size, probe.preprocess, probe.model, t.precision) == (3, cfg.preprocess, cfg.model,
                                                                           cfg.train.precision)
    # The spec the probe process reads back is the same config.
    assert from_dict(Config, json.loads(json.dumps(to_dict(probe)))) == probe


def test_probe_config_does_once_after_the_last_step_what_the_run_does_after_a_step(tmp_path):
    data = {"path": "/some/data.json", "cache": "/cache", "what": ""}
    cfg = load_config("pretrain/swin_unetr_tiny", ["train.probe_data=/p", "train.probe_steps=100",
                                                   "train.val_every=1", "train.preview_every=7"])
    t = est._probe_config(cfg, "cpu", 3, tmp_path, data).train
    assert (t.steps, t.val_every, t.preview_every, t.checkpoint_every, t.probe_every) == (3, 3, 3, 3, 3)
    assert t.probe_data == "/p" and t.probe_steps == est.PROBE_HEAD_STEPS
    # What the run never does, the probe does not measure.
    off = load_config("finetune/tiny", ["train.val_every=0", "train.checkpoint_every=0", "train.preview_every=0"])
    t = est._probe_config(off, "cpu", 3, tmp_path, data).train
    assert (t.val_every, t.preview_every, t.checkpoint_every, t.probe_data) == (0, 0, 0, "")


def test_probe_data_shares_the_runs_cache_or_writes_phantoms(tmp_path):
    cfg = load_config("pretrain/swin_unetr_tiny", [f"data={tmp_path}", f"train.out={tmp_path / 'runs'}"])
    data = est._probe_data(cfg, "pretrain", tmp_path / "probe")
    assert data["path"] == str(tmp_path) and data["cache"] == str((tmp_path / "runs" / "cache").resolve())
    off = est._probe_data(load_config("pretrain/swin_unetr_tiny", [f"data={tmp_path}", "data.cache='off'"]), "pretrain",
                          tmp_path)
    assert off["cache"] == "off"
    phantoms = est._probe_data(load_config("finetune/tiny", ["preprocess.roi_size=32"]), "finetune", tmp_path / "p")
    assert Path(phantoms["path"]).is_file() and "phantoms of 64^3" in phantoms["what"]
    labels = json.loads(Path(phantoms["path"]).read_text())["training"]
    assert len(labels) >= 3 and all(case["label"] for case in labels)  # labelled, for fine-tuning


@pytest.mark.parametrize("args, message", [
    (["--stage", "train"], "stage 'train': choose one of pretrain, finetune, predict"),
    (["--device", "tpu"], "device 'tpu': choose one of cpu, cuda"),
    (["--memory-budget", "0"], "memory budget 0.0 GiB: must be a positive number of GiB"),
    (["--memory-budget", "-2"], "memory budget -2.0 GiB: must be a positive number of GiB"),
    (["--steps", "1"], "1 probe steps: at least 2"),
    (["--stage", "predict", "--shape", "64", "--shape", "64"], "--shape: three sizes X Y Z, got 2"),
    (["train.batchsize=2"], "unknown key 'train.batchsize'"),
])
def test_bad_requests_are_one_line(args, message):
    result = runner.invoke(app, ["estimate", *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_cuda_without_a_gpu_is_one_line():
    result = runner.invoke(app, ["estimate", "--device", "cuda"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: device cuda: no CUDA GPU is visible to torch here; estimate on --device cpu"


def test_estimate_help_names_stages_budget_and_predict_options():
    text = " ".join(runner.invoke(app, ["estimate", "--help"], env={"COLUMNS": "200"}).output.split())
    for words in ("--stage", "pretrain, finetune or predict", "--memory-budget", "largest train.batch_size",
                  "--shape", "--overlap", "--sw-batch-size", "separate process", "largest validation volume",
                  "one checkpoint save", "the worst of these phases", "data.cache_dtype"):
        assert words in text, words


# --- sliding windows ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, roi, overlap", [
    ((64, 64, 64), (32, 32, 32), 0.5),
    ((100, 77, 45), (32, 32, 32), 0.5),
    ((100, 77, 45), (32, 32, 32), 0.25),
    ((20, 70, 33), (32, 32, 32), 0.5),  # smaller than the ROI along one axis: padded, one window there
    ((96, 40, 64), (64, 32, 48), 0.7),
    ((33, 33, 33), (32, 32, 32), 0.0),
])
def test_window_count_is_monai_sliding_windows(shape, roi, overlap):
    from monai.inferers import sliding_window_inference

    seen = []

    def count(x):
        seen.append(x.shape[0])
        return x

    sliding_window_inference(torch.zeros(1, 1, *shape), roi, 1, count, overlap=overlap)
    assert count_windows(shape, roi, overlap) == sum(seen)


# --- the memory fit and what fits ----------------------------------------------------------------------------


def test_fit_through_two_probes_and_what_fits_a_budget():
    fit = Fit.through((1, 3 * GIB), (4, 6 * GIB), (96, 96, 96))  # 2 GiB + 1 GiB per crop
    assert fit.base == pytest.approx(2 * GIB) and fit.per_crop == pytest.approx(GIB)
    assert fit.peak(4, (192, 96, 96)) == pytest.approx(10 * GIB)  # a crop of twice the voxels costs twice
    # 2 crops per volume: 9 GiB holds 7 crops -> 3 volumes; fewer volumes than asked keep the step's crops.
    batch = largest_batch(fit, 9 * GIB, batch_size=4, num_crops=2)
    assert batch.overrides == ["train.batch_size=3", "train.accumulate=2"] and batch.peak == pytest.approx(8 * GIB)
    assert largest_batch(fit, 16 * GIB, batch_size=4, num_crops=2).overrides == ["train.batch_size=7"]
    # One volume does not fit (2 crops = 4 GiB > 3.5): one crop does.
    assert largest_batch(fit, 3.5 * GIB, 2, 2).overrides == ["train.batch_size=1", "preprocess.num_crops=1",
                                                            "train.accumulate=4"]
    # At 4 crops, a ROI of side s costs 2 + 4 * (s / 96)^3 GiB: 10 GiB holds 120^3 -> 96 (a multiple of 32).
    assert largest_roi(fit, 10 * GIB, 4).overrides == ["preprocess.roi_size=96"]
    assert largest_roi(fit, 10.1 * GIB, 4).overrides == ["preprocess.roi_size=96"]
    assert largest_roi(fit, 40 * GIB, 4).overrides == ["preprocess.roi_size=192"]  # 2 + 4 * 8 = 34; 224: 52.8
    assert largest_roi(fit, 40 * GIB, 4, allowed=lambda side: side % 128 == 0).overrides == ["preprocess.roi_size=128"]
    assert largest_roi(fit, 40 * GIB, 4, most=100).overrides == ["preprocess.roi_size=96"]


def test_nothing_fits_a_budget_below_the_base():
    fit = Fit.through((1, 3 * GIB), (2, 4 * GIB), (96, 96, 96))
    assert largest_batch(fit, 1.5 * GIB, 1, 1) is None
    assert largest_roi(fit, 1.5 * GIB, 1) is None
    assert largest_batch(Fit(GIB, 0.0, (64, 64, 64)), 8 * GIB, 1, 1) is None  # no growth measured: no guess


def test_the_report_says_when_nothing_fits():
    fit = Fit.through((1, 3 * GIB), (2, 4 * GIB), (96, 96, 96))
    e = est.Estimate(stage="pretrain", device="cpu", peak=4 * GIB, seconds=2.0, steps=100, device_memory=16 * GIB,
                     probe_steps=3, probe_s=10, crops=2, fit=fit, budget=GIB, fit_points=[(1, 3 * GIB), (2, 4 * GIB)])
    text = "\n".join(e.report())
    assert "the config's 2 crops do not fit" in text and "nothing fits" in text
    assert "memory fit   2.0 GiB + 1.0 GiB per crop (measured at 1 and 2 crops per micro-step)" in text


def test_out_of_memory_setting_from_the_fit_else_half_the_crops():
    cfg = load_config("pretrain/swin_unetr", ["train.batch_size=4"])  # 4 volumes x 2 crops at 96^3
    fit = Fit.through((1, 3 * GIB), (8, 10 * GIB), (96, 96, 96))
    overrides, text = fitting_setting(cfg, 8 * GIB, fit)
    assert overrides == ["train.batch_size=3", "train.accumulate=2"] and text.endswith("(about 8.0 GiB)")
    # Without a fit, or one that says the config fits although it ran out: half the crops, then a smaller ROI.
    assert fitting_setting(cfg, 8 * GIB, None)[0] == ["train.batch_size=2", "train.accumulate=2"]
    assert fitting_setting(cfg, 12 * GIB, fit)[0] == ["train.batch_size=2", "train.accumulate=2"]
    one = load_config("pretrain/swin_unetr", ["train.batch_size=1", "preprocess.num_crops=1"])
    assert smaller_setting(one) == ["preprocess.roi_size=64"]
    assert fitting_setting(one, 2.5 * GIB, fit)[0] == ["preprocess.roi_size=64"]  # 2 + (64/96)^3 = 2.3 GiB
    assert smaller_setting(load_config("pretrain/swin_unetr", ["train.batch_size=1", "preprocess.num_crops=4"])) == [
        "preprocess.num_crops=2"]
    tiny = load_config("finetune/tiny", ["train.batch_size=1", "preprocess.num_crops=1", "preprocess.roi_size=32"])
    assert fitting_setting(tiny, GIB, None) == ([], "none smaller than one 32^3 crop: try model.use_checkpoint=true "
                                                    "or a smaller model.feature_size")


@pytest.mark.parametrize("err, oom", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                  "tried to allocate 4000000000000 bytes. Error code 12 (Cannot allocate memory)"), True),
    (MemoryError(), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
    (ValueError("out of range"), False),
])
def test_what_counts_as_out_of_memory(err, oom):
    assert is_out_of_memory(err) is oom


def fake_probes(monkeypatch, peak_of, out_of_memory_above=None, after=None):
    """Probes that 'measure' peak_of(crops) in training (and ``after``: {phase: bytes} after the steps,
    for the probe at the config's crops) and 2 s/step; more crops than ``out_of_memory_above`` run out."""
    calls = []

    def probe(spec, tmp):
        cfg = from_dict(Config, spec["config"])
        crops = cfg.train.batch_size * cfg.preprocess.num_crops
        calls.append(crops)
        t = cfg.train
        # The config's probe does what the run does after its last step; the fit's probes only train.
        main = Path(t.out).name == "runs"
        assert (t.steps, t.val_every, t.checkpoint_every) == ((3, 3, 3) if main else (3, 0, 0))
        if out_of_memory_above is not None and crops > out_of_memory_above:
            raise est.FreshProcessFailed("out of memory at step 1 of 3 on cpu", out_of_memory=True)
        phases = {"training": peak_of(crops), **((after or {}) if main else {})}
        return {"peak": max(phases.values()), "phases": phases, "phase_s": {"validation": 30.0} if after else {},
                "validated": "big (400x400x300 voxels)" if after else "", "classes": 2, "checkpoint_bytes": 0,
                "step_s": 2.0, "data_s": 0.1, "cpu_s": 3.9, "times": [5.0, 2.0, 2.0]}

    monkeypatch.setattr(est, "run_probe", probe)
    return calls


def test_a_budget_adds_a_probe_at_one_crop_and_reads_the_fit(tmp_path, monkeypatch):
    calls = fake_probes(monkeypatch, lambda crops: (1 + 0.5 * crops) * GIB)
    cfg = load_config("finetune/tiny", [f"data={tmp_path}", "train.batch_size=2", "preprocess.num_crops=2"])
    plain = est.estimate(cfg, "finetune", "cpu")
    assert calls == [4] and plain.fit is None and plain.peak == 3 * GIB and plain.seconds == 2.0
    calls.clear()
    found = est.estimate(cfg, "finetune", "cpu", budget_gib=4.2)
    assert calls == [4, 1]  # the config's crops, then one
    assert found.fit.base == pytest.approx(GIB) and found.fit.per_crop == pytest.approx(0.5 * GIB)
    assert found.batch.overrides == ["train.batch_size=3"]  # 1 + 3 x 2 x 0.5 = 4 GiB
    assert found.roi.overrides == ["preprocess.roi_size=64"]  # 96^3: 1 + 4 x 0.5 x (96/64)^3 = 7.75 GiB
    calls.clear()
    one = load_config("finetune/tiny", [f"data={tmp_path}", "train.batch_size=1", "preprocess.num_crops=1"])
    assert est.estimate(one, "finetune", "cpu", budget_gib=4.0).fit is not None and calls == [1, 2]


def test_a_probe_that_runs_out_of_memory_gives_the_peak_from_smaller_ones(tmp_path, monkeypatch):
    calls = fake_probes(monkeypatch, lambda crops: (2 + 3 * crops) * GIB, out_of_memory_above=2)
    cfg = load_config("pretrain/swin_unetr", [f"data={tmp_path}", "train.accelerator=cpu"])  # 2 x 2 crops
    monkeypatch.setattr(est, "device_memory", lambda device: 12 * GIB)
    found = est.estimate(cfg, "pretrain", "cpu")
    assert calls == [4, 1, 2]
    assert found.peak == pytest.approx(14 * GIB) and not found.timed
    assert found.batch.overrides == ["train.batch_size=1", "train.accumulate=2"]  # 2 + 2 x 3 = 8 GiB
    line = found.line()
    assert line.startswith("estimate: peak 14.0 GiB resident, s/step not measured (out of memory) on cpu")
    assert "expect out of memory, train.batch_size=1 train.accumulate=2 (about 8.0 GiB) fits" in line


def test_the_peak_is_the_worst_phase_and_each_phase_is_reported(tmp_path, monkeypatch):
    after = {"validation": 5 * GIB, "checkpoint": 2.5 * GIB}
    fake_probes(monkeypatch, lambda crops: 2 * GIB, after=after)
    cfg = load_config("finetune/tiny", [f"data={tmp_path}", "train.steps=200", "train.val_every=50"])
    found = est.estimate(cfg, "finetune", "cpu")
    assert found.phases == {"training": 2 * GIB, **after} and found.peak == 5 * GIB
    assert found.summary() == ("peak 5.0 GiB resident (training 2.0, validation 5.0, checkpoint 2.5), "
                               "2 s/step on cpu")
    text = "\n".join(found.report())
    assert "  peak memory  5.0 GiB resident" in text
    assert ("  by phase     training 2.0 GiB, validation 5.0 GiB, checkpoint 2.5 GiB; validated big "
            "(400x400x300 voxels)") in text
    assert "plus 4 validations (each 30 s for big (400x400x300 voxels) alone)" in text
    assert "then its validation, checkpoint once" in text
    assert found.to_dict()["phases"] == found.phases
    # A budget the validation alone exceeds: no batch or ROI of training can fit it.
    squeezed = est.estimate(cfg, "finetune", "cpu", budget_gib=4)
    assert squeezed.batch is None and squeezed.roi is None
    assert any("the validation alone peaks at 5.0 GiB, above 4.0 GiB" in note for note in squeezed.notes)


@pytest.mark.skipif(not est._resettable_high_water_mark(), reason="needs Linux's resettable VmHWM")
def test_phase_meter_gives_each_phase_its_own_peak():
    import numpy as np

    size = 200 * 2**20
    meter = est.PhaseMeter("cpu")
    with meter.phase("validation"):
        block = np.ones(size // 8)  # touched: resident
        del block
    with meter.phase("checkpoint"):
        pass
    phases = meter.finish()
    assert list(phases) == ["training", "validation", "checkpoint"]
    # the checkpoint does not inherit its peak (the training phase's peak is this test session's history
    # before the meter, which earlier tests may have raised above the block: not compared here)
    assert phases["validation"] - phases["checkpoint"] > 0.9 * size
    assert set(meter.seconds) == {"validation", "checkpoint"}


def write_case(folder: Path, name: str, shape, spacing=(1.0, 1.0, 1.0)) -> dict:
    """A CT body (air outside, a labelled block inside) of ``shape`` at ``spacing``: its dataset entry."""
    import nibabel as nib
    import numpy as np

    image = np.full(shape, -1000.0, np.float32)
    body = tuple(slice(2, n - 2) for n in shape)
    image[body] = 40.0
    label = np.zeros(shape, np.uint8)
    label[tuple(slice(n // 3, n // 3 + max(2, n // 4)) for n in shape)] = 1
    image[label == 1] = 90.0
    affine = np.diag([*spacing, 1.0])
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, affine), str(folder / f"{name}_image.nii.gz"))
    nib.save(nib.Nifti1Image(label, affine), str(folder / f"{name}_label.nii.gz"))
    return {"image": f"{name}_image.nii.gz", "label": f"{name}_label.nii.gz"}


def test_a_large_validation_volume_is_the_estimates_peak_and_the_checkpoint_is_measured(tmp_path):
    """Training on 32^3 crops of small volumes; validation by sliding window over a 192x192x96
    volume: the validation phase is the peak, above training by at least the volume's logits and
    prediction (16 bytes a voxel for 2 classes), and one checkpoint is written and measured."""
    big = (192, 192, 96)
    entries = [write_case(tmp_path / "data", f"small{i}", (40, 36, 28)) for i in range(2)]
    validation = [write_case(tmp_path / "data", "mid", (64, 64, 64)), write_case(tmp_path / "data", "big", big)]
    (tmp_path / "data" / "dataset.json").write_text(json.dumps({
        "modality": {"0": "CT"}, "labels": {"0": "background", "1": "block"}, "training": entries,
        "validation": validation}))
    cfg = load_config("finetune/tiny", [f"data={tmp_path / 'data' / 'dataset.json'}", *TINY,
                                        "preprocess.spacing=null", "finetune.overlap=0", "finetune.sw_batch_size=4",
                                        "train.batch_size=1", "train.val_every=50", "train.checkpoint_every=50",
                                        f"train.out={tmp_path / 'runs'}"])
    found = est.estimate(cfg, "finetune", "cpu", steps=2)
    assert list(found.phases) == ["training", "validation", "checkpoint"]
    assert found.peak == found.phases["validation"] == max(found.phases.values())
    assert found.peak - found.phases["training"] > 16 * math.prod(big)
    assert found.validated == "big (192x192x96 voxels), the largest of 2"
    assert found.phase_s["validation"] > 0 and found.phase_s["checkpoint"] > 0
    from swinssl.nn import build_network

    weights = sum(p.numel() for p in build_network(cfg.model, out_channels=2).parameters()) * 4
    assert found.checkpoint_bytes > 3 * weights  # the weights and AdamW's two moments
    assert found.classes == 2


# --- the largest validation volume and the cache's disk, from headers ------------------------------------


@pytest.mark.parametrize("affine, spacing", [
    (np.diag([0.7, 0.9, 3.0, 1.0]), (1.5, 1.5, 2.0)),
    (np.array([[0, 0, 2.5, 5.0], [-0.8, 0, 0, 3.0], [0, 1.1, 0, -4.0], [0, 0, 0, 1]]), (1.0, 2.0, 1.5)),
    (np.array([[-1.2, 0, 0, 0], [0, -1.2, 0, 0], [0, 0, 4.0, 0], [0, 0, 0, 1]]), None),
])
def test_preprocessed_shape_from_the_header_is_monais(tmp_path, affine, spacing):
    import nibabel as nib
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, Spacingd

    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((37, 23, 11), np.float32), affine), str(path))
    pre = load_config("finetune/ct", ["preprocess.spacing=null" if spacing is None else
                                      f"preprocess.spacing=[{spacing[0]},{spacing[1]},{spacing[2]}]"]).preprocess
    steps = [LoadImaged("image"), EnsureChannelFirstd("image"), Orientationd("image", axcodes="RAS", labels=None)]
    if spacing is not None:
        steps.append(Spacingd("image", pixdim=spacing))
    assert est.preprocessed_shape(path, pre) == tuple(Compose(steps)({"image": str(path)})["image"].shape[1:])


def forbid_voxel_reads(monkeypatch):
    """Any read of voxels (swinssl's readers, MONAI's loader, nibabel's arrays) or hash of a file fails."""
    import nibabel as nib
    from monai.transforms import LoadImage

    import swinssl.data.checksums as checksums
    import swinssl.data.io as io

    def refuse(*args, **kwargs):
        raise AssertionError("voxels read")

    for module, name in [(io, "read_volume"), (io, "read_image"), (io, "read_label"), (LoadImage, "__call__"),
                         (nib.arrayproxy.ArrayProxy, "__array__"), (nib.arrayproxy.ArrayProxy, "__getitem__"),
                         (checksums, "sha256_file")]:
        monkeypatch.setattr(module, name, refuse)


def test_the_largest_validation_volume_is_chosen_from_headers_after_resampling(tmp_path, monkeypatch):
    from swinssl.data.discover import find_dataset

    # "wide" has more voxels in its file; "deep" more after resampling to 1 mm (its 5 mm slices become 96).
    entries = [write_case(tmp_path, "wide", (100, 100, 10)), write_case(tmp_path, "deep", (50, 50, 20), (1, 1, 5)),
               write_case(tmp_path, "small", (20, 20, 20))]
    (tmp_path / "dataset.json").write_text(json.dumps({"training": entries}))
    cases = find_dataset(tmp_path / "dataset.json").cases
    forbid_voxel_reads(monkeypatch)
    pre = load_config("finetune/ct", ["preprocess.spacing=[1,1,1]"]).preprocess
    assert [c.case_id for c in est.largest_cases(cases, pre)] == ["deep"]
    assert [c.case_id for c in est.largest_cases(cases, pre, 2)] == ["wide", "deep"]  # their order kept
    own = load_config("finetune/ct", ["preprocess.spacing=null"]).preprocess
    assert [c.case_id for c in est.largest_cases(cases, own)] == ["wide"]


@pytest.fixture
def two_volumes(tmp_path):
    """Two labelled volumes of known grids: a (40, 30, 20) at (1, 1, 2) mm and b (51, 51, 10) at
    (0.5, 0.5, 4) mm; at 1 mm, (40, 30, 39) = 46,800 and (26, 26, 37) = 25,012 voxels."""
    entries = [write_case(tmp_path / "data", "a", (40, 30, 20), (1, 1, 2)),
               write_case(tmp_path / "data", "b", (51, 51, 10), (0.5, 0.5, 4))]
    (tmp_path / "data" / "dataset.json").write_text(json.dumps({
        "modality": {"0": "CT"}, "labels": {"0": "background", "1": "block"}, "training": entries}))
    return tmp_path / "data" / "dataset.json"


VOXELS = 46_800 + 25_012


def at_1mm(data, preset, *more):
    return load_config(preset, [f"data={data}", "preprocess.spacing=[1,1,1]", "train.val_fraction=0.5", *more])


def test_cache_disk_is_voxels_times_bytes_from_headers_alone(two_volumes, monkeypatch):
    forbid_voxel_reads(monkeypatch)
    finetune = est.cache_usage(at_1mm(two_volumes, "finetune/tiny"), "finetune")
    assert (finetune.volumes, finetune.uncounted, finetune.dtype) == (2, 0, "float32")
    assert finetune.bytes == VOXELS * (4 + 1)  # float32 image + a uint8 label
    half = est.cache_usage(at_1mm(two_volumes, "finetune/tiny", "data.cache_dtype=float16"), "finetune")
    assert half.bytes == VOXELS * (2 + 1)
    pretrain = est.cache_usage(at_1mm(two_volumes, "pretrain/swin_unetr_tiny"), "pretrain")
    assert pretrain.bytes == VOXELS * 4  # images only: pre-training never reads labels
    pretrain_half = est.cache_usage(at_1mm(two_volumes, "pretrain/swin_unetr_tiny", "data.cache_dtype=float16"),
                                    "pretrain")
    assert pretrain_half.bytes == pretrain.bytes / 2
    two_channels = est.cache_usage(at_1mm(two_volumes, "pretrain/swin_unetr_tiny", "model.in_channels=2"), "pretrain")
    assert two_channels.bytes == 2 * pretrain.bytes
    assert finetune.cached == 0 and finetune.line() == (
        f"cache: at most {est.gib(VOXELS * 5)} for 2 volumes in {finetune.root} (none of it there yet), float32 images")


def test_cache_disk_counts_the_entries_already_there(two_volumes, tmp_path, monkeypatch):
    from swinssl.data.discover import find_dataset
    from swinssl.data.prepare import stage_head
    from swinssl.data.transforms import case_item

    cfg = at_1mm(two_volumes, "finetune/tiny", f"train.out={tmp_path / 'runs'}")
    head = stage_head(cfg, "finetune", tmp_path / "runs" / "cache", [0, 1])
    first = find_dataset(two_volumes).cases[0]
    head(case_item(first))  # preprocess one volume into the cache
    entry = next((tmp_path / "runs" / "cache" / "entries").iterdir())
    size = sum(f.stat().st_size for f in entry.iterdir())
    forbid_voxel_reads(monkeypatch)
    usage = est.cache_usage(cfg, "finetune")
    assert (usage.cached, usage.cached_volumes) == (size, 1)
    assert f"({est.gib(size)} already there, 1 of the volumes)" in usage.line()
    # A float16 cache is another set of entries: none of them there.
    assert est.cache_usage(at_1mm(two_volumes, "finetune/tiny", f"train.out={tmp_path / 'runs'}",
                                  "data.cache_dtype=float16"), "finetune").cached == 0
    off = est.cache_usage(at_1mm(two_volumes, "finetune/tiny", "data.cache=off"), "finetune")
    assert off.line().startswith("cache: off")


def test_swinssl_estimate_prints_the_cache_line(two_volumes, tmp_path, monkeypatch):
    monkeypatch.setattr(est, "_estimate_training", lambda *args: fake_estimate(stage="finetune", fit=None))
    result = runner.invoke(app, ["estimate", "--stage", "finetune", f"data={two_volumes}", "preprocess.spacing=[1,1,1]",
                                 "train.val_fraction=0.5", f"train.out={tmp_path / 'runs'}", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert f"cache: at most {est.gib(VOXELS * 5)} for 2 volumes in {tmp_path / 'runs' / 'cache'}" in result.output


# --- the line at start ----------------------------------------------------------------------------------------


def fake_estimate(**changes):
    values = dict(stage="pretrain", device="cpu", peak=3.1 * GIB, seconds=4.2, steps=1000, device_memory=32 * GIB,
                  probe_steps=3, probe_s=20.0, crops=4, fit=Fit(GIB, 0.5 * GIB, (64, 64, 64)))
    values.update(changes)
    return est.Estimate(**values)


def test_pretrain_prints_the_estimate_at_start_and_hands_it_to_the_run(tmp_path, monkeypatch):
    import swinssl.engine.pretrain

    asked, seen = [], []
    monkeypatch.setattr(est, "estimate", lambda cfg, stage, device: asked.append((stage, device)) or fake_estimate())
    monkeypatch.setattr(swinssl.engine.pretrain, "pretrain",
                        lambda cfg=None, **kw: seen.append(kw.get("start_estimate")) or tmp_path / "run")
    result = runner.invoke(app, ["pretrain", f"data={tmp_path}", "train.accelerator=cpu", "train.steps=1000"])
    assert result.exit_code == 0, result.output
    assert asked == [("pretrain", "cpu")]
    assert ("estimate: peak 3.1 GiB resident, 4.2 s/step on cpu -> about 1.2 h for 1000 steps "
            "(swinssl estimate measured 3 steps)") in result.output.splitlines()
    hint = seen[0]
    assert hint["summary"] == "peak 3.1 GiB resident, 4.2 s/step on cpu" and hint["fit"]["per_crop"] == 0.5 * GIB

    asked.clear()
    result = runner.invoke(app, ["pretrain", f"data={tmp_path}", "--no-estimate"])
    assert result.exit_code == 0 and asked == [] and "estimate:" not in result.output


def test_finetune_estimate_says_when_the_run_will_not_fit(tmp_path, monkeypatch):
    import swinssl.engine.finetune

    over = fake_estimate(stage="finetune", peak=40 * GIB)
    over.batch = largest_batch(over.fit, over.device_memory, 80, 1)
    monkeypatch.setattr(est, "estimate", lambda cfg, stage, device: over)
    monkeypatch.setattr(swinssl.engine.finetune, "finetune", lambda cfg=None, **kw: tmp_path / "run")
    result = runner.invoke(app, ["finetune", f"data={tmp_path}", "train.accelerator=cpu"])
    assert result.exit_code == 0, result.output
    assert ("more than the 32.0 GiB the cpu has: expect out of memory, train.batch_size=62 train.accumulate=2 "
            "(about 32.0 GiB) fits") in result.output


def test_a_failed_probe_does_not_stop_the_run(tmp_path, monkeypatch):
    import swinssl.engine.pretrain

    def fails(cfg, stage, device):
        raise est.FreshProcessFailed("the probe process was killed (SIGKILL), most likely by the system for want of "
                              "memory", out_of_memory=True)

    monkeypatch.setattr(est, "estimate", fails)
    monkeypatch.setattr(swinssl.engine.pretrain, "pretrain", lambda cfg=None, **kw: tmp_path / "run")
    result = runner.invoke(app, ["pretrain", f"data={tmp_path}", "train.accelerator=cpu"])
    assert result.exit_code == 0 and "estimate: not available (the probe process was killed" in result.output
    # A config or data problem is the run's to report, once.
    monkeypatch.setattr(est, "estimate", lambda *a: (_ for _ in ()).throw(est.FreshProcessFailed("bad", exit_code=3)))
    result = runner.invoke(app, ["pretrain", f"data={tmp_path}", "train.accelerator=cpu"])
    assert result.exit_code == 0 and "estimate: not available" not in result.output


# --- out of memory during a run ---------------------------------------------------------------------------------

TINY = ["model.feature_size=12", "model.depths=[1,1,1,1]", "preprocess.roi_size=32", "preprocess.num_crops=1",
        "train.num_workers=0", "train.log_every=1", "train.val_every=0", "train.checkpoint_every=1",
        "train.warmup_steps=1", "train.steps=3", "train.batch_size=2"]



def run_out_of_memory_at_step_3(monkeypatch, error):
    from swinssl.engine.runner import Runner

    step = Runner.step

    def step_3_runs_out(self, batches, index):
        if index == 2:
            raise error
        return step(self, batches, index)

    monkeypatch.setattr(Runner, "step", step_3_runs_out)


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried "
                 "to allocate 21474836480 bytes. Error code 12 (Cannot allocate memory)"),
])
def test_out_of_memory_ends_the_run_with_one_line_and_keeps_the_checkpoint(small_phantoms, tmp_path, monkeypatch,
                                                                             error):
    from swinssl.checkpoint import read_checkpoint
    from swinssl.engine.finetune import finetune

    run_out_of_memory_at_step_3(monkeypatch, error)
    cfg = load_config("finetune/tiny", [f"data={small_phantoms}", f"train.out={tmp_path}", "train.name=r", *TINY])
    with pytest.raises(TrainingError) as caught:
        finetune(cfg, progress=False)
    line = str(caught.value)
    run = tmp_path / "r"
    assert "\n" not in line
    assert line.startswith("out of memory at step 3 of 3 on cpu (")
    assert "no estimate was made at start" in line
    assert "a setting that fits: train.batch_size=1 train.accumulate=2" in line
    assert (f"(check: swinssl estimate --stage finetune --config {run / 'config.yaml'} train.batch_size=1 "
            "train.accumulate=2 --device cpu --memory-budget ") in line
    assert line.endswith(f"the last good checkpoint is {run / 'checkpoints' / 'last.pt'}")
    assert read_checkpoint(run / "checkpoints" / "last.pt")["step"] == 2  # the one before, intact


def test_out_of_memory_through_the_cli_names_the_estimate_made_at_start(small_phantoms, tmp_path, monkeypatch):
    run_out_of_memory_at_step_3(monkeypatch, torch.OutOfMemoryError("CUDA out of memory"))
    big = fake_estimate(stage="finetune", peak=30 * GIB, fit=Fit(0.5 * GIB, 100 * GIB, (32, 32, 32)))
    monkeypatch.setattr(est, "estimate", lambda cfg, stage, device: big)
    monkeypatch.setattr("swinssl.engine.memory.device_memory", lambda device: 150 * GIB)
    result = runner.invoke(app, ["finetune", f"data={small_phantoms}", f"train.out={tmp_path}", "train.name=r", *TINY])
    assert result.exit_code == 4, result.output
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "Traceback" not in result.output
    assert error[0].startswith("error: out of memory at step 3 of 3 on cpu (150.0 GiB); the estimate at start: "
                               "peak 30.0 GiB resident, 4.2 s/step on cpu; a setting that fits: train.batch_size=1 "
                               "train.accumulate=2 (about 100.5 GiB)"), error[0]


def test_other_errors_in_a_step_keep_their_traceback(small_phantoms, tmp_path, monkeypatch):
    from swinssl.engine.finetune import finetune

    run_out_of_memory_at_step_3(monkeypatch, RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    cfg = load_config("finetune/tiny", [f"data={small_phantoms}", f"train.out={tmp_path}", "train.name=r", *TINY])
    with pytest.raises(RuntimeError, match="mat1 and mat2"):
        finetune(cfg, progress=False)


def test_runs_log_step_and_data_seconds(small_phantoms, tmp_path):
    from swinssl.engine.finetune import finetune
    from swinssl.runs import read_metrics

    cfg = load_config("finetune/tiny", [f"data={small_phantoms}", f"train.out={tmp_path}", "train.name=r", *TINY,
                                        "train.steps=2", "train.checkpoint_every=0"])
    rows = read_metrics(finetune(cfg, progress=False))
    step_s = [r["value"] for r in rows if r["name"] == "step_s"]
    cpu_s = [r["value"] for r in rows if r["name"] == "cpu_s"]
    data_s = [r["value"] for r in rows if r["name"] == "data_s"]
    assert len(step_s) == len(cpu_s) == len(data_s) == 2
    assert all(s > 0 for s in step_s + cpu_s) and all(d >= 0 for d in data_s)


# --- a real estimate against a real run ---------------------------------------------------------------------------


def measured_run(command: list[str], run_dir: Path) -> tuple[float, float]:
    """(peak resident bytes of the process, median step_s after the first) of a real CLI run."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    out, err = process.communicate()
    assert process.returncode == 0, err.decode()[-2000:]
    from swinssl.runs import read_metrics

    step_s = [r["value"] for r in sorted(read_metrics(run_dir), key=lambda r: r["step"]) if r["name"] == "step_s"]
    return usage.ru_maxrss * 1024, statistics.median(step_s[1:])


@pytest.mark.slow
def test_tiny_estimate_is_within_a_quarter_of_a_real_three_step_run(tmp_path):
    from swinssl.data.phantom import write_phantom_dataset

    data = write_phantom_dataset(tmp_path / "data", cases=4, size=64, seed=0)
    overrides = [f"data={data}", "train.num_workers=0"]
    cfg = load_config("pretrain/swin_unetr_tiny", overrides)
    predicted = est.estimate(cfg, "pretrain", "cpu")
    peak, step_s = measured_run([sys.executable, "-m", "swinssl.cli", "pretrain", "--no-estimate", *overrides,
                                 f"train.out={tmp_path / 'runs'}", "train.name=real", "train.steps=3",
                                 "train.log_every=1"], tmp_path / "runs" / "real")
    assert predicted.peak == pytest.approx(peak, rel=0.25)
    assert predicted.seconds == pytest.approx(step_s, rel=0.25)


def test_the_predict_estimate_defaults_to_predicts_window_batch_and_the_configs_overlap(monkeypatch):
    import swinssl.infer.volume as volume

    seen = {}

    def fake(cfg, stage, device, budget, steps, shape=None, overlap=None, sw_batch_size=None, disk=False):
        seen.update(overlap=overlap, sw_batch_size=sw_batch_size)
        raise est.ConfigError("stop here")

    monkeypatch.setattr(est, "estimate", fake)
    monkeypatch.setattr(volume.torch, "get_num_threads", lambda: 3)  # predict's rule: a window per thread
    monkeypatch.setattr(volume, "_available_memory", lambda: 2**40)
    runner.invoke(app, ["estimate", "--stage", "predict", "--device", "cpu", "finetune.overlap=0.7"])
    assert seen == {"overlap": 0.7, "sw_batch_size": 3}
    runner.invoke(app, ["estimate", "--stage", "predict", "--device", "cpu", "--overlap", "0.25", "--sw-batch-size", "2"])
    assert seen == {"overlap": 0.25, "sw_batch_size": 2}
