"""Predicting an archive: parts (``--part I/N``), resuming by model fingerprint, the reader/network/
writer pipeline (swinssl.infer.cases, swinssl.results.PredictionFolder)."""

import fcntl
import json
import threading
import time

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import write_nifti
from torch import nn
from typer.testing import CliRunner

from swinssl import infer
from swinssl.cli import app
from swinssl.config import ModelConfig, PreprocessConfig, to_dict
from swinssl.errors import ConfigError, DataError
from swinssl.infer import PredictOptions, cases, predict
from swinssl.results import PredictionFolder

LPS_ANISO = np.array([[-0.8, 0, 0, 30.0], [0, -1.2, 0, 40.0], [0, 0, 3.0, -20.0], [0, 0, 0, 1]])
SHAPE = (48, 40, 16)
# One box per case, each somewhere else, so that masks swapped between cases would show.
BOXES = [np.s_[4:28, 22:38, 2:9], np.s_[20:44, 4:20, 6:14], np.s_[8:20, 8:30, 3:12], np.s_[30:46, 24:36, 1:7],
         np.s_[10:40, 12:26, 9:15]]
FAST = PredictOptions(cache="off")


class ThresholdNet(nn.Module):
    """Class 1 where the normalised input exceeds 0.55 (the box at +400 HU, not the body at -200 HU)."""

    def forward(self, x):
        score = (x[:, :1] - 0.55) * 20
        return torch.cat([-score, score], dim=1)


@pytest.fixture
def checkpoint(tmp_path, monkeypatch):
    """``checkpoint(name, label)``: a fine-tuning checkpoint whose network is ThresholdNet (known masks,
    no weights); another ``label`` gives other file bytes, so another model fingerprint."""
    monkeypatch.setattr(infer.model, "build_network", lambda cfg: ThresholdNet())

    def make(name="model.pt", label="box"):
        preprocess = PreprocessConfig(spacing=(2.0, 2.0, 2.0), crop_foreground=True, ct_window=(-1000.0, 1000.0),
                                      roi_size=(16, 16, 16))
        plan = {"network": {**to_dict(ModelConfig(feature_size=12, depths=(1, 1, 1, 1))), "out_channels": 2,
                            "patch_size": 2},
                "preprocess": to_dict(preprocess), "labels": {"0": "background", "1": label},
                "channel_names": ["image"], "modality": "CT"}
        path = tmp_path / name
        torch.save({"format": "swinssl", "kind": "finetune", "model": {}, "plan": plan}, path)
        return path

    return make


def write_cases(folder, count=len(BOXES)):
    """``count`` CT volumes (air, a body at -200 HU, a box at +400 HU); their paths."""
    paths = []
    for i, box in enumerate(BOXES[:count]):
        image = np.full(SHAPE, -1000.0, np.float32)
        image[2:-2, 2:-2, 1:-1] = -200.0
        image[box] = 400.0
        paths.append(write_nifti(folder / f"case_{i}.nii.gz", image, LPS_ANISO))
    return paths


def write_truncated(path):
    image = np.full(SHAPE, -200.0, np.float32)
    write_nifti(path, image, LPS_ANISO)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


@pytest.fixture
def networked(monkeypatch):
    """The case ids the network ran on, in order."""
    seen = []
    real = cases._labels

    def spy(model, plan, case, image, options, progress):
        seen.append(case.case_id)
        return real(model, plan, case, image, options, progress)

    monkeypatch.setattr(cases, "_labels", spy)
    return seen


def masks_of(folder):
    return {p.name: nib.load(p) for p in sorted(folder.glob("*.nii.gz"))}


def assert_same_masks(found, expected):
    assert sorted(found) == sorted(expected) and found
    for name in expected:
        assert np.array_equal(np.asarray(found[name].dataobj), np.asarray(expected[name].dataobj)), name
        np.testing.assert_array_equal(found[name].affine, expected[name].affine)


