"""Fine-tuning SwinUNETR for segmentation, from scratch or from pre-trained weights.

Labelled cases of the dataset's training (and validation) splits, never its test cases;
a validation split from the dataset, a k-fold split or ``train.val_fraction``; a label
ratio or explicit case list for data-efficiency studies. DiceCE loss (MONAI), AdamW with
optional layer-wise LR decay of the encoder, warm-up + cosine (the shared loop in
``engine.loop``), sliding-window validation Dice every ``train.val_every`` steps,
``checkpoints/best.pt`` (best validation mean Dice) and ``checkpoints/last.pt``, and PNG
overlays of a validation case. Checkpoints carry the plan that ``swinssl predict`` needs.

With ``model.multiview`` (SwinMM): each crop is seen in two axis orders drawn per step, the
network's cross-view block joins them, and the loss is the mean DiceCE of the two views
plus ``finetune.consistency_weight`` x their symmetric KL. With ``finetune.unlabeled``,
random crops of unlabelled volumes add the same loss against the detached argmax of the
two views' mean softmax (pseudo-labels); their label files are never read.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import compute_dice
from torch.optim.lr_scheduler import LambdaLR

import swinssl
from swinssl.config import Config, FinetuneConfig, ModelConfig, to_dict
from swinssl.data.discover import Case, Dataset, find_dataset
from swinssl.data.io import read_volume
from swinssl.data.transforms import case_item, finetune_transforms, pretrain_transforms
from swinssl.engine.checkpoint import restore_rng, rng_state, save_checkpoint
from swinssl.engine.data import cache_root, crop_loader, images_of, labels_of, sample_seed
from swinssl.engine.distributed import DistributedFaults
from swinssl.engine.logging import MetricLogger, save_overlay
from swinssl.engine.loop import progress_bar, run_steps, setup_fabric, warmup_cosine
from swinssl.engine.pretrain import split_cases
from swinssl.engine.run_dir import open_run_dir, resume_state
from swinssl.errors import ConfigError, DataError
from swinssl.nn import build_network, load_pretrained
from swinssl.nn.load import read_checkpoint
from swinssl.nn.multiview import VIEW_ORDERS
from swinssl.ssl.losses import symmetric_kl

log = logging.getLogger(__name__)

# Architecture fields a pre-trained plan fixes: the encoder's weights only fit this shape. Not the
# input channels: those are the data's, and load_pretrained adapts a pre-trained stem to them.
ARCHITECTURE = ("feature_size", "depths", "num_heads", "window_size", "use_v2", "downsample",
                "domain_invariance", "dim_heads", "dim_pool")


def finetune(cfg: Config | None = None, resume: str | Path | None = None, overrides: list[str] = (),
             progress: bool = True) -> Path:
    """Run (or resume) a fine-tuning; returns the run directory."""
    state = None
    if resume is not None:
        cfg, state = resume_state(resume, overrides)
    assert cfg is not None
    ft, t = cfg.finetune, cfg.train
    if not cfg.data.path:
        raise ConfigError("data.path is empty: pass data=PATH (a dataset.json, nnU-Net raw folder or labelled folder)")
    # A resumed run has its weights in its own checkpoint (and its saved config adopted the plan).
    pretrained = read_pretrained(ft.pretrained) if ft.pretrained and state is None else None
    if pretrained is not None:
        cfg.model = adopt_plan(cfg.model, pretrained, ft.pretrained)
    dataset = find_dataset(cfg.data.path, cfg.data.modality)
    classes = class_indices(dataset, cfg.data.num_classes)
    train_cases, val_cases = finetune_split(dataset, ft, t.val_fraction, cfg.seed)
    unlabeled = unlabeled_cases(ft.unlabeled, cfg.data.modality) if ft.unlabeled else []
    if unlabeled and not cfg.model.multiview:
        raise ConfigError("finetune.unlabeled needs model.multiview=true: pseudo-labels come from the views' mean")

    fabric = setup_fabric(t, cfg.seed)
    splits = {"train": train_cases, "validation": val_cases}
    if unlabeled:
        splits["unlabeled"] = unlabeled
    run_dir, manifest = open_run_dir(fabric, cfg, "finetune", resume, state, splits)

    model = build_network(cfg.model, out_channels=len(classes))
    if pretrained is not None:
        report = load_pretrained(model, pretrained, layout=None)
        if fabric.is_global_zero:
            print(f"pre-trained weights: {report.summary()}")
    optimizer = torch.optim.AdamW(layer_decay_groups(model, t.lr, ft.layer_decay), lr=t.lr, weight_decay=t.weight_decay)
    scheduler = LambdaLR(optimizer, warmup_cosine(t.warmup_steps, t.steps))
    start, best = 0, -1.0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng(state["rng"])
        start, best = int(state["step"]), float(state.get("best_dice", -1.0))
        manifest = state["plan"].get("manifest_sha256")
    raw_model = model
    if t.compile:
        model.compile()
    model, optimizer = fabric.setup(model, optimizer)

    plan = {
        "network": {**to_dict(cfg.model), "out_channels": len(classes), "patch_size": 2},
        "preprocess": to_dict(cfg.preprocess),
        "labels": {str(c): dataset.labels.get(c, "background" if c == 0 else f"class_{c}") for c in classes},
        "channel_names": dataset.channel_names or ["image"] * cfg.model.in_channels,
        "modality": _common_modality(train_cases),
        "pretrained": ft.pretrained or None,
        "manifest_sha256": manifest,
        "package_version": swinssl.__version__,
        # Where the preprocessed volumes are: predict reads them from there too (prediction_cache).
        "cache": str(cache_root(cfg).resolve()) if cache_root(cfg) else None,
    }
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=ft.dice_weight, lambda_ce=ft.ce_weight)
    pipeline = finetune_transforms(cfg.preprocess, classes=classes, channels=cfg.model.in_channels, train=True,
                                   cache=cache_root(cfg))
    loader = crop_loader(train_cases, pipeline, t.batch_size, cfg.seed, rank=fabric.global_rank,
                         start_step=start * t.accumulate, steps=t.steps * t.accumulate, num_workers=t.num_workers)
    batches = iter(loader)
    if unlabeled:
        # Random crops (no label to guide them), normalised as the labelled ones; another seed stream.
        extra = crop_loader(unlabeled, pretrain_transforms(cfg.preprocess, channels=cfg.model.in_channels,
                                                           cache=cache_root(cfg)),
                            t.batch_size, cfg.seed + UNLABELED_SEED, rank=fabric.global_rank,
                            start_step=start * t.accumulate, steps=t.steps * t.accumulate, num_workers=t.num_workers)
        batches = (dict(b, unlabeled=u["image"]) for b, u in zip(loader, extra))
    logger = MetricLogger(run_dir) if fabric.is_global_zero else None

    def checkpoint(name: str, step: int, metrics: dict) -> None:
        if not fabric.is_global_zero:
            return
        payload = {
            "format": "swinssl", "version": swinssl.__version__, "kind": "finetune", "step": step,
            "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": rng_state(), "plan": plan, "metrics": metrics, "best_dice": best,
        }
        save_checkpoint(run_dir / "checkpoints" / name, payload)

    def losses(batch, step: int, micro: int):
        x, y = images_of(batch).to(fabric.device), labels_of(batch).to(fabric.device)
        if not cfg.model.multiview:
            return loss_fn(model(x), y), {}, {}
        orders = draw_view_pair(sample_seed(cfg.seed, step * t.accumulate + micro, fabric.global_rank, 98))
        seg, consistency = multiview_loss(model, x, y, orders, loss_fn)
        total = seg + ft.consistency_weight * consistency
        parts = {"dice_ce": seg, "consistency": consistency}
        if "unlabeled" in batch:
            xu = batch["unlabeled"].to(fabric.device)
            parts["unlabeled_dice_ce"], parts["unlabeled_consistency"] = multiview_loss(model, xu, None, orders, loss_fn)
            total = total + ft.unlabeled_weight * (parts["unlabeled_dice_ce"]
                                                   + ft.consistency_weight * parts["unlabeled_consistency"])
        return total, parts, {}

    def after_step(done: int, metrics: dict, _previews: dict) -> None:
        nonlocal best
        if val_cases and (done % t.val_every == 0 or done == t.steps):
            val = validate(raw_model, cfg, val_cases, classes, plan["labels"], fabric,
                           overlay=run_dir / "previews" / f"step_{done:07d}.png" if fabric.is_global_zero else None)
            if logger:
                logger.log(done, "val", val)
            metrics.update({f"val_{k}": v for k, v in val.items()})
            if val["dice"] > best:
                best = val["dice"]
                checkpoint("best.pt", done, metrics)
        if done % t.checkpoint_every == 0 or done == t.steps:
            checkpoint("last.pt", done, metrics)

    bar = progress_bar(progress and fabric.is_global_zero, start, t.steps, f"finetune {run_dir.name}")
    with DistributedFaults(fabric, run_dir / "checkpoints" / "last.pt"):
        run_steps(fabric, model, optimizer, scheduler, batches, losses, t, start, logger, bar, after_step,
                  run_dir / "checkpoints" / "last.pt")
        if logger:
            logger.close()
        fabric.barrier()
    return run_dir


UNLABELED_SEED = 7919  # offset of the unlabelled crops' seed stream from the labelled one


def draw_view_pair(seed: int) -> tuple:
    """Two distinct axis orders of the three (identity, swap_xy, swap_xz), as SwinMM draws per batch."""
    first, second = np.random.default_rng(seed).permutation(len(VIEW_ORDERS))[:2]
    return VIEW_ORDERS[first], VIEW_ORDERS[second]


def multiview_loss(model, x: torch.Tensor, y: torch.Tensor | None, orders, loss_fn) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean DiceCE of the two views, their symmetric KL) for crops ``x``.

    ``y=None`` (unlabelled crops): the target is the detached argmax of the two views' mean softmax.
    """
    outs = model(x, orders=orders)
    if y is None:
        with torch.no_grad():
            y = sum(torch.softmax(o.float(), 1) for o in outs).argmax(1, keepdim=True)
    return sum(loss_fn(o, y) for o in outs) / len(outs), symmetric_kl(*outs)


