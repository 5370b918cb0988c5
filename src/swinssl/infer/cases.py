"""Predicting cases and folders: options, one case in its input's geometry (by one model or an
ensemble), many cases to files.

An archive is predicted in parts and resumed. ``predict(..., part=(I, N))`` names the cases of
the whole input list (``output_names``, so a case's file never depends on the part), orders them
by name and takes every N-th from the I-th, as nnU-Net's ``-part_id/-num_parts``: N processes,
GPUs or machines given the same inputs and folder split them without talking to each other. A
case is skipped when its mask is there and its record (``PredictionFolder.write_case``, written
after the mask) names the same input and the same ``model_fingerprint``; a mask without a record
was being written when its process stopped, and is predicted again.

A case goes through three steps: read and preprocess (``_preprocessed``), the network
(``_labels``), invert and write (``_mask``, ``write_mask``). ``predict`` can overlap them: a
reader thread preprocesses the next cases into a queue of ``PIPELINE_DEPTH`` while the main
thread runs the network on the current one and a writer thread inverts and writes the previous
one, each helper on the intra-op threads the network leaves (``helper_threads``). That pays
where the network leaves something idle: a GPU's host cores, or CPU cores beyond the network's
intra-op threads. Where
the network's threads take every core, the helpers only compete with them (OpenMP threads
spin while they wait), so by default ``predict`` then runs the steps in turn
(``overlap_by_default``; ``benchmarks/predict_archive.py`` measures both on 2 cores).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import queue
import re
import sys
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from torch import nn
from tqdm import tqdm

from swinssl.data.checksums import file_checksum
from swinssl.data.discover import Case, find_dataset
from swinssl.data.transforms import Pipeline, case_item, inference_transforms, invert
from swinssl.errors import ConfigError, DataError, SwinsslError
from swinssl.infer.exported import exported_views, is_exported
from swinssl.infer.model import load_ensemble
from swinssl.infer.volume import predict_volume, window_batch
from swinssl.infer.write import OutputFormat, output_suffix, write_mask
from swinssl.methods import Method, check_views, method_of, window_predictor
from swinssl.plan import Plan
from swinssl.results import PredictionFolder
from swinssl.runtime import release_freed_memory
from swinssl.utils import count_windows, writable_dir

log = logging.getLogger(__name__)

GEOMETRY_TOLERANCE_MM = 1e-3
DEFAULT_OVERLAP = 0.5  # of a plan without one (trained before plans carried the fine-tuning's overlap)
# The options that change a mask, so part of its fingerprint; the window batch, device and cache do not.
FINGERPRINT_OPTIONS = ("roi_size", "overlap", "mode", "flips", "views", "output_format")
PIPELINE_DEPTH = 2  # preprocessed cases waiting for the network: each holds a whole volume in memory
_POLL_S = 0.1  # how often a waiting thread looks whether the pipeline was stopped


@dataclass(frozen=True)
class PredictOptions:
    """How ``predict`` and ``predict_case`` predict.

    ``roi_size``: the sliding window (an int is a cube; None: the plan's training crop);
    ``overlap`` (None: the plan's, the fine-tuning's validation overlap, else 0.5) and ``mode``
    (``gaussian`` weights window centres, ``constant`` averages);
    ``sw_batch_size``: windows per forward pass (None: from the cores and memory,
    ``infer.volume.window_batch``); ``flips``: average over the 8 axis flips;
    ``views``: a choice of ``swinssl.methods.view_choices()`` (``auto``: the network's method
    decides); ``output_format``: ``nifti``, or ``same`` to keep NRRD for NRRD inputs;
    ``device`` of the network (``auto``: cuda when there is one, except for exported predictors); ``cache``: the preprocessing cache folder, ``auto`` (the one
    the model was trained with, ``prediction_cache``) or ``off``/None.
    """

    roi_size: Sequence[int] | int | None = None
    overlap: float | None = None
    sw_batch_size: int | None = None
    mode: str = "gaussian"
    flips: bool = False
    views: str = "auto"
    output_format: OutputFormat = "nifti"
    device: str = "cpu"
    cache: str | Path | None = "auto"


def predict_case(model: nn.Module | Sequence[nn.Module], plan: Plan, case_or_path: Case | str | Path,
                 options: PredictOptions = PredictOptions(), pipeline: Pipeline | None = None,
                 progress: bool = False) -> MetaTensor:
    """Integer mask ``(1, X, Y, Z)`` for one case, in the input file's geometry.

    ``model``: one network, or the networks of an ensemble (one plan, ``load_ensemble``), whose
    softmax probabilities are averaged before the argmax (``ensemble_probabilities``).

    The result has the input's spatial shape and ``.affine`` (orientation included); its dtype
    is uint8 (int32 beyond 256 classes). ``options``: the window size (default: the plan's
    training crop), overlap, window batch, blending, flips and views (``predict_volume``);
    ``output_format``, ``device`` and ``cache`` are ``predict``'s. ``pipeline``: the plan's
    ``inference_pipeline`` (with a cache folder to read the preprocessed volume from); None
    builds one without a cache. ``progress``: one line saying what the case costs (its shape after
    preprocessing, windows, window size, overlap, windows per pass) and a bar over its windows with
    an ETA. Raises ``DataError`` naming the file for unreadable or invalid inputs.
    """
    case = _as_case(case_or_path, plan)
    options = dataclasses.replace(options, overlap=overlap_of(options.overlap, plan))
    pipeline = inference_pipeline(plan) if pipeline is None else pipeline
    data = _preprocessed(pipeline, case, plan)
    labels, num_classes = _labels(model, plan, case, data["image"], options, progress)
    return _mask(pipeline, data, labels, num_classes, case.images[0])


def _preprocessed(pipeline: Pipeline, case: Case, plan: Plan) -> dict:
    """The pipeline's item of ``case``: its preprocessed ``image`` (1, X', Y', Z') with the trace ``invert`` undoes.

    A case that does not declare its modality is normalised as the plan's; where its intensities say
    otherwise (guessed as the pipeline reads it, not in a read of its own), that is said.
    """
    checked = case.modality is None and plan.modality in ("CT", "MRI")
    item = {**case_item(case), "label": None}  # a case's label plays no part in predicting it
    if checked:
        item.update(modality=plan.modality, check_modality=True)
    data = pipeline(item)
    data.pop("check_modality", None)  # left where the cache answered: that volume was seen in training
    guessed = data.pop("guessed_modality", None)
    if checked and guessed is not None and guessed != plan.modality:
        _said_other_modality(case.images[0], guessed, "by its intensities (air near -1000 HU or not)", plan)
    return data


def _labels(model: nn.Module | Sequence[nn.Module], plan: Plan, case: Case, image: torch.Tensor,
            options: PredictOptions, progress: bool) -> tuple[torch.Tensor, int]:
    """Class indices ``(1, X', Y', Z')`` (float) of a preprocessed image, and the number of classes."""
    if min(image.shape[1:]) == 0:
        # Nothing above the foreground threshold: the crop is empty and the whole volume is background.
        return torch.zeros((1, *image.shape[1:])), plan.out_channels or 2
    models = [model] if isinstance(model, nn.Module) else list(model)
    roi, method = _roi(options.roi_size, plan), method_of(plan)
    options = dataclasses.replace(options, sw_batch_size=options.sw_batch_size or window_batch(models[0], roi, method))
    with _window_bar(progress, case, image.shape[1:], roi, options, len(models)) as bar:
        probs = ensemble_probabilities(models, image, roi, options, on_windows=bar.update, method=method)
    num_classes = probs.shape[0]
    labels = probs.argmax(dim=0, keepdim=True).float()
    # Inverting resamples onto the file's grid, the memory peak of a prediction: free what we can first.
    del probs
    release_freed_memory()
    return labels, num_classes


def _mask(pipeline: Pipeline, data: dict, labels: torch.Tensor, num_classes: int, source: Path) -> MetaTensor:
    """``labels`` mapped back onto the input file's grid, checked to land on it, as integers."""
    mask = invert(pipeline, data, labels, nearest=True)
    _check_geometry(mask, source)
    return mask.round().to(torch.uint8 if num_classes <= 256 else torch.int32)


def ensemble_probabilities(models: Sequence[nn.Module], image: torch.Tensor, roi_size: Sequence[int],
                           options: PredictOptions = PredictOptions(),
                           on_windows: Callable[[int], None] | None = None, method: Method | None = None) -> torch.Tensor:
    """Softmax probabilities ``(C, X, Y, Z)`` of one preprocessed image: the mean over ``models`` of each
    one's ``predict_volume`` (its sliding windows, flips and views, with ``options``).

    Probabilities are averaged, not logits, as nnU-Net ensembles its folds: a model sure of a voxel
    adds at most 1 to its class, so one over-confident model cannot outvote the others. One model:
    its own output. ``options.overlap`` None: ``DEFAULT_OVERLAP``; ``on_windows``, ``method``: ``predict_volume``'s.
    """
    o = options
    overlap = DEFAULT_OVERLAP if o.overlap is None else o.overlap
    total: torch.Tensor | None = None
    for model in models:
        probs = predict_volume(model, image, roi_size, overlap, o.sw_batch_size, o.mode, o.flips, o.views, on_windows,
                               method=method)
        total = probs if total is None else total.add_(probs)
    assert total is not None, "ensemble_probabilities: no model"
    return total / len(models)


def _as_case(case_or_path: Case | str | Path, plan: Plan) -> Case:
    """A ``Case`` for a path; the plan's modality fills in where the case does not say."""
    if isinstance(case_or_path, Case):
        case = case_or_path
    else:
        cases = find_dataset(case_or_path).cases
        if len(cases) != 1:
            raise DataError(f"{case_or_path}: holds {len(cases)} volumes; predict_case takes one (use predict)")
        case = cases[0]
    if case.modality and plan.modality in ("CT", "MRI") and case.modality != plan.modality:
        _said_other_modality(case.images[0], case.modality, "declared", plan)
    # A case that declares none is normalised as the plan's modality (_preprocessed): guessing from
    # intensities could differ from how the model was trained.
    return case


def _said_other_modality(path: Path, seen: str, how: str, plan: Plan) -> None:
    # Said, not refused: a CT model on an MRI (or the reverse) predicts, but from input it never saw.
    log.warning("%s: a %s volume (%s), but the model was fine-tuned on %s; predicting anyway",
                path, seen, how, plan.modality)


def _check_geometry(mask: MetaTensor, source: Path) -> None:
    """The inverse must land on the grid the file was read on; a misaligned mask is never written."""
    shape, affine = mask.meta.get("spatial_shape"), mask.meta.get("original_affine")
    if shape is not None and tuple(int(s) for s in np.asarray(shape)) != tuple(mask.shape[1:]):
        raise RuntimeError(f"{source}: mask shape {tuple(mask.shape[1:])} differs from the input's {tuple(np.asarray(shape))}")
    found = np.asarray(mask.affine, np.float64)
    if affine is not None and not np.allclose(found, np.asarray(affine, np.float64), atol=GEOMETRY_TOLERANCE_MM):
        raise RuntimeError(f"{source}: mask affine differs from the input's after inverting the preprocessing")


def collect_cases(inputs: str | Path | Iterable[str | Path]) -> tuple[list[Case], dict[str, str]]:
    """Every case under ``inputs`` (files, folders, dataset.json / nnU-Net folders; all splits).

    Returns the cases (each image set once) and, for inputs that could not be read as a
    dataset, input -> reason.
    """
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    cases: list[Case] = []
    failed: dict[str, str] = {}
    seen: set[tuple[Path, ...]] = set()
    for item in items:
        try:
            found = find_dataset(item).cases
        except DataError as err:
            failed[str(item)] = str(err)
            continue
        for case in found:
            key = tuple(p.resolve() for p in case.images)
            if key not in seen:
                seen.add(key)
                cases.append(case)
    return cases, failed


def output_names(cases: Sequence[Case]) -> list[str]:
    """One file stem per case: its case id, made unique (``<folder>_<id>``, then ``_2``...) when ids repeat.

    Patient folders each holding ``ct.nii.gz`` would otherwise overwrite one another.
    """
    counts = Counter(c.case_id for c in cases)
    names = [c.case_id if counts[c.case_id] == 1 else f"{c.images[0].parent.name}_{c.case_id}" for c in cases]
    used: Counter[str] = Counter()
    unique = []
    for name in names:
        used[name] += 1
        unique.append(name if used[name] == 1 else f"{name}_{used[name]}")
    return unique


def predict(model_source: str | Path | Sequence[str | Path], inputs: str | Path | Sequence[str | Path],
            out_dir: str | Path, options: PredictOptions = PredictOptions(), progress: bool = True,
            part: tuple[int, int] | None = None, overwrite: bool = False, pipeline: bool | None = None) -> list[Path]:
    """Predict a mask for every case in ``inputs`` (or in this part of them) and write it to ``out_dir``;
    returns the masks of those cases, written now or kept from an earlier run, in name order.

    ``model_source``: a fine-tuned checkpoint or its run directory, a cross-validation folder
    (``finetune.fold=all``: all its folds), an exported predictor (``.onnx`` or ``.pt2``, written
    by ``swinssl export``; its plan comes from its metadata, its views choice and window size are
    fixed: ``swinssl.infer.exported``), or a list of these: an ensemble, whose softmax
    probabilities are averaged (``load_ensemble`` refuses models whose plans differ).
    ``inputs``: a volume file, a folder of volumes, an MSD ``dataset.json`` or nnU-Net raw folder (all cases, test ones
    included), or a list of these. Each mask is ``<out_dir>/<case_id>.nii.gz`` (``.nrrd`` for an
    NRRD input with ``output_format="same"``) in its input's geometry. Inputs that cannot be
    read are reported (one warning line each) and skipped; ``DataError`` if this part has cases and
    none has a mask, or there are no cases at all.
    ``out_dir/predictions.json`` lists input -> output, the (first) model and checkpoint, every
    checkpoint averaged (``models``) and the options (with the views actually used); it is
    assembled from the per-case records at the end (``PredictionFolder.assemble_record``), so it
    lists every case of ``inputs`` that any part has predicted with this model and options so far.
    See ``PredictOptions`` for the options.

    ``part``: ``(I, N)``, predict only every N-th case (in name order) from the I-th, ``0 <= I < N``.
    ``overwrite``: predict cases again whose mask this model and these options already made (by
    default they are skipped). ``pipeline``: overlap reading, the network and writing (threads);
    False: one case after the other; None: ``overlap_by_default``. Both write the same masks.
    """
    if options.output_format not in ("nifti", "same"):
        raise ConfigError(f"output_format must be one of nifti, same, got {options.output_format!r}")
    check_views(options.views)
    part = check_part(part)
    out_dir = writable_dir(out_dir)
    sources = [model_source] if isinstance(model_source, (str, Path)) else list(model_source)
    if options.device == "auto":  # exported predictors run on the CPU (onnxruntime, torch.export's CPU graph)
        gpu = torch.cuda.is_available() and not any(is_exported(s) for s in sources)
        options = dataclasses.replace(options, device="cuda" if gpu else "cpu")
    models, plan, checkpoints = load_ensemble(sources, options.device)
    if len(models) > 1:
        log.info("ensemble of %d models: %s", len(models), ", ".join(map(str, checkpoints)))
    roi = _roi(options.roi_size, plan)
    # auto resolved, so the record says which (one plan: the same for every model); exported
    # predictors hold theirs, baked into their graphs
    method = method_of(plan)
    views = exported_views(models, options.views, roi) or window_predictor(models[0], method, options.views)[1]
    options = dataclasses.replace(options, roi_size=roi, views=views, overlap=overlap_of(options.overlap, plan),
                                  sw_batch_size=options.sw_batch_size or window_batch(models[0], roi, method))
    fingerprint = model_fingerprint(checkpoints, options)
    cache = prediction_cache(options.cache, plan.cache)
    transforms = inference_pipeline(plan, cache)  # one for all cases: an unusable cache is found (and said) once
    cases, failed_inputs = collect_cases(inputs)
    for source, reason in failed_inputs.items():
        log.warning("skipped %s", reason if reason.startswith(source) else f"{source}: {reason}")
    names = output_names(cases)  # over the whole list: a case's file is the same whichever part predicts it
    folder = PredictionFolder(out_dir)
    jobs = [_Job(name, case, out_dir / f"{name}{output_suffix(case.images[0], options.output_format)}")
            for name, case in part_of(dict(zip(names, cases)), part)]
    todo = jobs if overwrite else _not_done(folder, jobs, fingerprint)
    steps = _Steps(models, plan, options, transforms, folder, fingerprint, progress)
    with tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="predict", unit="case", disable=not progress) as bar:
        overlapped = overlap_by_default(options.device) if pipeline is None else pipeline
        (_predict_overlapped if overlapped else _predict_in_turn)(todo, steps, bar.update)
    kept = {job.name for job in jobs} - {job.name for job in todo}
    masks = [job.target for job in jobs if job.name in kept or job.name in steps.written]
    if cases and not jobs:
        log.warning("part %d/%d: none of the %d case(s) falls to this part", *part, len(cases))
    elif not masks:
        reasons = "; ".join([*failed_inputs.values(), *steps.failed.values()][:3]) or "no cases found"
        raise DataError(f"{_describe(inputs)}: no mask written ({len(failed_inputs) + len(steps.failed)} input(s) "
                        f"failed: {reasons})")
    for job in jobs:  # recorded only now: a run that writes no mask leaves its folder as it found it
        if job.name in steps.failed:
            folder.write_case(job.name, job.source, fingerprint, error=steps.failed[job.name])
    record = {**dataclasses.asdict(options), "roi_size": list(options.roi_size), "device": str(options.device),
              "cache": str(cache) if cache else None}
    folder.assemble_record(str(sources[0]), checkpoints, plan.labels, record, names, fingerprint, failed_inputs)
    log.info("wrote %d mask(s) to %s; %d kept from before; %d input(s) skipped", len(steps.written), out_dir,
             len(kept), len(failed_inputs) + len(steps.failed))
    return masks


