"""Loading a fine-tuned model (or an ensemble of them) and its plan for prediction."""

from __future__ import annotations

import logging

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from swinssl.errors import CheckpointError
from swinssl.infer.exported import is_exported, load_exported
from swinssl.nn.build import build_network
from swinssl.checkpoint import FORMAT, Checkpoint, read_checkpoint
from swinssl.nn.load import filter_swinssl, load_exactly
from swinssl.nn.swin_unetr import SwinUNETR
from swinssl.plan import Plan, plan_difference
from swinssl.runs import resolve_checkpoint, resolve_checkpoints


log = logging.getLogger(__name__)


def load_model(source: str | Path, device: str | torch.device = "cpu") -> tuple[SwinUNETR, Plan]:
    """A fine-tuned SwinUNETR (eval mode, on ``device``) and its plan, from a checkpoint or run directory.

    Raises ``CheckpointError`` (one line naming the file) for a missing or unreadable file, a
    checkpoint that is not a fine-tuned swinssl one (e.g. pre-training: no segmentation head),
    a plan without network or preprocessing, or weights that do not fit the planned network.
    """
    path = resolve_checkpoint(source)
    ckpt = _finetune_checkpoint(read_checkpoint(path), path)
    plan = Plan.from_dict(ckpt.plan or None, source=str(path))
    model = build_network(plan.network_fields())
    _load_weights(model, ckpt.model, path)
    return model.to(device).eval(), plan


def load_ensemble(sources: Sequence[str | Path], device: str | torch.device = "cpu"
                  ) -> tuple[list[nn.Module], Plan, list[Path]]:
    """The models of ``sources`` (checkpoints, run directories, cross-validation folders standing
    for each of their folds: ``swinssl.runs.resolve_checkpoints``, or exported predictors: ``.onnx``
    and ``.pt2`` files, ``load_exported``), their common plan, and their files.

    Raises ``CheckpointError`` naming two checkpoints and the first plan key where they differ: the
    members of an ensemble must see the same preprocessed input and predict the same classes.
    """
    if not sources:
        raise ValueError("load_ensemble: no model given")
    checkpoints = []
    for source in sources:
        for checkpoint in resolve_checkpoints(source):
            if checkpoint.name == "last.pt" and Path(source).is_dir():
                log.warning("%s: no best.pt (the fine-tuning validated on no case, so none was kept): predicting "
                            "with %s, the last step's weights", source, checkpoint)
            checkpoints.append(checkpoint)
    models, plans = [], []
    for checkpoint in checkpoints:
        model, plan = load_exported(checkpoint, device) if is_exported(checkpoint) else load_model(checkpoint, device)
        difference = plan_difference(plans[0], plan) if plans else None
        if difference:
            key, first, this = difference
            raise CheckpointError(f"{checkpoint}: its plan differs from that of {checkpoints[0]} at {key} "
                                  f"({this!r} vs {first!r}); an ensemble needs models of one plan")
        models.append(model)
        plans.append(plan)
    return models, plans[0], checkpoints


def _finetune_checkpoint(data: Any, path: Path) -> Checkpoint:
    if not isinstance(data, Mapping) or data.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a swinssl checkpoint; predict needs a fine-tuned checkpoint or run directory (swinssl finetune)"
        )
    ckpt = Checkpoint.from_dict(data, str(path))
    if ckpt.kind != "finetune":
        raise CheckpointError(
            f"{path}: a {ckpt.kind!r} checkpoint holds no segmentation head; fine-tune it first (swinssl finetune) "
            "and predict with that run"
        )
    return ckpt


def _load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Strict load: a prediction from half-loaded weights would look plausible and be wrong."""
    state = {filter_swinssl(k): v for k, v in state.items()}  # DDP / torch.compile prefixes
    load_exactly(model, state, f"{path}: weights do not fit the network of its plan")