# --- data --------------------------------------------------------------------------------------------


def class_indices(dataset: Dataset, num_classes: int = 0) -> list[int]:
    """Classes 0..K-1: from the config, the dataset's label names, or the values in its label files."""
    if num_classes:
        return list(range(num_classes))
    if dataset.labels:
        found = sorted(dataset.labels)
    else:
        values: set[int] = set()
        for case in dataset.labelled:
            values |= set(np.unique(read_volume(case.label).numpy()).astype(int).tolist())
        found = sorted(values)
    if not found or found[-1] < 1:
        raise DataError(f"{dataset.root}: labels hold no foreground class")
    return list(range(found[-1] + 1))


def finetune_split(dataset: Dataset, ft: FinetuneConfig, val_fraction: float, seed: int) -> tuple[list[Case], list[Case]]:
    """(training, validation) labelled cases; never the dataset's test split."""
    labelled = [c for c in dataset.split("training", "validation") if c.label is not None]
    if not labelled:
        raise DataError(f"{dataset.root}: no labelled training cases (fine-tuning needs image + label pairs)")
    if ft.folds:
        if not 0 <= ft.fold < ft.folds or ft.folds > len(labelled):
            raise ConfigError(f"finetune.fold {ft.fold} / finetune.folds {ft.folds}: need 0 <= fold < folds "
                              f"<= {len(labelled)} labelled cases")
        order = np.random.default_rng([seed, 12]).permutation(len(labelled))
        held = set(np.array_split(order, ft.folds)[ft.fold].tolist())
        train = [c for i, c in enumerate(labelled) if i not in held]
        val = [c for i, c in enumerate(labelled) if i in held]
    elif any(c.split == "validation" for c in labelled):
        train = [c for c in labelled if c.split == "training"]
        val = [c for c in labelled if c.split == "validation"]
    else:
        train, val = split_cases(labelled, val_fraction, seed)
    return label_subset(train, ft, seed), val


