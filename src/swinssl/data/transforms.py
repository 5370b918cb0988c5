"""MONAI transform pipelines, one function per stage: pre-training, fine-tuning, inference.

Items are dicts made by ``case_item``: ``{"image": path(s), "label": path or None,
"modality": "CT" | "MRI" | None, "case_id": str}``. Every pipeline starts with
``LoadCased`` (read + check, see ``swinssl.data.io``) and normalises each volume by
its own modality, so one pipeline serves mixed CT + MRI data:

- CT: HU window ``ct_window`` mapped to [0, 1], clipped;
- MRI: ``mri_percentiles`` (per channel) mapped to [0, 1], clipped, or z-score on
  non-zero voxels (``mri_normalization: zscore``).

Outputs are channel-first float32 MetaTensors ``(C, X, Y, Z)``; labels are
``(1, X, Y, Z)`` class indices. Pre-training crops are plain float32 tensors.

The deterministic head of every pipeline (read, geometry, normalisation, foreground) can
run through the on-disk cache of ``swinssl.data.cache`` (``cache=``): the random tail is the
same either way, so cached and uncached pipelines give the same crops for the same seed,
and a cached inference volume inverts to the file's grid as an uncached one does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    Invertd,
    CropForegroundd,
    MapTransform,
    NormalizeIntensity,
    Orientationd,
    RandCropByLabelClassesd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Randomizable,
    ScaleIntensityRange,
    ScaleIntensityRangePercentiles,
    Spacingd,
    SpatialPadd,
    SpatialResample,
)
from monai.transforms.spatial.functional import spatial_resample
from monai.utils import TraceKeys, get_torch_dtype_from_string

from swinssl.config import PreprocessConfig
from swinssl.data.cache import cached, settings_fingerprint
from swinssl.data.discover import Case
from swinssl.data.io import guess_modality, read_image, read_label
from swinssl.errors import DataError, SwinsslError


class Pipeline(Compose):
    """MONAI ``Compose`` that lets our one-line errors through.

    MONAI wraps any failure inside a transform in ``RuntimeError("applying transform ...")``;
    a ``SwinsslError`` (which names the file) is re-raised as it is.
    """

    def __call__(self, input_, *args, **kwargs):
        try:
            return super().__call__(input_, *args, **kwargs)
        except RuntimeError as err:
            cause = err.__cause__
            while cause is not None and not isinstance(cause, SwinsslError):
                cause = cause.__cause__
            if cause is None:
                raise
        # Raised outside the handler so that the error does not chain back to MONAI's wrapper.
        raise cause


def volume_file(item: Mapping[str, Any]) -> str:
    """The file that names a case item (its first image file)."""
    image = item["image"]
    return image if isinstance(image, str) else image[0]


def case_item(case: Case) -> dict[str, Any]:
    """The dict a pipeline consumes for one case."""
    images = [str(p) for p in case.images]
    return {
        "image": images[0] if len(images) == 1 else images,
        "label": str(case.label) if case.label else None,
        "modality": case.modality,
        "case_id": case.case_id,
    }


class LoadCased(MapTransform):
    """Read ``image`` (and ``label`` when present) with the checks of ``swinssl.data.io``.

    Resolves a missing ``modality`` from intensities (CT if air-like values are present). An item
    with ``"check_modality": True`` keeps its ``modality`` and gets that guess as ``guessed_modality``
    (prediction warns on a mismatch without reading the file twice).
    ``classes``: allowed label values (None: any integers); ``channels``: expected image channels.
    """

    def __init__(self, classes: Sequence[int] | None = None, channels: int = 1, require_label: bool = False):
        super().__init__(keys=["image", "label"], allow_missing_keys=True)
        self.classes = classes
        self.channels = channels
        self.require_label = require_label

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image_path = d["image"]
        d["image"] = read_image(image_path, channels=self.channels)
        first = volume_file(data)
        if d.get("label"):
            d["label"] = read_label(d["label"], d["image"], first, self.classes)
        elif self.require_label:
            raise DataError(f"{first}: no label for this case (fine-tuning needs one)")
        else:
            d.pop("label", None)
        if d.pop("check_modality", False):
            d["guessed_modality"] = guess_modality(d["image"])
        if not d.get("modality"):
            d["modality"] = d.get("guessed_modality") or guess_modality(d["image"])
        return d


def intensity_normalizer(cfg: PreprocessConfig, modality: str):
    """The transform that scales a channel-first volume of ``modality`` (CT or MRI) for the network
    (see module docstring); one definition, also run by nnU-Net's ``SwinsslNormalization``."""
    if modality == "CT":
        return ScaleIntensityRange(*cfg.ct_window, b_min=0.0, b_max=1.0, clip=True)
    if cfg.mri_normalization == "percentile":
        return ScaleIntensityRangePercentiles(*cfg.mri_percentiles, b_min=0.0, b_max=1.0, clip=True, channel_wise=True)
    return NormalizeIntensity(nonzero=True, channel_wise=True)


