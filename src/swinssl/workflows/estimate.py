"""Estimate before a run: peak memory and seconds per step (or per volume) from a short measured probe.

Nothing here is modelled from layer sizes: the probe runs the real thing in a fresh process
(``workflows.fresh``) and measures it there.

- ``pretrain`` / ``finetune``: the stage itself (``engine.pretrain`` / ``engine.finetune``, the
  same code path as ``swinssl pretrain`` / ``finetune``, on ``engine.runner``) for ``steps``
  optimiser steps (3 by default), then what the run does after a step, each once, as the run
  does it after its last step: the validation (fine-tuning: the sliding window over the largest
  validation volume at the run's overlap and ``finetune.sw_batch_size``; pre-training: the
  validation losses of the ``train.batch_size`` largest held-out volumes, and the frozen-encoder
  probe when ``train.probe_data`` is set, on its largest held-out case), the preview when the run
  writes them, and one checkpoint save, all into a temporary run folder deleted afterwards. The
  largest volume is chosen by preprocessed voxels from the files' headers
  (``preprocessed_shape``), no volume read. On the config's data (its preprocessing cache is
  shared, so the run that follows finds those volumes ready), or without ``data.path`` on a few
  synthetic phantoms written into that folder. Each phase's peak is measured on its own
  (``PhaseMeter``: on Linux the resident high-water mark, reset between phases; on CUDA torch's
  peak reserved memory, reset likewise); the estimate's peak is the worst of them, since a run
  is only as small as its largest moment. Step time: the median of the runner's ``step_s``
  (seconds from having the batch to the optimiser's update, the first step, a warm-up, not
  counted). Peak memory: on CPU the process's resident set size (interpreter, imports, data and
  model included, as for a real run's process; the DataLoader workers' own peak counts towards
  training); on CUDA ``torch.cuda.max_memory_reserved``.
- With a memory budget (or when the peak comes near the device's memory, or the probe runs out
  of it) a second probe at one crop per micro-step (two when the config has one), training only,
  gives the line ``training peak = base + crops x per_crop`` (``engine.memory.Fit``), and from it
  the largest ``train.batch_size`` at the config's ROI and the largest cubic ROI (a multiple of
  32) at the config's batch that fit; none where validation or saving alone exceed the budget.
- The disk the preprocessing cache of the run's volumes takes (``cache_usage``): preprocessed
  voxels from the headers (before the foreground crop, so an upper bound) x the bytes of
  ``data.cache_dtype``, plus a byte a voxel for labels; and how much of it the cache already holds.
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

import contextlib
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

import numpy as np

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
PHASES = ("training", "validation", "probe", "preview", "checkpoint")  # in the order a run meets them
PROBE_HEAD_STEPS = 2  # the frozen-encoder probe's head steps in the estimate: each costs the same memory
CACHE_DTYPE_BYTES = {"float32": 4, "float16": 2}  # data.cache_dtype: bytes of a cached image voxel
LABEL_BYTES = 1  # a cached label voxel (class indices as uint8: data.cache stores the smallest exact type)


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
    classes: int = 0  # predict; finetune: the classes the probe's run segments (background included)
    output_bytes: float = 0.0  # predict: the stitching's buffers, included in peak
    data: str = ""  # what the probe trained on
    times: list[float] = field(default_factory=list)  # seconds of each probe step (or window batch), warm-up first
    notes: list[str] = field(default_factory=list)
    # Training stages: each phase's own peak (bytes; PHASES order), ``peak`` the largest; seconds of the
    # phases after training (validation, probe, preview, checkpoint), each measured once.
    phases: dict[str, float] = field(default_factory=dict)
    phase_s: dict[str, float] = field(default_factory=dict)
    validated: str = ""  # what the probe's validation covered, e.g. "lung1 (195x195x121 voxels), the largest of 3"
    validations: int = 0  # validations the whole run makes (train.val_every over train.steps)
    checkpoint_bytes: int = 0  # the size of one checkpoint file of the run (0: the run saves none)
    cache: "CacheUsage | None" = None  # swinssl estimate: the disk the run's preprocessing cache takes

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

    def phase_part(self) -> str:
        """``(training 1.4, validation 2.0, checkpoint 1.5)`` in GiB; "" with one phase or none."""
        if len(self.phases) < 2:
            return ""
        return "(" + ", ".join(f"{name} {value / GIB:.{1 if self.peak >= GIB else 2}f}"
                               for name, value in self.phases.items()) + ")"

    def summary(self) -> str:
        """``peak 2.0 GiB resident (training 1.4, validation 2.0, checkpoint 1.5), 4.2 s/step on cpu``"""
        time_part = f"{self.seconds:.3g} s/{self.unit}" if self.timed else "s/step not measured (out of memory)"
        phases = f" {self.phase_part()}" if self.phase_part() else ""
        return f"peak {gib(self.peak)} {self.memory_kind}{phases}, {time_part} on {self.device}"

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
            if self.phases:
                lines.append("  by phase     " + ", ".join(
                    f"{name} {gib(value)}" + (f" (a {self.checkpoint_bytes / 2**20:.3g} MiB file)"
                                              if name == "checkpoint" and self.checkpoint_bytes else "")
                    for name, value in self.phases.items())
                    + (f"; validated {self.validated}" if self.validated else ""))
            if self.timed:
                lines += [f"  time         {self.seconds:.3g} s/step (median of {self.probe_steps - 1} timed steps; the "
                          f"first is a warm-up; {self.cpu_s:.3g} CPU s), {self.data_s:.2g} s/step waiting for data in "
                          "the probe",
                          f"  whole run    about {duration(self.seconds * self.steps)} for {self.steps} steps"
                          + self._after_steps_time()]
            after = [name for name in self.phases if name != "training"]
            lines.append(f"  measured     {self.probe_steps} steps of the real stage"
                         + (f", then its {', '.join(after)} once" if after else "")
                         + f", in a separate process, {self.probe_s:.0f} s, on {self.data}")
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
        if self.cache is not None:
            lines.append(self.cache.line())
        lines += [f"note: {n}" for n in self.notes]
        return lines

    def _after_steps_time(self) -> str:
        """``, plus 4 validations (each 20 s for lung1 ... alone)``: the validation measured once; a
        run's validation takes longer with more volumes. "" when the probe validated nothing."""
        seconds = self.phase_s.get("validation")
        if seconds is None or not self.validations:
            return ""
        return (f", plus {self.validations} validation{'s' if self.validations > 1 else ''} "
                f"(each {duration(seconds)} for {self.validated or 'the volumes measured'} alone)")

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
             overlap: float = PREDICT_OVERLAP, sw_batch_size: int = 1, disk: bool = False) -> Estimate:
    """Measure ``cfg`` for ``stage`` on ``device`` in a separate process; see the module docstring.

    ``fit``: also measure at one crop and fit memory against crops (None: when a budget is given,
    the peak comes within 10% of the device's memory, or the config's probe runs out of memory).
    ``shape``, ``overlap``, ``sw_batch_size``: predict only. ``disk``: training stages with
    ``data.path``: also the disk the preprocessing cache of the run's volumes takes (``Estimate.cache``).
    """
    check_request(stage, device, budget_gib, steps)
    budget = None if budget_gib is None else budget_gib * GIB
    with tempfile.TemporaryDirectory(prefix="swinssl-estimate-") as tmp:
        if stage == "predict":
            return _estimate_predict(cfg, device, budget, Path(tmp), shape, overlap, sw_batch_size)
        found = _estimate_training(cfg, stage, device, budget, steps, fit, Path(tmp))
    if disk and cfg.data.path:
        # After the probe: its classes spare reading labels, and what it cached is there for the run.
        found.cache = cache_usage(cfg, stage, classes=list(range(found.classes)) if found.classes else None)
    return found


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
                    overlap=cfg.finetune.overlap if overlap is None else overlap, sw_batch_size=sw_batch_size or 1,
                    disk=True)


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
    phases = main["phases"] if main else {}
    # The fit is of training: validation and saving do not grow with the crops of a step.
    points = [(crops, phases["training"])] if main else []
    wanted = fit if fit is not None else (budget is not None or main is None or main["peak"] > NEAR_FULL * memory)
    if wanted:
        # One crop (two where the config has one, or where the config's own probe failed: a line needs two points).
        for few in ([1] if crops > 1 and main else [1, 2] if not main else [2]):
            small = _probe_config(cfg, device, steps, tmp, data, after_steps=False)
            small = replace(small, train=replace(small.train, batch_size=1, out=str(tmp / f"runs_{few}")),
                            preprocess=replace(small.preprocess, num_crops=few))
            result = run_probe({"kind": "train", "stage": stage, "device": device, "config": to_dict(small)}, tmp)
            points.append((few, result["phases"]["training"]))
    if main is None and failure is not None and len(points) < 2:
        raise failure
    line = Fit.through(points[0], points[1], p.roi_size) if len(points) >= 2 else None
    if main is None:
        phases = {"training": line.peak(crops)}
    est = Estimate(stage=stage, device=device, peak=max(phases.values()), seconds=main["step_s"] if main else math.nan,
                   steps=t.steps, device_memory=memory, probe_steps=steps, probe_s=time.perf_counter() - started,
                   data_s=main["data_s"] if main else math.nan, cpu_s=main["cpu_s"] if main else math.nan,
                   crops=crops, fit=line, fit_points=points,
                   data=data["what"], times=main["times"] if main else [], phases=phases,
                   phase_s=main["phase_s"] if main else {}, validated=main["validated"] if main else "",
                   validations=_validations(cfg), classes=main["classes"] if main else 0,
                   checkpoint_bytes=main["checkpoint_bytes"] if main else 0)
    if main is None:
        est.notes.append(f"the config's own probe ran out of memory ({failure}); its peak is the fit's, "
                         "training only (validation and saving not measured)")
    if line is not None:
        est.budget = budget if budget is not None else memory
        rest = max((v for k, v in phases.items() if k != "training"), default=0.0)
        if rest > est.budget:
            worst = max((k for k in phases if k != "training"), key=phases.get)
            est.notes.append(f"the {worst} alone peaks at {gib(rest)}, above {gib(est.budget)}: no batch or ROI "
                             "fits" + (" (fewer windows at once: finetune.sw_batch_size)" if worst == "validation"
                                       and stage == "finetune" else ""))
        else:
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


