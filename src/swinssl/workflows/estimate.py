"""Estimate before a run: peak memory and seconds per step (or per volume) from a short measured probe.

Nothing here is modelled from layer sizes: the probe runs the real thing in a fresh process
(``workflows.fresh``) and measures it there.

- ``pretrain`` / ``finetune``: the stage itself (``engine.pretrain`` / ``engine.finetune``, the
  same code path as ``swinssl pretrain`` / ``finetune``) for ``steps`` optimiser steps (3 by
  default) with validation, the pre-training probe, previews and checkpoints off, into a
  temporary run folder deleted afterwards; on the config's data (its preprocessing cache is
  shared, so the run that follows finds those volumes ready), or without ``data.path`` on a few
  synthetic phantoms written into that folder. Step time: the median of the runner's ``step_s``
  (seconds from having the batch to the optimiser's update, the first step, a warm-up, not
  counted). Peak memory: on CPU the process's peak resident set size (``ru_maxrss``:
  interpreter, imports, data and model included, as for a real run's process); on CUDA
  ``torch.cuda.max_memory_reserved``.
- With a memory budget (or when the peak comes near the device's memory, or the probe runs out
  of it) a second probe at one crop per micro-step (two when the config has one) gives the line
  ``peak = base + crops x per_crop`` (``engine.memory.Fit``), and from it the largest
  ``train.batch_size`` at the config's ROI and the largest cubic ROI (a multiple of 32) at the
  config's batch that fit.
- ``predict``: the network of the config (``swinssl.nn.build_network``) in eval mode times
  batches of ``sw_batch_size`` windows of the ROI; seconds per volume = the number of sliding
  windows (``count_windows``, tiled as MONAI's ``sliding_window_inference`` tiles) x the time per
  window; peak = the measured peak + the output buffers of the stitching (``classes x voxels x
  4 bytes x 2``, and the count map).

``swinssl estimate`` prints ``Estimate.report()``; ``swinssl pretrain`` / ``finetune`` print
``Estimate.line()`` at start and pass ``Estimate.hint()`` to the run (``start_estimate``), so
that an out-of-memory error ends with the estimate and a setting that fits.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from swinssl.config import Config, from_dict, load_config, to_dict
from swinssl.engine.memory import GIB, Fit, Setting, device_memory, gib, largest_batch, largest_roi, roi_checker
from swinssl.errors import ConfigError, SwinsslError
from swinssl.runs import RunDir
from swinssl.utils import atomic_write_text, count_windows
from swinssl.workflows.fresh import FreshProcessFailed, run_fresh

PROBE_STEPS = 3  # optimiser steps of a training probe; the first is not timed
STAGES = ("pretrain", "finetune", "predict")
DEVICES = ("cpu", "cuda")
PREDICT_SHAPE = (256, 256, 128)  # the volume a predict estimate assumes without data or --shape
PREDICT_OVERLAP = 0.5  # swinssl predict's default
PREDICT_BATCHES = 3  # window batches timed after one untimed
NEAR_FULL = 0.9  # a peak above this share of the device's memory gets a fit (and a setting that fits) unasked


@dataclass
class Estimate:
    """What a probe predicts for a config on a device. Memory in bytes."""

    stage: str
    device: str  # cpu | cuda
    peak: float  # bytes: peak resident set size of the process (CPU) or reserved by torch's allocator (CUDA)
    seconds: float  # per optimiser step (pretrain, finetune) or per volume (predict)
    steps: int  # train.steps of the config (0 for predict)
    device_memory: int
    probe_steps: int  # optimiser steps (or window batches) the probe ran
    probe_s: float  # wall seconds of the probe(s), start-up included
    data_s: float = 0.0  # seconds per step the probe waited for batches (first visits, uncached)
    cpu_s: float = 0.0  # CPU seconds of the process per step (all its threads): the work, whatever else runs
    crops: int = 0  # crops per micro-step (training) or windows per batch (predict)
    fit: Fit | None = None
    budget: float | None = None  # bytes the suggestions fit into
    batch: Setting | None = None  # the largest batch at the config's ROI within the budget
    roi: Setting | None = None  # the largest cubic ROI at the config's crops within the budget
    fit_points: list[tuple[int, float]] = field(default_factory=list)  # (crops, peak) measured
    windows: int = 0  # predict: sliding windows of the volume
    shape: tuple[int, int, int] | None = None  # predict: the preprocessed volume
    classes: int = 0  # predict
    output_bytes: float = 0.0  # predict: the stitching's buffers, included in peak
    data: str = ""  # what the probe trained on
    times: list[float] = field(default_factory=list)  # seconds of each probe step (or window batch), warm-up first
    notes: list[str] = field(default_factory=list)

    @property
    def memory_kind(self) -> str:
        return "resident" if self.device == "cpu" else "reserved on the GPU"

    @property
    def unit(self) -> str:
        return "volume" if self.stage == "predict" else "step"

    @property
    def timed(self) -> bool:
        """False when the config's own probe ran out of memory: its peak is then the fit's, its time unknown."""
        return not math.isnan(self.seconds)

    def summary(self) -> str:
        """``peak 3.1 GiB resident, 4.2 s/step on cpu``"""
        time_part = f"{self.seconds:.3g} s/{self.unit}" if self.timed else "s/step not measured (out of memory)"
        return f"peak {gib(self.peak)} {self.memory_kind}, {time_part} on {self.device}"

    def line(self) -> str:
        """The one line ``swinssl pretrain`` / ``finetune`` print at start."""
        whole = f" -> about {duration(self.seconds * self.steps)} for {self.steps} steps" if self.steps and self.timed \
            else ""
        out = f"estimate: {self.summary()}{whole} (swinssl estimate measured {self.probe_steps} steps)"
        if self.peak > self.device_memory:
            fits = self.batch or self.roi
            out += (f"; more than the {gib(self.device_memory)} the {self.device} has: expect out of memory"
                    + (f", {fits} fits" if fits else ""))
        return out

    def hint(self) -> dict:
        """What a run needs to say when it runs out of memory (its ``start_estimate``)."""
        return {"summary": self.summary(), "fit": self.fit.to_dict() if self.fit else None}

    def report(self) -> list[str]:
        """The lines ``swinssl estimate`` prints."""
        lines = [f"{self.stage} on {self.device} ({gib(self.device_memory)} of memory)"]
        if self.stage == "predict":
            vox = math.prod(self.shape or (0,))
            buffers = f"output buffers {gib(self.output_bytes)} for {self.classes} classes x {vox:,} voxels"
            lines += [
                f"  peak memory  {gib(self.peak)} {self.memory_kind} "
                + (f"(windows {gib(self.peak - self.output_bytes)} + {buffers})" if self.device == "cpu" else
                   f"(windows; the {buffers} are in host memory)"),
                f"  time         {self.seconds:.3g} s per {'x'.join(map(str, self.shape or ()))} volume: "
                f"{self.windows} windows at overlap {PREDICT_OVERLAP:g} x {self.seconds / max(self.windows, 1):.3g} s "
                f"({self.crops} per forward pass)",
                f"  measured     {self.probe_steps} window batches in a separate process, {self.probe_s:.0f} s",
            ]
        else:
            lines.append(f"  peak memory  {gib(self.peak)} {self.memory_kind}"
                         + (" (the process's peak resident set size: interpreter, imports, data and model included)"
                            if self.device == "cpu" else " (torch.cuda.max_memory_reserved)"))
            if self.timed:
                lines += [f"  time         {self.seconds:.3g} s/step (median of {self.probe_steps - 1} timed steps; the "
                          f"first is a warm-up; {self.cpu_s:.3g} CPU s), {self.data_s:.2g} s/step waiting for data in "
                          "the probe",
                          f"  whole run    about {duration(self.seconds * self.steps)} for {self.steps} steps "
                          "(validation and checkpoints not included)"]
            lines.append(f"  measured     {self.probe_steps} steps of the real stage in a separate process, "
                         f"{self.probe_s:.0f} s, on {self.data}")
        if self.fit is not None:
            points = " and ".join(f"{c}" for c, _ in sorted(self.fit_points))
            lines.append(f"  memory fit   {gib(self.fit.base)} + {gib(self.fit.per_crop)} per crop "
                         f"(measured at {points} crops per micro-step)")
        if self.budget is not None and self.stage != "predict":
            lines.append(f"budget {gib(self.budget)}: the config's {self.crops} crops "
                         + ("fit" if self.peak <= self.budget else "do not fit"))
            if self.batch:
                lines.append(f"  largest batch at the config's ROI: {self.batch}")
            if self.roi:
                lines.append(f"  largest cubic ROI at the config's batch: {self.roi}")
            if not (self.batch or self.roi) and self.fit is not None and self.fit.per_crop > 0:
                lines.append("  nothing fits: not one crop, nor a 32^3 ROI; try model.use_checkpoint=true, "
                             "train.precision=bf16-mixed or a smaller model.feature_size")
        elif self.budget is not None:
            lines.append(f"budget {gib(self.budget)}: " + (
                "fits" if self.peak <= self.budget else f"does not fit; {self.batch} fits" if self.batch else
                f"does not fit, not even one window at a time; the output buffers alone take {gib(self.output_bytes)}"))
        lines += [f"note: {n}" for n in self.notes]
        return lines

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["fit"] = self.fit.to_dict() if self.fit else None
        for key in ("batch", "roi"):
            value = getattr(self, key)
            out[key] = {"overrides": value.overrides, "peak": value.peak} if value else None
        return out

    def write_json(self, path: str | Path) -> Path:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return Path(path)


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


# --- the estimate ------------------------------------------------------------------------------------


def check_request(stage: str, device: str, budget_gib: float | None, steps: int = PROBE_STEPS) -> None:
    """One line for a request that cannot be measured."""
    if stage not in STAGES:
        raise ConfigError(f"stage {stage!r}: choose one of {', '.join(STAGES)}")
    if device not in DEVICES:
        raise ConfigError(f"device {device!r}: choose one of {', '.join(DEVICES)}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("device cuda: no CUDA GPU is visible to torch here; estimate on --device cpu")
    if budget_gib is not None and not budget_gib > 0:
        raise ConfigError(f"memory budget {budget_gib} GiB: must be a positive number of GiB")
    if steps < 2:
        raise ConfigError(f"{steps} probe steps: at least 2 (the first is a warm-up and not timed)")


def device_of(cfg: Config) -> str | None:
    """The device a config's run trains on (cpu or cuda), or None for one the estimate does not measure (mps)."""
    accelerator = cfg.train.accelerator
    if accelerator == "cpu":
        return "cpu"
    if accelerator in ("cuda", "gpu"):
        return "cuda"
    if accelerator == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return None


