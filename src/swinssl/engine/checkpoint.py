"""What the engine does with checkpoints beyond the envelope (``swinssl.checkpoint``): the random
number generators' state, and the start of a stage from pre-trained weights."""

from __future__ import annotations

import torch

from swinssl.checkpoint import read_checkpoint
from swinssl.config import ModelConfig
from swinssl.plan import adopt_architecture, architecture_of
from swinssl.runs import resolve_checkpoint


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def pretrained_start(source: str, model: ModelConfig) -> tuple[dict, ModelConfig]:
    """A pre-trained checkpoint (a file, or a run directory's checkpoints/last.pt) and ``model``
    with the architecture its plan holds adopted, saying what changed."""
    weights = read_checkpoint(resolve_checkpoint(source, prefer_best=False))
    return weights, adopt_architecture(model, architecture_of(weights.get("plan"), source), source)