def stamps(folder):
    """Modification times of every file under ``folder`` but predictions.json and the lock."""
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*")
            if p.is_file() and p.name not in ("predictions.json", "lock")}


def warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


# --- parts --------------------------------------------------------------------------------------


def test_two_parts_into_one_folder_equal_a_single_run(tmp_path, checkpoint):
    model = checkpoint()
    inputs = [*write_cases(tmp_path / "in"), write_truncated(tmp_path / "in" / "truncated.nii.gz")]
    runner = CliRunner()
    # Given in another order than the other part's: the names' order splits them, not the inputs'.
    first = runner.invoke(app, ["predict", str(model), *map(str, reversed(inputs)), "-o", str(tmp_path / "split"),
                                "--part", "0/2", "--cache", "off"])
    assert first.exit_code == 0, first.output
    # The names in order, every second one from the first: part 0 is cases 0, 2, 4; the bad input is
    # named 'truncated', so it falls to part 1.
    assert sorted(p.name for p in (tmp_path / "split").glob("*.nii.gz")) == [f"case_{i}.nii.gz" for i in (0, 2, 4)]
    so_far = PredictionFolder(tmp_path / "split").read_record()
    assert sorted(so_far["predictions"]) == [str(inputs[i]) for i in (0, 2, 4)] and so_far["failed"] == {}
    second = runner.invoke(app, ["predict", str(model), str(tmp_path / "in"), "-o", str(tmp_path / "split"),
                                 "--part", "1/2", "--cache", "off"])
    assert second.exit_code == 0, second.output
    whole = predict(model, tmp_path / "in", tmp_path / "whole", FAST, progress=False)

    assert [p.name for p in whole] == [f"case_{i}.nii.gz" for i in range(5)]
    assert_same_masks(masks_of(tmp_path / "split"), masks_of(tmp_path / "whole"))
    split = PredictionFolder(tmp_path / "split").read_record()
    single = PredictionFolder(tmp_path / "whole").read_record()
    assert split["predictions"] == {str(i): str(tmp_path / "split" / i.name) for i in inputs[:5]}
    assert {s: o.replace("whole", "split") for s, o in single["predictions"].items()} == split["predictions"]
    assert list(split["failed"]) == list(single["failed"]) == [str(inputs[5])]  # a failure recorded by its part


def test_a_part_without_cases_is_said_and_writes_no_mask(tmp_path, checkpoint, caplog):
    write_cases(tmp_path / "in", count=2)
    with caplog.at_level("WARNING"):
        assert predict(checkpoint(), tmp_path / "in", tmp_path / "out", FAST, progress=False, part=(3, 4)) == []
    assert warnings(caplog) == ["part 3/4: none of the 2 case(s) falls to this part"]
    assert not list((tmp_path / "out").glob("*.nii.gz"))


@pytest.mark.parametrize("value", ["2/2", "0/0", "-1/2", "1", "a/b", "1/2/3"])
def test_bad_part_values_are_refused_with_one_line(tmp_path, value):
    result = CliRunner().invoke(app, ["predict", str(tmp_path), str(tmp_path), "-o", str(tmp_path / "out"),
                                      "--part", value])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: --part {value}") and "0 <= I < N" in lines[0], lines
    assert not (tmp_path / "out").exists()  # refused before anything is loaded or written


@pytest.mark.parametrize("part", [(2, 2), (-1, 2), (0, 0), (0.5, 2), ("0", "2")])
def test_predict_refuses_a_bad_part(tmp_path, part):
    with pytest.raises(ConfigError, match=r"part=.*0 <= I < N"):
        predict(tmp_path / "model.pt", tmp_path, tmp_path / "out", part=part)


# --- resuming -----------------------------------------------------------------------------------


