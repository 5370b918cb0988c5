"""One runner for every training stage, on Lightning Fabric (CPU, one GPU, DDP across GPUs and nodes).

A stage (``engine.pretrain.PretrainStage``, ``engine.finetune.FinetuneStage``) says what is
its own: the data splits, the model and its parameter groups, the plan its checkpoints
carry, the batches, the loss of a micro-step, validation and previews. The runner does the
rest the same way for all: the run directory, AdamW with warm-up + cosine, resuming exactly
where a run stopped, gradient accumulation, clipping, a stop (or skip) on a non-finite loss or
gradient, averaged metrics (CSV, TensorBoard, progress bar; ``step_s``: seconds per optimiser
step without waiting for data, ``cpu_s``: the process's CPU seconds in it, ``data_s``: seconds
waiting for batches; at the first step, ``startup_s``: seconds from the process's start to its first
batch ready), ``checkpoints/last.pt``
(and ``best.pt`` for a stage with a best metric), one clear line when a process of a distributed
run fails, and one when a step runs out of memory (``engine.memory``: where, the estimate made at
start, a setting that fits).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from swinssl.config import Config
from swinssl.data.discover import Case
from swinssl.engine.checkpoint import restore_rng, rng_state
from swinssl.engine.data import BadVolumes
from swinssl.engine.distributed import DistributedFaults
from swinssl.engine.logging import MetricLogger
from swinssl.engine.loop import due, nonfinite_gradients, progress_bar, setup_fabric, warmup_cosine
from swinssl.engine.memory import is_out_of_memory, out_of_memory_line
from swinssl.engine.run_dir import open_run_dir, resume_state
from swinssl.nn.load import filter_swinssl, load_exactly
from swinssl.checkpoint import Checkpoint
from swinssl.errors import TrainingError
from swinssl.plan import Plan
from swinssl.plots import save_preview
from swinssl.runs import RunDir
from swinssl.runtime import process_age_s

MAX_SKIPPED_IN_A_ROW = 10  # train.on_nonfinite=skip: more than this is a diverged run, not a bad batch


class Stage(Protocol):
    """What a training stage supplies to ``run_stage``."""

    kind: str  # "pretrain" | "finetune": the checkpoints' kind
    run_prefix: str  # a new run directory is named <run_prefix>-<date>-<time> unless train.name says otherwise
    best_metric: str | None  # a validation metric (higher is better) kept as checkpoints/best.pt
    validation_every: tuple[int, ...]  # validate runs after steps due at any of these intervals (0: never)

    def splits(self) -> dict[str, list[Case]]:
        """The data of the run by split, for its manifest (checked before any process starts)."""

    def build_model(self, fabric) -> nn.Module:
        """The model, with any start weights loaded."""

    def param_groups(self, model: nn.Module) -> list[dict]:
        """AdamW parameter groups (``lr`` where a group differs from ``train.lr``)."""

    def plan(self, manifest: str | None) -> Plan:
        """The plan every checkpoint carries."""

    def batches(self, fabric, start: int, bad: BadVolumes) -> Iterator:
        """Micro-batches from optimiser step ``start`` on (``train.accumulate`` per step). A stage that
        skips bad volumes lists those it met in a batch's ``bad_volumes`` and reads ``bad.known``."""

    def losses(self, model: nn.Module, batch: Any, step: int, micro: int, fabric) -> tuple:
        """(weighted loss, {name: value to log}, preview panels) of one micro-step."""

    def validate(self, model: nn.Module, fabric, run: RunDir, step: int) -> dict[str, float]:
        """Validation metrics after optimiser step ``step`` (those due then; {} without validation data)."""

    @staticmethod
    def check(cfg: Config) -> None:
        """Refuse (ConfigError) a config this stage cannot train, without reading data (which smaller ROI would do)."""


def run_stage(stage_of, cfg: Config | None = None, resume: str | Path | None = None, overrides=(),
              progress: bool = True, start_estimate: dict | None = None) -> Path:
    """Run (or resume) the stage ``stage_of(cfg)`` builds; returns the run directory. ``start_estimate``:
    the estimate made before the run (``workflows.estimate.Estimate.hint``), which an out-of-memory
    error names."""
    state = None
    if resume is not None:
        cfg, state = resume_state(resume, overrides)
    assert cfg is not None
    stage = stage_of(cfg, resumed=state is not None)
    splits = stage.splits()
    fabric = setup_fabric(cfg.train, cfg.seed)
    run_dir, manifest = open_run_dir(fabric, cfg, stage.run_prefix, resume, state, splits)
    return Runner(stage, cfg, fabric, RunDir(run_dir), manifest, state, progress, start_estimate).train()


