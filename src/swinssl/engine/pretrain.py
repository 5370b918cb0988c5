"""Pre-training, shared by every method, on Lightning Fabric (CPU, one GPU, DDP across GPUs and nodes).

A method module supplies ``SSLModel``, ``check_config`` and ``compute_losses``; this stage
adds the data (unlabelled volumes, never a dataset's test cases), validation losses on
held-out volumes, previews and atomic checkpoints to the shared loop (``engine.loop``:
devices, precision, AdamW, warm-up + cosine, clipping, accumulation, logging), and
resumes a run exactly where it stopped.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from monai.data import list_data_collate
from torch.optim.lr_scheduler import LambdaLR

import swinssl
from swinssl.config import Config, to_dict
from swinssl.data.discover import Case, find_dataset
from swinssl.data.transforms import pretrain_transforms
from swinssl.engine.checkpoint import restore_rng, rng_state, save_checkpoint
from swinssl.engine.data import SeededDataset, cache_root, crop_loader, images_of, sample_seed
from swinssl.engine.distributed import DistributedFaults
from swinssl.engine.logging import MetricLogger, save_preview
from swinssl.engine.loop import progress_bar, run_steps, setup_fabric, warmup_cosine
from swinssl.engine.run_dir import open_run_dir, resume_state
from swinssl.errors import ConfigError, DataError
from swinssl.methods import get_method

VALIDATION_STEP = 2**30  # a step index no training step reaches: fixed validation crops and views


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
    state = None
    if resume is not None:
        cfg, state = resume_state(resume, overrides)
    assert cfg is not None
    method = get_method(cfg.method.name)
    method.check_config(cfg)
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
    fabric = setup_fabric(t, cfg.seed)

    run_dir, manifest = open_run_dir(fabric, cfg, cfg.method.name, resume, state,
                                     {"train": train_cases, "validation": val_cases})

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
    pipeline = pretrain_transforms(cfg.preprocess, channels=channels, cache=cache_root(cfg))
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

    def losses(batch, step: int, micro: int):
        generator.manual_seed(sample_seed(cfg.seed, step * t.accumulate + micro, fabric.global_rank, 99))
        return method.compute_losses(model, images_of(batch).to(fabric.device), generator, cfg.method)

    def after_step(done: int, metrics: dict, previews: dict) -> None:
        if val_cases and (done % t.val_every == 0 or done == t.steps):
            val = validate(raw_model, method, cfg, val_cases, fabric)
            if logger:
                logger.log(done, "val", val)
            metrics.update({f"val_{k}": v for k, v in val.items()})
        if fabric.is_global_zero and t.preview_every and (done % t.preview_every == 0 or done == t.steps):
            save_preview(run_dir / "previews" / f"step_{done:07d}.png", previews, title=f"step {done}")
        if done % t.checkpoint_every == 0 or done == t.steps:
            checkpoint(done, metrics)

    bar = progress_bar(progress and fabric.is_global_zero, start, t.steps, f"pretrain {run_dir.name}")
    with DistributedFaults(fabric, run_dir / "checkpoints" / "last.pt"):
        run_steps(fabric, model, optimizer, scheduler, iter(loader), losses, t, start, logger, bar, after_step,
                  run_dir / "checkpoints" / "last.pt")
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
    dataset = SeededDataset(cases, pretrain_transforms(cfg.preprocess, channels=cfg.model.in_channels,
                                                       cache=cache_root(cfg)))
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
