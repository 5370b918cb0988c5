"""The frozen-encoder probe: how much of a segmentation task an encoder's features already hold.

The Swin encoder of a model is frozen; only a light head is trained on its five multi-scale
feature maps: one 1x1x1 convolution per map to the classes, upsampled (trilinear) and summed.
There is no path from the raw image to the output, so the score measures the encoder alone.
Trained with DiceCE on fixed class-balanced crops of the labelled training cases (on the
stride-2 grid of the first map, against each cell's class shares), then scored by
sliding-window Dice per class on held-out labelled cases. The same probe on a freshly
initialised encoder of the same plan is the baseline: a pre-training paid off for this task
when its probe beats the random encoder's. ``swinssl probe`` runs it on a checkpoint (here);
``train.probe_data`` runs it during pre-training (``engine.validate.ProbeTask``, which both use).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from swinssl.config import Config, ModelConfig, from_dict, to_dict
from swinssl.engine.checkpoint import pretrained_start
from swinssl.engine.validate import ProbeTask, random_encoder
from swinssl.nn import build_network, load_pretrained
from swinssl.utils import atomic_write_text, writable_dir


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


def probe_against_random(source: str | Path, cfg: Config, steps: int = 200, seed: int = 0,
                         device: str = "cpu") -> list[ProbeResult]:
    """The probe of ``source`` and, unless it is ``random`` itself, of a random encoder of the network
    its plan adopted (same crops, held-out cases, steps and seed): the baseline it has to beat."""
    results = [probe(source, cfg, steps, seed, device)]
    if str(source) != "random":
        network = from_dict(ModelConfig, results[0].network, source=str(source), prefix="model.")
        results.append(probe("random", dataclasses.replace(cfg, model=network), steps, seed, device))
    return results


def write_probe(results: list[ProbeResult], out: str | Path) -> Path:
    """``probe.json`` in ``out``: the results as they are."""
    path = writable_dir(out) / "probe.json"
    atomic_write_text(path, json.dumps([dataclasses.asdict(r) for r in results], indent=2) + "\n")
    return path
