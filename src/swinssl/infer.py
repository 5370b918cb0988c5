"""Prediction: masks for new volumes, written in each input's own geometry.

``predict(model_source, inputs, out_dir)`` is what ``swinssl predict`` runs. Per case:

1. ``inference_transforms`` of the checkpoint's plan (reorient, resample, normalise by
   modality, crop the foreground) -- the same preprocessing the network was trained on --
   read from the preprocessing cache when the volume is in it (by default the cache the
   model was trained with; see ``prediction_cache``);
2. ``predict_volume``: sliding windows over the preprocessed volume (ROI = the training
   crop, overlap 0.5, Gaussian blending), optionally averaged over the 8 flips of the
   three spatial axes (test-time augmentation);
3. argmax, then ``invert`` (nearest-neighbour) back through the crop, the resampling and
   the reorientation, so the mask has the input file's shape and affine;
4. written atomically as ``<out_dir>/<case_id>.nii.gz`` (or ``.nrrd`` for NRRD inputs with
   ``output_format="same"``), uint8 (uint16 beyond 256 classes).

A bad input (unreadable, truncated, NaN voxels...) is reported on one line and skipped;
``DataError`` is raised only when no mask at all could be written. ``predictions.json``
in ``out_dir`` records input -> output, the model and the options.

Checkpoints are the fine-tuning engine's: ``{"format": "swinssl", "kind": "finetune",
"model": state dict, "plan": {"network", "preprocess", "labels", "channel_names",
"modality", "cache"}}``; a run directory stands for its ``checkpoints/best.pt`` (else ``last.pt``).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import nibabel as nib
import nrrd
import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from torch import nn
from tqdm import tqdm

from swinssl.config import ModelConfig, PreprocessConfig, from_dict
from swinssl.data.discover import Case, find_dataset
from swinssl.data.transforms import Pipeline, case_item, inference_transforms, invert
from swinssl.errors import CheckpointError, ConfigError, DataError, SwinsslError
from swinssl.nn.load import filter_swinssl, read_checkpoint
from swinssl.nn.multiview import window_predictor
from swinssl.nn.swin_unetr import SwinUNETR, build_network
from swinssl.runtime import release_freed_memory
from swinssl.ssl.views import PERMUTATIONS
from swinssl.utils import atomic_path, atomic_write_text, writable_dir

log = logging.getLogger(__name__)

OutputFormat = Literal["nifti", "same"]
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # NRRD files are written in LPS, as 3D Slicer and ITK expect
GEOMETRY_TOLERANCE_MM = 1e-3


# --- loading a fine-tuned model -----------------------------------------------------------------


def resolve_checkpoint(source: str | Path) -> Path:
    """The checkpoint file that ``source`` stands for.

    A file is itself; a run directory gives ``checkpoints/best.pt`` if present, else
    ``checkpoints/last.pt`` (a ``checkpoints/`` folder itself works too).
    """
    path = Path(source).expanduser()
    if not path.is_dir():
        return path
    for folder in (path / "checkpoints", path):
        for name in ("best.pt", "last.pt"):
            if (folder / name).is_file():
                return folder / name
    raise CheckpointError(f"{path}: no checkpoints/best.pt or checkpoints/last.pt in this run directory")


def load_model(source: str | Path, device: str | torch.device = "cpu") -> tuple[SwinUNETR, dict]:
    """A fine-tuned SwinUNETR (eval mode, on ``device``) and its plan, from a checkpoint or run directory.

    Raises ``CheckpointError`` (one line naming the file) for a missing or unreadable file, a
    checkpoint that is not a fine-tuned swinssl one (e.g. pre-training: no segmentation head),
    a plan without network or preprocessing, or weights that do not fit the planned network.
    """
    path = resolve_checkpoint(source)
    ckpt = read_checkpoint(path)
    plan = _finetune_plan(ckpt, path)
    model = _network_of(plan, path)
    _load_weights(model, ckpt.get("model"), path)
    return model.to(device).eval(), plan


def _finetune_plan(ckpt: Any, path: Path) -> dict:
    if not isinstance(ckpt, Mapping) or ckpt.get("format") != "swinssl":
        raise CheckpointError(
            f"{path}: not a swinssl checkpoint; predict needs a fine-tuned checkpoint or run directory (swinssl finetune)"
        )
    kind = ckpt.get("kind")
    if kind != "finetune":
        raise CheckpointError(
            f"{path}: a {kind!r} checkpoint holds no segmentation head; fine-tune it first (swinssl finetune) "
            "and predict with that run"
        )
    plan = ckpt.get("plan")
    if not isinstance(plan, Mapping) or not all(isinstance(plan.get(k), Mapping) for k in ("network", "preprocess")):
        raise CheckpointError(f"{path}: the checkpoint's plan lacks its 'network' or 'preprocess' section")
    return dict(plan)


def _network_of(plan: Mapping, path: Path) -> nn.Module:
    """The network the plan describes (``patch_size`` is not a ``ModelConfig`` field; 2 unless said)."""
    network = dict(plan["network"])
    patch_size = network.pop("patch_size", 2)
    try:
        cfg = from_dict(ModelConfig, network, source=str(path), prefix="plan.network.")
    except ConfigError as err:
        raise CheckpointError(str(err)) from None
    return build_network({**dataclasses.asdict(cfg), "patch_size": patch_size})


def _load_weights(model: nn.Module, state: Any, path: Path) -> None:
    """Strict load: a prediction from half-loaded weights would look plausible and be wrong."""
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: the checkpoint's 'model' is not a state dict of tensors")
    state = {filter_swinssl(k): v for k, v in state.items()}  # DDP / torch.compile prefixes
    target = model.state_dict()
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    mismatched = sorted(k for k in set(state) & set(target) if state[k].shape != target[k].shape)
    if missing or unexpected or mismatched:
        example = (mismatched or missing or unexpected)[0]
        raise CheckpointError(
            f"{path}: weights do not fit the network of its plan ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(mismatched)} shape-mismatched tensors, e.g. {example})"
        )
    model.load_state_dict(state)


def preprocess_of(plan: Mapping) -> PreprocessConfig:
    """The plan's preprocessing as a ``PreprocessConfig``."""
    return from_dict(PreprocessConfig, dict(plan["preprocess"]), source="checkpoint plan", prefix="preprocess.")


