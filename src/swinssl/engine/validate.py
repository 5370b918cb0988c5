"""Validation during training: sliding-window Dice of a segmentation network on held-out cases, and
the frozen-encoder probe's score of an encoder (``ProbeTask``).

Windows go through the fine-tuning method's inference hooks (``methods.window_predictor``), as
``swinssl predict`` sends them, so a validation Dice is the Dice predict would reach on those volumes at the
fine-tuning's overlap. Fine-tuning validates with ``validate``; pre-training scores its encoder
with ``ProbeTask`` beside a random encoder (``random_encoder``); ``engine.probe`` scores a checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import compute_dice
from torch import nn

from swinssl.config import Config, ModelConfig
from swinssl.data.discover import Case, find_dataset
from swinssl.data.splits import class_indices, finetune_split
from swinssl.data.transforms import case_item, finetune_transforms
from swinssl.engine.data import SeededDataset, cache_root, images_of, labels_of, sample_seed
from swinssl.errors import ConfigError
from swinssl.methods import Method, window_predictor
from swinssl.nn import build_encoder
from swinssl.nn.heads import FrozenEncoderProbe
from swinssl.plots import save_overlay


@torch.no_grad()
def validate(model, cfg: Config, cases: list[Case], classes: list[int], names: dict[str, str], device,
             overlay: Path | None = None, method: Method | None = None, views: str = "auto") -> dict[str, float]:
    """Sliding-window Dice per foreground class on the preprocessed validation volumes, and their mean.

    A class absent from both label and prediction counts as Dice 1, absent from one of
    them as 0 (MONAI's ``ignore_empty=False``), so the mean is never NaN. ``method``: whose inference
    hooks predict the windows (None: the model as it is); ``views``: their choice, as predict's.
    """
    was_training = model.training
    model.eval()
    predictor, _ = window_predictor(model, method, views)
    pipeline = finetune_transforms(cfg.preprocess, classes=classes, channels=cfg.model.in_channels, train=False,
                                   cache=cache_root(cfg), cache_dtype=cfg.data.cache_dtype)
    k = len(classes)
    per_class = torch.zeros(k - 1, dtype=torch.float64)
    for index, case in enumerate(cases):
        item = pipeline(case_item(case))
        # The unwrapped model gets no input conversion from Fabric: match its weights' dtype (64-true).
        x = item["image"].as_tensor()[None].to(device, next(model.parameters()).dtype)
        logits = sliding_window_inference(x, cfg.preprocess.roi_size, cfg.finetune.sw_batch_size, predictor,
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


# The head's optimiser. A linear head on fixed features converges within a few hundred full-batch
# steps at this rate (Adam); the encoder's own training rate is no guide for it.
PROBE_LR = 1e-2


PROBE_CROPS = 32  # label-guided training crops, drawn once per probe task


class ProbeTask:
    """A probe's labelled data, prepared once and scored on any number of encoders.

    Training crops: ``PROBE_CROPS`` label-guided crops (class-balanced, no augmentation) of the
    labelled training cases of ``cfg.data.path``, drawn once from ``seed``. Held-out cases: the
    dataset's validation split, else ``train.val_fraction`` of the labelled training cases; never
    its test cases. The encoder's features of the crops are computed once per scored encoder, so
    the head's steps cost almost nothing: a probe costs about ``PROBE_CROPS`` encoder forwards
    plus a sliding window over the held-out cases.
    """

    def __init__(self, cfg: Config, seed: int = 0, crops: int = PROBE_CROPS):
        if not cfg.data.path:
            raise ConfigError("the probe's data path is empty: pass a labelled dataset (a dataset.json or "
                              "labelled folder)")
        self.cfg, self.seed = cfg, seed
        dataset = find_dataset(cfg.data.path, cfg.data.modality)
        self.classes = class_indices(dataset, cfg.data.num_classes)
        self.names = {str(c): dataset.labels.get(c, f"class_{c}") for c in self.classes}
        self.train_cases, self.test_cases = finetune_split(
            dataset, dataclasses.replace(cfg.finetune, label_ratio=1.0, cases=[], folds=0), cfg.train.val_fraction,
            seed)
        if not self.test_cases:
            raise ConfigError(f"{cfg.data.path}: the probe needs held-out labelled cases (a validation split, or "
                              "train.val_fraction > 0 with at least two labelled training cases)")
        preprocess = dataclasses.replace(cfg.preprocess, augment=False, crop_sampling="classes")
        pipeline = finetune_transforms(preprocess, classes=self.classes, channels=cfg.model.in_channels, train=True,
                                       cache=cache_root(cfg), cache_dtype=cfg.data.cache_dtype)
        volumes = SeededDataset(self.train_cases, pipeline)
        per_visit = preprocess.num_crops
        drawn = [c for i in range(-(-crops // per_visit))
                 for c in volumes[(i % len(self.train_cases), sample_seed(seed, i, 0, 71))]][:crops]
        self.images = torch.stack([images_of(c) for c in drawn])
        self.labels = torch.stack([labels_of(c) for c in drawn])

    def score(self, encoder: nn.Module, steps: int = 200, device="cpu") -> tuple[float, dict[str, float]]:
        """(mean Dice over the foreground classes, {class name: Dice}) of a head trained ``steps``
        full-batch steps on ``encoder``'s frozen features; ``encoder`` itself is left as it was."""
        cfg = self.cfg
        frozen = copy.deepcopy(encoder).float()
        with torch.random.fork_rng(devices=[]):  # the head's seed, leaving the caller's random stream alone
            torch.manual_seed(self.seed)
            model = FrozenEncoderProbe(frozen, cfg.model.feature_size, len(self.classes)).to(device)
        with torch.no_grad():
            hidden = [torch.cat(parts) for parts in zip(*(
                model.encoder(x.to(device), normalize=True) for x in self.images.split(8)))]
        # The head learns on its own grid (8x fewer voxels than the crops, no full-size upsampling to
        # differentiate): targets are each grid cell's class shares.
        one_hot = F.one_hot(self.labels[:, 0].long(), len(self.classes)).permute(0, 4, 1, 2, 3).float()
        targets = F.interpolate(one_hot, size=hidden[0].shape[2:], mode="area").to(device)
        optimizer = torch.optim.AdamW(model.head.parameters(), lr=PROBE_LR, weight_decay=0.0)
        loss_fn = DiceCELoss(softmax=True)
        for _ in range(steps):
            loss = loss_fn(model.head(hidden), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        # The probe is one network of the encoder's features: its windows go through it as they are.
        scores = validate(model, cfg, self.test_cases, self.classes, self.names, device, method=None, views="single")
        return scores.pop("dice"), {k.removeprefix("dice_"): v for k, v in scores.items()}


def random_encoder(model: ModelConfig, seed: int) -> nn.Module:
    """A freshly initialised Swin encoder of ``model``, the same for one seed: the probe's baseline."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_encoder(dataclasses.replace(model, use_checkpoint=False))