def label_subset(cases: list[Case], ft: FinetuneConfig, seed: int) -> list[Case]:
    """The training cases actually used: ``finetune.cases`` by id, else a seeded ``label_ratio`` share."""
    if ft.cases:
        by_id = {c.case_id: c for c in cases}
        unknown = [c for c in ft.cases if c not in by_id]
        if unknown:
            raise ConfigError(f"finetune.cases: {unknown} are not labelled training cases; "
                              f"available: {', '.join(sorted(by_id))}")
        return [by_id[c] for c in ft.cases]
    if not 0 < ft.label_ratio <= 1:
        raise ConfigError(f"finetune.label_ratio must be in (0, 1], got {ft.label_ratio}")
    n = max(1, round(len(cases) * ft.label_ratio))
    # Nested subsets: the 10% cases are among the 30% cases for one seed, as in data-efficiency studies.
    order = np.random.default_rng([seed, 13]).permutation(len(cases))[:n]
    return [cases[i] for i in sorted(order.tolist())]


def unlabeled_cases(path: str, modality: str) -> list[Case]:
    """The training volumes of ``path`` with their labels dropped: semi-supervised training never reads them."""
    cases = [replace(c, label=None) for c in find_dataset(path, modality).split("training", "validation")]
    if not cases:
        raise DataError(f"{path}: no unlabelled training volumes")
    return cases