# --- one preprocessed volume --------------------------------------------------------------------


@dataclass(frozen=True)
class View:
    """One flip of the whole volume for test-time augmentation.

    ``forward`` maps a batch ``(B, C, X, Y, Z)`` into the view, ``inverse`` maps the network's
    output for it back. (Multi-view fusion permutes each window instead: ``window_predictor``.)
    """

    name: str
    forward: Callable[[torch.Tensor], torch.Tensor]
    inverse: Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def flip_view(axes: tuple[int, ...]) -> View:
    """Flip the given spatial axes (0, 1, 2 of X, Y, Z); a flip is its own inverse."""
    dims = tuple(2 + a for a in axes)
    if not dims:
        return View("identity", _identity, _identity)

    def flip(x: torch.Tensor) -> torch.Tensor:
        return torch.flip(x, dims)

    return View("flip" + "".join("xyz"[a] for a in axes), flip, flip)


def flip_views() -> list[View]:
    """The 8 combinations of flipping X, Y and Z (the identity first)."""
    return [flip_view(axes) for n in range(4) for axes in itertools.combinations(range(3), n)]


def predict_volume(
    model: nn.Module,
    image: torch.Tensor,
    roi_size: Sequence[int] | int,
    overlap: float = 0.5,
    sw_batch_size: int = 1,
    mode: str = "gaussian",
    flips: bool = False,
    fuse: bool = False,
    view: str = "identity",
) -> torch.Tensor:
    """Softmax probabilities ``(C, X, Y, Z)`` (float32, CPU) for one preprocessed image ``(C_in, X, Y, Z)``.

    Sliding windows of ``roi_size`` with ``overlap``, blended with ``mode`` (``gaussian``
    weights window centres, ``constant`` averages); an image smaller than the ROI is padded.
    Windows run on the model's device and are stitched on the image's device (CPU for the
    pipeline's output), so a large volume does not have to fit in GPU memory at once.
    ``flips``: average the softmax over the 8 flips of the spatial axes (flip, predict, flip back).
    ``fuse``: multi-view fusion, the softmax of the three axis orders of every window
    averaged (``swinssl.nn.multiview.window_predictor``); without it, the one axis order
    ``view`` (``identity``, ``swap_xy``, ``swap_xz``: window permuted, predicted, mapped back).
    """
    if image.ndim != 4:
        raise ValueError(f"expected one image (C, X, Y, Z), got shape {tuple(image.shape)}")
    chosen = flip_views() if flips else [flip_view(())]
    x = (image.as_tensor() if isinstance(image, MetaTensor) else image).float().unsqueeze(0)
    device = _device_of(model)
    predictor = window_predictor(model, fuse, view)
    total: torch.Tensor | None = None
    with torch.no_grad():
        for view in chosen:
            logits = sliding_window_inference(
                view.forward(x), roi_size, sw_batch_size, predictor, overlap=overlap, mode=mode, sw_device=device, device=x.device
            )
            # Averaged as probabilities, not logits: one confident view must not outvote the others.
            probs = view.inverse(torch.softmax(logits.float(), dim=1))
            total = probs if total is None else total.add_(probs)
    assert total is not None
    return (total / len(chosen))[0].cpu()