def overlap_by_default(device: str | torch.device) -> bool:
    """Whether ``predict`` overlaps reading and writing with the network unless told: when the network
    runs on a GPU, or its intra-op threads leave CPU cores to this process.

    On 2 cores with the network on both, the overlap measured 0.9-1.1x the cases per minute of
    predicting in turn; with the network on one thread, 1.4x (benchmarks/predict_archive.py).
    """
    if torch.device(device).type == "cuda":
        return True
    return _cores() > torch.get_num_threads()


def helper_threads(device: str | torch.device) -> int:
    """Intra-op threads of the pipeline's reader and writer: every core with the network on a GPU,
    else the cores its threads leave, at least one."""
    if torch.device(device).type == "cuda":
        return torch.get_num_threads()
    return max(1, _cores() - torch.get_num_threads())


def _cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def parse_part(text: str) -> tuple[int, int]:
    """``"I/N"`` (``--part``) as ``(I, N)``; ``ConfigError`` unless ``0 <= I < N``."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if match is None:
        raise ConfigError(f"--part {text}: expected I/N, part I of N with 0 <= I < N (e.g. 0/4 for the first of 4 parts)")
    index, count = int(match.group(1)), int(match.group(2))
    if not index < count:
        raise ConfigError(f"--part {text}: expected I/N with 0 <= I < N; there is no part {index} of {count}")
    return index, count


def check_part(part: tuple[int, int] | None) -> tuple[int, int]:
    """``part`` as ``(I, N)`` (None: the whole list, ``(0, 1)``); ``ConfigError`` unless ``0 <= I < N``."""
    if part is None:
        return 0, 1
    try:
        index, count = (int(p) for p in part)
        valid = 0 <= index < count and tuple(part) == (index, count)
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ConfigError(f"part={part!r}: expected (I, N), part I of N with 0 <= I < N")
    return index, count


def part_of(named: Mapping[str, Case], part: tuple[int, int]) -> list[tuple[str, Case]]:
    """The (name, case) pairs of part ``(I, N)``: in name order, every N-th from the I-th."""
    index, count = part
    return [(name, named[name]) for name in sorted(named)[index::count]]


def model_fingerprint(checkpoints: Sequence[Path], options: PredictOptions) -> str:
    """SHA-256 naming what made a mask: the content of every checkpoint (or exported predictor) in
    order, and ``FINGERPRINT_OPTIONS`` of the resolved ``options`` (window size, overlap, blending,
    flips, views, output format)."""
    made_by = {"checkpoints": [file_checksum(Path(c)) for c in checkpoints],
               "options": {key: getattr(options, key) for key in FINGERPRINT_OPTIONS}}
    return hashlib.sha256(json.dumps(made_by, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class _Job:
    """One case to predict: its output name, and the mask file it goes to."""

    name: str
    case: Case
    target: Path

    @property
    def source(self) -> Path:
        return self.case.images[0]


def _not_done(folder: PredictionFolder, jobs: Sequence[_Job], fingerprint: str) -> list[_Job]:
    """The jobs whose mask is not there as made by ``fingerprint`` from their input; says what it skips
    and what it predicts again, once each."""
    todo, again = [], 0
    for job in jobs:
        record = folder.read_case(job.name)
        if (job.target.is_file() and record is not None and record.get("fingerprint") == fingerprint
                and record.get("mask") == job.target.name
                and record.get("resolved_source") == str(job.source.resolve())):
            continue
        todo.append(job)
        again += job.target.is_file()
    if len(todo) < len(jobs):
        log.warning("%d of %d cases already predicted by this model; skipped (--overwrite predicts them again)",
                    len(jobs) - len(todo), len(jobs))
    if again:
        log.warning("%s: %d mask(s) made by another model, other options or from another input, or whose writing "
                    "was interrupted; predicting them again", folder.path, again)
    return todo


class _Steps:
    """The three steps of one case in ``predict``, and what they produced: ``written`` (name -> mask)
    and ``failed`` (name -> reason). ``prepare`` and ``finish`` may run in other threads than ``network``."""

    def __init__(self, models: Sequence[nn.Module], plan: Plan, options: PredictOptions, transforms: Pipeline,
                 folder: PredictionFolder, fingerprint: str, progress: bool):
        self.models, self.plan, self.options, self.transforms = models, plan, options, transforms
        self.folder, self.fingerprint, self.progress = folder, fingerprint, progress
        self.written: dict[str, Path] = {}
        self.failed: dict[str, str] = {}

    def prepare(self, job: _Job) -> dict:
        return _preprocessed(self.transforms, _as_case(job.case, self.plan), self.plan)

    def network(self, job: _Job, data: dict) -> tuple[torch.Tensor, int]:
        return _labels(self.models, self.plan, job.case, data["image"], self.options, self.progress)

    def finish(self, job: _Job, data: dict, labels: tuple[torch.Tensor, int]) -> None:
        mask = _mask(self.transforms, data, *labels, job.source)
        write_mask(mask, job.target)
        # After the mask: a record says its mask is whole, so a process stopped in between leaves none.
        self.folder.write_case(job.name, job.source, self.fingerprint, mask=job.target.name)
        self.written[job.name] = job.target

    def bad(self, job: _Job, err: SwinsslError) -> None:
        """A bad input: one line, and the case is left out."""
        self.failed[job.name] = str(err)
        log.warning("skipped %s", err)


def _predict_in_turn(jobs: Sequence[_Job], steps: _Steps, done: Callable[[int], object]) -> None:
    """Each case's three steps, one case after the other."""
    for job in jobs:
        try:
            data = steps.prepare(job)
            steps.finish(job, data, steps.network(job, data))
        except SwinsslError as err:
            steps.bad(job, err)
        done(1)


