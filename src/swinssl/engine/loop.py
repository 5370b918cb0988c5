"""The optimisation loop shared by pre-training and fine-tuning, on Lightning Fabric.

``setup_fabric`` creates the devices and process settings from ``TrainConfig``;
``run_steps`` runs optimiser steps ``start .. train.steps``: micro-steps with gradient
accumulation, a stop (or skip) on a non-finite loss or gradient, clipping, the LR schedule, averaged metrics
(CSV + TensorBoard + progress bar). What a stage adds (its loss, validation, previews,
checkpoints) comes in as two functions, so each stage stays a readable page.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from swinssl.config import TrainConfig
from swinssl.engine.logging import MetricLogger
from swinssl.errors import TrainingError

# (batch, step, micro-step) -> (weighted loss, {name: value} to log, preview panels)
LossFn = Callable[[Any, int, int], "tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]"]
# (optimiser steps done, last logged metrics, last preview panels) -> None
AfterStep = Callable[[int, dict, dict], None]


def warmup_cosine(warmup: int, total: int):
    """LR factor: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def setup_fabric(t: TrainConfig, seed: int):
    """Fabric for the configured devices and precision, with this process's numerics set."""
    from lightning_fabric import Fabric

    if t.deterministic:  # repeatable cuBLAS matmuls; read when CUDA starts, so set before Fabric
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    fabric = Fabric(accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=strategy(t),
                    precision=t.precision)
    fabric.launch()
    if fabric.device.type == "cpu" and t.keep_memory:
        from swinssl.runtime import keep_freed_memory

        keep_freed_memory()
    torch.autograd.set_detect_anomaly(False)  # the reference loops leave it on: 2x slower
    # Without it, CPU backward of trilinear upsampling accumulates in a thread-dependent
    # order and two runs of one seed drift apart by ~1e-5 in 4 steps.
    torch.use_deterministic_algorithms(t.deterministic, warn_only=True)
    torch.manual_seed(seed)
    return fabric


def strategy(t: TrainConfig):
    """Fabric's strategy for ``t.strategy``, with ``t.timeout_s`` on every collective (a process
    that hangs or dies then fails the run after the timeout instead of stalling it for good)."""
    from datetime import timedelta

    from lightning_fabric.strategies import DDPStrategy, FSDPStrategy

    timeout = timedelta(seconds=t.timeout_s)
    if t.strategy == "ddp" or (t.strategy == "auto" and t.devices * t.num_nodes > 1):  # auto: Fabric's pick too
        return DDPStrategy(timeout=timeout)
    if t.strategy == "ddp_spawn":
        return DDPStrategy(start_method="spawn", timeout=timeout)
    if t.strategy == "fsdp":
        return FSDPStrategy(timeout=timeout)
    return t.strategy


def progress_bar(enabled: bool, start: int, total: int, what: str):
    from tqdm import tqdm

    # Redirected to a log file, a bar redrawn ten times a second would flood it.
    return tqdm(total=total, initial=start, desc=what, unit="step", dynamic_ncols=True,
                disable=not enabled, mininterval=0.1 if sys.stderr.isatty() else 30)


MAX_SKIPPED_IN_A_ROW = 10  # train.on_nonfinite=skip: more than this is a diverged run, not a bad batch


def run_steps(fabric, model, optimizer, scheduler, batches: Iterator, loss_fn: LossFn, t: TrainConfig, start: int,
              logger: MetricLogger | None, bar, after_step: AfterStep, last_checkpoint: Path) -> None:
    """Optimiser steps ``start .. t.steps``; see the module docstring."""
    sums: dict[str, float] = {}
    count, tick, crops, skipped, in_a_row = 0, time.perf_counter(), 0, 0, 0
    metrics: dict = {}
    try:
        for step in range(start, t.steps):
            model.train()
            previews: Mapping[str, torch.Tensor] = {}
            fault, parts_seen = "", []
            for micro in range(t.accumulate):
                batch = next(batches)
                with fabric.no_backward_sync(model, enabled=micro < t.accumulate - 1):
                    total, parts, previews = loss_fn(batch, step, micro)
                    if not fault and not torch.isfinite(total):
                        detail = ", ".join(f"{k}={v.item():.4g}" for k, v in parts.items())
                        fault = f"loss is not finite ({detail})"
                    # Backward even then: every process must join the gradient all-reduce.
                    fabric.backward(total / t.accumulate)
                crops += batch["image"].shape[0] * fabric.world_size
                parts_seen.append({"loss": total, **parts})
            fault = nonfinite_gradients(fabric, model, optimizer, t, fault)
            if fault:
                skipped, in_a_row = skipped + 1, in_a_row + 1
                if t.on_nonfinite == "stop" or in_a_row > MAX_SKIPPED_IN_A_ROW:
                    why = fault if t.on_nonfinite == "stop" else f"{fault}, {in_a_row} steps in a row"
                    raise TrainingError(f"step {step}: {why}; the last good checkpoint is {last_checkpoint}")
                bar.write(f"warning: step {step} skipped: {fault}", file=sys.stderr)
            else:
                optimizer.step()
                in_a_row = 0
                for seen in parts_seen:
                    for k, v in seen.items():
                        sums[k] = sums.get(k, 0.0) + v.item()
                    count += 1
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()  # a skipped step still advances the schedule: steps stay (seed, step) addressable
            done = step + 1
            if done % t.log_every == 0 or done == t.steps:
                means = {k: v / max(count, 1) for k, v in sums.items()}
                means = {k: float(fabric.all_reduce(torch.tensor(v), reduce_op="mean")) for k, v in means.items()}
                rate = crops / (time.perf_counter() - tick)
                metrics = {**means, "lr": scheduler.get_last_lr()[0], "crops_per_s": rate, "skipped_steps": skipped}
                if logger:
                    logger.log(done, "train", metrics)
                bar.set_postfix(loss=f"{means.get('loss', float('nan')):.4f}", crops_s=f"{rate:.2f}")
                sums, count, tick, crops = {}, 0, time.perf_counter(), 0
            after_step(done, metrics, dict(previews))
            bar.update(1)
    finally:  # ends the bar's line, so an error message starts on its own line
        bar.close()


def nonfinite_gradients(fabric, model, optimizer, t: TrainConfig, fault: str) -> str:
    """Clip (when ``t.clip_grad`` > 0) and return why this step must not update, or "".

    Every process reaches the same verdict (an all-reduce of the flag), so a skip or a stop
    never leaves one process waiting for the others. Under 16-mixed the GradScaler owns
    overflowing gradients (it skips the step and lowers the scale), so only the loss counts.
    """
    norm = fabric.clip_gradients(model, optimizer, max_norm=t.clip_grad if t.clip_grad > 0 else math.inf,
                                 error_if_nonfinite=False)
    if not fault and t.precision != "16-mixed" and norm is not None and not torch.isfinite(norm):
        fault = f"gradient norm is {norm.item()}"
    if fabric.world_size > 1:
        elsewhere = fabric.all_reduce(torch.tensor(float(bool(fault)), device=fabric.device), reduce_op="sum")
        if not fault and float(elsewhere) > 0:
            fault = "non-finite values on another process"
    return fault

