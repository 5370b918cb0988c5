"""Pre-training, shared by every method: the stage ``engine.runner`` runs.

The method (``swinssl.methods``, from ``method.name``) checks the config, builds the model
(encoder + the heads of its weighted tasks) and computes a step's losses; this stage adds the
data (unlabelled volumes, never a dataset's test cases), the validation losses on fixed crops
of held-out volumes, and the plan its checkpoints carry.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import torch
from monai.data import list_data_collate

from swinssl.config import Config
from swinssl.data.discover import Case, find_dataset
from swinssl.data.splits import split_cases
from swinssl.data.cache import CachedPrefixd, prepared_bad
from swinssl.data.transforms import case_item, pretrain_transforms, volume_file
from swinssl.engine.data import (BadVolumes, SeededDataset, cache_root, common_modality, crop_loader, images_of,
                                 sample_seed)
from swinssl.engine.loop import due
from swinssl.engine.validate import ProbeTask, random_encoder
from swinssl.engine.runner import run_stage
from swinssl.errors import ConfigError, DataError
from swinssl.methods import get_method
from swinssl.plan import Plan
from swinssl.runs import RunDir

VALIDATION_STEP = 2**30  # a step index no training step reaches: fixed validation crops and views


def pretrain(cfg: Config | None = None, resume: str | Path | None = None, overrides: list[str] = (),
             progress: bool = True, start_estimate: dict | None = None) -> Path:
    """Run (or resume) a pre-training; returns the run directory. ``start_estimate``: see ``run_stage``."""
    return run_stage(PretrainStage, cfg, resume, overrides, progress, start_estimate)


class PretrainStage:
    """Self-supervised pre-training of the method ``cfg.method.name`` on unlabelled volumes."""

    best_metric = None

    def __init__(self, cfg: Config, resumed: bool = False):
        self.cfg, self.method = cfg, get_method(cfg.method.name)
        self.kind, self.run_prefix = "pretrain", cfg.method.name
        self.check(cfg)
        if not cfg.data.path:
            raise ConfigError("data.path is empty: pass data=PATH (a folder, dataset.json or nnU-Net raw folder)")
        self.dataset = find_dataset(cfg.data.path, cfg.data.modality)
        # Images only, and never a dataset's test cases: later fine-tuning is evaluated on them.
        volumes = [replace(c, label=None) for c in self.dataset.split("training", "validation")]
        if not volumes:
            raise DataError(f"{cfg.data.path}: no training volumes (only test cases)")
        self.train_cases, self.val_cases = split_cases(volumes, cfg.train.val_fraction, cfg.seed)
        self.pipeline = pretrain_transforms(cfg.preprocess, channels=cfg.model.in_channels, cache=cache_root(cfg),
                                            cache_dtype=cfg.data.cache_dtype)
        self.generator = torch.Generator()
        self.probe_task, self.probe_random = None, None
        if cfg.train.probe_data:
            probe_cfg = replace(cfg, data=replace(cfg.data, path=cfg.train.probe_data, num_classes=0))
            self.probe_task = ProbeTask(probe_cfg, cfg.seed)
        self.validation_every = (cfg.train.val_every, cfg.train.probe_every if self.probe_task else 0)

    @staticmethod
    def check(cfg: Config) -> None:
        get_method(cfg.method.name).check(cfg)
        if not 0 <= cfg.data.max_bad_fraction <= 1:
            raise ConfigError(f"data.max_bad_fraction must be between 0 and 1, got {cfg.data.max_bad_fraction}")

    def splits(self) -> dict[str, list[Case]]:
        return {"train": self.train_cases, "validation": self.val_cases}

    def build_model(self, fabric):
        return self.method.build_model(self.cfg)

    def param_groups(self, model):
        return [{"params": list(model.parameters())}]

    def plan(self, manifest: str | None) -> Plan:
        cfg = self.cfg
        return Plan(network=cfg.model, preprocess=cfg.preprocess, method=cfg.method, manifest_sha256=manifest,
                    channel_names=self.dataset.channel_names or ["image"] * cfg.model.in_channels,
                    modality=common_modality(self.train_cases))

    def batches(self, fabric, start: int, bad: BadVolumes):
        """Crops of the training volumes; a bad volume is skipped (``engine.data``), and a bad
        validation volume leaves the validation (``validation_losses``)."""
        t, self.bad = self.cfg.train, bad
        head = self.pipeline.transforms[0]
        if isinstance(head, CachedPrefixd):  # what swinssl data prepare found bad, with these settings: not read
            files = [volume_file(case_item(c)) for c in self.train_cases]
            bad.prepared(prepared_bad(head.root, files, settings=head.settings), rank_zero=fabric.is_global_zero)
        return iter(crop_loader(self.train_cases, self.pipeline, t.batch_size, self.cfg.seed, rank=fabric.global_rank,
                                world_size=fabric.world_size, start_step=start * t.accumulate,
                                steps=t.steps * t.accumulate, num_workers=t.num_workers, skip_bad=True,
                                known_bad=bad.known))

    def losses(self, model, batch, step: int, micro: int, fabric):
        """The micro-step's losses. With several processes, the views are drawn for the step's whole
        batch (every process's crops, gathered) from one generator seeded alike everywhere, and each
        process runs the model on its own crops (``Method.compute_losses``): the losses equal one
        process's on the whole batch."""
        t, x, rows = self.cfg.train, images_of(batch).to(fabric.device), None
        if fabric.world_size > 1:
            local = x.shape[0]
            x = fabric.all_gather(x).flatten(0, 1)  # (W, B, ...) in rank order, as engine.data lays the step out
            rows = slice(fabric.global_rank * local, (fabric.global_rank + 1) * local)
        # Rank 0's seed on every process (and what one process always used).
        self.generator.manual_seed(sample_seed(self.cfg.seed, step * t.accumulate + micro, 0, 99))
        return self.method.compute_losses(model, x, self.generator, self.cfg.method, rows)

    def validate(self, model, fabric, run: RunDir, step: int) -> dict[str, float]:
        """The validation losses and the probe, each when due after ``step``."""
        t, out = self.cfg.train, {}
        if due(step, t.val_every, t.steps):
            out.update(self.validation_losses(model, fabric))
        # The probe is deterministic: one process measures it; the logger is rank 0's anyway.
        if self.probe_task and due(step, t.probe_every, t.steps) and fabric.is_global_zero:
            out.update(self.probe(model, fabric.device))
        return out

    def probe(self, model, device) -> dict[str, float]:
        """``probe_dice`` of the current encoder, ``probe_dice_random`` (measured on the run's first
        probe) and ``probe_s``, the seconds this probe took."""
        started, steps = time.perf_counter(), self.cfg.train.probe_steps
        if self.probe_random is None:
            self.probe_random, _ = self.probe_task.score(random_encoder(self.cfg.model, self.cfg.seed), steps, device)
        dice, _ = self.probe_task.score(model.swinViT, steps, device)
        return {"probe_dice": dice, "probe_dice_random": self.probe_random, "probe_s": time.perf_counter() - started}

    @torch.no_grad()
    def validation_losses(self, model, fabric) -> dict[str, float]:
        """Mean losses over fixed crops and fixed views of the held-out volumes (same every time).

        Volumes go in batches of ``train.batch_size``, as in training, so the contrastive
        negatives of a crop include crops of other volumes.
        """
        cfg = self.cfg
        if not self.val_cases:
            return {}
        was_training = model.training
        model.eval()
        generator = torch.Generator()
        seen: list[dict[str, float]] = []
        for first, crops in self.validation_batches():
            # The unwrapped model gets no input conversion from Fabric: match its weights' dtype (64-true).
            x = images_of(list_data_collate(crops)).to(fabric.device, next(model.parameters()).dtype)
            generator.manual_seed(sample_seed(cfg.seed, VALIDATION_STEP + first, 0, 99))
            total, parts, _ = self.method.compute_losses(model, x, generator, cfg.method)
            seen.append({k: v.item() for k, v in {"loss": total, **parts}.items()})
        model.train(was_training)
        return {k: sum(batch[k] / len(seen) for batch in seen) for k in seen[0]} if seen else {}

    def validation_batches(self) -> Iterator[tuple[int, list]]:
        """(index of its first volume, the volumes' fixed crops) per ``train.batch_size`` validation
        volumes. A bad volume is reported as in training and leaves the validation."""
        dataset, size, bad = SeededDataset(self.val_cases, self.pipeline), self.cfg.train.batch_size, set()
        for first in range(0, len(self.val_cases), size):
            crops = []
            for i in range(first, min(first + size, len(self.val_cases))):
                try:
                    crops.append(dataset[(i, sample_seed(self.cfg.seed, VALIDATION_STEP + i, 0, 0))])
                except DataError as err:
                    self.bad.met([(volume_file(dataset.items[i]), str(err))])
                    bad.add(i)
            if crops:
                yield first, crops
        self.val_cases = [case for i, case in enumerate(self.val_cases) if i not in bad]
