"""Memory of a training run: how much the device has, what fits, and one line when a run runs out.

The estimate (``workflows.estimate``) measures a run's peak at two crop counts and fits
``peak = base + crops x per_crop`` (``Fit``); ``largest_batch`` and ``largest_roi`` read the
settings that fit a budget off that line. The runner turns an out-of-memory error into a
``TrainingError`` of one line (``out_of_memory_line``): where, on which device, the estimate made
at start when there was one (handed to the run by ``swinssl pretrain`` / ``finetune``), a setting that
fits, and the ``swinssl estimate`` command that checks it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

GIB = 2**30
ROI_STEP = 32  # ROI sides that SwinUNETR takes without padding
MAX_BATCH = 256  # the largest batch size a budget suggests


def gib(n: float) -> str:
    """``3.1 GiB`` (``0.42 GiB`` under 1 GiB)."""
    value = n / GIB
    return f"{value:.2f} GiB" if abs(value) < 1 else f"{value:.1f} GiB"


# --- the device ---------------------------------------------------------------------------------------


def device_memory(device: str | torch.device) -> int:
    """Bytes the device can hold: a GPU's total memory; for the CPU the physical memory, or the
    container's limit (cgroup) when that is lower."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device.index or 0).total_memory
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` says an allocation failed: torch's OutOfMemoryError (CUDA), the CPU
    allocator's RuntimeError ("can't allocate memory"), or Python's MemoryError."""
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return True
    if isinstance(err, RuntimeError):
        text = str(err).lower()
        return any(mark in text for mark in ("can't allocate memory", "cannot allocate memory", "out of memory",
                                              "not enough memory"))
    return False


# --- what fits ------------------------------------------------------------------------------------------


def voxels(roi) -> int:
    return math.prod(int(s) for s in roi)


@dataclass
class Fit:
    """Peak memory of a run against its crops per micro-step (``train.batch_size x preprocess.num_crops``),
    measured at two crop counts: ``base + crops x per_crop``; a crop of another ROI costs in proportion
    to its voxels (``per_crop`` is at ``roi_size``)."""

    base: float
    per_crop: float
    roi_size: tuple[int, int, int]

    @classmethod
    def through(cls, a: tuple[int, float], b: tuple[int, float], roi_size) -> "Fit":
        """The line through (crops, peak) points ``a`` and ``b`` (different crop counts)."""
        (c1, p1), (c2, p2) = sorted([a, b])
        if c1 == c2:
            raise ValueError(f"a fit needs two crop counts, got {c1} twice")
        per_crop = (p2 - p1) / (c2 - c1)
        return cls(base=p1 - c1 * per_crop, per_crop=per_crop, roi_size=tuple(int(s) for s in roi_size))

    def peak(self, crops: int, roi=None) -> float:
        scale = 1.0 if roi is None else voxels(roi) / voxels(self.roi_size)
        return self.base + crops * self.per_crop * scale

    def to_dict(self) -> dict:
        return {"base": self.base, "per_crop": self.per_crop, "roi_size": list(self.roi_size)}

    @classmethod
    def from_dict(cls, d: dict) -> "Fit":
        return cls(float(d["base"]), float(d["per_crop"]), tuple(int(s) for s in d["roi_size"]))


@dataclass
class Setting:
    """A setting that fits: the overrides, and the peak the fit predicts for them."""

    overrides: list[str]
    peak: float

    def __str__(self) -> str:
        return f"{' '.join(self.overrides)} (about {gib(self.peak)})"


def largest_batch(fit: Fit, budget: float, batch_size: int, num_crops: int, accumulate: int = 1) -> Setting | None:
    """The largest ``train.batch_size`` whose peak fits ``budget`` at the fit's ROI; at one volume per
    step, the most ``preprocess.num_crops`` that fit. A smaller batch than ``batch_size`` comes with the
    ``train.accumulate`` that keeps the crops of an optimiser step. None when not even one crop fits."""
    if fit.per_crop <= 0:
        return None
    most = min(MAX_BATCH, int((budget - fit.base) // (num_crops * fit.per_crop)))
    if most >= 1:
        out = [f"train.batch_size={most}"]
        if most < batch_size:
            out.append(f"train.accumulate={math.ceil(batch_size * accumulate / most)}")
        return Setting(out, fit.peak(most * num_crops))
    crops = int((budget - fit.base) // fit.per_crop)
    if crops >= 1:
        return Setting(["train.batch_size=1", f"preprocess.num_crops={crops}",
                        f"train.accumulate={math.ceil(batch_size * num_crops * accumulate / crops)}"], fit.peak(crops))
    return None


def largest_roi(fit: Fit, budget: float, crops: int, allowed: Callable[[int], bool] = lambda side: True,
                most: int = 512) -> Setting | None:
    """The largest cubic ``preprocess.roi_size`` (a multiple of 32, at most ``most``) whose peak at
    ``crops`` crops fits ``budget`` and that ``allowed`` accepts; None when none does."""
    if fit.per_crop <= 0:
        return None
    best = None
    for side in range(ROI_STEP, most + 1, ROI_STEP):
        peak = fit.peak(crops, (side,) * 3)
        if peak > budget:
            break
        if allowed(side):
            best = Setting([f"preprocess.roi_size={side}"], peak)
    return best


def smaller_setting(cfg) -> list[str]:
    """Without a fit: half the crops (``train.batch_size``, then ``preprocess.num_crops``), else the
    next smaller ROI side that is a multiple of 32; [] when already at one 32^3 crop."""
    t, p = cfg.train, cfg.preprocess
    if t.batch_size > 1:
        half = t.batch_size // 2
        return [f"train.batch_size={half}", f"train.accumulate={math.ceil(t.batch_size * t.accumulate / half)}"]
    if p.num_crops > 1:
        return [f"preprocess.num_crops={p.num_crops // 2}"]
    side = max(p.roi_size)
    smaller = (side - 1) // ROI_STEP * ROI_STEP
    return [f"preprocess.roi_size={smaller}"] if smaller >= ROI_STEP else []


# --- the line when a run runs out of memory -------------------------------------------------------------


def fitting_setting(cfg, budget: float, fit: Fit | None,
                    check: Callable[[object], None] | None = None) -> tuple[list[str], str]:
    """A setting smaller than the config's that fits ``budget``, as (overrides, text): the largest
    batch from ``fit``, else its largest ROI at the config's crops, else (no fit, or one that says
    the config fits although it did not) half the crops or the next smaller ROI."""
    t, p = cfg.train, cfg.preprocess
    crops = t.batch_size * p.num_crops
    if fit is not None:
        choice = largest_batch(fit, budget, t.batch_size, p.num_crops, t.accumulate)
        if choice is not None and fit.peak(crops) > budget:
            if choice.peak >= fit.peak(crops):  # not smaller: the config's crops at a smaller ROI
                choice = None
            if choice is None:
                choice = largest_roi(fit, budget, crops, roi_checker(cfg, check), most=max(p.roi_size) - 1)
            if choice is not None:
                return choice.overrides, str(choice)
            return [], "none at one 32^3 crop by the estimate's fit: try model.use_checkpoint=true or a smaller " \
                       "model.feature_size"
    smaller = smaller_setting(cfg)
    if smaller:
        return smaller, " ".join(smaller)
    return [], "none smaller than one 32^3 crop: try model.use_checkpoint=true or a smaller model.feature_size"


def roi_checker(cfg, check: Callable[[object], None] | None) -> Callable[[int], bool]:
    """Whether a cubic ROI side passes ``check`` (the stage's config check, raising ConfigError)."""
    from swinssl.errors import ConfigError

    def allowed(side: int) -> bool:
        if check is None:
            return True
        try:
            check(replace(cfg, preprocess=replace(cfg.preprocess, roi_size=(side,) * 3)))
        except ConfigError:
            return False
        return True

    return allowed


def out_of_memory_line(where: str, device: torch.device, cfg, kind: str, config_file: Path,
                       last: Path, check: Callable[[object], None] | None = None, hint: dict | None = None) -> str:
    """The one line a run that ran out of memory ends with; ``hint``: the estimate made at start."""
    budget = device_memory(device)
    fit = Fit.from_dict(hint["fit"]) if hint and hint.get("fit") else None
    said = f"the estimate at start: {hint['summary']}" if hint and hint.get("summary") else "no estimate was made at start"
    overrides, setting = fitting_setting(cfg, budget, fit, check)
    where_device = f"{device.type}{'' if device.index is None else f':{device.index}'}"
    command = " ".join(["swinssl estimate", f"--stage {kind}", f"--config {config_file}", *overrides,
                        f"--device {device.type}", f"--memory-budget {budget / GIB:.0f}"])
    kept = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written yet"
    return (f"out of memory at {where} on {where_device} ({gib(budget)}); {said}; a setting that fits: {setting} "
            f"(check: {command}); {kept}")