def _validations(cfg: Config) -> int:
    """How many times a run of ``cfg`` validates: on multiples of ``train.val_every`` and after its last step."""
    every, steps = cfg.train.val_every, cfg.train.steps
    return 0 if every <= 0 else steps // every + (1 if steps % every else 0)


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


def _probe_config(cfg: Config, device: str, steps: int, tmp: Path, data: dict, after_steps: bool = True) -> Config:
    """The config a training probe runs: ``steps`` steps on one device in ``tmp``, then (``after_steps``)
    what the run does after a step, each once, after the last step: the validation (and the
    pre-training's probe), the preview and the checkpoint the config asks for; without
    ``after_steps``, nothing but training."""
    t = cfg.train

    def once(every: int) -> int:
        """Due only after the last step (runner's ``due``), when due at all."""
        return steps if after_steps and every > 0 else 0

    probe_data = t.probe_data if after_steps else ""
    train = replace(t, steps=steps, val_every=once(t.val_every), probe_data=probe_data,
                    probe_every=once(t.probe_every) if probe_data else t.probe_every,
                    probe_steps=min(t.probe_steps, PROBE_HEAD_STEPS), preview_every=once(t.preview_every),
                    checkpoint_every=once(t.checkpoint_every), log_every=1, out=str(tmp / "runs"), name="probe",
                    devices=1, num_nodes=1, strategy="auto", accelerator=device)
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


