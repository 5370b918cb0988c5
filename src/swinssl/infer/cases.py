"""Predicting cases and folders: options, one case in its input's geometry (by one model or an
ensemble), many cases to files."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from torch import nn
from tqdm import tqdm

from swinssl.data.discover import Case, find_dataset
from swinssl.data.io import guess_modality, read_volume
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
    data = pipeline({**case_item(case), "label": None})  # a case's label plays no part in predicting it
    image = data["image"]
    num_classes = plan.out_channels or 2
    if min(image.shape[1:]) == 0:
        # Nothing above the foreground threshold: the crop is empty and the whole volume is background.
        labels = torch.zeros((1, *image.shape[1:]))
    else:
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
    mask = invert(pipeline, data, labels, nearest=True)
    _check_geometry(mask, case.images[0])
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
    if plan.modality in ("CT", "MRI"):
        # Said, not refused: a CT model on an MRI (or the reverse) predicts, but from input it never saw.
        seen = case.modality or _guessed_modality(case.images[0])
        if seen is not None and seen != plan.modality:
            how = "declared" if case.modality else "by its intensities (air near -1000 HU or not)"
            log.warning("%s: a %s volume (%s), but the model was fine-tuned on %s; predicting anyway",
                        case.images[0], seen, how, plan.modality)
    if case.modality is None and plan.modality in ("CT", "MRI"):
        # A model trained on one modality normalises like that modality; guessing from intensities could differ.
        case = dataclasses.replace(case, modality=plan.modality)
    return case


def _guessed_modality(path: Path) -> str | None:
    """CT or MRI by a file's intensities; None for a file the prediction will report as bad anyway."""
    image = read_volume(path)
    return guess_modality(image) if torch.isfinite(image.sum()) else None


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
            out_dir: str | Path, options: PredictOptions = PredictOptions(), progress: bool = True) -> list[Path]:
    """Predict a mask for every case in ``inputs`` and write it to ``out_dir``; returns the written files.

    ``model_source``: a fine-tuned checkpoint or its run directory, a cross-validation folder
    (``finetune.fold=all``: all its folds), an exported predictor (``.onnx`` or ``.pt2``, written
    by ``swinssl export``; its plan comes from its metadata, its views choice and window size are
    fixed: ``swinssl.infer.exported``), or a list of these: an ensemble, whose softmax
    probabilities are averaged (``load_ensemble`` refuses models whose plans differ).
    ``inputs``: a volume file, a folder of volumes, an MSD ``dataset.json`` or nnU-Net raw folder (all cases, test ones
    included), or a list of these. Each mask is ``<out_dir>/<case_id>.nii.gz`` (``.nrrd`` for an
    NRRD input with ``output_format="same"``) in its input's geometry. Inputs that cannot be
    read are reported (one warning line each) and skipped; ``DataError`` if no mask was written.
    ``out_dir/predictions.json`` lists input -> output, the (first) model and checkpoint, every
    checkpoint averaged (``models``) and the options (with the views actually used). See
    ``PredictOptions`` for the options.
    """
    if options.output_format not in ("nifti", "same"):
        raise ConfigError(f"output_format must be one of nifti, same, got {options.output_format!r}")
    check_views(options.views)
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
    cache = prediction_cache(options.cache, plan.cache)
    pipeline = inference_pipeline(plan, cache)  # one for all cases: an unusable cache is found (and said) once
    cases, failed = collect_cases(inputs)
    for source, reason in failed.items():
        log.warning("skipped %s", reason if reason.startswith(source) else f"{source}: {reason}")
    written: dict[str, str] = {}
    for case, name in tqdm(list(zip(cases, output_names(cases))), desc="predict", unit="case", disable=not progress):
        source = case.images[0]
        try:
            mask = predict_case(models, plan, case, options, pipeline=pipeline, progress=progress)
        except SwinsslError as err:
            failed[str(source)] = str(err)
            log.warning("skipped %s", err)
            continue
        target = write_mask(mask, out_dir / f"{name}{output_suffix(source, options.output_format)}")
        written[str(source)] = str(target)
    if not written:
        reasons = "; ".join(list(failed.values())[:3]) or "no cases found"
        raise DataError(f"{_describe(inputs)}: no mask written ({len(failed)} input(s) failed: {reasons})")
    record = {**dataclasses.asdict(options), "roi_size": list(options.roi_size), "device": str(options.device),
              "cache": str(cache) if cache else None}
    PredictionFolder(out_dir).write_record(str(sources[0]), checkpoints, plan.labels, record, written, failed)
    log.info("wrote %d mask(s) to %s; %d input(s) skipped", len(written), out_dir, len(failed))
    return [Path(p) for p in written.values()]


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
