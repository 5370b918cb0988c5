"""Pieces of the optimisation shared by every stage (used by ``engine.runner``): Fabric and the
process's numerics from ``TrainConfig``, the warm-up + cosine schedule, the progress bar, and
the clipping / non-finite-gradient verdict every process agrees on.
"""

from __future__ import annotations

import math
import os
import sys

import torch

from swinssl.config import TrainConfig


def warmup_cosine(warmup: int, total: int):
    """LR factor: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``.

    MONAI's ``WarmupCosineSchedule`` gives the same cosine but warms up as ``step / warmup``:
    its first optimiser step runs at LR 0 and is wasted (pinned in tests/test_pretrain.py), so
    the warm-up here is ``(step + 1) / warmup``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def due(step: int, every: int, total: int) -> bool:
    """Whether something done every ``every`` steps (0: never) is due after step ``step`` of ``total``:
    on multiples of ``every``, and after the last step."""
    return every > 0 and (step % every == 0 or step == total)


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