_END = object()  # no more items in a queue


def _predict_overlapped(jobs: Sequence[_Job], steps: _Steps, done: Callable[[int], object]) -> None:
    """The three steps of consecutive cases at once: a reader thread preprocesses cases into a queue of
    ``PIPELINE_DEPTH``, this thread runs the network, a writer thread inverts and writes.

    The order of cases, and so every mask and record, is that of ``_predict_in_turn``. A bad input
    (``SwinsslError``) in any step is one line and the case is left out, as there; any other error
    in a thread stops both threads and is raised here, after they have ended (a mask or record
    being written when it happened is completed: each is written atomically).
    """
    if not jobs:
        return
    intra_op = helper_threads(steps.options.device)
    to_network: queue.Queue = queue.Queue(PIPELINE_DEPTH)
    to_writer: queue.Queue = queue.Queue(1)
    stop = threading.Event()
    errors: list[BaseException] = []

    def put(where: queue.Queue, item: object) -> bool:
        while not stop.is_set():
            with contextlib.suppress(queue.Full):
                where.put(item, timeout=_POLL_S)
                return True
        return False

    def get(where: queue.Queue) -> object:
        while True:
            with contextlib.suppress(queue.Empty):
                return where.get(timeout=_POLL_S)
            if stop.is_set():
                return _END

    def helper(work: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            torch.set_num_threads(intra_op)  # this thread's own intra-op threads; the network keeps its
            try:
                work()
            except BaseException as err:  # raised in the main thread
                errors.append(err)
                stop.set()
        return run

    def read() -> None:
        try:
            for job in jobs:
                try:
                    item = (job, steps.prepare(job), None)
                except SwinsslError as err:
                    item = (job, None, err)
                if not put(to_network, item):
                    return
        finally:
            put(to_network, _END)

    def write() -> None:
        while (item := get(to_writer)) is not _END:
            job, data, labels = item
            try:
                steps.finish(job, data, labels)
            except SwinsslError as err:
                steps.bad(job, err)
            done(1)

    threads = [threading.Thread(target=helper(read), name="predict-read", daemon=True),
               threading.Thread(target=helper(write), name="predict-write", daemon=True)]
    for thread in threads:
        thread.start()
    try:
        while (item := get(to_network)) is not _END:
            job, data, err = item
            if err is None:
                try:
                    labels = steps.network(job, data)
                except SwinsslError as error:
                    err = error
            if err is not None:
                steps.bad(job, err)
                done(1)
            elif not put(to_writer, (job, data, labels)):
                break
            item = data = labels = None  # a case's volumes are freed as soon as the writer is done with them
        put(to_writer, _END)
    except BaseException:
        stop.set()
        raise
    finally:
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]


