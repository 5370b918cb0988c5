"""The nnU-Net control arm of swinssl's studies: nnU-Net v2's own plans, network and trainer.

``run_nnunet_arm`` trains nnU-Net (the ``3d_fullres`` configuration of its default plans,
``nnUNetPlans``, and its default trainer on a short schedule, ``nnUNetTrainer_short``) on exactly the
training and validation cases swinssl chose, predicts the test cases, and returns the folder of
their masks, ``<case_id>.nii.gz``: the names ``swinssl evaluate`` pairs with the test labels.
Everything lives under ``out``::

    nnUNet_raw/Dataset900_swinssl/    imagesTr, labelsTr (training and validation cases), imagesTs (test), dataset.json
    nnUNet_preprocessed/...           nnU-Net's plans and preprocessed cases; splits_final.json (fold 0)
    nnUNet_results/...                the trained fold 0, its final validation
    nnUNet_predictions/               nnUNetv2_predict's output folder (masks move on once all are written)
    predictions/<case_id>.nii.gz      the test masks: the folder returned
    logs/<step>.log                   each nnU-Net command's output
    arm.json                          the cases, schedule, nnU-Net version, and wall seconds: plan_s, train_s
                                      (nnUNetv2_train: start-up, training and nnU-Net's final validation,
                                      summed over resumed attempts: the device time spent), predict_s

Each step runs one of nnU-Net's console commands in a subprocess: nnU-Net reads its three folders
into module globals when imported and starts worker pools, neither of which should reach the
caller. A step whose output is complete is skipped, so a stopped arm resumes where it stopped;
a training stopped midway continues from its ``checkpoint_latest.pth`` (``--c``). With ``progress``
nnU-Net's output also goes to stderr as it comes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from swinssl.data.discover import Case
from swinssl.data.io import read_volume
from swinssl.errors import ConfigError, DataError, DependencyError, SwinsslError
from swinssl.nnunet import SHORT_SCHEDULE, SHORT_SCHEDULE_ENV
from swinssl.nnunet.install import install, installed_nnunet
from swinssl.utils import atomic_path, atomic_write_text, writable_dir

# One dataset per arm folder, so the ID never meets another dataset's: any free ID would do.
DATASET_ID = 900
DATASET = f"Dataset{DATASET_ID}_swinssl"
CONFIGURATION, PLANS, TRAINER, FOLD = "3d_fullres", "nnUNetPlans", "nnUNetTrainer_short", 0
FILE_ENDING = ".nii.gz"
DEVICES = ("cpu", "cuda", "mps")  # nnU-Net's -device choices (a GPU is picked with CUDA_VISIBLE_DEVICES)
# On a CPU the network already uses every core; one augmentation worker and one export process keep
# up with it. On a GPU nnU-Net's own defaults (about a dozen workers) apply.
CPU_WORKERS = {"nnUNet_n_proc_DA": "1", "nnUNet_def_n_proc": "1"}
LOG_TAIL = 3  # lines of a failed command's log quoted in its error


class NnunetFailed(SwinsslError):
    """One of nnU-Net's commands failed; the message names it and ends with its log's last lines."""

    exit_code = 4


def run_nnunet_arm(train: Sequence[Case], validation: Sequence[Case], test: Sequence[Case], out: Path,
                   labels: Mapping[int, str], channel_names: Sequence[str], *, epochs: int | None = None,
                   iterations: int | None = None, val_iterations: int | None = None, device: str = "cpu",
                   progress: bool = True) -> Path:
    """Train nnU-Net's fold 0 on ``train`` (validated on ``validation``), predict ``test``; returns
    ``out/predictions`` holding ``<case_id>.nii.gz`` per test case (see the module docstring).

    ``labels``: class index -> name (empty: the values found in the training labels);
    ``channel_names``: one per image file of a case, as nnU-Net names them (``CT`` selects its CT
    normalisation; empty: the cases' modality). ``epochs`` / ``iterations`` / ``val_iterations``
    per epoch: ``nnUNetTrainer_short``'s schedule (None: its default, ``SHORT_SCHEDULE``).
    ``validation`` must not be empty: nnU-Net's fold needs validation cases, and taking some from
    ``train`` would train nnU-Net on fewer cases than the other arms.
    """
    out = writable_dir(out)
    schedule = _schedule(epochs, iterations, val_iterations)
    channel_names = _channel_names(channel_names, [*train, *validation, *test])
    _check_cases(train, validation, test, len(channel_names))
    if device not in DEVICES:
        raise ConfigError(f"device={device!r}: nnU-Net runs on one of {', '.join(DEVICES)}")
    _, version = installed_nnunet()
    install()  # nnU-Net finds nnUNetTrainer_short by name in its own package folder (idempotent)
    record = _claim(out / "arm.json", {
        "trainer": TRAINER, "plans": PLANS, "configuration": CONFIGURATION, "fold": FOLD, "dataset": DATASET,
        "epochs": schedule["num_epochs"], "iterations": schedule["num_iterations_per_epoch"],
        "val_iterations": schedule["num_val_iterations_per_epoch"],
        "labels": {str(k): v for k, v in sorted(labels.items())}, "channel_names": list(channel_names),
        "cases": {"train": [c.case_id for c in train], "validation": [c.case_id for c in validation],
                  "test": [c.case_id for c in test]}})
    record.update({"nnunet_version": version, "device": device})
    env = _environment(out, schedule, device)

    raw = out / "nnUNet_raw" / DATASET
    if not (raw / "dataset.json").is_file():
        write_raw_dataset(raw, [*train, *validation], test, labels, channel_names)

    preprocessed = out / "nnUNet_preprocessed" / DATASET
    if not _preprocessed(preprocessed, [*train, *validation]):
        record["plan_s"] = _run("plan", [_command("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID),
                                         "-c", CONFIGURATION, "-np", "1", "-npfp", "1",
                                         "--verify_dataset_integrity"], env, out, progress)
        _write_json(out / "arm.json", record)
    write_splits(preprocessed, [c.case_id for c in train], [c.case_id for c in validation])

    fold = out / "nnUNet_results" / DATASET / f"{TRAINER}__{PLANS}__{CONFIGURATION}" / f"fold_{FOLD}"
    if not (fold / "checkpoint_final.pth").is_file() or not (fold / "validation" / "summary.json").is_file():
        if (fold / "checkpoint_final.pth").is_file():
            resume = ["--val"]  # trained, stopped in the final validation: run only that
        elif (fold / "checkpoint_latest.pth").is_file():
            resume = ["--c"]
        else:
            resume = []
        seconds = _run("train", [_command("nnUNetv2_train"), str(DATASET_ID), CONFIGURATION, str(FOLD),
                                 "-tr", TRAINER, "-p", PLANS, "-device", device, *resume], env, out, progress)
        record["train_s"] = record.get("train_s", 0.0) + seconds  # device time, stopped attempts included
        _write_json(out / "arm.json", record)

    predictions = out / "predictions"
    wanted = [predictions / f"{c.case_id}{FILE_ENDING}" for c in test]
    if not all(p.is_file() for p in wanted):
        # nnU-Net writes into its own folder; the masks move on only once every one is written, so a
        # mask in `predictions` is never half a file and the step's output is complete or absent.
        staging = out / "nnUNet_predictions"
        # Test-time mirroring stays nnU-Net's default: it is part of nnU-Net's method, and on a CPU it
        # costs about 10 s per 64^3 volume more than without (8 passes per window), little next to training.
        record["predict_s"] = _run("predict", [
            _command("nnUNetv2_predict"), "-i", str(raw / "imagesTs"), "-o", str(staging), "-d", str(DATASET_ID),
            "-tr", TRAINER, "-p", PLANS, "-c", CONFIGURATION, "-f", str(FOLD), "-device", device,
            "-npp", "1", "-nps", "1", "--disable_progress_bar"], env, out, progress)
        predictions.mkdir(exist_ok=True)
        for path in wanted:
            if not (staging / path.name).is_file():
                raise NnunetFailed(f"nnUNetv2_predict wrote no {staging / path.name};"
                                   f" see {out / 'logs' / 'predict.log'}")
            os.replace(staging / path.name, path)
        _write_json(out / "arm.json", record)
    return predictions


# --------------------------------------------------------------------------------------------------
# Checking the request
# --------------------------------------------------------------------------------------------------


def _schedule(epochs: int | None, iterations: int | None, val_iterations: int | None) -> dict[str, int]:
    given = {"num_epochs": epochs, "num_iterations_per_epoch": iterations,
             "num_val_iterations_per_epoch": val_iterations}
    schedule = {k: SHORT_SCHEDULE[k] if v is None else v for k, v in given.items()}
    for key, value in schedule.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{SHORT_SCHEDULE_ENV[key]}: {value!r} is not a positive integer ({key})")
    return schedule


def _channel_names(channel_names: Sequence[str], cases: Sequence[Case]) -> list[str]:
    """The channel names given, else the cases' one modality (nnU-Net normalises a channel by its name)."""
    if channel_names:
        return [str(name) for name in channel_names]
    modalities = {c.modality for c in cases}
    if len(modalities) == 1 and None not in modalities:
        return [str(modalities.pop())]
    modality = "mixed" if len(modalities) > 1 else "unknown"
    raise ConfigError(f"channel_names: none given and the cases' modality is {modality}; pass one name per image "
                      "file, e.g. ['CT'] (nnU-Net normalises CT channels by name)")


def _check_cases(train: Sequence[Case], validation: Sequence[Case], test: Sequence[Case], channels: int) -> None:
    for what, cases in (("train", train), ("validation", validation), ("test", test)):
        if not cases:
            rule = " (nnU-Net's fold 0 is validated on them; the swinssl run's validation cases fit)" \
                if what == "validation" else ""
            raise ConfigError(f"{what}: no cases{rule}")
    seen: dict[str, str] = {}
    for what, cases in (("train", train), ("validation", validation), ("test", test)):
        for case in cases:
            if case.case_id in seen:
                raise ConfigError(f"case {case.case_id}: in {seen[case.case_id]} and in {what}; "
                                  "each case belongs to one")
            seen[case.case_id] = what
            if len(case.images) != channels:
                raise ConfigError(f"case {case.case_id}: {len(case.images)} image file(s), but {channels} channel "
                                  "name(s); nnU-Net needs one file per channel")
            if what != "test" and case.label is None:
                raise DataError(f"{case.images[0]}: {what} case {case.case_id} has no label")


def _claim(path: Path, request: dict) -> dict:
    """``arm.json``: this request, with what an earlier call recorded if it asked for the same. A
    folder holding an arm of other cases, classes or schedule is refused: its steps would be skipped."""
    if path.is_file():
        earlier = json.loads(path.read_text())
        differ = [key for key in request if earlier.get(key) != request[key]]
        if differ:
            raise ConfigError(f"{path.parent}: holds an nnU-Net arm of other {', '.join(differ)}; "
                              "give another folder or remove it")
        return {**earlier, **request}
    _write_json(path, request)
    return dict(request)


# --------------------------------------------------------------------------------------------------
# nnU-Net's raw dataset and split
# --------------------------------------------------------------------------------------------------


def write_raw_dataset(folder: Path, training: Sequence[Case], test: Sequence[Case], labels: Mapping[int, str],
                      channel_names: Sequence[str]) -> Path:
    """nnU-Net's raw dataset of the cases: ``imagesTr/<id>_0000.nii.gz`` (one file per channel),
    ``labelsTr/<id>.nii.gz``, ``imagesTs`` and ``dataset.json`` (written last: its presence means the
    folder is complete). NIfTI ``.nii.gz`` files are copied as they are; other formats (NRRD, ...)
    are read with swinssl's reader and written as NIfTI with the geometry it read; labels are
    integers. ``labels`` empty: the values found in the labels, named ``class_<n>``."""
    for split, cases in (("Tr", training), ("Ts", test)):
        for case in cases:
            for channel, image in enumerate(case.images):
                _write_volume(image, folder / f"images{split}" / f"{case.case_id}_{channel:04d}{FILE_ENDING}")
            if split == "Tr":
                _write_volume(case.label, folder / "labelsTr" / f"{case.case_id}{FILE_ENDING}", label=True)
    names = dict(labels) or {v: f"class_{v}" for v in _label_values(sorted((folder / "labelsTr").iterdir()))}
    names[0] = "background"  # nnU-Net's name for 0, whatever the dataset calls it
    by_name: dict[str, int] = {}
    for index, name in sorted(names.items()):
        if name in by_name:
            raise ConfigError(f"labels: classes {by_name[name]} and {index} are both named {name!r} "
                              "(nnU-Net names each class once; 0 is 'background')")
        by_name[name] = int(index)
    _write_json(folder / "dataset.json", {
        "name": DATASET.split("_", 1)[1], "channel_names": {str(i): n for i, n in enumerate(channel_names)},
        "labels": by_name, "numTraining": len(training), "file_ending": FILE_ENDING})
    return folder


def _write_volume(source: Path, path: Path, label: bool = False) -> None:
    if path.is_file():
        return  # written atomically by an earlier call
    path.parent.mkdir(parents=True, exist_ok=True)
    source = Path(source)
    if source.name.lower().endswith(".nii.gz") and (not label or _integer_nifti(source)):
        with atomic_path(path) as tmp:
            shutil.copyfile(source, tmp)
        return
    volume = read_volume(source)
    data, affine = np.asarray(volume.as_tensor())[0], np.asarray(volume.affine, dtype=np.float64)
    if label:
        rounded = np.round(data)
        if not np.array_equal(rounded, data):
            raise DataError(f"{source}: label has non-integer values")
        data = rounded.astype(np.uint8 if rounded.min() >= 0 and rounded.max() <= 255 else np.int32)
    _save_nifti(data, affine, path)


def _integer_nifti(path: Path) -> bool:
    import nibabel as nib

    return np.dtype(nib.load(str(path)).get_data_dtype()).kind in "iu"


def _save_nifti(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    import nibabel as nib

    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)  # both forms, so that nnU-Net's SimpleITK reads the same geometry
    image.set_sform(affine, code=1)
    image.set_data_dtype(data.dtype)
    with atomic_path(path) as tmp:
        nib.save(image, tmp)


def _label_values(paths: Sequence[Path]) -> list[int]:
    import nibabel as nib

    values: set[int] = {0}
    for path in paths:
        values |= {int(v) for v in np.unique(np.asarray(nib.load(str(path)).dataobj))}
    return sorted(values)


def write_splits(preprocessed: Path, train_ids: Sequence[str], validation_ids: Sequence[str]) -> Path:
    """``splits_final.json`` with one fold, 0: nnU-Net reads it instead of making its own 5-fold split."""
    path = preprocessed / "splits_final.json"
    splits = [{"train": list(train_ids), "val": list(validation_ids)}]
    if not path.is_file() or json.loads(path.read_text()) != splits:
        _write_json(path, splits)
    return path


def _preprocessed(folder: Path, cases: Sequence[Case]) -> bool:
    """nnU-Net's plans and every case preprocessed (a case's ``.pkl`` is written after its arrays)."""
    data = folder / f"{PLANS}_{CONFIGURATION}"
    return (folder / f"{PLANS}.json").is_file() and all((data / f"{c.case_id}.pkl").is_file() for c in cases)


# --------------------------------------------------------------------------------------------------
# Running nnU-Net's commands
# --------------------------------------------------------------------------------------------------


def _environment(out: Path, schedule: Mapping[str, int], device: str) -> dict[str, str]:
    env = {**(CPU_WORKERS if device == "cpu" else {}), **os.environ}  # the caller's worker counts win
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (out / name).mkdir(exist_ok=True)
        env[name] = str(out / name)
    env["nnUNet_compile"] = "f"  # nnU-Net compiles by default on a GPU: minutes of start-up, fragile
    env.update({SHORT_SCHEDULE_ENV[key]: str(value) for key, value in schedule.items()})
    return env


def _command(name: str) -> str:
    """An nnU-Net console command: beside this Python (its virtual environment), else on PATH."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.is_file() else shutil.which(name)
    if not found:
        raise DependencyError(f"{name}: nnU-Net's command is not installed beside {sys.executable} nor on PATH "
                              "(pip install 'swinssl[nnunet]')")
    return found


def _run(step: str, command: list[str], env: Mapping[str, str], out: Path, progress: bool) -> float:
    """Run one nnU-Net command, its output into ``out/logs/<step>.log`` (and onto stderr with
    ``progress``); its wall seconds. ``NnunetFailed`` when it fails."""
    log = out / "logs" / f"{step}.log"
    log.parent.mkdir(exist_ok=True)
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        f.write(" ".join(command) + "\n")
        f.flush()
        # Its own process group: stopping the caller stops nnU-Net and its worker processes too.
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(env),
                                   text=True, errors="replace", start_new_session=True)
        try:
            for line in process.stdout:  # type: ignore[union-attr]
                f.write(line)
                if progress:
                    sys.stderr.write(line)
            code = process.wait()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            process.wait()
            raise
    seconds = time.perf_counter() - started
    if code != 0:
        raise NnunetFailed(f"{Path(command[0]).name} failed (exit code {code}) after {seconds:.0f} s; "
                           f"{log}: {_tail(log)}")
    return seconds


def _tail(log: Path) -> str:
    """The log's last lines on one line (progress bars rewrite their line with carriage returns)."""
    lines = [part.strip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines()
             for part in line.split("\r") if part.strip()]
    return " | ".join(lines[-LOG_TAIL:])[-600:]


def _write_json(path: Path, content) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(content, indent=2) + "\n")