# --- the cache on disk ------------------------------------------------------------------------------------


@dataclass
class CacheUsage:
    """The disk the preprocessing cache of a run's volumes takes (``cache_usage``), in bytes."""

    root: str  # the cache folder; "" when data.cache is off
    volumes: int  # the run's volumes
    bytes: float  # at most: preprocessed voxels before the foreground crop x bytes a voxel (image + label)
    dtype: str  # data.cache_dtype: the cached image's voxels
    cached: float | None = None  # bytes of this run's entries already in the cache (None: not known)
    cached_volumes: int = 0
    uncounted: int = 0  # volumes whose headers do not tell their grid (DICOM, other formats): not in ``bytes``

    def line(self) -> str:
        """``cache: at most 12.4 GiB for 5,050 volumes in runs/cache (0.3 GiB already there)``"""
        if not self.root:
            return "cache: off (data.cache=off): every visit reads and preprocesses its volume again"
        there = ("" if self.cached is None else
                 f" ({gib(self.cached)} already there, {self.cached_volumes:,} of the volumes)" if self.cached_volumes
                 else " (none of it there yet)")
        left = (f"; {self.uncounted:,} volume{'s' if self.uncounted > 1 else ''} not counted: the header does not "
                "say the grid (DICOM or another format)" if self.uncounted else "")
        return (f"cache: at most {gib(self.bytes)} for {self.volumes:,} volumes in {self.root}{there}, "
                f"{self.dtype} images{left}")


