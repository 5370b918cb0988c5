"""Checkpoints: written atomically, read with ``weights_only=True``.

Format (a dict of tensors and plain data, so it loads without unpickling code)::

    {"format": "swinssl", "version": str, "kind": "pretrain" | "finetune", "step": int,
     "model": state dict, "optimizer": ..., "scheduler": ..., "rng": {"torch": ByteTensor, ...},
     "plan": swinssl.plan.Plan.to_dict(), "metrics": {...}, "best_dice": float (fine-tuning)}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from swinssl.config import ModelConfig
from swinssl.errors import CheckpointError, TrainingError
from swinssl.nn.load import read_checkpoint
from swinssl.plan import adopt_architecture, architecture_of
from swinssl.runs import resolve_checkpoint
from swinssl.utils import atomic_path, writable_dir


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` via a temporary file, fsync and rename: never half a file.

    A failed write (full disk, quota, unwritable folder) raises ``TrainingError`` naming the
    file; the previous checkpoint at ``path`` stays as it was and no temporary is left.
    """
    path = Path(path)
    try:
        # Through a Python file: torch.save on a path hides ENOSPC behind a zip-writer RuntimeError.
        with atomic_path(path, suffix=".pt") as tmp, open(tmp, "wb") as f:
            torch.save(state, f)
    except OSError as err:
        kept = "the previous checkpoint there is unchanged" if path.is_file() else "no checkpoint was written"
        raise TrainingError(f"{path}: cannot write the checkpoint ({err.strerror or err}); {kept}") from err
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint without executing code (``CheckpointError`` with the path otherwise)."""
    return read_checkpoint(path)


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def export_weights(source: str | Path, out: str | Path) -> Path:
    """Write the model weights of a checkpoint (or run directory) as ``.safetensors``: tensors
    and a JSON plan only, so the file can be shared and loaded without any pickle. ``predict``,
    ``load_pretrained`` and ``finetune.pretrained`` read it like the checkpoint itself."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise CheckpointError("swinssl export needs the safetensors package (pip install safetensors)") from None
    out = Path(out)
    if out.suffix != ".safetensors":
        raise CheckpointError(f"{out}: the exported file's name must end in .safetensors")
    path = resolve_checkpoint(source)
    ckpt = load_checkpoint(path)
    if ckpt.get("format") != "swinssl" or not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"{path}: not a swinssl checkpoint (export reads pretrain and finetune checkpoints)")
    weights = ckpt["model"]
    meta = {"format": "swinssl", "version": str(ckpt.get("version")), "kind": str(ckpt.get("kind")),
            "step": str(ckpt.get("step", 0)), "plan": json.dumps(ckpt.get("plan", {})), "source": str(path)}
    writable_dir(out.parent)
    with atomic_path(out, suffix=".safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp), metadata=meta)
    return out


def pretrained_start(source: str, model: ModelConfig) -> tuple[dict, ModelConfig]:
    """A pre-trained checkpoint (a file, or a run directory's checkpoints/last.pt) and ``model``
    with the architecture its plan holds adopted, saying what changed."""
    weights = read_checkpoint(resolve_checkpoint(source, prefer_best=False))
    return weights, adopt_architecture(model, architecture_of(weights.get("plan"), source), source)