def estimate(cfg: Config, stage: str = "pretrain", device: str = "cpu", budget_gib: float | None = None,
             steps: int = PROBE_STEPS, fit: bool | None = None, shape: tuple[int, int, int] | None = None,
             overlap: float = PREDICT_OVERLAP, sw_batch_size: int = 1) -> Estimate:
    """Measure ``cfg`` for ``stage`` on ``device`` in a separate process; see the module docstring.

    ``fit``: also measure at one crop and fit memory against crops (None: when a budget is given,
    the peak comes within 10% of the device's memory, or the config's probe runs out of memory).
    ``shape``, ``overlap``, ``sw_batch_size``: predict only.
    """
    check_request(stage, device, budget_gib, steps)
    budget = None if budget_gib is None else budget_gib * GIB
    with tempfile.TemporaryDirectory(prefix="swinssl-estimate-") as tmp:
        if stage == "predict":
            return _estimate_predict(cfg, device, budget, Path(tmp), shape, overlap, sw_batch_size)
        return _estimate_training(cfg, stage, device, budget, steps, fit, Path(tmp))


def estimate_at_start(stage: str, cfg: Config | None, resume: str | Path | None = None, overrides=(),
                      say: Callable[[str], None] = print) -> Estimate | None:
    """What ``swinssl pretrain`` / ``finetune`` measure before a run (its ``line()`` to print and its
    ``hint()`` for the run's out-of-memory line, ``start_estimate``); None when none is made: a
    process of a torchrun launch (every process would probe), a resumed folder without a config, no
    data yet, a device the estimate does not measure, or a failed probe. A config or data problem is
    left for the run to report; any other failure of the probe is said and the run starts anyway."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return None
    if resume is not None:
        if not RunDir(resume).config.is_file():
            return None
        cfg = load_config(RunDir(resume).config, list(overrides))
    device = device_of(cfg)
    if not cfg.data.path or not Path(cfg.data.path).exists() or device is None:
        return None
    say(f"estimate: measuring {PROBE_STEPS} steps in a separate process (--no-estimate skips this)")
    try:
        found = estimate(cfg, stage, device)
    except FreshProcessFailed as err:
        if err.out_of_memory or err.exit_code not in (2, 3, 5):  # config, data, output: the run says which
            say(f"estimate: not available ({err})")
        return None
    except SwinsslError:
        return None
    return found


def estimate_request(presets: list[str] | None, overrides: list[str], stage: str, device: str | None,
                     budget_gib: float | None = None, steps: int = PROBE_STEPS, shape: list[int] | None = None,
                     overlap: float | None = None, sw_batch_size: int | None = None,
                     say: Callable[[str], None] = print) -> Estimate:
    """``swinssl estimate``: the config of ``presets`` (default: the stage's tiny preset) with
    ``overrides`` on ``device`` (default: the config's), each default of a predict estimate as
    ``swinssl predict`` would choose it (overlap from the config, windows per batch for the device)."""
    presets = presets or ["pretrain/swin_unetr_tiny" if stage == "pretrain" else "finetune/tiny"]
    cfg = load_config(presets, overrides)
    device = device or device_of(cfg)
    if device is None:
        raise ConfigError(f"train.accelerator {cfg.train.accelerator}: the estimate measures cpu or cuda; pass --device")
    check_request(stage, device, budget_gib, steps)
    if shape is not None and len(shape) != 3:
        raise ConfigError(f"--shape: three sizes X Y Z, got {len(shape)}")
    if stage == "predict" and sw_batch_size is None:
        from swinssl.infer.volume import network_window_batch

        from swinssl.methods import finetune_method

        streams = finetune_method(cfg.finetune.method, dataclasses.asdict(cfg.model)).window_streams()
        sw_batch_size = network_window_batch(cfg.model.feature_size, cfg.preprocess.roi_size, device, streams)
    say(f"estimate: measuring {stage} of {' + '.join(presets)} on {device} in a separate process")
    return estimate(cfg, stage, device, budget_gib, steps, shape=tuple(shape) if shape else None,
                    overlap=cfg.finetune.overlap if overlap is None else overlap, sw_batch_size=sw_batch_size or 1)


def _estimate_training(cfg: Config, stage: str, device: str, budget: float | None, steps: int,
                       fit: bool | None, tmp: Path) -> Estimate:
    check = _stage_check(stage)
    check(cfg)
    data = _probe_data(cfg, stage, tmp)
    base = _probe_config(cfg, device, steps, tmp, data)
    memory = device_memory(device)
    t, p = cfg.train, cfg.preprocess
    crops = t.batch_size * p.num_crops
    started = time.perf_counter()
    failure: FreshProcessFailed | None = None
    try:
        main = run_probe({"kind": "train", "stage": stage, "device": device, "config": to_dict(base)}, tmp)
    except FreshProcessFailed as err:
        if not err.out_of_memory:
            raise
        failure, main = err, None
    points = [(crops, main["peak"])] if main else []
    wanted = fit if fit is not None else (budget is not None or main is None or main["peak"] > NEAR_FULL * memory)
    if wanted:
        # One crop (two where the config has one, or where the config's own probe failed: a line needs two points).
        for few in ([1] if crops > 1 and main else [1, 2] if not main else [2]):
            small = replace(base, train=replace(base.train, batch_size=1),
                            preprocess=replace(base.preprocess, num_crops=few))
            small = replace(small, train=replace(small.train, out=str(tmp / f"runs_{few}")))
            result = run_probe({"kind": "train", "stage": stage, "device": device, "config": to_dict(small)}, tmp)
            points.append((few, result["peak"]))
    if main is None and failure is not None and len(points) < 2:
        raise failure
    line = Fit.through(points[0], points[1], p.roi_size) if len(points) >= 2 else None
    peak = main["peak"] if main else line.peak(crops)
    est = Estimate(stage=stage, device=device, peak=peak, seconds=main["step_s"] if main else math.nan,
                   steps=t.steps, device_memory=memory, probe_steps=steps, probe_s=time.perf_counter() - started,
                   data_s=main["data_s"] if main else math.nan, cpu_s=main["cpu_s"] if main else math.nan,
                   crops=crops, fit=line, fit_points=points,
                   data=data["what"], times=main["times"] if main else [])
    if main is None:
        est.notes.append(f"the config's own probe ran out of memory ({failure}); its peak is the fit's")
    if line is not None:
        est.budget = budget if budget is not None else memory
        est.batch = largest_batch(line, est.budget, t.batch_size, p.num_crops, t.accumulate)
        est.roi = largest_roi(line, est.budget, crops, roi_checker(cfg, check))
        if line.per_crop <= 0:
            est.notes.append("peak memory did not grow with the crops in the probes: no batch or ROI suggested")
    if device == "cpu" and t.keep_memory:
        est.notes.append("train.keep_memory=true: resident memory only grows over a run; the peak here is that "
                         f"of {steps} steps")
    if t.devices * t.num_nodes > 1:
        est.notes.append(f"measured on one device; each of the {t.devices * t.num_nodes} processes holds about as much")
    return est


def _stage_check(stage: str):
    if stage == "pretrain":
        from swinssl.engine.pretrain import PretrainStage

        return PretrainStage.check
    from swinssl.engine.finetune import FinetuneStage

    return FinetuneStage.check


def _probe_data(cfg: Config, stage: str, tmp: Path) -> dict:
    """The data a probe trains on: the config's, or phantoms written into ``tmp``."""
    if cfg.data.path:
        from swinssl.engine.data import cache_root

        cache = cache_root(cfg)
        return {"path": cfg.data.path, "cache": str(cache.resolve()) if cache else "off",
                "what": f"the config's data ({cfg.data.path})"}
    from swinssl.data.phantom import write_phantom_dataset

    size = min(max(64, max(cfg.preprocess.roi_size)), 128)
    # Enough volumes for a step's batch after one is held out (validation) and one is a test case.
    cases = min(max(4, cfg.train.batch_size + 2), 8)
    path = write_phantom_dataset(tmp / "data", cases=cases, size=size, seed=0)
    return {"path": str(path), "cache": "auto", "what": f"{cases} synthetic phantoms of {size}^3 (no data.path given)"}


def _probe_config(cfg: Config, device: str, steps: int, tmp: Path, data: dict) -> Config:
    """The config a training probe runs: ``steps`` steps, one device, nothing but training, in ``tmp``."""
    train = replace(cfg.train, steps=steps, val_every=0, probe_data="", preview_every=0, checkpoint_every=0,
                    log_every=1, out=str(tmp / "runs"), name="probe", devices=1, num_nodes=1, strategy="auto",
                    accelerator=device)
    finetune = replace(cfg.finetune, fold=0) if cfg.finetune.fold == "all" else cfg.finetune
    return replace(cfg, train=train, finetune=finetune, data=replace(cfg.data, path=data["path"], cache=data["cache"]))


def _estimate_predict(cfg: Config, device: str, budget: float | None, tmp: Path, shape, overlap: float,
                      sw_batch_size: int) -> Estimate:
    if not 0 <= overlap < 1:
        raise ConfigError(f"overlap {overlap}: must be in [0, 1)")
    if sw_batch_size < 1:
        raise ConfigError(f"sw_batch_size {sw_batch_size}: must be at least 1")
    if shape is not None and (len(shape) != 3 or min(shape) < 1):
        raise ConfigError(f"shape {tuple(shape)}: three positive sizes X Y Z")
    started = time.perf_counter()
    spec = {"kind": "predict", "device": device, "config": to_dict(cfg), "shape": list(shape) if shape else None,
            "sw_batch_size": sw_batch_size, "batches": PREDICT_BATCHES}
    result = run_probe(spec, tmp)
    shape = tuple(result["shape"])
    windows = count_windows(shape, cfg.preprocess.roi_size, overlap)
    voxels = math.prod(shape)
    # MONAI's sliding window keeps the blended output and a count map; predict then the softmax of it.
    output = result["classes"] * voxels * 4 * 2 + voxels * 4
    if not result["input_loaded"]:
        output += cfg.model.in_channels * voxels * 4  # the preprocessed image itself
    seconds = windows * result["batch_s"] / sw_batch_size
    memory = device_memory(device)
    est = Estimate(stage="predict", device=device, peak=result["peak"] + output, seconds=seconds, steps=0,
                   device_memory=memory, probe_steps=PREDICT_BATCHES, probe_s=time.perf_counter() - started,
                   crops=sw_batch_size, windows=windows, shape=shape, classes=result["classes"], output_bytes=output,
                   data=result["what"], times=result["times"])
    if device == "cuda":
        est.notes.append(f"windows run on the GPU; the output buffers ({gib(output)}) are in host memory")
        est.peak = result["peak"]
    if budget is not None:
        est.budget = budget
        if est.peak > budget and sw_batch_size > 1:
            fewer = max(1, min(sw_batch_size - 1, int((budget - est.peak) // max(result["per_window"], 1)
                                                     + sw_batch_size)))
            smaller = Setting([f"--sw-batch-size {fewer}"], est.peak - (sw_batch_size - fewer) * result["per_window"])
            est.batch = smaller if smaller.peak <= budget else None
    return est


# --- the probe process -----------------------------------------------------------------------------------


def run_probe(spec: dict, tmp: Path) -> dict:
    """Run one probe in a fresh process (``workflows.fresh``); its result."""
    return run_fresh("swinssl.workflows.estimate:measure", spec)


def peak_memory(device: str) -> int:
    """This process's peak: resident set size (CPU; its largest finished child's if larger), or reserved by torch (CUDA)."""
    if device == "cuda":
        import torch

        return int(torch.cuda.max_memory_reserved())
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) * scale


def _train_probe(spec: dict) -> dict:
    from swinssl.runs import read_metrics

    cfg = from_dict(Config, spec["config"], source="estimate")
    if spec["stage"] == "pretrain":
        from swinssl.engine.pretrain import pretrain as run
    else:
        from swinssl.engine.finetune import finetune as run
    run_dir = run(cfg, progress=False)
    rows = sorted((r for r in read_metrics(run_dir) if r["split"] == "train"), key=lambda r: r["step"])
    step_s = [r["value"] for r in rows if r["name"] == "step_s"]
    data_s = [r["value"] for r in rows if r["name"] == "data_s"]
    cpu_s = [r["value"] for r in rows if r["name"] == "cpu_s"]
    return {"peak": peak_memory(spec["device"]), "step_s": statistics.median(step_s[1:]),
            "data_s": statistics.median(data_s[1:]), "cpu_s": statistics.median(cpu_s[1:]), "times": step_s}


def _predict_probe(spec: dict) -> dict:
    import torch

    from swinssl.methods import finetune_method, window_predictor
    from swinssl.nn import build_network

    cfg = from_dict(Config, spec["config"], source="estimate")
    device = torch.device(spec["device"])
    shape, classes, loaded, what = spec["shape"], cfg.data.num_classes, False, "the given shape"
    if cfg.data.path:
        from swinssl.data.discover import find_dataset
        from swinssl.data.transforms import case_item, inference_transforms

        dataset = find_dataset(cfg.data.path, cfg.data.modality)
        if not classes and dataset.labelled:
            from swinssl.data.splits import class_indices

            classes = len(class_indices(dataset))
        if shape is None:
            cases = dataset.split("test") or dataset.split("training", "validation")
            if not cases:
                raise ConfigError(f"{cfg.data.path}: no volumes to take the shape of")
            image = inference_transforms(cfg.preprocess, cfg.model.in_channels)(case_item(cases[0]))["image"]
            shape, loaded, what = list(image.shape[1:]), True, f"{cases[0].case_id} of {cfg.data.path}, preprocessed"
    if shape is None:
        shape, what = list(PREDICT_SHAPE), "the default volume"
    classes = classes or 2
    model = build_network(cfg.model, out_channels=classes).to(device).eval()
    predictor, _ = window_predictor(model, finetune_method(cfg.finetune.method, dataclasses.asdict(cfg.model)))
    roi, sw = tuple(cfg.preprocess.roi_size), spec["sw_batch_size"]
    # One window first, then the batch: the peak only grows, so the two give the memory of a window.
    peaks, times = [], []
    for n in sorted({1, sw}):
        x = torch.rand((n, cfg.model.in_channels, *roi), device=device)
        times = []
        with torch.no_grad():
            for _ in range(spec["batches"] + 1):
                began = time.perf_counter()
                predictor(x).float().cpu()
                times.append(time.perf_counter() - began)
        del x
        peaks.append(peak_memory(spec["device"]))
    per_window = (peaks[-1] - peaks[0]) / (sw - 1) if sw > 1 else 0.0
    return {"peak": peaks[-1], "batch_s": statistics.median(times[1:]), "shape": shape, "classes": classes,
            "input_loaded": loaded, "what": what, "per_window": per_window, "times": times}


def measure(spec: dict) -> dict:
    """The probe process's work: a few training steps or window batches, as ``spec`` says."""
    return _train_probe(spec) if spec["kind"] == "train" else _predict_probe(spec)
