"""Fine-tuning SwinUNETR for segmentation, from scratch or from pre-trained weights: the stage
``engine.runner`` runs.

Labelled cases of the dataset's training (and validation) splits, never its test cases;
a validation split from the dataset, a k-fold split or ``train.val_fraction``; a label
ratio or explicit case list for data-efficiency studies. DiceCE loss (MONAI), AdamW with
optional layer-wise LR decay of the encoder, warm-up + cosine, sliding-window validation
Dice every ``train.val_every`` steps, ``checkpoints/best.pt`` (best validation mean Dice)
and ``checkpoints/last.pt``, and PNG overlays of a validation case. Checkpoints carry the
plan that ``swinssl predict`` needs.

The objective is the fine-tuning hook of the network's method (``swinssl.methods``): DiceCE
of the network's output for a plain SwinUNETR; SwinMM's two-view loss with consistency for a
multi-view one. With ``finetune.unlabeled`` (a method that takes it, e.g. SwinMM), random
crops of unlabelled volumes come with each batch; their label files are never read. Those
volumes are another dataset's, or (``finetune.unlabeled=rest``) this dataset's training cases
that neither train (outside the label ratio or case list) nor validate.

``finetune.fold=all`` trains every fold of ``finetune.folds`` into one parent folder
(``finetune_folds``): ``fold_0`` ... each a run directory as above, beside ``folds.json``;
``swinssl predict`` ensembles them.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import replace
from pathlib import Path

import torch
from monai.losses import DiceCELoss

from swinssl.config import Config, load_config
from swinssl.data.discover import Case, find_dataset
from swinssl.data.io import check_case_grids
from swinssl.data.splits import check_fold, check_modality, class_indices, finetune_split, unlabeled_cases
from swinssl.data.transforms import finetune_transforms, pretrain_transforms
from swinssl.engine.checkpoint import pretrained_start
from swinssl.engine.data import cache_root, common_modality, crop_loader, images_of, labels_of, sample_seed
from swinssl.engine.distributed import launched_as_rank_zero
from swinssl.engine.run_dir import open_folds_dir
from swinssl.engine.runner import run_stage
from swinssl.engine.validate import validate
from swinssl.errors import ConfigError
from swinssl.methods import finetune_method
from swinssl.nn import build_network, load_pretrained
from swinssl.plan import Plan, adopt_input, input_of
from swinssl.runs import RunDir

log = logging.getLogger(__name__)

UNLABELED_SEED = 7919  # offset of the unlabelled crops' seed stream from the labelled one
def finetune(cfg: Config | None = None, resume: str | Path | None = None, overrides: list[str] = (),
             progress: bool = True, start_estimate: dict | None = None) -> Path:
    """Run (or resume) a fine-tuning; returns the run directory. With ``finetune.fold=all``, or
    resuming such a run, every fold (``finetune_folds``); returns their parent folder."""
    if resume is not None and RunDir(resume).folds.is_file():
        return resume_folds(resume, overrides, progress, start_estimate)
    if resume is None and cfg is not None and cfg.finetune.fold == "all":
        return finetune_folds(cfg, progress, start_estimate)
    return run_stage(FinetuneStage, cfg, resume, overrides, progress, start_estimate)


class FinetuneStage:
    """Supervised fine-tuning of SwinUNETR (or the network the method hooks own) on labelled cases."""

    kind = run_prefix = "finetune"
    best_metric = "dice"

    def __init__(self, cfg: Config, resumed: bool = False):
        ft = cfg.finetune
        self.validation_every = (cfg.train.val_every,)
        if cfg.train.probe_data:
            raise ConfigError("train.probe_data: the probe runs during pre-training; for a fine-tuning's "
                              "encoder use swinssl probe RUN --data ...")
        # A resumed run has its weights in its own checkpoint (and its saved config adopted the plan).
        self.pretrained = None
        if ft.pretrained and not resumed:
            self.pretrained, cfg.model = pretrained_start(ft.pretrained, cfg.model)
            pretrained_input, pretrained_modality = input_of(self.pretrained.get("plan"), ft.pretrained)
            cfg.preprocess = adopt_input(cfg.preprocess, pretrained_input, ft.pretrained, ft.adopt_preprocessing)
        self.cfg = cfg
        self.dataset = find_dataset(_data_path(cfg), cfg.data.modality)
        self.classes = class_indices(self.dataset, cfg.data.num_classes)
        self.train_cases, self.val_cases = finetune_split(self.dataset, ft, cfg.train.val_fraction, cfg.seed)
        check_case_grids(self.train_cases + self.val_cases)  # from the headers: refused before the first step
        if not self.val_cases:
            print("warning: no validation case (the dataset has no validation split and train.val_fraction=0, or "
                  "one labelled case): no validation Dice and no checkpoints/best.pt; predict will use last.pt")
        if self.pretrained is not None:
            check_modality(pretrained_modality, common_modality(self.train_cases), ft)
        self.objective = FinetuneStage.method(cfg)  # the fine-tuning hooks, by name
        self.objective.check_finetune(cfg)
        self.unlabeled = (unlabeled_cases(ft.unlabeled, cfg.data.modality, self.dataset,
                                          self.train_cases + self.val_cases) if ft.unlabeled else [])
        self.labels = {str(c): self.dataset.labels.get(c, "background" if c == 0 else f"class_{c}")
                       for c in self.classes}
        self.segmentation_loss = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=ft.dice_weight,
                                            lambda_ce=ft.ce_weight)

    @staticmethod
    def method(cfg: Config):
        """The method whose fine-tuning hooks ``cfg`` names (``finetune.method``), checked against its network."""
        return finetune_method(cfg.finetune.method, dataclasses.asdict(cfg.model))

    @staticmethod
    def check(cfg: Config) -> None:
        FinetuneStage.method(cfg).check_finetune(cfg)

    def splits(self) -> dict[str, list[Case]]:
        splits = {"train": self.train_cases, "validation": self.val_cases}
        if self.unlabeled:
            splits["unlabeled"] = self.unlabeled
        return splits

    def build_model(self, fabric):
        model = build_network(self.cfg.model, out_channels=len(self.classes))
        if self.pretrained is not None:
            report = load_pretrained(model, self.pretrained, layout=None)
            if fabric.is_global_zero:
                print(f"pre-trained weights: {report.summary()}")
        return model

    def param_groups(self, model):
        return layer_decay_groups(model, self.cfg.train.lr, self.cfg.finetune.layer_decay)

    def plan(self, manifest: str | None) -> Plan:
        cfg = self.cfg
        cache = cache_root(cfg)
        return Plan(network=cfg.model, preprocess=cfg.preprocess, out_channels=len(self.classes), labels=self.labels,
                    channel_names=self.dataset.channel_names or ["image"] * cfg.model.in_channels,
                    modality=common_modality(self.train_cases), pretrained=cfg.finetune.pretrained or None,
                    finetune_method=self.objective.name,
                    overlap=cfg.finetune.overlap,
                    manifest_sha256=manifest,
                    # Where the preprocessed volumes are: predict reads them from there too (prediction_cache).
                    cache=str(cache.resolve()) if cache else None)

    def batches(self, fabric, start: int, bad=None):
        """Crops of the labelled (and unlabelled) cases. A bad case stops fine-tuning (one line, the
        last good checkpoint kept): a model trained around a missing label is another model."""
        cfg, t = self.cfg, self.cfg.train

        def loader(cases, pipeline, seed):
            return crop_loader(cases, pipeline, t.batch_size, seed, rank=fabric.global_rank,
                               world_size=fabric.world_size, start_step=start * t.accumulate,
                               steps=t.steps * t.accumulate, num_workers=t.num_workers)

        labelled = loader(self.train_cases, finetune_transforms(cfg.preprocess, classes=self.classes,
                                                                channels=cfg.model.in_channels, train=True,
                                                                cache=cache_root(cfg),
                                                                cache_dtype=cfg.data.cache_dtype), cfg.seed)
        if not self.unlabeled:
            return iter(labelled)
        # Random crops (no label to guide them), normalised as the labelled ones; another seed stream.
        extra = loader(self.unlabeled, pretrain_transforms(cfg.preprocess, channels=cfg.model.in_channels,
                                                           cache=cache_root(cfg), cache_dtype=cfg.data.cache_dtype),
                      cfg.seed + UNLABELED_SEED)
        return (dict(b, unlabeled=u["image"]) for b, u in zip(labelled, extra))

    def losses(self, model, batch, step: int, micro: int, fabric):
        t = self.cfg.train
        x, y = images_of(batch).to(fabric.device), labels_of(batch).to(fabric.device)
        extra = batch["unlabeled"].to(fabric.device) if "unlabeled" in batch else None
        seed = sample_seed(self.cfg.seed, step * t.accumulate + micro, fabric.global_rank, 98)
        total, parts = self.objective.finetune_losses(model, x, y, extra, seed, self.cfg, self.segmentation_loss)
        return total, parts, {}

    def validate(self, model, fabric, run: RunDir, step: int) -> dict[str, float]:
        if not self.val_cases:
            return {}
        return validate(model, self.cfg, self.val_cases, self.classes, self.labels, fabric.device,
                        overlay=run.preview(step) if fabric.is_global_zero else None, method=self.objective)


# --- cross-validation ------------------------------------------------------------------------------


def finetune_folds(cfg: Config, progress: bool = True, start_estimate: dict | None = None) -> Path:
    """Train fold 0 .. ``finetune.folds - 1`` one after the other, each the run ``finetune.fold=i``
    would be, into ``<train.out>/<train.name>/fold_i``; returns that parent folder (``swinssl.runs``).
    ``start_estimate``: see ``engine.runner.run_stage``.

    Every fold's split is checked before anything is written, and listed in ``folds.json``.
    """
    check_fold(cfg.finetune)
    dataset = find_dataset(_data_path(cfg), cfg.data.modality)
    validation = {}
    for fold in range(cfg.finetune.folds):
        _, held = finetune_split(dataset, replace(cfg.finetune, fold=fold), cfg.train.val_fraction, cfg.seed)
        validation[f"fold_{fold}"] = [c.case_id for c in held]
    parent = open_folds_dir(cfg, FinetuneStage.run_prefix, validation)
    return train_folds(cfg, parent, [False] * cfg.finetune.folds, progress, start_estimate=start_estimate)


def resume_folds(parent: str | Path, overrides: list[str] = (), progress: bool = True,
                 start_estimate: dict | None = None) -> Path:
    """Continue a cross-validation: folds begun are resumed (``overrides`` apply to them too), the
    others started from the parent's config."""
    parent = Path(parent)
    cfg = load_config(RunDir(parent).config, overrides)
    # Decided before any process writes a fold, so that every process of a multi-process run agrees.
    started = [RunDir(RunDir(parent).fold(f)).config.is_file() for f in range(cfg.finetune.folds)]
    return train_folds(cfg, parent, started, progress, overrides, start_estimate)