def preprocessed_shape(path: str | Path, preprocess) -> tuple[int, int, int] | None:
    """The spatial shape of a volume after reorientation (to ``preprocess.orientation``) and
    resampling to ``preprocess.spacing``, from the file's header alone (``data.io.header_grid``),
    before the foreground crop; None where the header does not tell (DICOM, other formats).

    Spacing (MONAI ``Spacingd`` after ``Orientationd``, its default ``scale_extent=False``) keeps the
    first and last voxel centres: an axis of ``n`` voxels ``s`` mm apart becomes
    ``round((n - 1) * s / target) + 1`` voxels, ``target`` being the spacing of the RAS axis it
    points along. Reorientation only permutes and flips axes.
    """
    from swinssl.data.io import header_grid

    grid = header_grid(path)
    if grid is None:
        return None
    shape, affine = grid
    directions = np.asarray(affine, dtype=np.float64)[:3, :3]
    axis_of = np.abs(directions).argmax(axis=0)  # the RAS axis each array axis points along
    sizes = np.asarray(shape, dtype=np.float64)
    if preprocess.spacing is not None:
        own = np.sqrt((directions**2).sum(axis=0))  # mm between voxels along each array axis
        sizes = np.round((sizes - 1) * own / np.asarray(preprocess.spacing, dtype=np.float64)[axis_of] + 1.0)
    # Orientationd puts the world axis of each letter of ``preprocess.orientation`` at that letter's place.
    world = {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}
    slot = {world.get(letter, i): i for i, letter in enumerate(str(preprocess.orientation).upper()[:3])}
    oriented = [0, 0, 0]
    for axis, size in zip(axis_of, sizes):
        oriented[slot.get(int(axis), int(axis))] = int(size)
    return tuple(oriented) if 0 not in oriented else tuple(int(v) for v in sizes)  # an oblique tie: the file's order


