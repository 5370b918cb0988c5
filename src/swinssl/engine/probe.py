"""The frozen-encoder probe: how much of a segmentation task an encoder's features already hold.

The Swin encoder of a model is frozen; only a light head is trained on its five multi-scale
feature maps: one 1x1x1 convolution per map to the classes, upsampled (trilinear) and summed.
There is no path from the raw image to the output, so the score measures the encoder alone.
Trained with DiceCE on fixed class-balanced crops of the labelled training cases (on the
stride-2 grid of the first map, against each cell's class shares), then scored by
sliding-window Dice per class on held-out labelled cases. The same probe on a freshly
initialised encoder of the same plan is the baseline: a pre-training paid off for this task
when its probe beats the random encoder's. ``swinssl probe`` runs it on a checkpoint;
``train.probe_data`` runs it during pre-training.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import nn

from swinssl.config import Config, ModelConfig, to_dict
from swinssl.data.discover import find_dataset
from swinssl.data.transforms import finetune_transforms
from swinssl.engine.data import SeededDataset, cache_root, images_of, labels_of, sample_seed
from swinssl.engine.finetune import class_indices, finetune_split, pretrained_start, validate
from swinssl.errors import ConfigError
from swinssl.nn import build_encoder, build_network, load_pretrained
from swinssl.utils import atomic_write_text, writable_dir


class ProbeHead(nn.Module):
    """Encoder feature maps (C, 2C, 4C, 8C, 16C channels; strides 2..32) -> logits ``(B, K, d, h, w)`` on
    the stride-2 grid of the first map: each map projected to the classes (1x1x1), and the
    projections summed from the coarsest up, upsampling (trilinear) the running sum to the next
    map's grid, as a feature pyramid does: linear in the features, with a third of the work of
    upsampling each map to the finest grid. ``FrozenEncoderProbe`` upsamples the sum to the input."""

    def __init__(self, feature_size: int, num_classes: int):
        super().__init__()
        self.projections = nn.ModuleList(nn.Conv3d(feature_size * 2**i, num_classes, 1) for i in range(5))

    def forward(self, hidden: list[torch.Tensor]) -> torch.Tensor:
        logits = self.projections[4](hidden[4])
        for i in range(3, -1, -1):
            up = F.interpolate(logits, size=hidden[i].shape[2:], mode="trilinear", align_corners=False)
            logits = self.projections[i](hidden[i]) + up
        return logits


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
        logits = F.interpolate(self.head(hidden), size=padded.shape[2:], mode="trilinear", align_corners=False)
        return logits[:, :, : size[0], : size[1], : size[2]]


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
                                       cache=cache_root(cfg))
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
        scores = validate(model, cfg, self.test_cases, self.classes, self.names, device)
        return scores.pop("dice"), {k.removeprefix("dice_"): v for k, v in scores.items()}


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


def random_encoder(model: ModelConfig, seed: int) -> nn.Module:
    """A freshly initialised Swin encoder of ``model``, the same for one seed: the probe's baseline."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_encoder(dataclasses.replace(model, use_checkpoint=False))


def probe(source: str | Path, cfg: Config, steps: int = 200, seed: int = 0, device: str = "cpu") -> ProbeResult:
    """Probe the encoder of ``source`` on ``cfg.data.path`` (see ``ProbeTask``).

    ``source``: a pre-training run or any checkpoint ``load_pretrained`` reads, or ``random`` for
    a freshly initialised encoder of ``cfg.model`` (seeded). A swinssl plan's architecture is
    adopted first, as fine-tuning does.
    """
    encoder = None
    if str(source) != "random":
        weights, model_cfg = pretrained_start(str(source), cfg.model)
        cfg = dataclasses.replace(cfg, model=model_cfg)
        # load_pretrained reads every checkpoint layout into a SwinUNETR; only its encoder is probed.
        net = build_network(dataclasses.replace(cfg.model, use_checkpoint=False), out_channels=2)
        load_pretrained(net, weights)
        encoder = net.swinViT
    task = ProbeTask(cfg, seed)
    dice, per_class = task.score(encoder if encoder is not None else random_encoder(cfg.model, seed), steps, device)
    return ProbeResult(str(source), dice, per_class, steps, seed, [c.case_id for c in task.train_cases],
                       [c.case_id for c in task.test_cases], to_dict(cfg.model))


def probe_curve(rows: list[dict]) -> tuple[dict[int, float], float | None]:
    """A pre-training's logged probe, from its metrics rows (``engine.logging.read_metrics``): {step:
    ``probe_dice``} and ``probe_dice_random`` (None for a run without the probe)."""
    curve = {r["step"]: r["value"] for r in rows if r["name"] == "probe_dice"}
    return curve, next((r["value"] for r in rows if r["name"] == "probe_dice_random"), None)


def write_probe(results: list[ProbeResult], out: str | Path) -> Path:
    """``probe.json`` in ``out``: the results as they are."""
    path = writable_dir(out) / "probe.json"
    atomic_write_text(path, json.dumps([dataclasses.asdict(r) for r in results], indent=2) + "\n")
    return path