class NormalizeByModalityd(MapTransform):
    """Scale ``image`` by the modality named in the item (see module docstring)."""

    def __init__(self, cfg: PreprocessConfig):
        super().__init__(keys=["image"])
        self.ct = intensity_normalizer(cfg, "CT")
        self.mri = intensity_normalizer(cfg, "MRI")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        modality = d.get("modality")
        if modality not in ("CT", "MRI"):
            raise DataError(f"{d.get('case_id', '?')}: unknown modality {modality!r} (expected CT or MRI)")
        d["image"] = (self.ct if modality == "CT" else self.mri)(d["image"])
        return d


def _geometry(cfg: PreprocessConfig, keys: list[str]) -> list:
    """Reorient and (optionally) resample; labels use nearest-neighbour."""
    steps: list = [Orientationd(keys=keys, axcodes=cfg.orientation, labels=None)]
    if cfg.spacing is not None:
        modes = ["bilinear" if k == "image" else "nearest" for k in keys]
        spacing = Spacingd(keys=keys, pixdim=cfg.spacing, mode=modes)
        old = spacing.spacing_transform.sp_resample
        spacing.spacing_transform.sp_resample = SeparableNearestResample(
            mode=old.mode, padding_mode=old.padding_mode, align_corners=old.align_corners, dtype=old.dtype,
            lazy=old.lazy)
        steps.append(spacing)
    return steps


class SeparableNearestResample(SpatialResample):
    """MONAI's ``SpatialResample`` (what ``Spacingd`` resamples with) whose inverse, when it is a
    nearest-neighbour one between grids with parallel axes (the voxel-to-voxel map a scale and a
    shift per axis: a resampling after reorientation), gathers along each axis instead of sampling
    every voxel of the output grid: a predicted mask of a 512x512x100 CT is 26M voxels, and MONAI's
    grid sampling of them took a quarter of a prediction's time on 2 cores.

    Each axis's source voxels come from MONAI's own resampling of a ramp of indices (1..n) along
    that axis alone: the same matrices, coordinates, rounding, padding and dtype, so the result
    equals MONAI's voxel for voxel (tests/test_transforms.py). Any other inverse is MONAI's.
    """

    def inverse(self, data: torch.Tensor) -> torch.Tensor:
        info = self.get_most_recent_transform(data)[TraceKeys.EXTRA_INFO]
        if not isinstance(data, MetaTensor) or data.ndim != 4 or info.get("mode") not in ("nearest", 0):
            return super().inverse(data)
        source = data.peek_pending_affine().to(torch.float64).numpy()
        target = np.asarray(info["src_affine"], dtype=np.float64)
        voxels = np.linalg.solve(source, target)  # output voxel -> this grid's voxel, as MONAI computes it
        if voxels.shape != (4, 4) or np.any(voxels[:3, :3][~np.eye(3, dtype=bool)] != 0):
            return super().inverse(data)
        transform = self.pop_transform(data)
        size = [int(n) for n in transform[TraceKeys.ORIG_SIZE]]
        align = info.get("align_corners")
        align = False if align in (None, TraceKeys.NONE) else align
        dtype = get_torch_dtype_from_string(info["dtype"])
        index = []
        for axis in range(3):
            # One axis alone: the other axes are one voxel that maps onto itself.
            shape_in, shape_out, line = [1, 1, 1], [1, 1, 1], np.eye(4)
            shape_in[axis], shape_out[axis] = data.shape[1 + axis], size[axis]
            line[axis, axis], line[axis, 3] = voxels[axis, axis], voxels[axis, 3]
            ramp = torch.arange(1, data.shape[1 + axis] + 1, dtype=torch.float32).reshape(1, *shape_in)
            ramp = MetaTensor(ramp, affine=torch.eye(4, dtype=torch.float64))
            with self.trace_transform(False):
                picked = spatial_resample(ramp, torch.from_numpy(line), shape_out, info["mode"], info["padding_mode"],
                                          align, dtype, False, self.get_transform_info())
            index.append(picked.as_tensor().reshape(-1).round().long() - 1)  # -1: outside, padded with zeros
        values = data.as_tensor().to(torch.float32)
        for axis, picked in enumerate(index, start=1):
            zeros = list(values.shape)
            zeros[axis] = 1  # one plane of zeros after the last: what index -1 picks
            values = torch.cat([values, values.new_zeros(zeros)], axis)[(slice(None),) * axis + (picked,)]
        out = MetaTensor(values, meta=data.meta, applied_operations=data.applied_operations)
        out.affine = torch.from_numpy(source) @ torch.from_numpy(voxels)  # as MONAI's track_transform_meta sets it
        return out


