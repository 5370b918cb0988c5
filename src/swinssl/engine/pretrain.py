"""The pre-training loop, shared by every method, on Lightning Fabric (CPU, one GPU, DDP across GPUs and nodes).

A method module supplies ``SSLModel``, ``check_config`` and ``compute_losses``; this loop
owns devices, precision, optimisation (AdamW, warm-up + cosine, clipping, accumulation),
validation on held-out volumes, logging, previews and atomic checkpoints, and resumes a
run exactly where it stopped.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from monai.data import list_data_collate
from torch.optim.lr_scheduler import LambdaLR

import swinssl
from swinssl.config import Config, load_config, to_dict
from swinssl.data.discover import Case, find_dataset
from swinssl.data.transforms import pretrain_transforms
from swinssl.engine.checkpoint import load_checkpoint, restore_rng, rng_state, save_checkpoint
from swinssl.engine.data import SeededDataset, crop_loader, images_of, sample_seed
from swinssl.engine.logging import MetricLogger, save_preview
from swinssl.engine.run_dir import new_run_dir, write_run_files
from swinssl.errors import ConfigError, DataError, TrainingError
from swinssl.methods import get_method

VALIDATION_STEP = 2**30  # a step index no training step reaches: fixed validation crops and views


def warmup_cosine(warmup: int, total: int):
    """LR factor: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def split_cases(cases: list[Case], val_fraction: float, seed: int) -> tuple[list[Case], list[Case]]:
    """Held-out volumes for the validation loss: a seeded subset, at least one when asked and possible."""
    if val_fraction <= 0 or len(cases) < 2:
        return cases, []
    n_val = min(len(cases) - 1, max(1, round(len(cases) * val_fraction)))
    order = np.random.default_rng([seed, 11]).permutation(len(cases))
    val = set(order[:n_val].tolist())
    return [c for i, c in enumerate(cases) if i not in val], [c for i, c in enumerate(cases) if i in val]