def test_a_second_run_writes_nothing_and_runs_no_network(tmp_path, checkpoint, networked, caplog):
    model = checkpoint()
    write_cases(tmp_path / "in", count=3)
    first = predict(model, tmp_path / "in", tmp_path / "out", FAST, progress=False)
    assert networked == ["case_0", "case_1", "case_2"]
    before, networked[:] = stamps(tmp_path / "out"), []
    assert len(before) == 6  # 3 masks and their 3 records
    with caplog.at_level("WARNING"):
        again = predict(model, tmp_path / "in", tmp_path / "out", FAST, progress=False)
    assert networked == [] and stamps(tmp_path / "out") == before
    assert again == first
    assert warnings(caplog) == ["3 of 3 cases already predicted by this model; skipped (--overwrite predicts them "
                                "again)"]
    assert len(PredictionFolder(tmp_path / "out").read_record()["predictions"]) == 3
    # Neither the window batch, nor the device, nor the cache changes a mask.
    predict(model, tmp_path / "in", tmp_path / "out", PredictOptions(cache=tmp_path / "cache", sw_batch_size=3,
                                                                     device="cpu"), progress=False)
    assert networked == []


@pytest.mark.parametrize("change", [
    {"checkpoint": "other"}, {"overlap": 0.25}, {"roi_size": 24}, {"mode": "constant"}, {"flips": True},
    {"views": "swap_xy"}, {"output_format": "same"},
])
def test_another_model_or_option_predicts_again_and_says_so_once(tmp_path, checkpoint, networked, caplog, change):
    write_cases(tmp_path / "in", count=2)
    predict(checkpoint(), tmp_path / "in", tmp_path / "out", FAST, progress=False)
    networked.clear()
    model = checkpoint("other.pt", label="lesion") if "checkpoint" in change else checkpoint()
    options = PredictOptions(cache="off", **{k: v for k, v in change.items() if k != "checkpoint"})
    with caplog.at_level("WARNING"):
        predict(model, tmp_path / "in", tmp_path / "out", options, progress=False)
    assert networked == ["case_0", "case_1"]
    said = warnings(caplog)
    assert len(said) == 1 and "2 mask(s) made by another model, other options" in said[0], said
    networked.clear()
    predict(model, tmp_path / "in", tmp_path / "out", options, progress=False)  # and now they are this one's
    assert networked == []


def test_model_fingerprint_names_the_checkpoints_bytes_and_the_options_that_change_a_mask(tmp_path):
    first, second = tmp_path / "a.pt", tmp_path / "b.pt"
    first.write_bytes(b"weights")
    second.write_bytes(b"weights")
    base = PredictOptions(roi_size=(16, 16, 16), overlap=0.5, views="single")
    fingerprint = cases.model_fingerprint([first], base)
    assert cases.model_fingerprint([second], base) == fingerprint  # the content, not the path
    same = {"sw_batch_size": 7, "device": "cuda", "cache": "off"}
    for key, value in same.items():
        assert cases.model_fingerprint([first], PredictOptions(**{**vars(base), key: value})) == fingerprint, key
    changed = {"roi_size": (24, 24, 24), "overlap": 0.25, "mode": "constant", "flips": True, "views": "fused",
               "output_format": "same"}
    assert set(changed) == set(cases.FINGERPRINT_OPTIONS)
    for key, value in changed.items():
        assert cases.model_fingerprint([first], PredictOptions(**{**vars(base), key: value})) != fingerprint, key
    second.write_bytes(b"other weights")
    assert cases.model_fingerprint([second], base) != fingerprint
    assert cases.model_fingerprint([first, second], base) not in (fingerprint, cases.model_fingerprint([second], base))