def _run_volumes(cfg: Config, stage: str, classes: list[int] | None) -> tuple[list, list, list[int] | None]:
    """(labelled cases, image-only cases, classes) a run of ``cfg`` caches: fine-tuning's training and
    validation cases of its fold (of every fold for ``finetune.fold=all``) with their labels and its
    unlabelled ones; pre-training's training and validation volumes. ``classes``: the fine-tuning's, when
    known; None when only reading its labels would tell (nothing is read here)."""
    from swinssl.data.discover import find_dataset
    from swinssl.data.splits import class_indices, finetune_split, unlabeled_cases

    dataset = find_dataset(cfg.data.path, cfg.data.modality)
    if stage == "pretrain":
        return [], [replace(c, label=None) for c in dataset.split("training", "validation")], None
    ft = cfg.finetune
    folds = range(ft.folds) if ft.fold == "all" else [ft.fold]
    labelled: dict = {}
    for fold in folds:
        train, val = finetune_split(dataset, replace(ft, fold=fold), cfg.train.val_fraction, cfg.seed)
        labelled.update({c.images: c for c in train + val})
    cases = list(labelled.values())
    extra = unlabeled_cases(ft.unlabeled, cfg.data.modality, dataset, cases) if ft.unlabeled else []
    if cfg.data.num_classes or dataset.labels:
        classes = class_indices(dataset, cfg.data.num_classes)  # from the config or dataset.json: no label read
    return cases, extra, classes


def _entry_bytes(head, case) -> int | None:
    """Bytes of ``case``'s entry of ``head`` (a ``CachedPrefixd``) in the cache, or None when there is
    none. The key comes from the checksum memo alone: a source not remembered there has no entry
    (an entry is only built with its sources' checksums remembered), and no file is hashed here."""
    from swinssl.data.cache import entry_complete
    from swinssl.data.transforms import case_item

    try:
        key = head.key(case_item(case), hash_new=False)
    except OSError:
        return None
    entry = head.entry(key) if key else None
    if entry is None or not entry_complete(entry):
        return None
    return sum(f.stat().st_size for f in entry.iterdir() if f.is_file())


def cache_usage(cfg: Config, stage: str, classes: list[int] | None = None) -> CacheUsage:
    """The disk the preprocessing cache of a ``stage`` run of ``cfg`` takes, from the volumes' headers
    (no voxel read, no file hashed): for each volume ``preprocessed_shape`` voxels (before the
    foreground crop: at most) x ``model.in_channels`` x the bytes of ``data.cache_dtype``, plus one
    byte a voxel for a label; and the entries of these volumes the cache already holds (unknown
    for a fine-tuning whose classes only its label files tell, unless ``classes`` says them)."""
    from swinssl.data.prepare import stage_head
    from swinssl.engine.data import cache_root

    dtype = getattr(cfg.data, "cache_dtype", "float32")
    if dtype not in CACHE_DTYPE_BYTES:
        raise ConfigError(f"data.cache_dtype {dtype!r}: choose one of {', '.join(CACHE_DTYPE_BYTES)}")
    root = cache_root(cfg)
    labelled, images_only, classes = _run_volumes(cfg, stage, classes)
    usage = CacheUsage(root=str(root) if root else "", volumes=len(labelled) + len(images_only), bytes=0.0, dtype=dtype)
    channels = cfg.model.in_channels
    for case in labelled + images_only:
        shape = preprocessed_shape(case.images[0], cfg.preprocess)
        if shape is None:
            usage.uncounted += 1
            continue
        voxels = math.prod(shape)
        usage.bytes += voxels * (channels * CACHE_DTYPE_BYTES[dtype] + (LABEL_BYTES if case.label else 0))
    if root is None or (labelled and classes is None):
        return usage
    # Each group through the cache step of the pipeline that builds its entries: the same keys.
    groups = [(stage_head(cfg, "pretrain", root), images_only)] if images_only else []
    if labelled:
        groups.append((stage_head(cfg, "finetune", root, classes), labelled))
    usage.cached = 0.0
    for head, cases in groups:
        for case in cases:
            size = _entry_bytes(head, case)
            if size is not None:
                usage.cached += size
                usage.cached_volumes += 1
    return usage


# --- the probe process -----------------------------------------------------------------------------------


def run_probe(spec: dict, tmp: Path) -> dict:
    """Run one probe in a fresh process (``workflows.fresh``); its result."""
    return run_fresh("swinssl.workflows.estimate:measure", spec)