def _device_of(model: nn.Module) -> torch.device:
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


# --- one case -----------------------------------------------------------------------------------


def predict_case(
    model: nn.Module,
    plan: Mapping,
    case_or_path: Case | str | Path,
    roi_size: Sequence[int] | int | None = None,
    overlap: float = 0.5,
    sw_batch_size: int = 1,
    flips: bool = False,
    mode: str = "gaussian",
    fuse: bool | None = None,
    view: str = "identity",
    pipeline: Pipeline | None = None,
) -> MetaTensor:
    """Integer mask ``(1, X, Y, Z)`` for one case, in the input file's geometry.

    The result has the input's spatial shape and ``.affine`` (orientation included); its dtype
    is uint8 (int32 beyond 256 classes). ``roi_size`` defaults to the plan's training crop.
    ``fuse``: multi-view fusion (``predict_volume``); ``None`` uses the plan's default
    (``plan_fuses``: on for SwinMM multi-view models); ``view``: the axis order without fusion.
    ``pipeline``: the plan's ``inference_pipeline`` (with a cache folder to read the
    preprocessed volume from); None builds one without a cache.
    Raises ``DataError`` naming the file for unreadable or invalid inputs.
    """
    cfg = preprocess_of(plan)
    case = _as_case(case_or_path, plan)
    pipeline = inference_pipeline(plan) if pipeline is None else pipeline
    data = pipeline({**case_item(case), "label": None})  # a case's label plays no part in predicting it
    image = data["image"]
    num_classes = int(plan["network"].get("out_channels", 2))
    if min(image.shape[1:]) == 0:
        # Nothing above the foreground threshold: the crop is empty and the whole volume is background.
        labels = torch.zeros((1, *image.shape[1:]))
    else:
        fused = plan_fuses(plan) if fuse is None else fuse
        probs = predict_volume(model, image, roi_size or cfg.roi_size, overlap, sw_batch_size, mode, flips, fused,
                               view)
        num_classes = probs.shape[0]
        labels = probs.argmax(dim=0, keepdim=True).float()
        # Inverting resamples onto the file's grid, the memory peak of a prediction: free what we can first.
        del probs
        release_freed_memory()
    mask = invert(pipeline, data, labels, nearest=True)
    _check_geometry(mask, case.images[0])
    return mask.round().to(torch.uint8 if num_classes <= 256 else torch.int32)


def plan_fuses(plan: Mapping) -> bool:
    """Whether a model predicts with multi-view fusion unless told otherwise: SwinMM multi-view models do."""
    return bool(plan["network"].get("multiview", False))


def _as_case(case_or_path: Case | str | Path, plan: Mapping) -> Case:
    """A ``Case`` for a path; the plan's modality fills in where the case does not say."""
    if isinstance(case_or_path, Case):
        case = case_or_path
    else:
        cases = find_dataset(case_or_path).cases
        if len(cases) != 1:
            raise DataError(f"{case_or_path}: holds {len(cases)} volumes; predict_case takes one (use predict)")
        case = cases[0]
    if case.modality is None and plan.get("modality") in ("CT", "MRI"):
        # A model trained on one modality normalises like that modality; guessing from intensities could differ.
        case = dataclasses.replace(case, modality=plan["modality"])
    return case