def pretrain(cfg: Config | None = None, resume: str | Path | None = None, overrides: list[str] = (),
             progress: bool = True) -> Path:
    """Run (or resume) a pre-training; returns the run directory."""
    from lightning_fabric import Fabric

    state = None
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
        cfg = load_config(run_dir / "config.yaml", overrides)
        last = run_dir / "checkpoints" / "last.pt"
        state = load_checkpoint(last) if last.is_file() else None
    assert cfg is not None
    method = get_method(cfg.method.name)
    method.check_config(cfg.method, cfg.preprocess)
    if not cfg.data.path:
        raise ConfigError("data.path is empty: pass data=PATH (a folder, dataset.json or nnU-Net raw folder)")
    dataset = find_dataset(cfg.data.path, cfg.data.modality)
    # Images only, and never a dataset's test cases: later fine-tuning is evaluated on them.
    volumes = [replace(c, label=None) for c in dataset.split("training", "validation")]
    if not volumes:
        raise DataError(f"{cfg.data.path}: no training volumes (only test cases)")
    train_cases, val_cases = split_cases(volumes, cfg.train.val_fraction, cfg.seed)
    channels = cfg.model.in_channels

    t = cfg.train
    fabric = Fabric(accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
                    precision=t.precision)
    fabric.launch()
    if fabric.device.type == "cpu" and t.keep_memory:
        from swinssl.runtime import keep_freed_memory

        keep_freed_memory()
    torch.autograd.set_detect_anomaly(False)  # the reference loop leaves it on: 2x slower
    # Without it, CPU backward of trilinear upsampling (the reconstruction head) accumulates
    # in a thread-dependent order and two runs of one seed drift apart by ~1e-5 in 4 steps.
    torch.use_deterministic_algorithms(t.deterministic, warn_only=True)
    torch.manual_seed(cfg.seed)

    if resume is not None:
        run_dir = Path(resume)
    else:  # rank 0 names and creates the run directory, the others learn its name
        run_dir = new_run_dir(t.out, t.name, cfg.method.name) if fabric.is_global_zero else None
        run_dir = Path(fabric.broadcast(str(run_dir) if run_dir else None))
    manifest = None
    if fabric.is_global_zero and state is None:
        manifest = write_run_files(run_dir, cfg, {"train": train_cases, "validation": val_cases})
    manifest = fabric.broadcast(manifest)

    model = method.SSLModel(cfg.model, cfg.method)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    scheduler = LambdaLR(optimizer, warmup_cosine(t.warmup_steps, t.steps))
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng(state["rng"])
        start = int(state["step"])
        manifest = state["plan"].get("manifest_sha256")
    raw_model = model
    if t.compile:  # in place, so state-dict keys stay unprefixed
        model.compile()
    model, optimizer = fabric.setup(model, optimizer)

    plan = {
        "network": {**to_dict(cfg.model), "patch_size": 2},
        "preprocess": to_dict(cfg.preprocess),
        "method": to_dict(cfg.method),
        "channel_names": dataset.channel_names or ["image"] * channels,
        "manifest_sha256": manifest,
        "package_version": swinssl.__version__,
    }
    pipeline = pretrain_transforms(cfg.preprocess, channels=channels)
    micro_steps = t.steps * t.accumulate
    loader = crop_loader(train_cases, pipeline, t.batch_size, cfg.seed, rank=fabric.global_rank,
                         start_step=start * t.accumulate, steps=micro_steps, num_workers=t.num_workers)
    logger = MetricLogger(run_dir) if fabric.is_global_zero else None

    def checkpoint(step: int, metrics: dict) -> None:
        if not fabric.is_global_zero:
            return
        payload = {
            "format": "swinssl", "version": swinssl.__version__, "kind": "pretrain", "step": step,
            "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": rng_state(), "plan": plan, "metrics": metrics,
        }
        save_checkpoint(run_dir / "checkpoints" / "last.pt", payload)

    generator = torch.Generator()
    batches = iter(loader)
    sums: dict[str, float] = {}
    count, tick, volumes = 0, time.perf_counter(), 0
    bar = _progress(progress and fabric.is_global_zero, start, t.steps, run_dir)
    metrics: dict = {}
    for step in range(start, t.steps):
        model.train()
        for micro in range(t.accumulate):
            x = images_of(next(batches)).to(fabric.device)
            generator.manual_seed(sample_seed(cfg.seed, step * t.accumulate + micro, fabric.global_rank, 99))
            with fabric.no_backward_sync(model, enabled=micro < t.accumulate - 1):
                total, parts, previews = method.compute_losses(model, x, generator, cfg.method)
                if not torch.isfinite(total):
                    detail = ", ".join(f"{k}={v.item():.4g}" for k, v in parts.items())
                    raise TrainingError(f"step {step}: loss is not finite ({detail}); the last good checkpoint "
                                        f"is {run_dir / 'checkpoints' / 'last.pt'}")
                fabric.backward(total / t.accumulate)
            volumes += x.shape[0] * fabric.world_size
            for k, v in {"loss": total, **parts}.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            count += 1
        if t.clip_grad > 0:
            fabric.clip_gradients(model, optimizer, max_norm=t.clip_grad, error_if_nonfinite=False)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        done = step + 1

        if done % t.log_every == 0 or done == t.steps:
            means = {k: v / count for k, v in sums.items()}
            means = {k: float(fabric.all_reduce(torch.tensor(v), reduce_op="mean")) for k, v in means.items()}
            rate = volumes / (time.perf_counter() - tick)
            metrics = {**means, "lr": scheduler.get_last_lr()[0], "volumes_per_s": rate}
            if logger:
                logger.log(done, "train", metrics)
            bar.set_postfix(loss=f"{means['loss']:.4f}", vol_s=f"{rate:.2f}")
            sums, count, tick, volumes = {}, 0, time.perf_counter(), 0
        if val_cases and (done % t.val_every == 0 or done == t.steps):
            val = validate(raw_model, method, cfg, val_cases, fabric)
            if logger:
                logger.log(done, "val", val)
            metrics.update({f"val_{k}": v for k, v in val.items()})
        if fabric.is_global_zero and t.preview_every and (done % t.preview_every == 0 or done == t.steps):
            save_preview(run_dir / "previews" / f"step_{done:07d}.png", previews, title=f"step {done}")
        if done % t.checkpoint_every == 0 or done == t.steps:
            checkpoint(done, metrics)
        bar.update(1)
    bar.close()
    if logger:
        logger.close()
    fabric.barrier()
    return run_dir


@torch.no_grad()
def validate(model, method, cfg: Config, cases: list[Case], fabric) -> dict[str, float]:
    """Mean losses over fixed crops and fixed views of the held-out volumes (same every time).

    Volumes go in batches of ``train.batch_size``, as in training, so the contrastive
    negatives of a crop include crops of other volumes.
    """
    was_training = model.training
    model.eval()
    dataset = SeededDataset(cases, pretrain_transforms(cfg.preprocess, channels=cfg.model.in_channels))
    generator = torch.Generator()
    sums: dict[str, float] = {}
    starts = range(0, len(cases), cfg.train.batch_size)
    for first in starts:
        indices = range(first, min(first + cfg.train.batch_size, len(cases)))
        crops = [dataset[(i, sample_seed(cfg.seed, VALIDATION_STEP + i, 0, 0))] for i in indices]
        x = images_of(list_data_collate(crops)).to(fabric.device)
        generator.manual_seed(sample_seed(cfg.seed, VALIDATION_STEP + first, 0, 99))
        total, parts, _ = method.compute_losses(model, x, generator, cfg.method)
        for k, v in {"loss": total, **parts}.items():
            sums[k] = sums.get(k, 0.0) + v.item() / len(starts)
    model.train(was_training)
    return sums


def _progress(enabled: bool, start: int, total: int, run_dir: Path):
    from tqdm import tqdm

    # Redirected to a log file, a bar redrawn ten times a second would flood it.
    return tqdm(total=total, initial=start, desc=f"pretrain {run_dir.name}", unit="step", dynamic_ncols=True,
                disable=not enabled, mininterval=0.1 if sys.stderr.isatty() else 30)