def test_overwrite_predicts_every_case_again(tmp_path, checkpoint, networked, caplog):
    model = checkpoint()
    write_cases(tmp_path / "in", count=2)
    predict(model, tmp_path / "in", tmp_path / "out", FAST, progress=False)
    networked.clear()
    with caplog.at_level("WARNING"):
        predict(model, tmp_path / "in", tmp_path / "out", FAST, progress=False, overwrite=True)
    assert networked == ["case_0", "case_1"] and warnings(caplog) == []
    result = CliRunner().invoke(app, ["predict", str(model), str(tmp_path / "in"), "-o", str(tmp_path / "out"),
                                      "--cache", "off", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert networked == ["case_0", "case_1"] * 2 and "2 masks in" in result.output


def test_a_mask_without_its_record_is_predicted_again(tmp_path, checkpoint, networked, caplog):
    model = checkpoint()
    write_cases(tmp_path / "in", count=3)
    predict(model, tmp_path / "in", tmp_path / "out", FAST, progress=False)
    PredictionFolder(tmp_path / "out").case_record_file("case_1").unlink()  # stopped between mask and record
    networked.clear()
    with caplog.at_level("WARNING"):
        predict(model, tmp_path / "in", tmp_path / "out", FAST, progress=False)
    assert networked == ["case_1"]
    assert warnings(caplog)[0] == "2 of 3 cases already predicted by this model; skipped (--overwrite predicts them again)"
    assert "1 mask(s) made by another model" in warnings(caplog)[1]


def test_a_record_without_its_mask_is_predicted_again(tmp_path, checkpoint, networked):
    model = checkpoint()
    write_cases(tmp_path / "in", count=2)
    predict(model, tmp_path / "in", tmp_path / "out", FAST, progress=False)
    (tmp_path / "out" / "case_0.nii.gz").unlink()  # removed by the user
    networked.clear()
    predict(model, tmp_path / "in", tmp_path / "out", FAST, progress=False)
    assert networked == ["case_0"] and (tmp_path / "out" / "case_0.nii.gz").is_file()


def test_predictions_json_lists_only_what_this_model_made(tmp_path, checkpoint):
    inputs = write_cases(tmp_path / "in", count=3)
    predict(checkpoint(), tmp_path / "in", tmp_path / "out", FAST, progress=False)
    other = checkpoint("other.pt", label="lesion")
    predict(other, tmp_path / "in", tmp_path / "out", FAST, progress=False, part=(0, 2))  # cases 0 and 2 so far
    record = PredictionFolder(tmp_path / "out").read_record()
    assert record["checkpoint"] == str(other.resolve())
    assert sorted(record["predictions"]) == [str(inputs[0]), str(inputs[2])]  # not case 1, the first model's


def test_a_mask_of_another_input_under_the_same_name_is_predicted_again(tmp_path, checkpoint, networked):
    model = checkpoint()
    first = write_cases(tmp_path / "a", count=1)
    predict(model, first, tmp_path / "out", FAST, progress=False)
    networked.clear()
    second = write_cases(tmp_path / "b", count=1)  # another file, the same case id
    predict(model, second, tmp_path / "out", FAST, progress=False)
    assert networked == ["case_0"]
    assert PredictionFolder(tmp_path / "out").read_record()["predictions"] == {str(second[0]): str(tmp_path / "out" /
                                                                                                   "case_0.nii.gz")}


def test_a_run_stopped_while_writing_another_models_mask_leaves_it_to_be_predicted_again(tmp_path, checkpoint,
                                                                                          networked, monkeypatch):
    write_cases(tmp_path / "in", count=1)
    predict(checkpoint(), tmp_path / "in", tmp_path / "out", FAST, progress=False)
    other = checkpoint("other.pt", label="lesion")
    real_write, stop = cases.write_mask, [True]

    def stopped_once(mask, path):
        if stop.pop() if stop else False:
            raise KeyboardInterrupt  # the process is stopped while the new model's mask is written
        return real_write(mask, path)

    monkeypatch.setattr(cases, "write_mask", stopped_once)
    with pytest.raises(KeyboardInterrupt):
        predict(other, tmp_path / "in", tmp_path / "out", FAST, progress=False)
    networked.clear()
    predict(other, tmp_path / "in", tmp_path / "out", FAST, progress=False)
    assert networked == ["case_0"], "the old model's mask was kept as the new one's"


def test_predictions_json_is_assembled_under_the_folders_lock(tmp_path):
    folder = PredictionFolder(tmp_path)
    (tmp_path / "a.nii.gz").write_bytes(b"mask")
    folder.write_case("a", tmp_path / "in" / "a.nii.gz", "fp", mask="a.nii.gz")
    assembled = threading.Event()

    def assemble():
        folder.assemble_record("model", [tmp_path / "model.pt"], {"0": "background"}, {}, ["a"], "fp", {})
        assembled.set()

    with open(folder.case_records / "lock", "a") as held:  # another process assembling
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        worker = threading.Thread(target=assemble)
        worker.start()
        time.sleep(0.3)
        assert not assembled.is_set() and not folder.exists()
    worker.join(5)
    assert assembled.is_set()
    assert folder.read_record()["predictions"] == {str(tmp_path / "in" / "a.nii.gz"): str(tmp_path / "a.nii.gz")}


# --- the pipeline -------------------------------------------------------------------------------


def test_pipelined_masks_equal_sequential_ones_and_the_steps_overlap(tmp_path, checkpoint, monkeypatch):
    model = checkpoint()
    write_cases(tmp_path / "in")
    events, intra_op = [], set()
    second_read = threading.Event()  # set when a second case's preprocessing starts
    overlapped = []  # per written mask: had the next case's preprocessing started before it was written?

    def spy_of(step, real):
        def spy(*args, **kwargs):
            events.append((step, threading.current_thread().name))
            intra_op.add(torch.get_num_threads())
            if step == "_preprocessed" and sum(e[0] == "_preprocessed" for e in events) >= 2:
                second_read.set()
            if step == "_mask" and pipelining and not overlapped:
                # Scheduling-proof: the first write waits (bounded) for the reader to start the next case,
                # which only a pipeline can do while this case is still unwritten.
                overlapped.append(second_read.wait(30))
            return real(*args, **kwargs)
        return spy

    for step in ("_preprocessed", "_mask"):
        monkeypatch.setattr(cases, step, spy_of(step, getattr(cases, step)))
    pipelining = False
    in_turn = predict(model, tmp_path / "in", tmp_path / "in_turn", FAST, progress=False, pipeline=False)
    assert {thread for _, thread in events} == {"MainThread"}
    events.clear()
    intra_op.clear()
    second_read.clear()
    pipelining = True
    network_threads = torch.get_num_threads()
    monkeypatch.setattr(cases, "helper_threads", lambda device: network_threads + 1)
    pipelined = predict(model, tmp_path / "in", tmp_path / "pipelined", FAST, progress=False, pipeline=True)

    assert [p.name for p in pipelined] == [p.name for p in in_turn]
    assert_same_masks(masks_of(tmp_path / "pipelined"), masks_of(tmp_path / "in_turn"))
    records = [PredictionFolder(tmp_path / run).read_record() for run in ("in_turn", "pipelined")]
    assert list(records[0]["predictions"]) == list(records[1]["predictions"])
    assert set(events) == {("_preprocessed", "predict-read"), ("_mask", "predict-write")}
    assert overlapped == [True]  # the reader ran ahead: the second case was read before the first was written
    # The helpers ran on their own intra-op threads, and left the network's as they were.
    assert intra_op == {network_threads + 1} and torch.get_num_threads() == network_threads


def test_bad_inputs_in_any_step_of_the_pipeline_are_one_line_each_and_the_others_written(tmp_path, checkpoint,
                                                                                          caplog, monkeypatch):
    paths = write_cases(tmp_path / "in", count=3)
    write_truncated(tmp_path / "in" / "case_00_truncated.nii.gz")  # the reader's step
    image = np.full(SHAPE, -200.0, np.float32)
    image[3, 3, 3] = np.nan
    write_nifti(tmp_path / "in" / "case_0_nan.nii.gz", image, LPS_ANISO)
    real = cases._mask

    def misaligned(pipeline, data, labels, num_classes, source):  # the writer's step
        if source.name == "case_1.nii.gz":
            raise DataError(f"{source}: made up for the test")
        return real(pipeline, data, labels, num_classes, source)

    monkeypatch.setattr(cases, "_mask", misaligned)
    with caplog.at_level("WARNING"):
        written = predict(checkpoint(), tmp_path / "in", tmp_path / "out", FAST, progress=False, pipeline=True)

    assert [p.name for p in written] == ["case_0.nii.gz", "case_2.nii.gz"]
    said = warnings(caplog)
    assert len(said) == 3 and all("\n" not in line for line in said)
    assert any("case_00_truncated.nii.gz" in line and "cannot read" in line for line in said)
    assert any("case_0_nan.nii.gz" in line and "NaN" in line for line in said)
    assert any(line == f"skipped {paths[1]}: made up for the test" for line in said)
    record = PredictionFolder(tmp_path / "out").read_record()
    assert sorted(record["failed"]) == sorted(str(tmp_path / "in" / n) for n in
                                              ("case_00_truncated.nii.gz", "case_0_nan.nii.gz", "case_1.nii.gz"))
    assert sorted(record["predictions"]) == [str(paths[0]), str(paths[2])]


@pytest.mark.parametrize("step", ["_preprocessed", "_labels", "_mask"])
def test_an_unexpected_error_in_any_thread_stops_the_pipeline_and_is_raised(tmp_path, checkpoint, monkeypatch,
                                                                             step):
    write_cases(tmp_path / "in", count=4)
    real = getattr(cases, step)
    calls = []

    def fails_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError(f"a bug in {step}")
        return real(*args, **kwargs)

    monkeypatch.setattr(cases, step, fails_second)
    with pytest.raises(RuntimeError, match=f"a bug in {step}"):
        predict(checkpoint(), tmp_path / "in", tmp_path / "out", FAST, progress=False, pipeline=True)
    assert not {t.name for t in threading.enumerate()} & {"predict-read", "predict-write"}  # both ended
    assert len(calls) == 2  # stopped at the error, not run to the end
    left = sorted(p.name for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert all(not n.startswith(".") for n in left) and "predictions.json" not in left, left  # no temporary file
    for mask in (tmp_path / "out").glob("*.nii.gz"):  # what was written is whole and recorded
        nib.load(mask).get_fdata()
        assert PredictionFolder(tmp_path / "out").read_case(mask.name.removesuffix(".nii.gz")) is not None


def test_the_pipeline_is_the_default_where_the_network_leaves_cores_idle(monkeypatch):
    monkeypatch.setattr(cases.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(cases.torch, "get_num_threads", lambda: 2)
    assert not cases.overlap_by_default("cpu")  # the network takes both cores: helpers would only compete
    assert cases.overlap_by_default("cuda")
    assert (cases.helper_threads("cpu"), cases.helper_threads("cuda")) == (1, 2)  # the cores the network leaves
    monkeypatch.setattr(cases.torch, "get_num_threads", lambda: 1)
    assert cases.overlap_by_default("cpu") and cases.helper_threads("cpu") == 1
    monkeypatch.setattr(cases.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert cases.helper_threads("cpu") == 7


def test_predict_chooses_the_pipeline_by_default_as_overlap_by_default_says(tmp_path, checkpoint, monkeypatch):
    write_cases(tmp_path / "in", count=2)
    threads = set()
    real = cases._preprocessed
    monkeypatch.setattr(cases, "_preprocessed", lambda *a: threads.add(threading.current_thread().name) or real(*a))
    for overlapped in (True, False):
        threads.clear()
        monkeypatch.setattr(cases, "overlap_by_default", lambda device: overlapped)
        predict(checkpoint(), tmp_path / "in", tmp_path / str(overlapped), FAST, progress=False)
        assert threads == ({"predict-read"} if overlapped else {"MainThread"})