def _check_geometry(mask: MetaTensor, source: Path) -> None:
    """The inverse must land on the grid the file was read on; a misaligned mask is never written."""
    shape, affine = mask.meta.get("spatial_shape"), mask.meta.get("original_affine")
    if shape is not None and tuple(int(s) for s in np.asarray(shape)) != tuple(mask.shape[1:]):
        raise RuntimeError(f"{source}: mask shape {tuple(mask.shape[1:])} differs from the input's {tuple(np.asarray(shape))}")
    found = np.asarray(mask.affine, np.float64)
    if affine is not None and not np.allclose(found, np.asarray(affine, np.float64), atol=GEOMETRY_TOLERANCE_MM):
        raise RuntimeError(f"{source}: mask affine differs from the input's after inverting the preprocessing")


# --- writing ------------------------------------------------------------------------------------


def output_suffix(source: Path, output_format: OutputFormat) -> str:
    """``.nii.gz`` by default; with ``same``, NRRD stays NRRD and NIfTI keeps its extension.

    Formats we do not write (MHA/MHD, DICOM series) get NIfTI either way.
    """
    name = source.name.lower()
    if output_format == "same":
        if name.endswith((".nrrd", ".nhdr")):
            return ".nrrd"
        if name.endswith(".nii"):
            return ".nii"
    return ".nii.gz"


def write_mask(mask: MetaTensor, path: str | Path) -> Path:
    """Write ``mask`` (1, X, Y, Z) with its affine to ``path`` (.nii, .nii.gz or .nrrd), atomically.

    Stored as uint8, or uint16 when a class index exceeds 255. A failure leaves no file behind.
    """
    path = Path(path)
    array = mask[0].detach().cpu().numpy()
    array = array.astype(np.uint8 if array.max(initial=0) <= 255 else np.uint16)
    affine = np.asarray(mask.affine, dtype=np.float64)  # MONAI's world: RAS
    with atomic_path(path) as tmp:
        if path.name.lower().endswith(".nrrd"):
            _write_nrrd(tmp, array, affine)
        else:
            _write_nifti(tmp, array, affine)
    return path


def _write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    image = nib.Nifti1Image(array, affine)
    # Scanner coordinates in both qform and sform: viewers that read either agree on the placement.
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.set_data_dtype(array.dtype)
    nib.save(image, str(path))