@dataclass(frozen=True)
class Above:
    """``x > threshold``. A class, not a lambda: DataLoader workers started by ``spawn`` (macOS,
    Windows, a process that is itself spawned; ``forkserver`` from Python 3.14 on Linux) receive
    the pipeline pickled."""

    threshold: float

    def __call__(self, x):
        return x > self.threshold


def _foreground(cfg: PreprocessConfig, keys: list[str]) -> list:
    if not cfg.crop_foreground:
        return []
    return [CropForegroundd(keys=keys, source_key="image", select_fn=Above(cfg.foreground_threshold),
                            allow_smaller=True)]


def _head(cfg: PreprocessConfig, keys: list[str], load: LoadCased) -> list:
    """The deterministic head: read + check, geometry, normalisation, foreground crop."""
    return [load, *_geometry(cfg, keys), NormalizeByModalityd(cfg), *_foreground(cfg, keys)]


def _image_head(cfg: PreprocessConfig, channels: int) -> tuple[list, dict]:
    """The head for images without labels (pre-training, inference) and its cache fingerprint."""
    head = _head(cfg, ["image"], LoadCased(classes=None, channels=channels))
    return head, settings_fingerprint(cfg, channels=channels, classes=None, labels=False)


def crop_with_padding(image: Any, start: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """The ``size`` block at ``start`` of ``image`` (C, X, Y, Z: tensor or array, memory-mapped
    or not) as a new float32 tensor. Along an axis shorter than ``size`` the whole axis is
    taken, zero-padded equally on both sides (the extra voxel after)."""
    if isinstance(image, MetaTensor):
        image = image.as_tensor()  # no meta tracking for a slice
    spatial = image.shape[1:]
    slices, pads = [slice(None)], []
    for s, b, n in zip(spatial, start, size):
        if s >= n:
            slices.append(slice(b, b + n))
            pads.append((0, 0))
        else:
            slices.append(slice(None))
            pads.append(((n - s) // 2, n - s - (n - s) // 2))
    block = image[tuple(slices)]
    if torch.is_tensor(block):
        block = block.to(torch.float32, copy=True)
    else:
        block = torch.from_numpy(np.array(block, dtype=np.float32))
    if any(p != (0, 0) for p in pads):
        flat = [v for pair in reversed(pads) for v in pair]  # F.pad lists the last axis first
        block = torch.nn.functional.pad(block, flat)
    return block


class RandCropsd(Randomizable, MapTransform):
    """``num_samples`` random crops of ``roi_size`` from ``image``: a list of items with the
    crop as a float32 tensor. The image may be a memory-mapped array (from the cache), so a
    crop reads only its own voxels; axes shorter than the crop are zero-padded (centred)."""

    def __init__(self, roi_size: Sequence[int], num_samples: int):
        MapTransform.__init__(self, keys=["image"])
        self.roi_size, self.num_samples = tuple(int(r) for r in roi_size), num_samples

    def randomize(self, spatial: Sequence[int]) -> list[int]:
        return [int(self.R.randint(0, max(s - r, 0) + 1)) for s, r in zip(spatial, self.roi_size)]

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict[Hashable, Any]]:
        image = data["image"]
        rest = {k: v for k, v in data.items() if k != "image"}
        return [{**rest, "image": crop_with_padding(image, self.randomize(image.shape[1:]), self.roi_size)}
                for _ in range(self.num_samples)]


def pretrain_transforms(cfg: PreprocessConfig, channels: int = 1, cache: str | Path | None = None,
                        cache_dtype: str = "float32") -> Pipeline:
    """Unlabelled volumes -> ``cfg.num_crops`` random crops of ``cfg.roi_size`` in [0, 1] (a list of items).

    ``cache``: the cache folder for the head (crops are then read from memory-mapped arrays), or None;
    ``cache_dtype``: how it stores images (``data.cache_dtype``).
    """
    head, fingerprint = _image_head(cfg, channels)
    return Pipeline([*cached(head, cache, fingerprint, mmap=True, dtype=cache_dtype),
                     RandCropsd(cfg.roi_size, cfg.num_crops)])


def finetune_transforms(
    cfg: PreprocessConfig, classes: Sequence[int] | None = None, channels: int = 1, train: bool = True,
    cache: str | Path | None = None, cache_dtype: str = "float32",
) -> Pipeline:
    """Image + label. ``train``: label-guided random crops and augmentation; else whole volumes.

    ``cache``: the cache folder for the head, or None; ``cache_dtype``: how it stores images.
    """
    keys = ["image", "label"]
    head = _head(cfg, keys, LoadCased(classes=classes, channels=channels, require_label=True))
    fingerprint = settings_fingerprint(cfg, channels=channels, classes=list(classes) if classes else None, labels=True)
    steps: list = cached(head, cache, fingerprint, dtype=cache_dtype)
    if train:
        steps += [
            SpatialPadd(keys=keys, spatial_size=cfg.roi_size),
            label_guided_crops(cfg, keys, len(classes) if classes else None),
        ]
        if cfg.augment:
            steps += [
                RandFlipd(keys=keys, prob=0.1, spatial_axis=0),
                RandFlipd(keys=keys, prob=0.1, spatial_axis=1),
                RandFlipd(keys=keys, prob=0.1, spatial_axis=2),
                *quarter_turns(cfg.roi_size, keys),
                RandScaleIntensityd(keys="image", factors=0.1, prob=0.1),
                RandShiftIntensityd(keys="image", offsets=0.1, prob=0.1),
            ]
    return Pipeline(steps)


def quarter_turns(roi_size: Sequence[int], keys: list[str]) -> list:
    """Random quarter turns of a crop, in the first plane of ``roi_size`` whose two sides are
    equal ((0, 1) for a cube, as the papers' recipe): a turn in any other plane would change the
    crop's shape and break the batch. None where all three sides differ (the half turn is two
    of the flips already drawn)."""
    for axes in ((0, 1), (0, 2), (1, 2)):
        if roi_size[axes[0]] == roi_size[axes[1]]:
            return [RandRotate90d(keys=keys, prob=0.1, max_k=3, spatial_axes=axes)]
    return []


def label_guided_crops(cfg: PreprocessConfig, keys: list[str], num_classes: int | None):
    """``cfg.num_crops`` crops of ``cfg.roi_size``, centred on a foreground voxel with probability
    ``cfg.pos_fraction``: of a class drawn uniformly among the foreground classes present in the case
    (``classes``), or of any foreground voxel (``posneg``)."""
    common = dict(keys=keys, label_key="label", spatial_size=cfg.roi_size, num_samples=cfg.num_crops,
                  image_key="image", image_threshold=cfg.foreground_threshold)
    if cfg.crop_sampling == "posneg":
        return RandCropByPosNegLabeld(pos=cfg.pos_fraction, neg=1.0 - cfg.pos_fraction, **common)
    if not num_classes:
        raise ValueError("crop_sampling=classes needs the classes of the label")
    # A class absent from a case gets ratio 0 there, the others renormalised (MONAI's warning
    # for it is expected, so off).
    ratios = [1.0 - cfg.pos_fraction] + [cfg.pos_fraction / (num_classes - 1)] * (num_classes - 1)
    return RandCropByLabelClassesd(num_classes=num_classes, ratios=ratios, warn=False, **common)


def inference_transforms(cfg: PreprocessConfig, channels: int = 1, cache: str | Path | None = None) -> Pipeline:
    """Image only, every spatial step invertible: ``invert`` maps network outputs back to the input grid.

    ``cache``: the cache folder, or None. The head is pre-training's, so a volume pre-trained
    on is read from the same entry.
    """
    head, fingerprint = _image_head(cfg, channels)
    return Pipeline(cached(head, cache, fingerprint))


def invert(transforms: Compose, item: Mapping[Hashable, Any], output: torch.Tensor, nearest: bool = True) -> MetaTensor:
    """Map ``output`` (C, ...) on the grid of ``item["image"]`` back to the grid of the input file.

    Undoes foreground cropping, resampling and reorientation (MONAI's ``Invertd``); the
    result has the input's spatial shape and ``.affine``. ``nearest`` keeps masks integer.
    """
    image = item["image"]
    if not isinstance(image, MetaTensor):
        raise TypeError("invert needs the MetaTensor produced by the pipeline")
    if tuple(output.shape[1:]) != tuple(image.shape[1:]):
        raise ValueError(f"output spatial shape {tuple(output.shape[1:])} differs from the transformed image {tuple(image.shape[1:])}")
    # Invertd leaves a plain tensor untouched (with only a logged warning): always hand it a MetaTensor.
    pred = output.detach().to(torch.float32)
    pred = pred if isinstance(pred, MetaTensor) else MetaTensor(pred)
    inverter = Invertd(keys="pred", transform=transforms, orig_keys="image", nearest_interp=nearest)
    return inverter({**item, "pred": pred})["pred"]