def inference_pipeline(plan: Plan, cache: str | Path | None = None) -> Pipeline:
    """The plan's preprocessing (``inference_transforms``), reading from and adding to the cache
    folder ``cache`` (None: no cache)."""
    return inference_transforms(plan.preprocess, channels=plan.network.in_channels, cache=cache)


def prediction_cache(cache: str | Path | None, trained: str | None) -> Path | None:
    """The cache folder ``predict`` reads preprocessed volumes from, or None.

    ``"auto"``: the folder the model's fine-tuning used (``trained``, the plan's ``cache``) if it still
    exists. Predicting the same volumes again (other checkpoints, options) then skips
    decoding and resampling, and volumes seen in training are not preprocessed again.
    Where that folder is gone (a checkpoint from elsewhere), none: predicting once gains
    nothing from a cache. ``"off"`` or None: none; anything else: that folder.
    """
    if cache is None or str(cache) in ("off", ""):
        return None
    if str(cache) == "auto":
        return Path(trained) if trained and Path(trained).is_dir() else None
    return Path(cache)


@contextlib.contextmanager
def _window_bar(shown: bool, case: Case, shape: Sequence[int], roi: Sequence[int], options: PredictOptions,
                models: int) -> Iterator[tqdm]:
    """A bar over the windows of one case (every flip and model), after one line saying what they are."""
    windows = count_windows(shape, roi, options.overlap)
    passes = (8 if options.flips else 1) * models
    if shown:
        tqdm.write(f"{case.case_id}: {'x'.join(map(str, shape))} voxels after preprocessing, {windows} windows of "
                   f"{'x'.join(map(str, roi))} at overlap {options.overlap:g}" + (f" x {passes} passes" if passes > 1 else "")
                   + f", {options.sw_batch_size} per forward pass", file=sys.stderr)
    with tqdm(total=windows * passes, desc=f"  {case.case_id}", unit="window", leave=False, disable=not shown) as bar:
        yield bar


def overlap_of(overlap: float | None, plan: Plan) -> float:
    """The sliding-window overlap: as given, else the plan's (fine-tuning's), else 0.5."""
    if overlap is not None:
        return overlap
    return plan.overlap if plan.overlap is not None else DEFAULT_OVERLAP


def _roi(roi_size: Sequence[int] | int | None, plan: Plan) -> tuple[int, ...]:
    """The window size: as given (an int means a cube), else the plan's training crop."""
    if roi_size is None:
        return tuple(plan.preprocess.roi_size)
    return tuple(int(s) for s in roi_size) if isinstance(roi_size, Sequence) else (int(roi_size),) * 3


def _describe(inputs: str | Path | Iterable[str | Path]) -> str:
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    return str(items[0]) if len(items) == 1 else f"{items[0]} (+{len(items) - 1} more)" if items else "inputs"