def _common_modality(cases: list[Case]) -> str | None:
    found = {c.modality for c in cases}
    return found.pop() if len(found) == 1 else None


# --- model -------------------------------------------------------------------------------------------


def read_pretrained(source: str) -> dict:
    """A pre-trained checkpoint: a file, or a run directory (its checkpoints/last.pt)."""
    path = Path(source)
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
    return read_checkpoint(path)


def adopt_plan(model: ModelConfig, ckpt: dict, source: str) -> ModelConfig:
    """The network of a pre-trained plan, replacing differing architecture fields (and saying so)."""
    network = (ckpt.get("plan") or {}).get("network") if isinstance(ckpt.get("plan"), dict) else None
    if not network:
        return model
    changes = {}
    for key in ARCHITECTURE:
        if key in network:
            theirs = tuple(network[key]) if isinstance(network[key], list) else network[key]
            if theirs != getattr(model, key):
                changes[key] = theirs
    if changes:
        said = ", ".join(f"{k} {getattr(model, k)} -> {v}" for k, v in changes.items())
        print(f"adopting the network of the pre-trained plan {source}: {said}")
    return replace(model, **changes)


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


# --- validation --------------------------------------------------------------------------------------


@torch.no_grad()
def validate(model, cfg: Config, cases: list[Case], classes: list[int], names: dict[str, str], fabric,
             overlay: Path | None = None) -> dict[str, float]:
    """Sliding-window Dice per foreground class on the preprocessed validation volumes, and their mean.

    A class absent from both label and prediction counts as Dice 1, absent from one of
    them as 0 (MONAI's ``ignore_empty=False``), so the mean is never NaN.
    """
    was_training = model.training
    model.eval()
    pipeline = finetune_transforms(cfg.preprocess, classes=classes, channels=cfg.model.in_channels, train=False,
                                   cache=cache_root(cfg))
    k = len(classes)
    per_class = torch.zeros(k - 1, dtype=torch.float64)
    for index, case in enumerate(cases):
        item = pipeline(case_item(case))
        x = item["image"].as_tensor()[None].to(fabric.device)
        logits = sliding_window_inference(x, cfg.preprocess.roi_size, cfg.finetune.sw_batch_size, model,
                                          overlap=cfg.finetune.overlap, mode="gaussian")
        pred = logits.argmax(1).cpu()
        label = item["label"].as_tensor().long()
        one_hot = lambda m: torch.nn.functional.one_hot(m, k).permute(0, 4, 1, 2, 3)  # noqa: E731
        dice = compute_dice(one_hot(pred), one_hot(label[0][None]), include_background=False, ignore_empty=False)
        per_class += dice[0].double()
        if overlay is not None and index == 0:
            save_overlay(overlay, item["image"][0], {"label": label[0], "prediction": pred[0]},
                         title=f"{case.case_id}, mean Dice {dice.mean().item():.3f}")
    model.train(was_training)
    per_class /= len(cases)
    out = {"dice": per_class.mean().item()}
    out.update({f"dice_{names.get(str(c), c)}": per_class[c - 1].item() for c in classes[1:]})
    return out