def train_folds(cfg: Config, parent: Path, started: list[bool], progress: bool = True,
                overrides: list[str] = (), start_estimate: dict | None = None) -> Path:
    """Train (or continue, where ``started``) each fold's run in ``parent``, saying which fold is on."""
    folds = cfg.finetune.folds
    for fold in range(folds):
        run = RunDir(parent).fold(fold)
        if launched_as_rank_zero():
            print(f"fold {fold + 1}/{folds}: {run}")
        if started[fold]:
            run_stage(FinetuneStage, resume=run, overrides=overrides, progress=progress, start_estimate=start_estimate)
        else:
            run_stage(FinetuneStage, fold_config(cfg, parent, fold), progress=progress, start_estimate=start_estimate)
    return parent


def fold_config(cfg: Config, parent: Path, fold: int) -> Config:
    """The config of fold ``fold``'s run: in ``parent``, that fold held out, and the preprocessing
    cache where a single run's would be (one cache for all folds)."""
    cache = cache_root(cfg)
    return replace(cfg, finetune=replace(cfg.finetune, fold=fold),
                   train=replace(cfg.train, out=str(parent), name=RunDir(parent).fold(fold).name),
                   data=replace(cfg.data, cache=str(cache) if cache else cfg.data.cache))


def _data_path(cfg: Config) -> str:
    if not cfg.data.path:
        raise ConfigError("data.path is empty: pass data=PATH (a dataset.json, nnU-Net raw folder or labelled folder)")
    return cfg.data.path


# --- model -------------------------------------------------------------------------------------------


def layer_decay_groups(model: torch.nn.Module, lr: float, decay: float) -> list[dict]:
    """AdamW parameter groups: encoder stage i (patch embedding 0, layers1..4) at lr * decay^(5 - i), the
    decoder at lr. ``decay`` 1 gives one group."""
    if decay == 1.0:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]
    if not 0 < decay <= 1:
        raise ConfigError(f"finetune.layer_decay must be in (0, 1], got {decay}")
    groups: dict[int, list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        depth = 5
        if name.startswith("swinViT.patch_embed"):
            depth = 0
        elif name.startswith("swinViT.layers"):
            depth = int(name[len("swinViT.layers")])
        groups.setdefault(depth, []).append(param)
    return [{"params": params, "lr": lr * decay ** (5 - depth)} for depth, params in sorted(groups.items())]