def _write_nrrd(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    lps = RAS_TO_LPS @ affine
    header = {
        "space": "left-posterior-superior",
        "space directions": lps[:3, :3].T,  # one row per array axis: the step of that axis in mm
        "space origin": lps[:3, 3],
        "kinds": ["domain", "domain", "domain"],
        "encoding": "gzip",
    }
    nrrd.write(str(path), array, header=header, index_order="F")


# --- many cases ---------------------------------------------------------------------------------


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


def predict(
    model_source: str | Path,
    inputs: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    roi_size: Sequence[int] | int | None = None,
    overlap: float = 0.5,
    sw_batch_size: int = 1,
    flips: bool = False,
    output_format: OutputFormat = "nifti",
    device: str | torch.device = "cpu",
    progress: bool = True,
    fuse: bool | None = None,
    view: str = "identity",
    cache: str | Path | None = "auto",
) -> list[Path]:
    """Predict a mask for every case in ``inputs`` and write it to ``out_dir``; returns the written files.

    ``model_source``: a fine-tuned checkpoint or its run directory. ``inputs``: a volume file, a
    folder of volumes, an MSD ``dataset.json`` or nnU-Net raw folder (all cases, test ones
    included), or a list of these. Each mask is ``<out_dir>/<case_id>.nii.gz`` (``.nrrd`` for an
    NRRD input with ``output_format="same"``) in its input's geometry. Inputs that cannot be
    read are reported (one warning line each) and skipped; ``DataError`` if no mask was written.
    ``out_dir/predictions.json`` lists input -> output, the checkpoint and the options.
    ``fuse``: multi-view fusion of the three axis orders; ``None``: the model's default (``plan_fuses``).
    ``view``: without fusion, the axis order predicted (``identity``, ``swap_xy``, ``swap_xz``).
    ``cache``: preprocessing cache folder, ``"auto"`` (the one the model was trained with,
    ``prediction_cache``) or ``"off"``/None.
    """
    if output_format not in ("nifti", "same"):
        raise ConfigError(f"output_format must be one of nifti, same, got {output_format!r}")
    if view not in PERMUTATIONS:
        raise ConfigError(f"view {view!r}: choose one of {', '.join(PERMUTATIONS)}")
    out_dir = writable_dir(out_dir)
    checkpoint = resolve_checkpoint(model_source)
    model, plan = load_model(checkpoint, device)
    roi = _roi(roi_size, plan)
    fuse = plan_fuses(plan) if fuse is None else fuse
    cache = prediction_cache(cache, plan)
    pipeline = inference_pipeline(plan, cache)  # one for all cases: an unusable cache is found (and said) once
    cases, failed = collect_cases(inputs)
    for source, reason in failed.items():
        log.warning("skipped %s", reason if reason.startswith(source) else f"{source}: {reason}")
    written: dict[str, str] = {}
    for case, name in tqdm(list(zip(cases, output_names(cases))), desc="predict", unit="case", disable=not progress):
        source = case.images[0]
        try:
            mask = predict_case(model, plan, case, roi, overlap, sw_batch_size, flips, fuse=fuse, view=view,
                                pipeline=pipeline)
        except SwinsslError as err:
            failed[str(source)] = str(err)
            log.warning("skipped %s", err)
            continue
        target = write_mask(mask, out_dir / f"{name}{output_suffix(source, output_format)}")
        written[str(source)] = str(target)
    if not written:
        reasons = "; ".join(list(failed.values())[:3]) or "no cases found"
        raise DataError(f"{_describe(inputs)}: no mask written ({len(failed)} input(s) failed: {reasons})")
    options = {"roi_size": list(roi), "overlap": overlap, "sw_batch_size": sw_batch_size, "mode": "gaussian",
               "flips": flips, "views": "fused" if fuse else view, "output_format": output_format, "device": str(device),
               "cache": str(cache) if cache else None}
    _write_record(out_dir, model_source, checkpoint, plan, options, written, failed)
    log.info("wrote %d mask(s) to %s; %d input(s) skipped", len(written), out_dir, len(failed))
    return [Path(p) for p in written.values()]


def inference_pipeline(plan: Mapping, cache: str | Path | None = None) -> Pipeline:
    """The plan's preprocessing (``inference_transforms``), reading from and adding to the cache
    folder ``cache`` (None: no cache)."""
    return inference_transforms(preprocess_of(plan), channels=int(plan["network"].get("in_channels", 1)), cache=cache)


def prediction_cache(cache: str | Path | None, plan: Mapping) -> Path | None:
    """The cache folder ``predict`` reads preprocessed volumes from, or None.

    ``"auto"``: the folder the model's fine-tuning used (``plan["cache"]``) if it still
    exists. Predicting the same volumes again (other checkpoints, options) then skips
    decoding and resampling, and volumes seen in training are not preprocessed again.
    Where that folder is gone (a checkpoint from elsewhere), none: predicting once gains
    nothing from a cache. ``"off"`` or None: none; anything else: that folder.
    """
    if cache is None or str(cache) in ("off", ""):
        return None
    if str(cache) == "auto":
        trained = plan.get("cache")
        return Path(trained) if trained and Path(trained).is_dir() else None
    return Path(cache)


def _roi(roi_size: Sequence[int] | int | None, plan: Mapping) -> tuple[int, ...]:
    """The window size: as given (an int means a cube), else the plan's training crop."""
    if roi_size is None:
        return tuple(preprocess_of(plan).roi_size)
    return tuple(int(s) for s in roi_size) if isinstance(roi_size, Sequence) else (int(roi_size),) * 3


def _describe(inputs: str | Path | Iterable[str | Path]) -> str:
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    return str(items[0]) if len(items) == 1 else f"{items[0]} (+{len(items) - 1} more)" if items else "inputs"


def _write_record(out_dir: Path, model_source: str | Path, checkpoint: Path, plan: Mapping, options: dict,
                  written: dict[str, str], failed: dict[str, str]) -> None:
    """``predictions.json``: enough to know later which model and options made which file."""
    record = {
        "model": str(model_source),
        "checkpoint": str(checkpoint.resolve()),
        "labels": plan.get("labels", {}),
        "options": options,
        "predictions": written,
        "failed": failed,
    }
    atomic_write_text(out_dir / "predictions.json", json.dumps(record, indent=2) + "\n")