def peak_memory(device: str, self_: bool = True, children: bool = True) -> int:
    """This process's peak: resident set size (CPU; its largest finished child's if larger), or reserved by torch
    (CUDA). ``self_`` / ``children``: which of the two the CPU's peak counts."""
    if device == "cuda":
        import torch

        return int(torch.cuda.max_memory_reserved())
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    who = [resource.RUSAGE_SELF] * self_ + [resource.RUSAGE_CHILDREN] * children
    return max(resource.getrusage(w).ru_maxrss for w in who) * scale


class PhaseMeter:
    """The peak memory of each phase of this process (``PHASES``), one after another or nested.

    On Linux each phase's own peak: the resident high-water mark (``VmHWM``) read when the phase
    ends and reset to the current resident size when the next begins (``/proc/self/clear_refs``),
    so a phase's peak includes what stays resident from before it (the model, the optimiser's
    state, the allocator's free pages), as in a run. On CUDA torch's peak reserved memory, reset
    likewise. Elsewhere the high-water mark cannot be reset: a phase's value is the peak so far
    (the largest is still the process's peak). The first phase, training, starts with the process.
    """

    def __init__(self, device: str):
        self.device = device
        self.peaks: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self.current, self.began = "training", time.perf_counter()
        self.workers = 0  # CPU: the largest finished child process's peak (DataLoader workers)
        self.resettable = device == "cuda" or _resettable_high_water_mark()

    def read(self) -> int:
        """The current phase's peak so far (bytes)."""
        if self.device == "cuda":
            import torch

            return int(torch.cuda.max_memory_reserved())
        if self.resettable:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return peak_memory("cpu", children=False)

    def _end(self) -> None:
        """Fold the current phase's peak and seconds in, and start measuring afresh."""
        name = self.current
        self.peaks[name] = max(self.peaks.get(name, 0), self.read())
        if name != "training":
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - self.began
        if self.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
        elif self.resettable:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        self.began = time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str):
        """Measure what runs inside as phase ``name``; the phase around it resumes afterwards."""
        outer = self.current
        self._end()
        self.current = name
        try:
            yield
        finally:
            self._end()
            self.current = outer

    def finish(self) -> dict[str, float]:
        """Every phase's peak, in ``PHASES`` order; training includes the peak of finished child
        processes (DataLoader workers), as the run's own peak counts them."""
        self._end()
        if self.device == "cpu":
            self.workers = peak_memory("cpu", self_=False)
            self.peaks["training"] = max(self.peaks.get("training", 0), self.workers)
        return {name: float(self.peaks[name]) for name in PHASES if name in self.peaks}


def _resettable_high_water_mark() -> bool:
    """Whether this process can read its resident high-water mark and reset it (Linux 4.0 and later);
    asked without resetting it, so the peak since the process started stays."""
    try:
        return os.access("/proc/self/clear_refs", os.W_OK) and "VmHWM:" in Path("/proc/self/status").read_text()
    except OSError:
        return False


def _probe_runner(meter: PhaseMeter):
    """``engine.runner.Runner`` with each phase after a step measured by ``meter``, and one save at most."""
    from swinssl.engine.loop import due
    from swinssl.engine.runner import Runner

    class ProbeRunner(Runner):
        saved = 0  # bytes of the checkpoint file written (0: none)

        def after_step(self, done: int, metrics: dict, previews: dict) -> None:
            writes_preview = (self.fabric.is_global_zero and bool(previews)
                              and due(done, self.t.preview_every, self.t.steps))
            # What after_step does besides validating and saving is the preview (when one is written).
            with meter.phase("preview") if writes_preview else contextlib.nullcontext():
                super().after_step(done, metrics, previews)

        def save(self, path: Path, step: int, metrics: dict) -> None:
            if self.saved:  # best.pt and last.pt cost the same: one save is the measurement
                return
            with meter.phase("checkpoint"):
                super().save(path, step, metrics)
            self.saved = path.stat().st_size if path.is_file() else 0

    return ProbeRunner


