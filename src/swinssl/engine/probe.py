"""The frozen-encoder probe: how much of a segmentation task an encoder's features already hold.

The Swin encoder of a model is frozen; only a light head is trained on its five multi-scale
feature maps: one 1x1x1 convolution per map to the classes, each upsampled (trilinear) to the
input size, summed. There is no path from the raw image to the output, so the score measures
the encoder alone. Trained with DiceCE on random label-guided crops of the labelled training
cases, then scored by sliding-window Dice per class on held-out labelled cases. The same probe
on a freshly initialised encoder of the same plan is the baseline: a pre-training paid off for
this task when its probe beats the random encoder's.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import nn

from swinssl.config import Config, to_dict
from swinssl.data.discover import find_dataset
from swinssl.data.transforms import finetune_transforms
from swinssl.engine.data import cache_root, crop_loader, images_of, labels_of
from swinssl.engine.finetune import class_indices, finetune_split, pretrained_start, validate
from swinssl.errors import ConfigError
from swinssl.nn import build_network, load_pretrained
from swinssl.utils import atomic_write_text, writable_dir


class ProbeHead(nn.Module):
    """Encoder feature maps (C, 2C, 4C, 8C, 16C channels; strides 2..32) -> logits ``(B, K, *size)``."""

    def __init__(self, feature_size: int, num_classes: int):
        super().__init__()
        self.projections = nn.ModuleList(nn.Conv3d(feature_size * 2**i, num_classes, 1) for i in range(5))

    def forward(self, hidden: list[torch.Tensor], size) -> torch.Tensor:
        return sum(F.interpolate(p(h), size=size, mode="trilinear", align_corners=False)
                   for p, h in zip(self.projections, hidden))


class FrozenEncoderProbe(nn.Module):
    """A frozen Swin encoder (``swinViT``, eval mode, no gradient) and a trainable ``ProbeHead``."""

    def __init__(self, encoder: nn.Module, feature_size: int, num_classes: int, multiple: int = 32):
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.head = ProbeHead(feature_size, num_classes)
        self.multiple = multiple

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # frozen: dropout and drop-path stay off
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = tuple(x.shape[2:])
        pads = [(-s) % self.multiple for s in size]
        padded = F.pad(x, (0, pads[2], 0, pads[1], 0, pads[0])) if any(pads) else x
        with torch.no_grad():
            hidden = self.encoder(padded, normalize=True)
        logits = self.head(hidden, tuple(padded.shape[2:]))
        return logits[:, :, : size[0], : size[1], : size[2]]


@dataclass
class ProbeResult:
    source: str
    dice: float  # mean over the foreground classes
    per_class: dict[str, float]
    steps: int
    seed: int
    train_cases: list[str]
    test_cases: list[str]
    network: dict  # the encoder's network config (a checkpoint's plan adopted): a random baseline uses it too


def probe(source: str | Path, cfg: Config, steps: int = 200, seed: int = 0, device: str = "cpu") -> ProbeResult:
    """Train the probe on ``cfg.data.path``'s labelled training cases and score it on held-out ones.

    ``source``: a pre-training run or any checkpoint ``load_pretrained`` reads, or ``random`` for
    a freshly initialised encoder of ``cfg.model`` (seeded). A swinssl plan's architecture is
    adopted first, as fine-tuning does. Held-out cases: the dataset's validation split, else
    ``train.val_fraction`` of the labelled training cases; never its test cases.
    """
    if not cfg.data.path:
        raise ConfigError("data.path is empty: pass --data LABELLED (a dataset.json or labelled folder)")
    weights = None
    if str(source) != "random":
        weights, model_cfg = pretrained_start(str(source), cfg.model)
        cfg = dataclasses.replace(cfg, model=model_cfg)
    dataset = find_dataset(cfg.data.path, cfg.data.modality)
    classes = class_indices(dataset, cfg.data.num_classes)
    train_cases, test_cases = finetune_split(dataset, dataclasses.replace(cfg.finetune, label_ratio=1.0, cases=[]),
                                             cfg.train.val_fraction, seed)
    if not test_cases:
        raise ConfigError(f"{cfg.data.path}: the probe needs held-out labelled cases (a validation split, or "
                          "train.val_fraction > 0 with at least two labelled training cases)")
    torch.manual_seed(seed)
    net = build_network(dataclasses.replace(cfg.model, use_checkpoint=False), out_channels=len(classes))
    if weights is not None:
        load_pretrained(net, weights)
    model = FrozenEncoderProbe(net.swinViT, cfg.model.feature_size, len(classes)).to(device)
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    pipeline = finetune_transforms(cfg.preprocess, classes=classes, channels=cfg.model.in_channels, train=True,
                                   cache=cache_root(cfg))
    model.train()
    for batch in crop_loader(train_cases, pipeline, cfg.train.batch_size, seed, steps=steps):
        loss = loss_fn(model(images_of(batch).to(device)), labels_of(batch).to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    names = {str(c): dataset.labels.get(c, f"class_{c}") for c in classes}
    scores = validate(model, cfg, test_cases, classes, names, device)
    return ProbeResult(str(source), scores.pop("dice"), {k.removeprefix("dice_"): v for k, v in scores.items()},
                       steps, seed, [c.case_id for c in train_cases], [c.case_id for c in test_cases], to_dict(cfg.model))


def write_probe(results: list[ProbeResult], out: str | Path) -> Path:
    """``probe.json`` in ``out``: the results as they are."""
    path = writable_dir(out) / "probe.json"
    atomic_write_text(path, json.dumps([dataclasses.asdict(r) for r in results], indent=2) + "\n")
    return path