class Runner:
    """The optimisation of one stage: ``train`` runs optimiser steps until ``train.steps``."""

    def __init__(self, stage: Stage, cfg: Config, fabric, run: RunDir, manifest: str | None, state: Checkpoint | None,
                 progress: bool, start_estimate: dict | None = None):
        t = cfg.train
        self.stage, self.cfg, self.t, self.fabric, self.run = stage, cfg, t, fabric, run
        self.start_estimate = start_estimate
        model = stage.build_model(fabric)
        self.optimizer = torch.optim.AdamW(stage.param_groups(model), lr=t.lr, weight_decay=t.weight_decay)
        self.scheduler = LambdaLR(self.optimizer, warmup_cosine(t.warmup_steps, t.steps))
        self.start, self.best, self.wall_before = 0, -math.inf, 0.0
        if state is not None:
            load_exactly(model, {filter_swinssl(k): v for k, v in state.model.items()},
                         f"{run.last}: the weights do not fit the model of the run's config",
                         "the resume's overrides changed the network or a task's weight, or the run predates heads "
                         "built only for weighted tasks")
            self.optimizer.load_state_dict(state.optimizer)
            self.scheduler.load_state_dict(state.scheduler)
            restore_rng(state.rng)
            self.start = state.step
            self.wall_before = state.wall_s  # the time spent before the resume
            self.best = state.best.get(stage.best_metric, -math.inf) if stage.best_metric else -math.inf
            manifest = Plan.from_dict(state.plan, str(run.last)).manifest_sha256
        self.raw_model = model  # unwrapped: its state-dict keys carry no DDP / compile prefix
        if t.compile:  # in place, so state-dict keys stay unprefixed
            model.compile()
        self.model, self.optimizer = fabric.setup(model, self.optimizer)
        self.plan = stage.plan(manifest)
        self.logger = MetricLogger(run.path) if fabric.is_global_zero else None
        self.bar = progress_bar(progress and fabric.is_global_zero, self.start, t.steps, f"{stage.kind} {run.name}")

    def train(self) -> Path:
        t, fabric = self.t, self.fabric
        self.started, self.startup_s = time.perf_counter(), None
        with DistributedFaults(fabric, self.run.last):
            self.bad = BadVolumes(self.run, len(self.stage.splits()["train"]), self.cfg.data.max_bad_fraction,
                                  lambda line: self.bar.write(line, file=sys.stderr))
            batches = self.stage.batches(fabric, self.start, self.bad)
            sums: dict[str, float] = {}
            count, tick, crops, skipped, in_a_row, metrics = 0, time.perf_counter(), 0, 0, 0, {}
            busy, cpu, waited, timed = 0.0, 0.0, 0.0, 0  # seconds computing (wall, CPU), waiting for data; steps
            try:
                for step in range(self.start, t.steps):
                    began, began_cpu = time.perf_counter(), time.process_time()
                    with self.out_of_memory(f"step {step + 1} of {t.steps}"):
                        seen, previews, fault, crops_done = self.step(batches, step)
                    crops += crops_done
                    if fault:
                        skipped, in_a_row = skipped + 1, in_a_row + 1
                        if t.on_nonfinite == "stop" or in_a_row > MAX_SKIPPED_IN_A_ROW:
                            why = fault if t.on_nonfinite == "stop" else f"{fault}, {in_a_row} steps in a row"
                            raise TrainingError(f"step {step}: {why}; the last good checkpoint is {self.run.last}")
                        self.bar.write(f"warning: step {step} skipped: {fault}", file=sys.stderr)
                    else:
                        in_a_row = 0
                        for parts in seen:
                            for k, v in parts.items():
                                sums[k] = sums.get(k, 0.0) + v.item()  # waits for the device: the step is done
                            count += 1
                    busy += time.perf_counter() - began - self.waited
                    cpu += time.process_time() - began_cpu - self.waited_cpu
                    waited, timed = waited + self.waited, timed + 1
                    done = step + 1
                    if step == self.start and self.logger:  # this process's first step
                        self.logger.log(done, "train", {"startup_s": self.startup_s})
                    if due(done, t.log_every, t.steps):
                        means = {k: v / max(count, 1) for k, v in sums.items()}
                        means = {k: float(fabric.all_reduce(torch.tensor(v), reduce_op="mean")) for k, v in means.items()}
                        rate = crops / (time.perf_counter() - tick)
                        metrics = {**means, "lr": self.scheduler.get_last_lr()[0], "crops_per_s": rate,
                                   "skipped_steps": skipped, "step_s": busy / timed, "cpu_s": cpu / timed,
                                   "data_s": waited / timed}
                        if self.logger:
                            self.logger.log(done, "train", metrics)
                        self.bar.set_postfix(loss=f"{means.get('loss', float('nan')):.4f}", crops_s=f"{rate:.2f}")
                        sums, count, tick, crops = {}, 0, time.perf_counter(), 0
                        busy, cpu, waited, timed = 0.0, 0.0, 0.0, 0
                    with self.out_of_memory(f"the validation or checkpoint after step {done}"):
                        self.after_step(done, metrics, previews)
                    self.bar.update(1)
            finally:  # ends the bar's line, so an error message starts on its own line
                self.bar.close()
            if self.logger:
                self.logger.close()
            fabric.barrier()
        return self.run.path

    def step(self, batches: Iterator, step: int) -> tuple[list[dict], dict, str, int]:
        """One optimiser step: its micro-steps' logged values, the last preview panels, why the
        update was skipped ("" when it was made) and the crops seen by all processes."""
        t, fabric, model = self.t, self.fabric, self.model
        model.train()
        seen, previews, fault, crops = [], {}, "", 0
        self.waited = self.waited_cpu = 0.0  # seconds (wall, CPU) this step waits for its batches
        for micro in range(t.accumulate):
            fetch, fetch_cpu = time.perf_counter(), time.process_time()
            batch = next(batches)
            if self.startup_s is None:
                self.startup_s = process_age_s()
            self.bad.met(batch.pop("bad_volumes", ()))
            self.waited += time.perf_counter() - fetch
            self.waited_cpu += time.process_time() - fetch_cpu
            with fabric.no_backward_sync(model, enabled=micro < t.accumulate - 1):
                total, parts, previews = self.stage.losses(model, batch, step, micro, fabric)
                if not fault and not torch.isfinite(total):
                    detail = ", ".join(f"{k}={v.item():.4g}" for k, v in parts.items())
                    fault = f"loss is not finite ({detail})"
                # Backward even then: every process must join the gradient all-reduce.
                fabric.backward(total / t.accumulate)
            crops += batch["image"].shape[0] * fabric.world_size
            seen.append({"loss": total, **parts})
        fault = nonfinite_gradients(fabric, model, self.optimizer, t, fault)
        if not fault:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()  # a skipped step still advances the schedule: steps stay (seed, step) addressable
        return seen, previews, fault, crops

    @contextlib.contextmanager
    def out_of_memory(self, where: str):
        """An allocation that fails inside becomes a TrainingError of one line (``engine.memory``)."""
        try:
            yield
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            raise TrainingError(out_of_memory_line(where, self.fabric.device, self.cfg, self.stage.kind,
                                                   self.run.config, self.run.last, self.stage.check,
                                                   self.start_estimate)) from None

    def after_step(self, done: int, metrics: dict, previews: dict) -> None:
        t, run = self.t, self.run
        if any(due(done, every, t.steps) for every in self.stage.validation_every):
            val = self.stage.validate(self.raw_model, self.fabric, run, done)
            if val:
                if self.logger:
                    self.logger.log(done, "val", val)
                metrics.update({f"val_{k}": v for k, v in val.items()})
                metric = self.stage.best_metric
                if metric and val[metric] > self.best:
                    self.best = val[metric]
                    self.save(run.best, done, metrics)
        if self.fabric.is_global_zero and previews and due(done, t.preview_every, t.steps):
            save_preview(run.preview(done), previews, title=f"step {done}")
        if due(done, t.checkpoint_every, t.steps):
            self.save(run.last, done, metrics)

    def save(self, path: Path, step: int, metrics: dict) -> None:
        if not self.fabric.is_global_zero:
            return
        Checkpoint(kind=self.stage.kind, step=step, model=self.raw_model.state_dict(), plan=self.plan.to_dict(),
                   optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(), rng=rng_state(),
                   metrics=metrics, best={self.stage.best_metric: self.best} if self.stage.best_metric else {},
                   # The compute the run has cost so far: wall seconds since it first started, and its processes.
                   wall_s=self.wall_before + time.perf_counter() - self.started,
                   world_size=self.fabric.world_size).save(path)