def _measured(meter: PhaseMeter, name: str, function):
    """``function`` measured as phase ``name`` of ``meter`` whenever it is called."""

    def measured(*args, **kwargs):
        with meter.phase(name):
            return function(*args, **kwargs)

    return measured


def largest_cases(cases: list, preprocess, count: int = 1) -> list:
    """The ``count`` cases of most preprocessed voxels (``preprocessed_shape`` from their headers; a
    case whose header does not tell counts as smallest), in their original order."""
    sizes = [math.prod(preprocessed_shape(c.images[0], preprocess) or (0,)) for c in cases]
    keep = sorted(sorted(range(len(cases)), key=lambda i: -sizes[i])[:count])
    return [cases[i] for i in keep]


def _describe(cases: list, preprocess, out_of: int) -> str:
    shapes = [preprocessed_shape(c.images[0], preprocess) for c in cases]
    names = ", ".join(c.case_id + (f" ({'x'.join(map(str, shape))} voxels)" if shape else "")
                      for c, shape in zip(cases, shapes))
    return names + (f", the largest of {out_of}" if out_of > len(cases) else "")


def _narrow_validation(stage, cfg: Config) -> str:
    """Keep the validation volumes the run's validation peaks on: fine-tuning's largest, one batch
    of pre-training's largest, the probe's largest held-out case. What is validated, in words."""
    said = []
    if stage.val_cases:
        count = cfg.train.batch_size if stage.kind == "pretrain" else 1
        total = len(stage.val_cases)
        stage.val_cases = largest_cases(stage.val_cases, cfg.preprocess, count)
        said.append(_describe(stage.val_cases, cfg.preprocess, total))
    task = getattr(stage, "probe_task", None)
    if task is not None:
        total = len(task.test_cases)
        task.test_cases = largest_cases(task.test_cases, task.cfg.preprocess)
        said.append("probe on " + _describe(task.test_cases, task.cfg.preprocess, total))
    return "; ".join(said)


def _train_probe(spec: dict) -> dict:
    """Train ``spec``'s config as ``run_stage`` does, with ``_probe_runner``: phase peaks and step times."""
    from swinssl.engine.loop import setup_fabric
    from swinssl.engine.run_dir import open_run_dir
    from swinssl.runs import read_metrics

    meter = PhaseMeter(spec["device"])
    cfg = from_dict(Config, spec["config"], source="estimate")
    if spec["stage"] == "pretrain":
        from swinssl.engine.pretrain import PretrainStage as stage_of
    else:
        from swinssl.engine.finetune import FinetuneStage as stage_of
    stage = stage_of(cfg)
    validated = ""
    if any(every > 0 for every in stage.validation_every):
        validated = _narrow_validation(stage, cfg)
        stage.validate = _measured(meter, "validation", stage.validate)
        if getattr(stage, "probe_task", None) is not None:
            stage.probe = _measured(meter, "probe", stage.probe)
    fabric = setup_fabric(cfg.train, cfg.seed)
    run_dir, manifest = open_run_dir(fabric, cfg, stage.run_prefix, None, None, stage.splits())
    runner = _probe_runner(meter)(stage, cfg, fabric, RunDir(run_dir), manifest, None, progress=False)
    runner.train()
    phases = meter.finish()
    rows = sorted((r for r in read_metrics(run_dir) if r["split"] == "train"), key=lambda r: r["step"])
    step_s = [r["value"] for r in rows if r["name"] == "step_s"]
    data_s = [r["value"] for r in rows if r["name"] == "data_s"]
    cpu_s = [r["value"] for r in rows if r["name"] == "cpu_s"]
    return {"peak": max(phases.values()), "phases": phases, "phase_s": meter.seconds, "validated": validated,
            "workers": meter.workers, "checkpoint_bytes": runner.saved,
            "classes": len(getattr(stage, "classes", ())), "step_s": statistics.median(step_s[1:]),
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
